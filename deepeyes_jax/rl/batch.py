"""Packing trajectories into the training batch: tokens, positions, masks and images, split into
micro-batches of equal, bucketed shapes.

Each trajectory keeps its own images (the original and every crop, with their patches and grids) and
M-RoPE positions from the sampler, so nothing is re-tokenised or re-processed. Letters: M micro-batches,
b rows per micro-batch, T bucketed sequence length.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flax import struct

from deepeyes_jax.model import vision as vision_lib
from deepeyes_jax.model.config import VisionConfig
from deepeyes_jax.model.vision import VisionInputs, make_vision_inputs, window_layout
from deepeyes_jax.sampling.rollout import Trajectory
from deepeyes_jax.utils import buckets


@struct.dataclass
class TrainBatch:
    """Arrays of one update, stacked over micro-batches.

    Attributes:
      input_ids: [M, b, T] prompt + response, right-padded.
      attention_mask: [M, b, T] 0 on padding, else the trajectory's segment number in its row (1 unless
        packed).
      positions: [M, 3, b, T] M-RoPE positions.
      loss_mask: [M, b, T] 1 on tokens the policy sampled (never prompt, observation, forced, padding).
      sampler_logprobs: [M, b, T] the sampler's log-probs of those tokens (0 elsewhere).
      old_logprobs: [M, b, T] behaviour log-probs used in the ratio (the trainer's recomputation by
        default, else the sampler's; unread with `old_logprobs="current"`).
      advantages: [M, b, T] each trajectory's advantage on its tokens (or [M, b], one per row).
      vision: the images of each micro-batch (VisionInputs with a leading M axis).
      num_tokens: [M] sampled tokens per micro-batch (their sum is the token-mean normaliser).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    positions: np.ndarray
    loss_mask: np.ndarray
    sampler_logprobs: np.ndarray
    old_logprobs: np.ndarray
    advantages: np.ndarray
    vision: VisionInputs
    num_tokens: np.ndarray


def _first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of trajectory indices, each row's lengths summing to at most `capacity` (first fit by
    decreasing length)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def pack(trajs: Sequence[Trajectory], advantages: np.ndarray, vision_cfg: VisionConfig, micro_batches: int,
         min_length: int = 128, min_windows: int = 4, length_multiple: int = 0, packed: bool = False,
         row_multiple: int = 4, window_multiple: int = 0) -> TrainBatch:
    """Packs B trajectories into a TrainBatch of `micro_batches` micro-batches: sequence length and
    vision windows bucketed by `bucket_length` (`length_multiple`, `window_multiple`; 0 is powers of
    two).

    Unpacked, each row holds one trajectory (B divisible by `micro_batches`). With `packed`, rows hold
    as many trajectories as fit (`_first_fit`), told apart by `attention_mask` holding each one's
    segment number (1, 2, ...; `text.causal_mask` keeps attention inside a segment); each keeps its own
    M-RoPE positions, and the advantages are per token. The loss is the unpacked one, with less padding
    computed: one trajectory per row, a Mini-V* GRPO batch is a quarter padding. Rows per micro-batch
    are padded to a multiple of `row_multiple` so that few shapes (programs) occur.
    """
    b_total = len(trajs)
    lengths = [len(tr.input_ids) for tr in trajs]
    t = buckets.bucket_length(max(lengths), min_length, length_multiple)
    if packed:
        filled = _first_fit(lengths, t)
        b = -(-len(filled) // micro_batches)
        b = -(-b // row_multiple) * row_multiple
        # row i to micro-batch i % M (the fullest rows spread over them), then empty rows
        per = [filled[m::micro_batches] for m in range(micro_batches)]
        rows = [row for part in per for row in part + [[]] * (b - len(part))]
    else:
        if b_total % micro_batches:
            raise ValueError(f"{b_total} trajectories do not split into {micro_batches} micro-batches")
        b = b_total // micro_batches
        rows = [[i] for i in range(b_total)]
    adv_in = np.asarray(advantages, np.float32).reshape(-1)
    window = vision_cfg.window_patches
    # Each micro-batch's trajectories in the order their image tokens appear (row-major).
    groups = [[trajs[i] for row in rows[m * b:(m + 1) * b] for i in row] for m in range(micro_batches)]
    grids = [np.concatenate([tr.image_grid_thw for tr in g]) if g else np.zeros((0, 3), np.int64)
             for g in groups]
    need = max(len(window_layout(grid, vision_cfg)["src"]) // window for grid in grids)
    windows = buckets.bucket_length(need, min_windows, window_multiple, "window_multiple")
    # Full-attention vision layers attend per image in blocks of the largest image's windows (a static
    # field, bucketed to a power of two: a new bucket means a new program, see `rl/trainer.py`).
    largest = max(vision_lib.image_windows(grid, vision_cfg) for grid in grids if len(grid))
    image_windows = buckets.pow2(largest, 1)

    ids = np.zeros((micro_batches, b, t), np.int32)
    mask = np.zeros_like(ids)
    pos = np.zeros((micro_batches, 3, b, t), np.int32)
    loss_mask = np.zeros_like(ids)
    logp = np.zeros((micro_batches, b, t), np.float32)
    adv = np.zeros((micro_batches, b, t), np.float32)
    visions = []
    for m in range(micro_batches):
        for r, row in enumerate(rows[m * b:(m + 1) * b]):
            at = 0
            for seg, i in enumerate(row, start=1):
                tr = trajs[i]
                n, p = len(tr.input_ids), len(tr.prompt_ids)
                ids[m, r, at:at + n] = tr.input_ids
                mask[m, r, at:at + n] = seg
                pos[m, :, r, at:at + n] = tr.positions
                loss_mask[m, r, at + p:at + n] = tr.action_mask
                logp[m, r, at + p:at + n] = np.where(tr.action_mask > 0, tr.logprobs, 0.0)
                adv[m, r, at:at + n] = adv_in[i]
                at += n
        g = groups[m]
        pixels = (np.concatenate([tr.pixel_values for tr in g]) if g
                  else np.zeros((0, vision_cfg.patch_dim), np.float32))
        visions.append(make_vision_inputs(pixels, grids[m], vision_cfg, num_windows=windows,
                                          num_tokens=windows * vision_cfg.window_tokens,
                                          max_image_windows=image_windows))
    vision = VisionInputs(**{k: np.stack([getattr(v, k) for v in visions])
                             for k in ("patches", "rows", "cols", "image_ids", "token_index")},
                          image_windows=image_windows)
    return TrainBatch(input_ids=ids, attention_mask=mask, positions=pos, loss_mask=loss_mask,
                      sampler_logprobs=logp, old_logprobs=logp.copy(), advantages=adv,
                      vision=vision, num_tokens=loss_mask.sum(axis=(1, 2)).astype(np.float32))

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


@struct.dataclass
class TrainBatch:
    """Arrays of one update, stacked over micro-batches.

    Attributes:
      input_ids, attention_mask: [M, b, T] prompt + response, right-padded.
      positions: [M, 3, b, T] M-RoPE positions.
      loss_mask: [M, b, T] 1 on tokens the policy sampled (never prompt, observation, forced, padding).
      sampler_logprobs: [M, b, T] the sampler's log-probs of those tokens (0 elsewhere).
      old_logprobs: [M, b, T] behaviour log-probs used in the ratio (the trainer's recomputation by
        default, else the sampler's).
      advantages: [M, b] per trajectory (broadcast to its tokens).
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


def _pow2(n: int, minimum: int) -> int:
    b = max(minimum, 1)
    while b < n:
        b *= 2
    return b


def pack(trajs: Sequence[Trajectory], advantages: np.ndarray, vision_cfg: VisionConfig, micro_batches: int,
         min_length: int = 128, min_windows: int = 4) -> TrainBatch:
    """Packs B trajectories (B divisible by `micro_batches`) into a TrainBatch with pow2 buckets."""
    b_total = len(trajs)
    if b_total % micro_batches:
        raise ValueError(f"{b_total} trajectories do not split into {micro_batches} micro-batches")
    b = b_total // micro_batches
    t = _pow2(max(len(tr.input_ids) for tr in trajs), min_length)
    window = vision_cfg.window_merge_units**2 * vision_cfg.merge_unit
    groups = [trajs[m * b:(m + 1) * b] for m in range(micro_batches)]
    grids = [np.concatenate([tr.image_grid_thw for tr in g]) for g in groups]
    need = max(len(window_layout(grid, vision_cfg)["src"]) // window for grid in grids)
    windows = _pow2(need, min_windows)
    # Full-attention vision layers attend per image in blocks of the largest image's windows (a static
    # field, bucketed to a power of two: a new bucket means a new program, see `rl/trainer.py`).
    image_windows = _pow2(max(vision_lib.image_windows(grid, vision_cfg) for grid in grids), 1)

    ids = np.zeros((micro_batches, b, t), np.int32)
    mask = np.zeros_like(ids)
    pos = np.zeros((micro_batches, 3, b, t), np.int32)
    loss_mask = np.zeros_like(ids)
    logp = np.zeros((micro_batches, b, t), np.float32)
    visions = []
    for m, (g, grid) in enumerate(zip(groups, grids, strict=True)):
        for r, tr in enumerate(g):
            n, p = len(tr.input_ids), len(tr.prompt_ids)
            ids[m, r, :n] = tr.input_ids
            mask[m, r, :n] = 1
            pos[m, :, r, :n] = tr.positions
            loss_mask[m, r, p:n] = tr.action_mask
            logp[m, r, p:n] = np.where(tr.action_mask > 0, tr.logprobs, 0.0)
        pixels = np.concatenate([tr.pixel_values for tr in g])
        visions.append(make_vision_inputs(pixels, grid, vision_cfg, num_windows=windows,
                                          num_tokens=windows * vision_cfg.window_merge_units**2,
                                          max_image_windows=image_windows))
    vision = VisionInputs(**{k: np.stack([getattr(v, k) for v in visions])
                             for k in ("patches", "rows", "cols", "image_ids", "token_index")},
                          image_windows=image_windows)
    return TrainBatch(input_ids=ids, attention_mask=mask, positions=pos, loss_mask=loss_mask,
                      sampler_logprobs=logp, old_logprobs=logp.copy(),
                      advantages=np.asarray(advantages, np.float32).reshape(micro_batches, b),
                      vision=vision, num_tokens=loss_mask.sum(axis=(1, 2)).astype(np.float32))

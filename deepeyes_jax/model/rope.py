"""Multimodal rotary positions (M-RoPE): position ids for interleaved text and images, and the tables.

Position rule (as the reference's `get_rope_index` for still images): a text token takes `cur` on all
three rows (t, h, w) and advances `cur` by one; an image with merged grid (h', w') takes
t = cur, h = cur + row, w = cur + col (row-major), then `cur += max(h', w')`. Padding takes 0.
The rope delta of a row is max(position) + 1 - (number of real tokens); decoding continues at
position = index + delta.

Everything here is jittable: image runs are located with cumulative sums, not Python loops, so one
compiled function serves any interleaving of text and several images.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def mrope_positions(input_ids: jax.Array, attention_mask: jax.Array, image_grid_hw: jax.Array,
                    image_token_id: int, xp: Any = jnp) -> tuple[jax.Array, jax.Array]:
    """M-RoPE position ids for a batch.

    Args:
      input_ids: [B, T] token ids, image placeholders expanded (one `image_token_id` per merged patch).
      attention_mask: [B, T] 1 for real tokens, 0 for padding (left or right).
      image_grid_hw: [I, 2] merged grid (h/2, w/2) of every image, in order of appearance in the batch
        (row by row). Extra rows beyond the images present are ignored.
      image_token_id: id of `<|image_pad|>`.
      xp: the array module: `jnp` (in a jitted program) or `np` (on the host: eager `jnp` would
        dispatch and compile each operation for each new length).

    Returns:
      positions [3, B, T] int32 and rope deltas [B] int32.
    """
    real = attention_mask.astype(bool)
    is_img = (input_ids == image_token_id) & real
    b, t = input_ids.shape
    grid = xp.asarray(image_grid_hw, xp.int32).reshape(-1, 2)
    if grid.shape[0] == 0:  # text only: a dummy image that no token refers to
        grid = xp.ones((1, 2), xp.int32)
    sizes = grid[:, 0] * grid[:, 1]
    ends = xp.cumsum(sizes)  # exclusive end of each image in the global image-token order
    ordinal = xp.cumsum(is_img.reshape(-1)).reshape(b, t) - 1  # global index of an image token
    image = xp.searchsorted(ends, ordinal, side="right")  # which image a token belongs to
    image = xp.clip(image, 0, grid.shape[0] - 1)
    within = ordinal - (ends[image] - sizes[image])
    gw = grid[image, 1]
    row, col = within // xp.maximum(gw, 1), within % xp.maximum(gw, 1)
    last_of_image = is_img & (within == sizes[image] - 1)
    advance = xp.where(is_img, 0, real.astype(xp.int32))
    advance = xp.where(last_of_image, xp.max(grid[image], axis=-1), advance)
    base = xp.cumsum(advance, axis=1) - advance  # exclusive cumulative sum
    pos_t = base
    pos_h = base + xp.where(is_img, row, 0)
    pos_w = base + xp.where(is_img, col, 0)
    positions = xp.stack([pos_t, pos_h, pos_w]) * real[None]
    deltas = xp.max(positions, axis=(0, 2)) + 1 - real.sum(axis=1)
    return positions.astype(xp.int32), deltas.astype(xp.int32)


def text_positions(start: jax.Array, length: int) -> jax.Array:
    """[3, B, length] positions continuing text from per-row `start` [B] (decode and observations)."""
    p = start[:, None] + jnp.arange(length)[None, :]
    return jnp.broadcast_to(p[None], (3, *p.shape)).astype(jnp.int32)


def mrope_tables(positions: jax.Array, head_dim: int, theta: float,
                 section: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, H] in float32. Frequencies cover the full head dim; the first section[0] come
    from the t row, the next section[1] from h, the last section[2] from w (contiguous, not
    interleaved), then the half is repeated for rotate-half."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [3, B, T, H/2]
    which = jnp.concatenate([jnp.full((s,), i, jnp.int32) for i, s in enumerate(section)])
    f = jnp.where(which == 0, freqs[0], jnp.where(which == 1, freqs[1], freqs[2]))
    f = jnp.concatenate([f, f], axis=-1)
    return jnp.cos(f), jnp.sin(f)


def image_grid_hw(grid_thw, merge: int, xp: Any = jnp) -> jax.Array:
    """Merged (h', w') per image from the processor's grid_thw [I, 3] (`xp` as in mrope_positions)."""
    g = xp.asarray(grid_thw, xp.int32).reshape(-1, 3)
    return xp.stack([g[:, 1] // merge, g[:, 2] // merge], axis=-1)

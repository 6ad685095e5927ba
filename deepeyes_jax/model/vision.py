"""The Qwen2.5-VL vision tower with exact window attention, and its host-side input layout.

The reference permutes patches window-major (at merge-unit granularity) and runs variable-length
attention per window (`cu_window_seqlens`) or per image (`cu_seqlens`). Here the host lays the patches of
all images out in a padded window layout: every window owns `units^2` merge-unit slots (16 for 112 px
windows, i.e. 64 patches), empty slots are padding. Window layers then attend inside fixed [W, 64]
blocks (block-diagonal, exact, linear in the number of windows); full-attention layers attend within each
image through image ids: each window attends to the `image_windows` windows (the largest image's count)
from the start of its image (`image_attention`), so a batch of many images costs what its largest image
costs per window, not the square of the whole sequence. Images never see each other, and padding is
never attended to. The number of windows can be padded to a bucket so that one compiled program serves
many image sizes.

Letters: L padded patch sequence, W windows, P patches per window, U merge units, N heads, H head dim,
D vision width, E text width.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from deepeyes_jax.model import layers
from deepeyes_jax.model.config import VisionConfig
from deepeyes_jax.utils import buckets


@struct.dataclass
class VisionInputs:
    """Patches of one or more images in the padded window layout (see module docstring).

    Attributes:
      patches: [L, C*T*p*p] pixel rows; zeros in padding slots.
      rows, cols: [L] int32 patch coordinates inside their image (2-D rotary positions).
      image_ids: [L] int32 index of the image each patch belongs to; -1 for padding.
      token_index: [M] int32 for each output token (images in order, row-major merged grid), the merge
        unit in the padded layout (= patch position // 4) that produces it.
      image_windows: static; at least the number of windows of the largest image (None: unknown, full
        attention then spans the whole sequence under an image-id mask).
    """

    patches: jax.Array
    rows: jax.Array
    cols: jax.Array
    image_ids: jax.Array
    token_index: jax.Array
    image_windows: int | None = struct.field(pytree_node=False, default=None)

    @property
    def num_tokens(self) -> int:
        return self.token_index.shape[0]


def window_layout(grid_thw: np.ndarray, cfg: VisionConfig, num_windows: int | None = None,
                  num_tokens: int | None = None) -> dict[str, np.ndarray]:
    """Index arrays of the padded window layout for images with grids `grid_thw` [n, 3].

    Returns a dict with `src` [L] (index of the source patch in the reference's concatenated
    `pixel_values`, -1 for padding), `rows`, `cols`, `image_ids` [L] and `token_index` [M].
    `num_windows`/`num_tokens` pad to a bucket (extra windows are all padding; extra tokens read unit 0
    and must be ignored by the caller).
    """
    m, units = cfg.spatial_merge_size, cfg.window_merge_units
    per_unit = m * m
    src, rows, cols, img, tok = [], [], [], [], []
    patch_offset, slot_offset = 0, 0
    for i, (t, gh, gw) in enumerate(np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)):
        if t != 1:
            raise ValueError(f"grid_thw[{i}]={[int(t), int(gh), int(gw)]}: only still images (t=1) are "
                             "supported")
        if gh % m or gw % m:
            raise ValueError(f"grid_thw[{i}]={[int(t), int(gh), int(gw)]}: height and width must be "
                             f"multiples of spatial_merge_size={m}")
        lh, lw = gh // m, gw // m
        nwh, nww = -(-lh // units), -(-lw // units)
        unit = np.full((nwh * units, nww * units), -1, np.int64)
        unit[:lh, :lw] = np.arange(lh * lw).reshape(lh, lw)
        # Window-major order, row-major inside each window (as the reference's window_index).
        order = unit.reshape(nwh, units, nww, units).transpose(0, 2, 1, 3).reshape(-1)
        valid = order >= 0
        u = np.where(valid, order, 0)
        j = np.arange(per_unit)
        patch = (u[:, None] * per_unit + j[None, :])  # patches of a unit are contiguous in pixel_values
        ur, uc = u // lw, u % lw
        src.append(np.where(valid[:, None], patch + patch_offset, -1).reshape(-1))
        rows.append(np.where(valid[:, None], ur[:, None] * m + j[None, :] // m, 0).reshape(-1))
        cols.append(np.where(valid[:, None], uc[:, None] * m + j[None, :] % m, 0).reshape(-1))
        img.append(np.repeat(np.where(valid, i, -1), per_unit))
        slot_of_unit = np.empty(lh * lw, np.int64)
        slot_of_unit[order[valid]] = np.nonzero(valid)[0]
        tok.append(slot_of_unit + slot_offset)
        patch_offset += lh * lw * per_unit
        slot_offset += order.size
    window = units * units * per_unit
    length = sum(len(s) for s in src)
    if num_windows is not None:
        if num_windows * window < length:
            raise ValueError(f"num_windows={num_windows} is below the {length // window} windows these "
                             "images need")
        pad = num_windows * window - length
        src.append(np.full(pad, -1))
        rows.append(np.zeros(pad, np.int64))
        cols.append(np.zeros(pad, np.int64))
        img.append(np.full(pad, -1))
    token_index = np.concatenate(tok) if tok else np.zeros(0, np.int64)
    if num_tokens is not None:
        if num_tokens < len(token_index):
            raise ValueError(f"num_tokens={num_tokens} is below the {len(token_index)} tokens needed")
        token_index = np.concatenate([token_index, np.zeros(num_tokens - len(token_index), np.int64)])
    cat = lambda xs: np.concatenate(xs).astype(np.int32) if xs else np.zeros(0, np.int32)
    return dict(src=cat(src), rows=cat(rows), cols=cat(cols), image_ids=cat(img),
                token_index=token_index.astype(np.int32))


def image_windows(grid_thw: np.ndarray, cfg: VisionConfig) -> int:
    """Windows of the largest image in the padded layout (0 for no images)."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    units = cfg.spatial_merge_size * cfg.window_merge_units
    return int((-(-grid[:, 1] // units) * -(-grid[:, 2] // units)).max(initial=0))


def make_vision_inputs(pixel_values: np.ndarray, grid_thw: np.ndarray, cfg: VisionConfig,
                       num_windows: int | None = None, num_tokens: int | None = None,
                       max_image_windows: int | None = None) -> VisionInputs:
    """Builds `VisionInputs` from the image processor's concatenated `pixel_values` [sum(t*h*w), 1176].

    `max_image_windows` (static, default: exactly the largest image's) may be raised to a bucket so that
    image sets with different largest images share one compiled program.
    """
    pixel_values = np.asarray(pixel_values)
    grid_thw = np.asarray(grid_thw).reshape(-1, 3)
    need = image_windows(grid_thw, cfg)
    if max_image_windows is not None and max_image_windows < need:
        raise ValueError(f"max_image_windows={max_image_windows} is below the {need} windows of the "
                         "largest image")
    expected = int(np.prod(grid_thw, axis=1).sum())
    if pixel_values.shape != (expected, cfg.patch_dim):
        raise ValueError(f"pixel_values has shape {pixel_values.shape} but grid_thw "
                         f"{grid_thw.tolist()} needs ({expected}, {cfg.patch_dim})")
    lay = window_layout(grid_thw, cfg, num_windows, num_tokens)
    src = lay["src"]
    if len(pixel_values):
        patches = np.where((src >= 0)[:, None], pixel_values[np.maximum(src, 0)], 0).astype(np.float32)
    else:  # no image (a micro-batch of padding rows): all padding
        patches = np.zeros((len(src), cfg.patch_dim), np.float32)
    return VisionInputs(patches=patches, rows=lay["rows"], cols=lay["cols"],
                        image_ids=lay["image_ids"], token_index=lay["token_index"],
                        image_windows=max(max_image_windows or need, 1))


def image_attention(q: jax.Array, k: jax.Array, v: jax.Array, image_ids: jax.Array, window: int,
                    max_windows: int | None) -> jax.Array:
    """Exact attention of every patch to the real patches of its own image.

    Every window belongs to one image and each image's windows are contiguous, so the keys of a window's
    queries lie in the `max_windows` windows (the largest image's count) starting at the first window of
    its image: each window attends to that span under an image-id mask, W x P x (max_windows x P)
    scores in all instead of L x L. When the span is over half the sequence (one image, or a few
    similar ones), one dense [L, L] image-id mask costs less.

    Args:
      q, k, v: [L, N, H] with L a multiple of `window`.
      image_ids: [L] image of each patch, -1 for padding (never attended to).
      window: patches per window (P).
      max_windows: at least the largest image's window count (None: unknown, dense).
    Returns:
      [L, N, H].
    """
    w = q.shape[0] // window
    span = w if max_windows is None else min(max_windows, w)
    if 2 * span > w:
        mask = (image_ids[:, None] == image_ids[None, :]) & (image_ids >= 0)[None, :]  # [L, L]
        return layers.attention(q[None], k[None], v[None], mask[None])[0]
    windows = lambda a: a.reshape(w, window, *a.shape[1:])  # [W, P, ...]
    win_img = windows(image_ids).max(axis=1)  # [W]; every real window holds a real patch
    idx = jnp.arange(w)
    first = jnp.concatenate([jnp.ones((1,), bool), win_img[1:] != win_img[:-1]])
    start = jax.lax.cummax(jnp.where(first, idx, 0))  # [W] first window of each window's image
    # dynamic_slice clamps a start past W - span down, which still covers the image.
    take = lambda a: jax.vmap(lambda s0: jax.lax.dynamic_slice_in_dim(windows(a), s0, span))(start).reshape(
        w, span * window, *a.shape[1:])  # [W, span x P, ...]
    k_ids = take(image_ids)
    mask = (windows(image_ids)[:, :, None] == k_ids[:, None, :]) & (k_ids >= 0)[:, None, :]  # [W, P, S]
    return layers.attention(windows(q), take(k), take(v), mask).reshape(q.shape)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        n, h, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
        self.qkv = layers.Dense((d,), (3, n, h), ("embed",), (None, "heads", "head_dim"), bias=True,
                                dtype=dtype, rngs=rngs)
        self.proj = layers.Dense((n, h), (d,), ("heads", "head_dim"), ("embed",), bias=True,
                                 dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, image_ids: jax.Array, window: int,
                 full: bool, image_windows: int | None) -> jax.Array:
        """x [L, D]; image_ids [L] (-1 padding). Full attention attends within each image (see
        `image_attention`), window attention inside blocks of `window` patches."""
        qkv = self.qkv(x)  # [L, 3, N, H]
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
        if full:
            out = image_attention(q, k, v, image_ids, window, image_windows)
        else:
            blocks = lambda a: a.reshape(-1, window, *a.shape[1:])  # [W, P, ...]
            key_ok = blocks(image_ids >= 0)[:, None, :]  # [W, 1, P]
            out = layers.attention(blocks(q), blocks(k), blocks(v), key_ok).reshape(q.shape)
        return self.proj(out)


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.norm1 = layers.RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype, rngs=rngs)
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)
        self.norm2 = layers.RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype, rngs=rngs)
        self.mlp = layers.GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=True,
                                   dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, image_ids, window, full, image_windows):
        x = x + self.attn(self.norm1(x), cos, sin, image_ids, window, full, image_windows)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, then each 2x2 group of patches (4 consecutive rows) -> Linear, exact GELU, Linear."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        d4 = cfg.hidden_size * cfg.merge_unit
        self.ln_q = layers.RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype, rngs=rngs)
        self.fc1 = layers.Dense((d4,), (d4,), ("embed",), ("mlp",), bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = layers.Dense((d4,), (cfg.out_hidden_size,), ("mlp",), ("embed",), bias=True,
                                dtype=dtype, rngs=rngs)
        self.d4 = d4

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x).reshape(-1, self.d4)  # [U, 4D]
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.patch_embed = layers.Dense((cfg.patch_dim,), (cfg.hidden_size,), ("patch",), ("embed",),
                                        bias=False, dtype=param_dtype, rngs=rngs)
        self.blocks = nnx.List([VisionBlock(cfg, dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, dtype=param_dtype, rngs=rngs)

    def rotary(self, rows: jax.Array, cols: jax.Array) -> tuple[jax.Array, jax.Array]:
        """2-D rotary tables [L, H] in float32: row frequencies then column frequencies, twice."""
        quarter = self.cfg.head_dim // 2
        inv = 1.0 / (self.cfg.rope_theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
        f = jnp.concatenate([rows[:, None].astype(jnp.float32) * inv,
                             cols[:, None].astype(jnp.float32) * inv], axis=-1)
        f = jnp.concatenate([f, f], axis=-1)
        return jnp.cos(f), jnp.sin(f)

    def __call__(self, inputs: VisionInputs, remat: bool = False) -> jax.Array:
        """Returns merged image features [M, E] in token order (images in order, row-major).
        `remat` recomputes each block in the backward pass instead of storing its activations."""
        cfg = self.cfg
        window = cfg.window_patches
        x = self.patch_embed(inputs.patches.astype(self.dtype))  # [L, D]
        cos, sin = self.rotary(inputs.rows, inputs.cols)
        ids, n = inputs.image_ids, inputs.image_windows
        full = lambda blk, x: blk(x, cos, sin, ids, window, True, n)
        windowed = lambda blk, x: blk(x, cos, sin, ids, window, False, n)
        if remat:
            full, windowed = nnx.remat(full), nnx.remat(windowed)
        for i, block in enumerate(self.blocks):
            x = (full if i in cfg.fullatt_block_indexes else windowed)(block, x)
        merged = self.merger(x)  # [U, E]
        return merged[inputs.token_index]


def pad_buckets(grid_thw: Sequence[Sequence[int]], cfg: VisionConfig,
                window_bucket: int = 8) -> tuple[int, int]:
    """Bucketed (num_windows, num_tokens) for a set of images: the next multiple of `window_bucket`
    windows, and the token count those windows can hold. Few shapes means few compilations."""
    lay = window_layout(np.asarray(grid_thw).reshape(-1, 3), cfg)
    window = cfg.window_patches
    windows = len(lay["src"]) // window
    windows = buckets.bucket_length(windows, window_bucket, window_bucket, "window_bucket")
    return windows, windows * cfg.window_tokens

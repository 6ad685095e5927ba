"""Vision tower: the padded window layout against a transcription of the reference's packed algorithm
(window_index permutation + per-window / per-image attention over cu_seqlens), and isolation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepeyes_jax.model import config, layers, vision


def reference_window_index(grid_thw, cfg):
    """The reference's get_vision_window_index, transcribed with numpy."""
    m, ws = cfg.spatial_merge_size, cfg.window_merge_units
    index, cu, offset = [], [0], 0
    for t, gh, gw in grid_thw:
        lh, lw = gh // m, gw // m
        idx = np.arange(t * lh * lw).reshape(t, lh, lw)
        ph, pw = ws - lh % ws, ws - lw % ws
        nh, nw = (lh + ph) // ws, (lw + pw) // ws
        padded = np.pad(idx, ((0, 0), (0, ph), (0, pw)), constant_values=-100)
        padded = padded.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, ws, ws)
        seqlens = (padded != -100).sum((2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * m * m + cu[-1]).tolist())
        offset += t * lh * lw
    return np.concatenate(index), np.unique(np.array(cu))


def reference_forward(tower, pixel_values, grid_thw):
    """Packed reference algorithm: permute window-major, attend per segment, merge, un-permute."""
    cfg = tower.cfg
    m = cfg.spatial_merge_size
    rows, cols = [], []
    for _, gh, gw in grid_thw:
        h, w = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        shape = (gh // m, m, gw // m, m)
        rows.append(h.reshape(shape).transpose(0, 2, 1, 3).reshape(-1))
        cols.append(w.reshape(shape).transpose(0, 2, 1, 3).reshape(-1))
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    win, cu_win = reference_window_index(grid_thw, cfg)
    cu_full = np.concatenate([[0], np.cumsum([t * h * w for t, h, w in grid_thw])])
    perm = (win[:, None] * 4 + np.arange(4)).reshape(-1)
    x = tower.patch_embed(jnp.asarray(pixel_values))[perm]
    cos, sin = tower.rotary(jnp.asarray(rows[perm]), jnp.asarray(cols[perm]))
    for i, blk in enumerate(tower.blocks):
        cu = cu_full if i in cfg.fullatt_block_indexes else cu_win
        h = blk.norm1(x)
        qkv = blk.attn.qkv(h)
        q = layers.apply_rotary(qkv[:, 0], cos, sin)
        k = layers.apply_rotary(qkv[:, 1], cos, sin)
        v = qkv[:, 2]
        outs = []
        for a, b in zip(cu[:-1], cu[1:], strict=True):
            ok = jnp.ones((1, b - a, b - a), bool)
            outs.append(layers.attention(q[None, a:b], k[None, a:b], v[None, a:b], ok)[0])
        x = x + blk.attn.proj(jnp.concatenate(outs))
        x = x + blk.mlp(blk.norm2(x))
    merged = tower.merger(x)
    return merged[np.argsort(win)]


@pytest.fixture(scope="module")
def tower():
    cfg = config.tiny().vision
    return vision.VisionTower(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(3))


GRIDS = [
    [[1, 8, 8]],                 # exactly one window
    [[1, 18, 26]],               # 9x13 merge units: partial windows on both edges
    [[1, 16, 16], [1, 2, 30]],   # two images, one a thin strip
    [[1, 4, 6], [1, 22, 10], [1, 10, 4]],
]


@pytest.mark.parametrize("grid", GRIDS)
def test_window_layout_matches_reference_algorithm(tower, grid):
    grid = np.array(grid)
    rng = np.random.default_rng(0)
    pv = rng.normal(size=(int(grid.prod(1).sum()), tower.cfg.patch_dim)).astype(np.float32)
    want = reference_forward(tower, pv, grid)
    got = tower(vision.make_vision_inputs(pv, grid, tower.cfg))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    # Bucket padding (extra empty windows, extra token slots) changes nothing real.
    padded = tower(vision.make_vision_inputs(pv, grid, tower.cfg, *vision.pad_buckets(grid, tower.cfg)))
    np.testing.assert_allclose(np.asarray(padded)[: len(want)], np.asarray(want), atol=1e-5, rtol=1e-5)


def test_images_never_attend_to_each_other(tower):
    grid = np.array([[1, 12, 12], [1, 8, 16]])
    rng = np.random.default_rng(1)
    pv = rng.normal(size=(int(grid.prod(1).sum()), tower.cfg.patch_dim)).astype(np.float32)
    n0 = 144
    base = np.asarray(tower(vision.make_vision_inputs(pv, grid, tower.cfg)))
    pv2 = pv.copy()
    pv2[n0:] = rng.normal(size=pv2[n0:].shape)
    other = np.asarray(tower(vision.make_vision_inputs(pv2, grid, tower.cfg)))
    np.testing.assert_array_equal(base[: n0 // 4], other[: n0 // 4])
    assert not np.allclose(base[n0 // 4:], other[n0 // 4:])


def test_layout_errors_name_the_problem(tower):
    with pytest.raises(ValueError, match="needs"):
        vision.make_vision_inputs(np.zeros((10, 1176), np.float32), np.array([[1, 4, 4]]), tower.cfg)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        vision.window_layout(np.array([[1, 5, 4]]), tower.cfg)
    with pytest.raises(ValueError, match="only still images"):
        vision.window_layout(np.array([[2, 4, 4]]), tower.cfg)
    with pytest.raises(ValueError, match="num_windows=1"):
        vision.window_layout(np.array([[1, 18, 26]]), tower.cfg, num_windows=1)


def test_layout_is_a_permutation_with_padding():
    cfg = config.tiny().vision
    lay = vision.window_layout(np.array([[1, 18, 26], [1, 6, 4]]), cfg)
    src = lay["src"]
    real = src[src >= 0]
    np.testing.assert_array_equal(np.sort(real), np.arange(18 * 26 + 24))
    assert len(src) % 64 == 0
    assert np.all((lay["image_ids"] >= 0) == (src >= 0))
    assert len(lay["token_index"]) == (18 * 26 + 24) // 4
    jax.block_until_ready(jnp.asarray(src))


def test_window_sizes_follow_the_geometry():
    """112 px windows of 14 px patches merged 2 x 2: 8 x 8 patches, 4 x 4 merged tokens; a window
    with a different size changes both, and the layout is cut into windows of exactly that size."""
    cfg = config.qwen2p5_vl_7b().vision
    assert (cfg.window_patches, cfg.window_tokens) == (64, 16)
    wide = dataclasses.replace(cfg, window_size=224)
    assert (wide.window_patches, wide.window_tokens) == (256, 64)
    for c in (cfg, wide):
        lay = vision.window_layout(np.array([[1, 18, 26]]), c)
        windows = len(lay["src"]) // c.window_patches
        assert windows * c.window_patches == len(lay["src"])
        assert vision.pad_buckets([[1, 18, 26]], c, window_bucket=1) == (windows, windows * c.window_tokens)

"""M-RoPE position ids: the jittable implementation against a direct transcription of the rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepeyes_jax.model import rope

IMG = 7


def reference_positions(ids, mask, grids):
    """Loop form of the reference rule (text +1; image t/h/w grid then cur += max(h', w'))."""
    b, t = ids.shape
    pos = np.zeros((3, b, t), np.int64)
    deltas = np.zeros(b, np.int64)
    it = iter(grids)
    for r in range(b):
        cur, i, out = 0, 0, []
        idx = np.nonzero(mask[r])[0]
        row = ids[r, idx]
        while i < len(row):
            if row[i] == IMG:
                h, w = next(it)
                for k in range(h * w):
                    out.append((cur, cur + k // w, cur + k % w))
                i += h * w
                cur += max(h, w)
            else:
                out.append((cur, cur, cur))
                cur += 1
                i += 1
        out = np.array(out).T
        pos[:, r, idx] = out
        deltas[r] = out.max() + 1 - len(idx)
    return pos, deltas


def random_batch(rng, b=3, t=90):
    """Rows of text and images with random grids, left padding of random length."""
    ids = np.full((b, t), 1, np.int64)
    mask = np.zeros((b, t), np.int64)
    grids = []
    for r in range(b):
        seq = []
        while True:
            if rng.random() < 0.4:
                h, w = int(rng.integers(1, 6)), int(rng.integers(1, 6))
                if len(seq) + h * w + 2 > t:
                    break
                seq += [2] + [IMG] * (h * w) + [3]
                grids.append((h, w))
            else:
                n = int(rng.integers(1, 6))
                if len(seq) + n > t:
                    break
                seq += list(rng.integers(10, 20, n))
        pad = t - len(seq)
        ids[r, pad:] = seq
        mask[r, pad:] = 1
    return ids, mask, grids


@pytest.mark.parametrize("seed", range(6))
def test_positions_match_reference_rule(seed):
    rng = np.random.default_rng(seed)
    ids, mask, grids = random_batch(rng)
    want, want_d = reference_positions(ids, mask, grids)
    grid = np.array(grids, np.int32).reshape(-1, 2)
    # Extra grid rows (bucket padding) must not change anything.
    grid = np.concatenate([grid, np.ones((3, 2), np.int32)])
    fn = jax.jit(rope.mrope_positions, static_argnums=3)
    got, got_d = fn(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(grid), IMG)
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(got_d), want_d)
    # The host (numpy) path gives the same, as numpy arrays.
    host, host_d = rope.mrope_positions(ids, mask, rope.image_grid_hw(np.c_[np.ones(len(grid)), grid * 2], 2,
                                                                      xp=np), IMG, xp=np)
    assert isinstance(host, np.ndarray) and isinstance(host_d, np.ndarray)
    np.testing.assert_array_equal(host, want)
    np.testing.assert_array_equal(host_d, want_d)


def test_text_only_and_decode_continuation():
    ids = np.array([[0, 0, 5, 6, 8], [5, 6, 8, 9, 10]])
    mask = (ids != 0).astype(np.int32)
    pos, d = rope.mrope_positions(ids, mask, np.zeros((0, 2), np.int32), IMG)
    np.testing.assert_array_equal(np.asarray(pos)[0], [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(np.asarray(d), [0, 0])
    nxt = rope.text_positions(jnp.array([3, 5]), 2)
    np.testing.assert_array_equal(np.asarray(nxt)[2], [[3, 4], [5, 6]])


def test_image_then_text_positions_by_hand():
    # one 2x3 merged image after two text tokens: t=2, h=2+row, w=2+col, then text resumes at 2+3.
    ids = np.array([[5, 6] + [IMG] * 6 + [8]])
    pos, d = rope.mrope_positions(ids, np.ones_like(ids), np.array([[2, 3]]), IMG)
    pos = np.asarray(pos)[:, 0]
    np.testing.assert_array_equal(pos[0], [0, 1, 2, 2, 2, 2, 2, 2, 5])
    np.testing.assert_array_equal(pos[1], [0, 1, 2, 2, 2, 3, 3, 3, 5])
    np.testing.assert_array_equal(pos[2], [0, 1, 2, 3, 4, 2, 3, 4, 5])
    assert int(d[0]) == 6 - 9


def test_mrope_tables_use_contiguous_sections():
    pos = jnp.stack([jnp.full((1, 1), 3), jnp.full((1, 1), 5), jnp.full((1, 1), 7)])
    cos, _ = rope.mrope_tables(pos, head_dim=12, theta=100.0, section=(1, 2, 3))
    inv = 1.0 / (100.0 ** (np.arange(0, 12, 2) / 12))
    src = np.array([3, 5, 5, 7, 7, 7])
    want = np.cos(np.concatenate([src * inv, src * inv]))
    np.testing.assert_allclose(np.asarray(cos)[0, 0], want, rtol=1e-6)

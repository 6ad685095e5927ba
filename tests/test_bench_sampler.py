"""Pieces the sampler benchmarks rely on: the per-image block attention of the vision tower equals the
dense image-id mask, and bench/tool_rollout.py counts the tokens each rollout strategy prefills right."""

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_path
from deepeyes_jax import load_pretrained
from deepeyes_jax.model import config, vision
from deepeyes_jax.sampling import Greedy, Prompt, RolloutConfig, Sampler, engine

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import tool_rollout  # noqa: E402  (bench/ is not a package)

# Windows per image: 1, 1, 1, 4, 4, 1, 4, 2, 2 -> 20 (24 padded); the largest has 4, so each window attends
# to the 4 windows from its image's start (spans reach into the next images and, at the end, get clamped).
GRID = np.array([[1, 8, 8]] * 3 + [[1, 16, 16], [1, 2, 30], [1, 4, 6], [1, 10, 12], [1, 16, 8], [1, 6, 14]])


def test_block_image_attention_equals_dense_mask():
    cfg = config.tiny().vision
    tower = vision.VisionTower(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(3))
    pv = np.random.default_rng(0).normal(size=(int(GRID.prod(1).sum()), cfg.patch_dim)).astype(np.float32)
    assert vision.image_windows(GRID, cfg) == 4
    windows, tokens = vision.pad_buckets(GRID, cfg)  # with padding windows at the end
    vis = vision.make_vision_inputs(pv, GRID, cfg, windows, tokens)
    assert vis.image_windows == 4 and windows >= 2 * 4  # the span path runs, not the dense mask
    dense = np.asarray(tower(vis.replace(image_windows=None)))
    np.testing.assert_allclose(np.asarray(tower(vis)), dense, atol=1e-6, rtol=1e-6)
    bucketed = vision.make_vision_inputs(pv, GRID, cfg, windows, tokens, max_image_windows=5)
    np.testing.assert_allclose(np.asarray(tower(bucketed)), dense, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="max_image_windows=3 is below the 4 windows"):
        vision.make_vision_inputs(pv, GRID, cfg, max_image_windows=3)


def test_token_accounting_helpers():
    source = np.array([engine.FORCED] * 3 + [engine.OBSERVATION] * 5 + [engine.SAMPLED] * 2
                      + [engine.OBSERVATION] * 4 + [engine.SAMPLED] * 6)
    traj = type("T", (), {"source": source})()
    turns, obs = tool_rollout.turn_structure(traj)
    assert (turns, obs) == ([3, 2, 6], [5, 4])
    assert tool_rollout.reprefill_contexts(10, turns, obs) == [10, 18, 24]
    assert tool_rollout.inplace_counts(10, turns, obs) == {"prefilled": 9 + 9, "decode_steps": 11}
    assert tool_rollout.reprefill_counts(10, turns, obs) == {"prefilled": 9 + 17 + 23, "decode_steps": 11}
    assert tool_rollout.reprefill_counts(10, turns, obs, whole_input=True) == {"prefilled": 52,
                                                                               "decode_steps": 8}


def test_reprefill_rollout_rebuilds_the_in_place_trajectory():
    """The re-prefill loop starts every turn from exactly the context the helpers count, and ends with
    the in-place sampler's sequence."""
    pre = load_pretrained(fixture_path("ckpt_tied"))
    forced = [tool_rollout.zoom_call((28, 28, 112, 112))]
    cfg = RolloutConfig(max_turns=2, max_turn_tokens=64, max_response_tokens=512,
                        banned_tokens=RolloutConfig().banned_tokens + ("<|im_end|>", "</tool_call>"))
    s = Sampler(pre.model, pre.tokenizer, pre.image_processor, cfg)
    image = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    [traj] = s([Prompt(image=image, question=tool_rollout.QUESTION)], forced=[forced])
    re = tool_rollout.reprefill_rollout(s, image, forced, Greedy())
    turns, obs = tool_rollout.turn_structure(traj)
    assert len(turns) == 2 and len(obs) == 1 and turns[-1] == 64
    np.testing.assert_array_equal(re["input_ids"], traj.input_ids)
    assert re["contexts"] == tool_rollout.reprefill_contexts(len(traj.prompt_ids), turns, obs)
    assert [len(t) for t in re["turns"]] == turns

"""GRPO: advantages and loss against hand computations, gradient masking, and the sharded update."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_path
from deepeyes_jax import load_pretrained
from deepeyes_jax.model import sharding
from deepeyes_jax.rl import batch as batch_lib
from deepeyes_jax.rl import grpo
from deepeyes_jax.rl import step as step_lib
from deepeyes_jax.sampling import Prompt, RolloutConfig, Sample, Sampler
from deepeyes_jax.utils import buckets


def test_group_advantages_by_hand():
    r = np.array([1.0, 0.0, 2.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = grpo.advantages("grpo", r, 4)
    g = np.array([1.0, 0.0, 2.0, 1.0])
    std = np.sqrt(((g - 1.0) ** 2).sum() / 3)  # unbiased
    np.testing.assert_allclose(adv[:4], (g - 1.0) / (std + 1e-6), rtol=1e-6)
    np.testing.assert_array_equal(adv[4:], 0.0)  # equal rewards: zero advantage
    np.testing.assert_allclose(grpo.advantages("mean_only", r, 4)[:4], g - 1.0)
    assert grpo.zero_std_fraction(r, 4) == 0.5
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        grpo.advantages("ppo", r, 4)
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        grpo.advantages("grpo", r, 3)


def test_select_groups_keeps_groups_with_a_signal_first():
    # five groups of 2: rewards differ in groups 1 and 3 only
    r = np.array([1.0, 1.0, 0.0, 2.0, 0.5, 0.5, 2.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(grpo.select_groups(r, 2, 0), np.arange(10))  # 0: every group
    np.testing.assert_array_equal(grpo.select_groups(r, 2, 2), [2, 3, 6, 7])
    np.testing.assert_array_equal(grpo.select_groups(r, 2, 1), [2, 3])  # the first in sampling order
    # fewer groups with a signal than asked for: equal-reward groups fill, in order, whole groups kept
    np.testing.assert_array_equal(grpo.select_groups(r, 2, 3), [0, 1, 2, 3, 6, 7])
    np.testing.assert_array_equal(grpo.select_groups(r, 2, 5), np.arange(10))
    with pytest.raises(ValueError, match=r"update_groups=6 with 5 groups sampled; use 0 \(all\) or 1..5"):
        grpo.select_groups(r, 2, 6)


def test_ppo_clip_and_dual_clip_by_hand():
    logp = jnp.log(jnp.array([[1.5, 0.5, 1.1, 5.0]]))  # ratios (old logp = 0)
    old = jnp.zeros((1, 4))
    adv = jnp.array([[1.0, -1.0, 2.0, -1.0]])
    loss, st = grpo.ppo_clip_loss(logp, old, adv, clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    # token 0: A>0, ratio 1.5 -> clipped at 1.2: max(-1.5, -1.2) = -1.2
    # token 1: A<0, ratio 0.5 -> max(0.5, 0.8) = 0.8; dual cap 3.0 not reached
    # token 2: A>0, ratio 1.1 -> unclipped: -2.2
    # token 3: A<0, ratio 5.0 -> max(5, 1.2) = 5 -> dual clip min(5, 3) = 3
    np.testing.assert_allclose(np.asarray(loss)[0], [-1.2, 0.8, -2.2, 3.0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(st["clipped"])[0], [1, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(st["dual_clipped"])[0], [0, 0, 0, 1])
    np.testing.assert_allclose(np.asarray(grpo.low_var_kl(jnp.log(2.0), jnp.log(1.0))),
                               0.5 - np.log(0.5) - 1, rtol=1e-6)


def _batch_case():
    """A tiny hand batch: 2 rows, 6 tokens, vocab 5; only some tokens are the policy's."""
    v = batch_lib.TrainBatch(
        input_ids=np.array([[1, 2, 3, 4, 0, 0], [1, 2, 3, 4, 2, 1]], np.int32),
        attention_mask=np.array([[1, 1, 1, 1, 0, 0], [1] * 6], np.int32),
        positions=np.zeros((3, 2, 6), np.int32),
        loss_mask=np.array([[0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 1]], np.int32),
        sampler_logprobs=np.zeros((2, 6), np.float32), old_logprobs=np.full((2, 6), -1.5, np.float32),
        advantages=np.array([1.0, -0.5], np.float32), vision=None, num_tokens=np.array(4.0, np.float32))
    return v


def test_loss_by_hand_and_zero_gradient_off_policy_tokens():
    mb = _batch_case()
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 5)), jnp.float32)
    cfg = step_lib.UpdateConfig(dual_clip=None)
    # Old log-probs near the current ones (ratios 0.9-1.1: unclipped, so every policy token has a gradient).
    cur = np.asarray(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], -1),
                                         mb.input_ids[:, 1:, None], -1)[..., 0])
    shift = np.random.default_rng(1).uniform(-0.1, 0.1, size=cur.shape)
    mb = mb.replace(old_logprobs=np.pad(cur + shift, ((0, 0), (1, 0))).astype(np.float32))
    loss, st = step_lib.loss_from_logits(logits, mb, None, jnp.float32(4.0), cfg)
    logp = jax.nn.log_softmax(logits, -1)
    total = 0.0
    for r, t in [(0, 2), (1, 2), (1, 3), (1, 5)]:  # token t is predicted at position t - 1
        ratio = float(jnp.exp(logp[r, t - 1, mb.input_ids[r, t]] - mb.old_logprobs[r, t]))
        a = float(mb.advantages[r])
        total += max(-a * ratio, -a * np.clip(ratio, 0.8, 1.2))
    np.testing.assert_allclose(float(loss), total / 4, rtol=1e-5)
    assert float(st["tokens"]) == 4
    grad = jax.grad(lambda lg: step_lib.loss_from_logits(lg, mb, None, jnp.float32(4.0), cfg)[0])(logits)
    grad = np.asarray(grad)
    used = {(0, 1), (1, 1), (1, 2), (1, 4)}
    for r in range(2):
        for t in range(6):
            if (r, t) in used:
                assert np.abs(grad[r, t]).sum() > 0
            else:  # prompt, observation and padding positions: exactly zero
                assert np.all(grad[r, t] == 0.0), (r, t)


@pytest.fixture(scope="module")
def update_rollouts():
    """Four rollouts of the tiny checkpoint (185 tokens each, one image each) and their advantages."""
    pre = load_pretrained(fixture_path("ckpt_tied"))
    gold = np.load(fixture_path("golden_ckpt_tied.npz"))
    s = Sampler(pre.model, pre.tokenizer, pre.image_processor,
                RolloutConfig(max_turn_tokens=12, max_response_tokens=512))
    pieces = json.loads(fixture_path("golden_cases.json").read_text())["interleaved"]["turns"]
    prompt = Prompt(image=gold["single_image0"], prompt_ids=gold["single_input_ids"][0].tolist())
    trajs = s([prompt], 4, Sample(), jax.random.key(1), forced=[[pieces[0]], None, [pieces[0]], None])
    return pre, trajs, grpo.advantages("grpo", np.array([1.0, 0.0, 2.0, 0.5]), 4)


@pytest.fixture(scope="module")
def update_case(update_rollouts):
    pre, trajs, adv = update_rollouts
    return pre, batch_lib.pack(trajs, adv, pre.config.vision, micro_batches=2)


def _grads(pre, batch, mesh, rules, cfg=None):
    cfg = cfg or step_lib.UpdateConfig(lr=1e-3)
    opt = step_lib.make_optimizer(pre.model, cfg)
    graphdef, state = nnx.split((pre.model, opt))
    sh = sharding.state_shardings(state, mesh, rules)
    state = jax.device_put(state, sh)
    bsh = step_lib.batch_shardings(batch, mesh, rules)
    dev = jax.tree.map(lambda x, s: sharding.place(np.asarray(x), s), batch, bsh)
    fn = jax.jit(lambda s, b: step_lib.compute_grads(graphdef, s, b, None, cfg))
    with jax.set_mesh(mesh):
        grads, stats = fn(state, dev)
    return jax.device_get(grads), jax.device_get(stats)


def test_sharded_update_equals_unsharded(update_case):
    pre, batch = update_case
    assert batch.loss_mask.sum() > 0 and len(batch.vision.patches) == 2
    one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    want_g, want_s = _grads(pre, batch, one, sharding.get_rules("fsdp"))
    for shape, rules in [((2, 2, 2), "fsdp_tp"), ((1, 8, 1), "fsdp")]:
        got_g, got_s = _grads(pre, batch, sharding.make_mesh(shape), sharding.get_rules(rules))
        np.testing.assert_allclose(got_s["loss"], want_s["loss"], atol=1e-5, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_update_step_and_recomputed_logprobs(update_case):
    pre, batch = update_case
    cfg = step_lib.UpdateConfig(lr=1e-3)
    opt = step_lib.make_optimizer(pre.model, cfg)
    graphdef, state = nnx.split((pre.model, opt))
    mesh = sharding.make_mesh((1, -1, 1))
    rules = sharding.get_rules("fsdp")
    # A copy: the update donates its input, and the module's model is shared with other tests.
    state = jax.tree.map(jnp.copy, jax.device_put(state, sharding.state_shardings(state, mesh, rules)))
    steps = step_lib.compile_steps(graphdef, state, batch, mesh, rules, cfg, with_ref=False)
    dev = jax.tree.map(lambda x, s: sharding.place(np.asarray(x), s), batch, steps.batch_shardings)
    with jax.set_mesh(mesh):
        logp = np.asarray(steps.logprobs(state, dev))
        mask = batch.loss_mask > 0
        # The trainer's recomputation equals the sampler's log-probs (same weights, same tokens).
        np.testing.assert_allclose(logp[mask], batch.sampler_logprobs[mask], atol=2e-5)
        before = np.asarray(state[0]["embed"][...]).copy()
        state, m = steps.update(state, dev.replace(old_logprobs=jnp.asarray(logp)), None)
    assert abs(float(m["update/ratio"]) - 1.0) < 1e-5 and float(m["update/clipfrac"]) == 0.0
    assert float(m["update/grad_norm"]) > 0 and float(m["update/tokens"]) == mask.sum()
    assert not np.array_equal(np.asarray(state[0]["embed"][...]), before)


def test_current_old_logprobs_give_the_recomputed_update(update_case):
    """old_logprobs="current" (the update's own forward pass, gradient stopped) gives the loss and
    gradients of old log-probs recomputed by a separate pass, which it saves; a deliberately stale
    batch field is ignored."""
    pre, batch = update_case
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = sharding.get_rules("fsdp")
    cfg = step_lib.UpdateConfig(lr=1e-3)
    graphdef, state = nnx.split((pre.model, step_lib.make_optimizer(pre.model, cfg)))
    steps = step_lib.compile_steps(graphdef, state, batch, mesh, rules, cfg, with_ref=False)
    with jax.set_mesh(mesh):
        recomputed = np.asarray(steps.logprobs(state, steps.place(batch)))
    # A positive and a negative advantage in every micro-batch would be clipped by a shifted old log-prob.
    want_g, want_s = _grads(pre, batch.replace(old_logprobs=recomputed), mesh, rules, cfg)
    stale = batch.replace(old_logprobs=recomputed + 0.5)
    got_g, got_s = _grads(pre, stale, mesh, rules, step_lib.UpdateConfig(lr=1e-3, old_logprobs="current"))
    off_g, _ = _grads(pre, stale, mesh, rules, cfg)
    np.testing.assert_allclose(got_s["loss"], want_s["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_s["ratio"], got_s["tokens"], rtol=1e-6)  # every ratio exactly 1
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    # the stale old log-probs do change the gradients when read from the batch
    assert any(not np.allclose(a, b, atol=1e-6, rtol=1e-4)
               for a, b in zip(jax.tree.leaves(off_g), jax.tree.leaves(want_g), strict=True))
    with pytest.raises(ValueError, match="old_logprobs='fresh'"):
        step_lib.UpdateConfig(old_logprobs="fresh")


def test_packed_rows_give_the_unpacked_loss_and_gradients(update_case, update_rollouts):
    """Several trajectories per row (segments in attention_mask, per-token advantages) give the loss,
    statistics and gradients of one trajectory per row; so does a packed batch sharded over 8 devices."""
    pre, batch = update_case
    _, trajs, adv = update_rollouts
    t = batch.input_ids.shape[-1]
    n = [len(tr.input_ids) for tr in trajs]
    assert t < 2 * min(n) <= 2 * max(n) <= 2 * t  # rows of 2t hold two, rows of t one
    packed = batch_lib.pack(trajs, adv, pre.config.vision, micro_batches=2, min_length=2 * t, packed=True,
                            row_multiple=1)
    assert packed.input_ids.shape == (2, 1, 2 * t) and packed.attention_mask.max() == 2  # 2 rows of 2
    one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = sharding.get_rules("fsdp")
    want_g, want_s = _grads(pre, batch, one, rules)
    for mesh, b in [(one, packed), (sharding.make_mesh((1, 8, 1)),
                                    batch_lib.pack(trajs, adv, pre.config.vision, 2, min_length=2 * t,
                                                   packed=True))]:  # 8 rows a micro-batch, 7 empty
        got_g, got_s = _grads(pre, b, mesh, rules)
        for k in ("loss", "pg_loss", "tokens", "ratio"):
            np.testing.assert_allclose(got_s[k], want_s[k], rtol=1e-5, atol=1e-6)
        for a, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
            np.testing.assert_allclose(a, w, atol=1e-5, rtol=1e-4)  # a 2x longer row sums in another order


def test_length_buckets_and_chunked_logprobs(update_case):
    """Multiples of a length instead of powers of two pad less; the log-probs do not depend on the
    padded length or on how the vocabulary projection is chunked."""
    assert buckets.bucket_length(300, 128) == 512
    assert buckets.bucket_length(300, 128, 64) == 320
    assert buckets.bucket_length(70, 128, 64) == 128
    assert buckets.bucket_length(320, 128, 64) == 320
    with pytest.raises(ValueError, match="length_multiple=-64"):
        buckets.bucket_length(300, 128, -64)
    pre, batch = update_case
    t = batch.input_ids.shape[-1]
    odd = t // 32 + 1  # t is a power of two >= 128
    longest = 32 * odd  # past the padded length, and no chunk of 128 tiles it
    padded = batch.replace(**{k: np.pad(getattr(batch, k), [(0, 0)] * (getattr(batch, k).ndim - 1)
                                        + [(0, longest - t)])
                              for k in ("input_ids", "attention_mask", "positions", "loss_mask")})
    mb = jax.tree.map(lambda x: x[0], batch)
    mb_long = jax.tree.map(lambda x: x[0], padded)
    want, _ = step_lib.policy_logprobs(pre.model, mb)
    got, _ = step_lib.policy_logprobs(pre.model, mb_long, chunk=128)  # gcd(longest, 128) = 32
    mask = np.asarray(mb.attention_mask[:, 1:]) > 0
    np.testing.assert_allclose(np.asarray(got)[:, :t - 1][mask], np.asarray(want)[mask], atol=2e-5)


def test_window_buckets_give_the_same_logprobs(update_rollouts):
    """Vision windows padded to a multiple instead of a power of two: fewer windows, the same log-probs
    (padding windows hold no patch and no token reads them); a negative multiple names its setting."""
    pre, trajs, adv = update_rollouts
    window = pre.config.vision.window_patches
    pow2 = batch_lib.pack(trajs, adv, pre.config.vision, micro_batches=1, min_windows=1)
    need = int((np.asarray(pow2.vision.image_ids[0]) >= 0).reshape(-1, window).any(axis=1).sum())
    assert pow2.vision.patches.shape[1] // window > need + 1  # a power of two leaves room below it
    mult = batch_lib.pack(trajs, adv, pre.config.vision, micro_batches=1, min_windows=1,
                          window_multiple=need + 1)
    assert mult.vision.patches.shape[1] == (need + 1) * window
    for k in ("input_ids", "attention_mask", "positions", "loss_mask"):
        np.testing.assert_array_equal(getattr(mult, k), getattr(pow2, k))
    want, _ = step_lib.policy_logprobs(pre.model, jax.tree.map(lambda x: x[0], pow2))
    got, _ = step_lib.policy_logprobs(pre.model, jax.tree.map(lambda x: x[0], mult))
    mask = np.asarray(pow2.attention_mask[0, :, 1:]) > 0
    np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(want)[mask], atol=2e-5)
    assert buckets.bucket_length(136, 4, 32, "window_multiple") == 160
    with pytest.raises(ValueError, match="window_multiple=-32"):
        batch_lib.pack(trajs, adv, pre.config.vision, micro_batches=1, window_multiple=-32)


def test_kl_term_and_micro_batch_averaging_by_hand():
    mb = _batch_case()
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 5)), jnp.float32)
    ref = np.random.default_rng(3).normal(-1.6, 0.2, size=(2, 6)).astype(np.float32)
    base = step_lib.UpdateConfig(dual_clip=None)
    with_kl = step_lib.UpdateConfig(dual_clip=None, kl_coef=0.1)
    l0, _ = step_lib.loss_from_logits(logits, mb, None, jnp.float32(4.0), base)
    l1, st = step_lib.loss_from_logits(logits, mb, jnp.asarray(ref), jnp.float32(4.0), with_kl)
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    kl = 0.0
    for r, t in [(0, 2), (1, 2), (1, 3), (1, 5)]:
        d = ref[r, t] - logp[r, t - 1, mb.input_ids[r, t]]
        kl += np.exp(d) - d - 1
    np.testing.assert_allclose(float(l1) - float(l0), 0.1 * kl / 4, rtol=1e-5)
    np.testing.assert_allclose(float(st["kl"]), kl, rtol=1e-5)


def test_frozen_vision_tower_does_not_move(update_case):
    pre, batch = update_case
    cfg = step_lib.UpdateConfig(lr=1e-2, freeze_vision=True)
    opt = step_lib.make_optimizer(pre.model, cfg)
    graphdef, state = nnx.split((pre.model, opt))
    before = jax.tree.map(np.asarray, state[0])
    new, _ = jax.jit(lambda s, b: step_lib.train_step(graphdef, s, b, None, cfg))(state, batch)
    after = jax.tree.map(np.asarray, new[0])
    np.testing.assert_array_equal(after["visual"]["patch_embed"]["kernel"].get_value(),
                                  before["visual"]["patch_embed"]["kernel"].get_value())
    assert not np.array_equal(after["embed"].get_value(), before["embed"].get_value())

"""The GRPO update as one pure jitted step with explicit shardings, donation, per-layer
rematerialisation and micro-batch gradient accumulation (a `lax.scan` over micro-batches).

The train state is the model and its optimiser split into (graphdef, state); the step merges them,
computes the loss of every micro-batch against the policy's current parameters, accumulates gradients,
applies AdamW and returns the new state (donated in place) with scalar metrics.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepeyes_jax.model import sharding
from deepeyes_jax.model.qwen2_5_vl import Qwen25VL
from deepeyes_jax.rl import grpo
from deepeyes_jax.rl.batch import TrainBatch

OLD_LOGPROBS = ("recompute", "sampler", "current")


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """The update's hyper-parameters (defaults: the DeepEyes 7B recipe)."""

    lr: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    loss_agg: str = "token_mean"  # or "micro_batch_mean" (the reference's per-micro-batch averaging)
    policy_loss: str = "ppo_clip"
    freeze_vision: bool = False
    remat: bool = True
    # Where the ratio's old log-probs come from: the batch ("recompute": the trainer's forward pass before
    # the update, as the reference; "sampler": the sampler's), or "current": this update's own forward
    # pass with the gradient stopped. One optimiser step per rollout batch (`train_step`) makes the
    # parameters of both passes the same, so "current" gives the recomputed ratios (1) and gradients
    # without the extra forward pass.
    old_logprobs: str = "recompute"

    def __post_init__(self):
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ValueError(f"old_logprobs={self.old_logprobs!r}; choose one of {OLD_LOGPROBS}")
        if self.loss_agg not in ("token_mean", "micro_batch_mean"):
            raise ValueError(f"loss_agg={self.loss_agg!r}; use 'token_mean' or 'micro_batch_mean'")
        if self.policy_loss not in grpo.POLICY_LOSSES:
            raise ValueError(f"policy_loss={self.policy_loss!r}; choose one of {sorted(grpo.POLICY_LOSSES)}")


def make_optimizer(model: Qwen25VL, cfg: UpdateConfig) -> nnx.Optimizer:
    """AdamW with global-norm clipping; the vision tower frozen (zero updates) when asked."""
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(cfg.lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    if cfg.freeze_vision:
        def labels(params):
            return jax.tree_util.tree_map_with_path(
                lambda path, _: "frozen" if getattr(path[0], "key", None) == "visual" else "train", params)

        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def policy_logprobs(model: Qwen25VL, mb: TrainBatch, chunk: int = 256) -> tuple[jax.Array, jax.Array]:
    """log p(next token) and the entropy at every position but the last, [b, T-1] each.

    The vocabulary projection runs over chunks of at most `chunk` positions, rematerialised in the
    backward pass, so the [b, T, V] logits (2.5 GB for 4 x 1024 tokens of Qwen's 152k vocabulary) never exist.
    """
    feats = model.encode_images(mb.vision) if mb.vision is not None else None
    hidden = model.decode(model.embed_tokens(mb.input_ids, feats), mb.positions, mb.attention_mask)
    b, t, d = hidden.shape
    # the largest chunk that tiles t: all of it when t <= chunk; t = 320 with 256: 5 chunks of 64
    chunk = t if t <= chunk else math.gcd(t, chunk)
    targets = jnp.roll(mb.input_ids, -1, axis=1)  # the last position's target is never used

    @jax.checkpoint
    def one(args):
        h, tg = args
        return grpo.token_logprobs_and_entropy(model.logits(h), tg)

    split = lambda x: x.reshape(b, t // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)
    logp, ent = jax.lax.map(one, (split(hidden), split(targets)))
    merge = lambda x: x.swapaxes(0, 1).reshape(b, t)[:, :-1]
    return merge(logp), merge(ent)


def loss_from_logits(logits: jax.Array, mb: TrainBatch, ref_logp: jax.Array | None, normaliser: jax.Array,
                     cfg: UpdateConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`loss_from_logprobs` from full logits [b, T, V] (small cases and tests)."""
    logp, entropy = grpo.token_logprobs_and_entropy(logits[:, :-1], mb.input_ids[:, 1:])
    return loss_from_logprobs(logp, entropy, mb, ref_logp, normaliser, cfg)


def loss_from_logprobs(logp: jax.Array, entropy: jax.Array, mb: TrainBatch, ref_logp: jax.Array | None,
                       normaliser: jax.Array, cfg: UpdateConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss of one micro-batch from its next-token log-probs and entropies [b, T-1] (divided by the
    normaliser) and summed token statistics. Only `loss_mask` tokens contribute, so no other position
    gets gradient."""
    mask = mb.loss_mask[:, 1:].astype(jnp.float32)
    old = jax.lax.stop_gradient(logp) if cfg.old_logprobs == "current" else mb.old_logprobs[:, 1:]
    adv = (mb.advantages[:, 1:] if mb.advantages.ndim == 2  # per token (`batch.pack`), or per row
           else jnp.broadcast_to(mb.advantages[:, None], logp.shape))
    tok_loss, st = grpo.POLICY_LOSSES[cfg.policy_loss](
        logp, old, adv, clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip)
    total = tok_loss - cfg.entropy_coef * entropy
    kl = jnp.zeros_like(logp)
    if ref_logp is not None:
        kl = grpo.low_var_kl(logp, ref_logp[:, 1:])
        total = total + cfg.kl_coef * kl
    # where, not multiply: a masked position contributes an exact zero even if its value is not finite.
    masked = lambda x: jnp.sum(jnp.where(mask > 0, x, 0.0))
    loss = masked(total) / normaliser
    stats = {"pg_loss": masked(tok_loss), "entropy": masked(entropy), "clipfrac": masked(st["clipped"]),
             "dual_clipfrac": masked(st["dual_clipped"]), "ratio": masked(st["ratio"]), "kl": masked(kl),
             "logp_gap": masked(jnp.abs(logp - mb.sampler_logprobs[:, 1:])), "tokens": jnp.sum(mask)}
    return loss, stats


STATS = ("pg_loss", "entropy", "clipfrac", "dual_clipfrac", "ratio", "kl", "logp_gap", "tokens", "loss")


def compute_grads(graphdef: nnx.GraphDef, state: nnx.State, batch: TrainBatch, ref_logprobs: jax.Array | None,
                  cfg: UpdateConfig) -> tuple[nnx.State, dict[str, jax.Array]]:
    """Gradients of the batch loss w.r.t. the parameters, accumulated over micro-batches, and the
    summed statistics."""
    model, _ = nnx.merge(graphdef, state)
    model.remat = cfg.remat
    mgraph, params, rest = nnx.split(model, nnx.Param, ...)
    m = batch.input_ids.shape[0]
    if cfg.loss_agg == "token_mean":  # one mean over every sampled token of the batch
        norms = jnp.full((m,), jnp.maximum(jnp.sum(batch.num_tokens), 1.0))
    else:  # the reference: mean per micro-batch, then the mean over micro-batches
        norms = jnp.maximum(batch.num_tokens, 1.0) * m

    def micro(carry, inputs):
        grads, stats = carry
        mb, ref, norm = inputs

        def fn(p):
            logp, entropy = policy_logprobs(nnx.merge(mgraph, p, rest), mb)
            return loss_from_logprobs(logp, entropy, mb, ref, norm, cfg)

        (loss, st), g = jax.value_and_grad(fn, has_aux=True)(params)
        grads = jax.tree.map(jnp.add, grads, g)
        stats = jax.tree.map(jnp.add, stats, {**st, "loss": loss})
        return (grads, stats), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    stat0 = {k: jnp.zeros((), jnp.float32) for k in STATS}
    (grads, stats), _ = jax.lax.scan(micro, (zeros, stat0), (batch, ref_logprobs, norms))
    return grads, stats


def train_step(graphdef: nnx.GraphDef, state: nnx.State, batch: TrainBatch, ref_logprobs: jax.Array | None,
               cfg: UpdateConfig) -> tuple[nnx.State, dict[str, jax.Array]]:
    """One GRPO update over all micro-batches of `batch`. Pure: (state, batch) -> (state, metrics)."""
    grads, stats = compute_grads(graphdef, state, batch, ref_logprobs, cfg)
    model, optimizer = nnx.merge(graphdef, state)
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    n = jnp.maximum(stats.pop("tokens"), 1.0)
    metrics = {f"update/{k}": v / n for k, v in stats.items() if k != "loss"}
    metrics.update({"update/loss": stats["loss"], "update/grad_norm": grad_norm, "update/tokens": n})
    return nnx.state((model, optimizer)), metrics


def logprobs_step(graphdef: nnx.GraphDef, state: nnx.State, batch: TrainBatch) -> jax.Array:
    """Log-probs [M, b, T] of every token (at its own index; index 0 gets 0) under the current model."""
    model, _ = nnx.merge(graphdef, state)

    def one(_, mb):
        logp, _ = policy_logprobs(model, mb)
        return None, jnp.pad(logp, ((0, 0), (1, 0)))

    return jax.lax.scan(one, None, batch)[1]


@dataclasses.dataclass
class CompiledSteps:
    """The jitted update and log-prob functions with explicit shardings."""

    update: Any
    logprobs: Any
    state_shardings: Any
    batch_shardings: Any

    def place(self, batch: TrainBatch) -> TrainBatch:
        """The host batch on the devices, laid out as the steps take it."""
        return jax.tree.map(lambda x, s: sharding.place(np.asarray(x), s), batch, self.batch_shardings)


def batch_shardings(batch: TrainBatch, mesh: Mesh, rules: sharding.Rules) -> Any:
    """Rows split over the batch axes (when they divide); images replicated (any row may use any)."""
    row = sharding.logical_to_spec(("act_batch",), rules)[0]
    axes = () if row is None else (row,) if isinstance(row, str) else tuple(row)
    devices = 1
    for a in axes:
        devices *= mesh.shape[a]
    if batch.input_ids.shape[1] % devices:
        row = None

    def spec(path, x):
        name = getattr(path[0], "name", None)
        if name in ("input_ids", "attention_mask", "loss_mask", "sampler_logprobs", "old_logprobs"):
            return NamedSharding(mesh, PartitionSpec(None, row, None))
        if name == "positions":
            return NamedSharding(mesh, PartitionSpec(None, None, row, None))
        if name == "advantages":
            return NamedSharding(mesh, PartitionSpec(None, row, *([None] * (x.ndim - 2))))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(spec, batch)


def compile_steps(graphdef: nnx.GraphDef, state: nnx.State, batch: TrainBatch, mesh: Mesh,
                  rules: sharding.Rules, cfg: UpdateConfig, with_ref: bool) -> CompiledSteps:
    """jax.jit of the steps with in/out shardings; the train state is donated."""
    st_sh = sharding.state_shardings(state, mesh, rules)
    b_sh = batch_shardings(batch, mesh, rules)
    ref_sh = b_sh.old_logprobs if with_ref else None

    # Named functions, not lambdas: compilation logs and counters report `jit(update)`, `jit(logprobs)`.
    def update(s, b, r):
        return train_step(graphdef, s, b, r, cfg)

    def logprobs(s, b):
        return logprobs_step(graphdef, s, b)

    update = jax.jit(update, in_shardings=(st_sh, b_sh, ref_sh), out_shardings=(st_sh, None),
                     donate_argnums=(0,))
    logprobs = jax.jit(logprobs, in_shardings=(st_sh, b_sh), out_shardings=b_sh.old_logprobs)
    return CompiledSteps(update=update, logprobs=logprobs, state_shardings=st_sh, batch_shardings=b_sh)


def steps_for(programs: dict[Any, CompiledSteps], graphdef: nnx.GraphDef, state: nnx.State, batch: TrainBatch,
              mesh: Mesh, rules: sharding.Rules, cfg: UpdateConfig, with_ref: bool) -> CompiledSteps:
    """The compiled steps for `batch`, from `programs` or compiled into it on first use.

    Keyed by the batch's static structure (the vision block size `image_windows`): the shardings given to
    `jax.jit` fix the batch's tree, so a batch whose static field differs needs programs of its own.
    """
    key = batch.vision.image_windows
    if key not in programs:
        programs[key] = compile_steps(graphdef, state, batch, mesh, rules, cfg, with_ref)
    return programs[key]

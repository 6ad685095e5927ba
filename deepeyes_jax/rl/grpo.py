"""GRPO: group advantages and the clipped policy loss, as small registries keyed by config strings.

Letters: B rows (trajectories), T tokens. Every per-token array is [B, T]; `mask` is 1 only on tokens
the policy sampled (prompt, observation, forced and padding tokens are 0), so nothing else receives
gradient, enters the loss normaliser, or the entropy.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# ------------------------------------------------------------------------------------ advantages


def grpo_advantages(rewards: np.ndarray, group_size: int, eps: float = 1e-6) -> np.ndarray:
    """(r - mean) / (std + eps) per group, with the unbiased std (the reference's torch.std)."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    std = r.std(axis=1, ddof=1, keepdims=True) if group_size > 1 else np.zeros((r.shape[0], 1))
    return ((r - r.mean(axis=1, keepdims=True)) / (std + eps)).reshape(-1).astype(np.float32)


def mean_only_advantages(rewards: np.ndarray, group_size: int, eps: float = 1e-6) -> np.ndarray:
    """r - mean per group (no std normalisation)."""
    del eps
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    return (r - r.mean(axis=1, keepdims=True)).reshape(-1).astype(np.float32)


ADVANTAGES: dict[str, Callable[..., np.ndarray]] = {
    "grpo": grpo_advantages, "mean_only": mean_only_advantages}


def advantages(name: str, rewards: np.ndarray, group_size: int, eps: float = 1e-6) -> np.ndarray:
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; choose one of {sorted(ADVANTAGES)}")
    if len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    return ADVANTAGES[name](rewards, group_size, eps)


def zero_std_fraction(rewards: np.ndarray, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (they carry no learning signal)."""
    r = np.asarray(rewards).reshape(-1, group_size)
    return float(np.mean(np.all(r == r[:, :1], axis=1)))


def select_groups(rewards: np.ndarray, group_size: int, keep: int) -> np.ndarray:
    """Indices of the trajectories of `keep` groups to update on: groups whose rewards differ first, in
    sampling order, then equal-reward groups to fill (DAPO's dynamic sampling with one sampling round:
    sample more prompts than the update takes, and keep the groups that carry a signal). The update's
    shape stays fixed, so no new program compiles. `keep` = 0 keeps every group."""
    r = np.asarray(rewards).reshape(-1, group_size)
    groups = r.shape[0]
    if keep == 0:
        return np.arange(groups * group_size)
    if not 0 < keep <= groups:
        raise ValueError(f"update_groups={keep} with {groups} groups sampled; use 0 (all) or 1..{groups}")
    equal = np.all(r == r[:, :1], axis=1)
    order = np.concatenate([np.flatnonzero(~equal), np.flatnonzero(equal)])[:keep]
    return (np.sort(order)[:, None] * group_size + np.arange(group_size)).reshape(-1)


# ---------------------------------------------------------------------------------- policy loss


def ppo_clip_loss(logp: jax.Array, old_logp: jax.Array, adv: jax.Array, *, clip_low: float,
                  clip_high: float, dual_clip: float | None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token PPO clipped objective (to minimise) with optional dual clip for negative advantages.

    Args:
      logp, old_logp: [B, T] current and behaviour log-probs of the chosen tokens.
      adv: [B, T] advantages broadcast to tokens.
      clip_low, clip_high: ratio clipped to [1 - clip_low, 1 + clip_high].
      dual_clip: c > 1 caps the loss of negative-advantage tokens at -c * A (None: off).

    Returns:
      per-token loss [B, T] and per-token indicators (clipped, dual-clipped) for statistics.
    """
    ratio = jnp.exp(logp - old_logp)
    loss1 = -adv * ratio
    loss2 = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(loss1, loss2)
    stats = {"clipped": (loss2 > loss1).astype(jnp.float32)}
    if dual_clip is not None:
        loss3 = -adv * dual_clip
        dual = (adv < 0) & (loss3 < loss)
        loss = jnp.where(adv < 0, jnp.minimum(loss, loss3), loss)
        stats["dual_clipped"] = dual.astype(jnp.float32)
    else:
        stats["dual_clipped"] = jnp.zeros_like(loss)
    stats["ratio"] = ratio
    return loss, stats


def weighted_nll_loss(logp: jax.Array, old_logp: jax.Array, adv: jax.Array, *, clip_low: float,
                      clip_high: float, dual_clip: float | None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token `-adv * logp`: advantage-weighted likelihood (REINFORCE); with advantage 1 it is the
    negative log-likelihood of supervised training (Mini-V*'s format stage). Ignores old_logp and clips.
    """
    del old_logp, clip_low, clip_high, dual_clip
    zeros = jnp.zeros_like(logp)
    return -adv * logp, {"clipped": zeros, "dual_clipped": zeros, "ratio": jnp.ones_like(logp)}


POLICY_LOSSES = {"ppo_clip": ppo_clip_loss, "weighted_nll": weighted_nll_loss}


def low_var_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """The k3 estimator of KL(pi || ref) per token, clamped to [-10, 10] as the reference does."""
    d = ref_logp - logp
    return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)


def token_logprobs_and_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p(target) and the entropy of the full distribution, per position. logits [B, T, V] float32."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    p = jax.nn.softmax(logits, axis=-1)
    entropy = logz - jnp.sum(p * logits, axis=-1)
    return tgt - logz, entropy

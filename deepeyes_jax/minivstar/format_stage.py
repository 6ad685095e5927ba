"""The format stage: supervised training on teacher-forced episodes, the stand-in for pretraining.

Each step draws a batch of tasks, writes their turns (`tasks.format_turns`) and runs them through the
real sampler as teacher-forced turns, so the tool call is parsed and executed, the crop is re-encoded
and the observation lands in the context exactly as in RL. The forced tokens then get the loss.

The loss is the GRPO update itself with advantage 1 on every forced token and the old log-probs equal
to the current ones (the sampler's log-probs of this very model): the PPO ratio is 1, no clip is active,
and the gradient is that of the token-mean negative log-likelihood. One jitted step serves both stages.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from deepeyes_jax.minivstar import tasks as tasks_lib
from deepeyes_jax.model import sharding
from deepeyes_jax.model.checkpoint import Pretrained
from deepeyes_jax.rl import batch as batch_lib
from deepeyes_jax.rl import step as step_lib
from deepeyes_jax.sampling import Greedy, Prompt, RolloutConfig, Sampler, Trajectory, engine


@dataclasses.dataclass(frozen=True)
class FormatConfig:
    """steps x batch episodes at learning rate `lr`; `zoom_prob` of them zoom (see tasks.py).

    Episodes are rolled out `rollout_batch` at a time (teacher-forced, so they do not depend on the
    weights) and each such chunk feeds rollout_batch / batch consecutive steps.
    """

    steps: int = 300
    batch: int = 16
    lr: float = 1e-3
    zoom_prob: float = 0.5
    seed: int = 0
    micro_batches: int = 1
    rollout_batch: int = 64


def forced_only(traj: Trajectory) -> Trajectory:
    """The trajectory with its loss mask on the teacher-forced tokens (the sampler's action mask marks
    only sampled ones)."""
    return dataclasses.replace(traj, action_mask=(traj.source == engine.FORCED).astype(np.int32))


def episodes(sampler: Sampler, tasks: Sequence[tasks_lib.Task], rng: np.random.Generator, n: int,
             zoom_prob: float, mesh: jax.sharding.Mesh) -> list[Trajectory]:
    """`n` teacher-forced format-stage episodes of random tasks, loss mask on the forced tokens."""
    picked = [tasks[int(i)] for i in rng.integers(len(tasks), size=n)]
    forced = [tasks_lib.format_turns(t, rng, zoom_prob) for t in picked]
    with jax.set_mesh(mesh):
        trajs = sampler([Prompt(image=tasks_lib.image_of(t), question=t.record["question"]) for t in picked],
                        1, Greedy(), jax.random.key(0), forced=forced)
    return [forced_only(t) for t in trajs]


def train(pre: Pretrained, tasks: Sequence[tasks_lib.Task], rollout: RolloutConfig, cfg: FormatConfig,
          mesh: jax.sharding.Mesh, rules: sharding.Rules,
          log: Callable[[int, dict[str, float]], None] | None = None) -> Pretrained:
    """Trains `pre.model` on format-stage episodes of `tasks`; returns `pre` with the trained model.

    The update is `rl/step.py`'s with `policy_loss="weighted_nll"` and advantage 1: the token-mean
    negative log-likelihood of the forced tokens.
    """
    if cfg.rollout_batch % cfg.batch:
        raise ValueError(f"rollout_batch={cfg.rollout_batch} must be a multiple of batch={cfg.batch}")
    ucfg = step_lib.UpdateConfig(lr=cfg.lr, weight_decay=0.0, remat=False, policy_loss="weighted_nll")
    optimizer = step_lib.make_optimizer(pre.model, ucfg)
    graphdef, state = nnx.split((pre.model, optimizer))
    state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
    sampler = Sampler(pre.model, pre.tokenizer, pre.image_processor, rollout)
    rng = np.random.default_rng(cfg.seed)
    programs, pool = {}, []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        if not pool:
            pool = episodes(sampler, tasks, rng, cfg.rollout_batch, cfg.zoom_prob, mesh)
        trajs, pool = pool[:cfg.batch], pool[cfg.batch:]
        t1 = time.perf_counter()
        batch = batch_lib.pack(trajs, np.ones(len(trajs), np.float32), pre.config.vision, cfg.micro_batches)
        compiled = step_lib.steps_for(programs, graphdef, state, batch, mesh, rules, ucfg, with_ref=False)
        dev = jax.tree.map(lambda x, s: sharding.place(np.asarray(x), s), batch, compiled.batch_shardings)
        state, m = compiled.update(state, dev, None)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        t2 = time.perf_counter()
        if log is not None:
            log(step + 1, {"format/nll": m["update/loss"], "format/grad_norm": m["update/grad_norm"],
                           "format/zoom_frac": float(np.mean([len(t.images) > 1 for t in trajs])),
                           "format/tokens": float(batch.attention_mask.size),
                           "time/rollout": t1 - t0, "time/update": t2 - t1, "time/step": t2 - t0})
    model, _ = nnx.merge(graphdef, state)
    return dataclasses.replace(pre, model=model)

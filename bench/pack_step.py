"""GRPO update on Mini-V*-shaped rollouts: one trajectory per row against packed rows, and the ratio's
old log-probs recomputed by a forward pass against taken from the update's own (BENCHMARKS.md).

  .venv/bin/python bench/pack_step.py                  # 64 episodes, text 256 x 2, 5 timed steps
  .venv/bin/python bench/pack_step.py --episodes=128 --steps=3
  .venv/bin/python bench/pack_step.py --only=4,5,6 --zoom_prob=1.0   # the Mini-V* GRPO layouts

The batch is `--episodes` format-stage episodes of Mini-V* training items (`format_stage.episodes`:
the prompt with its image, a zoom call and its crop on `--zoom_prob` of them, an answer), so its
lengths vary as a GRPO step's do; advantages alternate in sign. Each variant packs the same episodes
(`rl/batch.pack`) and times, after one warm-up step that compiles, `--steps` of what the trainer runs
for it: with `recompute`, the log-prob pass and the update; with `current`, the update alone. All
variants compute the same loss (tests/test_grpo.py checks it); the first step's loss is printed.
"""

import os
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from common import append_section, summary
from flax import nnx

from deepeyes_jax.minivstar import base, format_stage, tasks
from deepeyes_jax.model import checkpoint, sharding
from deepeyes_jax.rl import batch as batch_lib
from deepeyes_jax.rl import step as step_lib
from deepeyes_jax.sampling import RolloutConfig, Sampler

_EPISODES = flags.DEFINE_integer("episodes", 64, "Trajectories per update (Mini-V*: 16 prompts x 4).")
_MICRO = flags.DEFINE_integer("micro_batches", 2, "Micro-batches per update.")
_ZOOM = flags.DEFINE_float("zoom_prob", 0.8, "Share of episodes with a zoom call and its crop.")
_HIDDEN = flags.DEFINE_integer("hidden", 256, "Text width.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Text layers.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per variant.")
_ONLY = flags.DEFINE_list("only", [], "Indices of VARIANTS to run (all when empty).")
_OUT = flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file to append to ('' to skip).")

VARIANTS = (  # (name, pack keyword arguments, old_logprobs)
    ("one per row, powers of two (before)", {}, "recompute"),
    ("one per row, multiples of 64", {"length_multiple": 64}, "recompute"),
    ("one per row, powers of two", {}, "current"),
    ("packed rows", {"packed": True}, "recompute"),
    ("packed rows", {"packed": True}, "current"),
    ("packed rows, multiples of 64", {"packed": True, "length_multiple": 64}, "current"),
    ("packed rows, multiples of 64, windows multiples of 32",
     {"packed": True, "length_multiple": 64, "window_multiple": 32}, "current"),
)


def main(_):
    mesh, rules = sharding.make_mesh((1, -1, 1)), sharding.get_rules("fsdp")
    d = base.write_base(tempfile.mkdtemp(), 0, tasks.SYNTHETIC.max_pixels,
                        base.model_config(_HIDDEN.value, _LAYERS.value))
    pre = checkpoint.load_pretrained(d, mesh=mesh, rules=rules)
    rc = RolloutConfig(max_turns=3, max_turn_tokens=96, max_response_tokens=384,
                       system_prompt=tasks.SYSTEM_PROMPT)
    sampler = Sampler(pre.model, pre.tokenizer, pre.image_processor, rc)
    trajs = format_stage.episodes(sampler, tasks.make_tasks(256, 0), np.random.default_rng(0),
                                  _EPISODES.value, _ZOOM.value)
    lengths = np.array([len(t.input_ids) for t in trajs])
    adv = np.where(np.arange(len(trajs)) % 2, -1.0, 1.0).astype(np.float32)
    rows, v = [], pre.config.vision
    window = v.window_patches
    for k, (name, kw, old) in enumerate(VARIANTS):
        if _ONLY.value and str(k) not in _ONLY.value:
            continue
        ucfg = step_lib.UpdateConfig(lr=2e-4, weight_decay=0.0, remat=False, old_logprobs=old)
        graphdef, state = nnx.split((pre.model, step_lib.make_optimizer(pre.model, ucfg)))
        state = jax.tree.map(lambda x: x.copy(), jax.device_put(state, sharding.state_shardings(state, mesh,
                                                                                                  rules)))
        batch = batch_lib.pack(trajs, adv, pre.config.vision, _MICRO.value, **kw)
        compiled = step_lib.compile_steps(graphdef, state, batch, mesh, rules, ucfg, with_ref=False)
        times, loss, first = [], None, 0.0
        for i in range(_STEPS.value + 1):
            t0 = time.perf_counter()
            with jax.set_mesh(mesh):
                dev = compiled.place(batch)
                if old == "recompute":
                    dev = dev.replace(old_logprobs=compiled.logprobs(state, dev))
                state, m = compiled.update(state, dev, None)
                m = jax.device_get(m)
            loss = float(m["update/loss"]) if loss is None else loss
            if i:  # the first step compiles
                times.append(time.perf_counter() - t0)
            else:
                first = time.perf_counter() - t0
        s = summary(times)
        m_, b_, t_ = batch.input_ids.shape
        rows.append([name, old, f"{m_} x {b_} x {t_}", f"{m_ * b_ * t_}",
                     f"{lengths.sum() / (m_ * b_ * t_):.2f}", f"{batch.vision.patches.shape[1] // window}",
                     f"{loss:.5f}", f"{first:.1f}", f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"])
        print(rows[-1], flush=True)
    append_section(
        f"GRPO update on Mini-V* rollouts: layouts (text {_HIDDEN.value} x {_LAYERS.value})",
        f"{len(trajs)} format-stage episodes of Mini-V* items ({_ZOOM.value:.0%} with a zoom call and its "
        f"crop; lengths {lengths.min()}-{lengths.max()}, mean {lengths.mean():.0f} tokens), {_MICRO.value} "
        "micro-batches, no remat. Seconds per update, median (min-max) of the timed steps after one "
        "that compiles; `recompute` includes the log-prob pass the trainer runs before the update. "
        "Fill: real tokens / computed tokens. Vision windows: of 64 patches, per micro-batch. First step: "
        "compiling and one update.",
        ["layout", "old log-probs", "micro-batches x rows x length", "tokens computed", "fill",
         "vision windows", "first loss", "first step (s)", "update (s)"], rows, _OUT.value)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    app.run(main)

"""Mini-V* format-stage steps: host build time (episodes laid out, batch packed) and update time, per kind.

  .venv/bin/python bench/format_step.py                      # text width 256 x 2 layers, 6 timed steps
  .venv/bin/python bench/format_step.py --hidden=128 --layers=4 --steps=4
  .venv/bin/python bench/format_step.py --length_multiple=64 --window_multiple=32   # the Mini-V* padding

For each kind (crop, ground, full_view, read captions of 32; protocol episodes of 16, as the Mini-V*
default makes them) it runs `--steps` + 1 steps and times the builds on the host after the first and the
updates that compiled no new program (the jitted step of `format_stage.train`, run sequentially here so
the two do not share the cores). Each build is timed a second time with the M-RoPE positions computed by
eager `jnp`, as forced episodes did before they used numpy.
"""

import dataclasses
import os
import sys
import tempfile
import time
from unittest import mock

import jax
import numpy as np
from absl import app, flags
from common import append_section, summary
from flax import nnx

from deepeyes_jax.minivstar import base, format_stage, tasks
from deepeyes_jax.model import checkpoint, rope, sharding
from deepeyes_jax.rl import batch as batch_lib
from deepeyes_jax.rl import step as step_lib
from deepeyes_jax.sampling import RolloutConfig, Sampler

_HIDDEN = flags.DEFINE_integer("hidden", 256, "Text width.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Text layers.")
_STEPS = flags.DEFINE_integer("steps", 6, "Timed steps per kind.")
_LMULT = flags.DEFINE_integer("length_multiple", 0, "Sequence lengths padded to multiples (0: powers of 2).")
_WMULT = flags.DEFINE_integer("window_multiple", 0, "Vision windows padded to multiples (0: powers of 2).")
_ZOOM = flags.DEFINE_float("zoom_prob", 0.6, "Share of protocol episodes that zoom (the Mini-V* default).")
_AIM = flags.DEFINE_float("aim", 0.3, "Share of attribute zooms into the asked card (the Mini-V* default).")
_OUT = flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file to append to ('' to skip).")


def _eager_jnp(fn):
    """`fn` with its `xp` forced to jax.numpy (the old host path)."""
    return lambda *a, xp=None, **k: fn(*a, **k)


def _pad(multiple: int) -> str:
    return f"multiples of {multiple}" if multiple else "powers of 2"


def main(_):
    mesh, rules = sharding.make_mesh((1, -1, 1)), sharding.get_rules("fsdp")
    d = base.write_base(tempfile.mkdtemp(), 0, tasks.SYNTHETIC.max_pixels,
                        base.model_config(_HIDDEN.value, _LAYERS.value))
    pre = checkpoint.load_pretrained(d, mesh=mesh, rules=rules)
    ts = tasks.make_tasks(128, 0)
    rc = RolloutConfig(max_turns=3, max_turn_tokens=96, max_response_tokens=384,
                       system_prompt=tasks.SYSTEM_PROMPT)
    sampler = Sampler(pre.model, pre.tokenizer, pre.image_processor, rc)
    plain = Sampler(pre.model, pre.tokenizer, pre.image_processor,
                    dataclasses.replace(rc, tools=(), max_turns=1))
    ucfg = step_lib.UpdateConfig(lr=1e-3, weight_decay=0.0, remat=False, policy_loss="weighted_nll")
    graphdef, state = nnx.split((pre.model, step_lib.make_optimizer(pre.model, ucfg)))
    state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
    rng, programs, rows, compiled_shapes = np.random.default_rng(0), {}, [], set()
    window = pre.config.vision.window_patches

    pools = format_stage.caption_pools(ts)

    def build(kind):  # the Mini-V* default's episodes and captions (configs/mini_vstar.py)
        if kind == "protocol":
            trajs = format_stage.episodes(sampler, ts, rng, 16, _ZOOM.value, name=False, aim=_AIM.value)
        else:
            trajs = format_stage.captions(plain, ts, rng, 32, kind, pools, crop_as_observation=True)
        return batch_lib.pack(trajs, np.ones(len(trajs), np.float32), pre.config.vision, 1,
                              length_multiple=_LMULT.value, window_multiple=_WMULT.value)

    for kind in (*tasks.PRETRAIN_KINDS, "protocol"):
        builds, eager, updates, shapes = [], [], [], set()
        for i in range(_STEPS.value + 1):
            t0 = time.perf_counter()
            batch = build(kind)
            t1 = time.perf_counter()
            shape = (batch.input_ids.shape, batch.vision.patches.shape, batch.vision.image_windows)
            new_shape = shape not in compiled_shapes  # jit compiles each new shape once
            compiled_shapes.add(shape)
            compiled = step_lib.steps_for(programs, graphdef, state, batch, mesh, rules, ucfg, with_ref=False)
            dev = compiled.place(batch)
            state, m = compiled.update(state, dev, None)
            jax.block_until_ready(m)
            t2 = time.perf_counter()
            with mock.patch.object(rope, "mrope_positions", _eager_jnp(rope.mrope_positions)), \
                    mock.patch.object(rope, "image_grid_hw", _eager_jnp(rope.image_grid_hw)):
                t3 = time.perf_counter()
                build(kind)
                t4 = time.perf_counter()
            shapes.add((batch.input_ids.shape[2], batch.vision.patches.shape[1] // window))
            if i:  # the first build runs eager jnp for the first time
                builds.append(t1 - t0), eager.append(t4 - t3)
            if not new_shape:  # updates that compiled a new program are not timed
                updates.append(t2 - t1)
        b, e, u = (summary(x) for x in (builds, eager, updates))
        rows.append([kind, f"{batch.input_ids.shape[1]} x " + " / ".join(str(t) for t, _ in sorted(shapes)),
                     " / ".join(sorted({str(w) for _, w in shapes})), f"{len(updates)}",
                     f"{b['median']:.2f} ({b['min']:.2f}-{b['max']:.2f})",
                     f"{e['median']:.2f} ({e['min']:.2f}-{e['max']:.2f})",
                     f"{u['median']:.2f} ({u['min']:.2f}-{u['max']:.2f})"])
    append_section(
        f"Mini-V* format-stage steps, text {_HIDDEN.value} x {_LAYERS.value}, lengths {_pad(_LMULT.value)}, "
        f"windows {_pad(_WMULT.value)}, protocol zoom {_ZOOM.value:g} / aim {_AIM.value:g}",
        "Seconds per step, median (min-max) of the timed steps; every padded shape the steps met is listed, "
        "and updates that compiled one are not timed. Build: laying out the batch's episodes on "
        "the host and packing it; eager-jnp build: the same with the M-RoPE positions computed by eager "
        "`jax.numpy` (before this change); update: the jitted step. `format_stage.train` overlaps the "
        "build of step n + 1 with the update of step n.",
        ["kind", "batch x tokens", "vision windows", "updates timed", "build (s)", "eager-jnp build (s)",
         "update (s)"], rows, _OUT.value)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    app.run(main)

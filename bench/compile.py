"""XLA compilations over a training run whose image sizes change every step, appended to BENCHMARKS.md.

  .venv/bin/python bench/compile.py --steps=20 --warmup=6

The real trainer (`rl/trainer.py::run`, config `configs/deepeyes.py:model=tiny`: 2 prompts x 4 rollouts,
sampler with the zoom tool, rewards, old log-probs, update, an async checkpoint every step) runs on
toy records whose image size is drawn per step from `--sizes`; the first `--warmup` steps cycle
through every size, the later steps draw them at random. Every backend compilation is counted with
JAX's own instrumentation (`deepeyes_jax/utils/compile_count.py`: the `jax.monitoring` backend-compile
event) and attributed to the step that triggered it. After warm-up the count must be zero.
"""

import collections
import importlib.util
import os
import tempfile
import time

import numpy as np
from absl import app, flags
from common import ROOT, append_section  # bench/common.py (the script directory is on sys.path)

from deepeyes_jax.data import toy
from deepeyes_jax.rl import trainer
from deepeyes_jax.utils.compile_count import CompileCounter

_STEPS = flags.DEFINE_integer("steps", 20, "Training steps.")
_WARMUP = flags.DEFINE_integer("warmup", 6, "Steps that cycle through every image size first.")
_SIZES = flags.DEFINE_list("sizes", ["84x112", "140x196", "196x140", "224x224", "112x280", "280x168"],
                           "HxW image sizes drawn from per step.")
_OUT = flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file to append to ('' to skip).")


class VariedImages:
    """Prompt groups of toy records whose image size changes per step; marks each step's start on the
    counter (the trainer calls `next` first thing in a step)."""

    def __init__(self, sizes, warmup: int, prompts: int, counter: CompileCounter, seed: int = 0):
        self.sizes, self.warmup, self.prompts, self.counter = sizes, warmup, prompts, counter
        self.rng = np.random.default_rng(seed)
        self.step = 0
        self.seen: list[tuple[int, int]] = []

    def __next__(self):
        if self.step < self.warmup:
            h, w = self.sizes[self.step % len(self.sizes)]
        else:
            h, w = self.sizes[int(self.rng.integers(len(self.sizes)))]
        self.counter.phase = self.step
        self.seen.append((h, w))
        recs = toy.toy_records(self.prompts, seed=1000 + self.step, height=h, width=w, data_source="vstar")
        self.step += 1
        return recs

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = state["step"]


def tiny_config():
    path = os.path.join(ROOT, "configs", "deepeyes.py")
    spec = importlib.util.spec_from_file_location("deepeyes_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("model=tiny")


def main(argv):
    del argv
    sizes = [tuple(int(v) for v in s.split("x")) for s in _SIZES.value]
    config = tiny_config()
    config.steps = _STEPS.value
    with CompileCounter(phase="setup", where=True) as cc, tempfile.TemporaryDirectory() as workdir:
        data = VariedImages(sizes, _WARMUP.value, config.data.prompts_per_step, cc)
        trainer.make_data = lambda c, seed: data  # the only change: varied image sizes per step
        t0 = time.perf_counter()
        os.chdir(ROOT)  # the config's checkpoint path is relative to the repository
        trainer.run(config, os.path.join(workdir, "run"))
        wall = time.perf_counter() - t0
    per = cc.by_phase()
    steps = range(_STEPS.value)
    after = [s for s in steps if s >= _WARMUP.value]
    rows = []
    for s in steps:
        n, secs = per.get(s, (0, 0.0))
        rows.append([s + 1, "x".join(map(str, data.seen[s])), n, f"{secs:.2f}",
                     cc.describe(phases={s}) if n else ""])
    n_setup, s_setup = per.get("setup", (0, 0.0))
    late = cc.count(phases=set(after))
    names = collections.Counter(c.name for c in cc.compilations if c.phase != "setup")
    intro = (f"The real trainer (`rl/trainer.py::run`, `configs/deepeyes.py:model=tiny`: 2 prompts x 4 "
             f"rollouts, zoom tool, old log-probs recomputed, update) for {_STEPS.value} steps on toy "
             f"records whose image size changes every step (steps 1-{_WARMUP.value} cycle through "
             f"{', '.join(_SIZES.value)}; later steps draw from them at random). Backend compilations "
             "counted with `jax.monitoring` (`deepeyes_jax/utils/compile_count.py`), attributed to the "
             f"step that triggered them. Setup (checkpoint load, optimiser, sharding) compiled {n_setup} "
             f"times in {s_setup:.1f} s. Whole run {wall:.0f} s; "
             f"{cc.count()} compilations, {cc.seconds():.1f} s of compile in all.")
    notes = (f"**After warm-up (steps {_WARMUP.value + 1}-{_STEPS.value}): {late} compilations.** "
             f"Distinct functions compiled during the steps: {len(names)}.")
    append_section("XLA compilations, varied image sizes", intro,
                   ["step", "image HxW", "compilations", "compile (s)", "what"], rows, _OUT.value, notes)
    if late:
        raise SystemExit(f"{late} compilations after warm-up: {cc.describe(phases=set(after))}")


if __name__ == "__main__":
    app.run(main)

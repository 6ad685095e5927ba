"""No XLA compilation after warm-up in a training run whose image sizes change every step.

The real trainer (tiny config: sampler with the zoom tool, rewards, old log-probs, update, a checkpoint
every step) runs 3 steps on one CPU device, in a subprocess (the 8 fake devices of conftest make each
step ~10x slower). Step 1 compiles everything; steps 2-3 bring image sizes never seen before (35, 64
and 40 image tokens) that the sampler's and the packer's buckets absorb: they must compile nothing.
bench/compile.py is the 20-step version of this check.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZES = [(140, 196), (224, 224), (112, 280)]


def run_steps() -> dict:
    """Runs the trainer over SIZES; returns the compilations per step (and what compiled late)."""
    from deepeyes_jax.data import toy
    from deepeyes_jax.rl import trainer
    from deepeyes_jax.utils.compile_count import CompileCounter

    spec = importlib.util.spec_from_file_location("deepeyes_config", REPO / "configs" / "deepeyes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("model=tiny")
    config.model.checkpoint = str(REPO / "tests" / "fixtures" / "ckpt_tied")
    config.steps = len(SIZES)
    config.checkpoint.async_save = False
    config.rollout.max_response_tokens = 128

    class Groups:
        """Prompt groups whose image size follows SIZES; marks each step on the counter."""

        def __init__(self, counter: CompileCounter):
            self.counter, self.step = counter, 0

        def __next__(self):
            h, w = SIZES[self.step]
            self.counter.phase = self.step
            self.step += 1
            return toy.toy_records(config.data.prompts_per_step, seed=self.step, height=h, width=w,
                                   data_source="vstar")

        def get_state(self):
            return {"step": self.step}

        def set_state(self, state):
            self.step = state["step"]

    with CompileCounter(phase="setup", where=True) as cc, tempfile.TemporaryDirectory() as workdir:
        data = Groups(cc)
        trainer.make_data = lambda c, seed: data
        trainer.run(config, os.path.join(workdir, "run"))
    late = set(range(1, len(SIZES)))
    return {"steps": data.step, "per_step": [cc.count(phases={s}) for s in range(len(SIZES))],
            "late": cc.describe(phases=late)}


def test_no_compilation_after_warmup():
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["steps"] == len(SIZES)
    assert out["per_step"][0] > 0  # the counter sees the first step's compilations
    assert out["per_step"][1:] == [0] * (len(SIZES) - 1), out["late"]


if __name__ == "__main__":
    result = run_steps()
    print(json.dumps(result), flush=True)

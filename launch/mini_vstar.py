"""Mini-V*: format stage, GRPO and evaluation of a tiny Qwen2.5-VL on synthetic V*-style items, on CPU.

  .venv/bin/python launch/mini_vstar.py --config=configs/mini_vstar.py --workdir=runs/mini_vstar

Writes (under --workdir) dynamics.png, summary.md/.json, the evaluations at the start and end, and a
trajectory viewer page (view.html) of the final evaluation. Rerunning resumes where it stopped.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from deepeyes_jax.minivstar import run

_CONFIG = config_flags.DEFINE_config_file("config", "configs/mini_vstar.py", "Mini-V* configuration")
_WORKDIR = flags.DEFINE_string("workdir", "runs/mini_vstar", "Everything the run writes goes here.")


def main(argv):
    del argv
    summary = run.run(_CONFIG.value, _WORKDIR.value)
    wd = _WORKDIR.value
    print(f"wrote {os.path.join(wd, 'dynamics.png')}, {os.path.join(wd, 'summary.md')} and "
          f"{summary['viewer']}")


if __name__ == "__main__":
    app.run(main)

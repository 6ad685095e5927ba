"""Mini-V* tool-reward ablation: conditional (DeepEyes), none, unconditional; one comparison figure.

  .venv/bin/python launch/mini_vstar_ablation.py --workdir=runs/mini_vstar_ablation

The three variants share the held-out set, the base model, the format stage and the starting evaluation
(under WORKDIR/common); each then runs GRPO and its final evaluation in WORKDIR/<variant>. Writes
WORKDIR/ablation.png (training curves of the three) and WORKDIR/ablation.md (start vs end per variant).
Any --config.* override applies to all three (e.g. --config.grpo.steps=40).
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

from deepeyes_jax.minivstar import run
from deepeyes_jax.rl import plots

_CONFIG = config_flags.DEFINE_config_file("config", "configs/mini_vstar.py", "Mini-V* configuration "
                                          "(its tool_reward is set per variant)")
_WORKDIR = flags.DEFINE_string("workdir", "runs/mini_vstar_ablation", "Everything goes here.")
_VARIANTS = flags.DEFINE_list("variants", ["conditional", "none", "unconditional"], "Tool-reward modes.")
_SHARED = flags.DEFINE_string("shared", None, "Directory of the shared stages (default WORKDIR/common); "
                              "e.g. the workdir of a launch/mini_vstar.py run with the same config.")


def main(argv):
    del argv
    wd = _WORKDIR.value
    shared = _SHARED.value or os.path.join(wd, "common")
    results = {}
    for variant in _VARIANTS.value:
        c = _CONFIG.value.copy_and_resolve_references()
        c.grpo.reward.tool_reward = variant
        c.label = f"tool reward: {variant}"
        results[variant] = run.run(c, os.path.join(wd, variant), shared)
    plots.plot_dynamics([os.path.join(wd, v, "grpo", "metrics.jsonl") for v in _VARIANTS.value],
                        os.path.join(wd, "ablation.png"), labels=list(_VARIANTS.value),
                        title="Mini-V*: tool-reward ablation", smoothing=0.6)
    keys = ["accuracy", "zoom_needed/accuracy", "zoom_needed/zoom_rate", "zoom_needed/iou_mean",
            "zoom_free/zoom_rate", "calls_per_item"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    first = next(iter(results.values()))
    lines = ["# Mini-V* tool-reward ablation", "",
             "Held-out, greedy, shuffled options. `start` is the shared format-stage model.", "",
             "| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|",
             "| start | " + " | ".join(fmt(first["start"][k]) for k in keys) + " |"]
    lines += [f"| {v} | " + " | ".join(fmt(r["end"][k]) for k in keys) + " |" for v, r in results.items()]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(wd, "ablation.md"), "w") as f:
        f.write(text)
    with open(os.path.join(wd, "ablation.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(text + f"\nwrote {os.path.join(wd, 'ablation.png')} and {os.path.join(wd, 'ablation.md')}")


if __name__ == "__main__":
    app.run(main)

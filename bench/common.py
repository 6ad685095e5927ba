"""Shared pieces of the benchmarks: model shapes, the PyTorch side's environment, timing and reporting.

Every benchmark runs both sides in one invocation, alternating them, and appends a section (machine,
date, command, median and spread) to BENCHMARKS.md via `append_section`. The PyTorch side runs in the
separate Python 3.11 environment `.venv-ref` (transformers + CPU torch) that `torch_python()` sets up;
the project itself never imports torch.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_config(name: str):
    """`tiny` (the test model), `110m` (text 512 x 8, vision 256 x 8, tied, Qwen's 151,936 vocabulary)
    or a preset name (`qwen2p5_vl_3b`, ...)."""
    from deepeyes_jax.model import config

    if name == "110m":
        c = config.tiny(tied=True)
        text = dataclasses.replace(c.text, vocab_size=151936, hidden_size=512, num_layers=8, num_heads=8,
                                   num_kv_heads=2, intermediate_size=1408, mrope_section=(8, 12, 12))
        vision = dataclasses.replace(c.vision, depth=8, hidden_size=256, num_heads=4, intermediate_size=704,
                                     out_hidden_size=512, fullatt_block_indexes=(3, 7))
        return c.replace(text=text, vision=vision, image_token_id=151655)
    return config.tiny() if name == "tiny" else config.get_preset(name)


def torch_python() -> str:
    """The `.venv-ref` interpreter (Python 3.11, torch 2.13 CPU, transformers 5.23), created on first use
    by tests/fixtures/setup_reference_env.sh (idempotent)."""
    py = os.path.join(ROOT, ".venv-ref", "bin", "python")
    subprocess.run(["bash", os.path.join(ROOT, "tests", "fixtures", "setup_reference_env.sh")], check=True,
                   stdout=subprocess.DEVNULL)
    return py


def summary(times: Sequence[float]) -> dict[str, float]:
    """Median and spread (min, max) of repeated measurements."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def machine() -> str:
    """`host, device kind x count` as the section headers write it."""
    import jax

    d = jax.devices()[0]
    return f"{platform.node() or 'host'}, {d.device_kind} x{jax.device_count()}, {os.cpu_count()} cpus"


def command() -> str:
    return " ".join([".venv/bin/python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def append_section(title: str, intro: str, header: Sequence[str], rows: Sequence[Sequence[object]],
                   output: str = "BENCHMARKS.md", notes: str = "") -> str:
    """Appends `### title (date, machine)` + command + intro + a markdown table (+ notes); returns it."""
    lines = [f"\n### {title} ({datetime.date.today()}, {machine()})\n", f"`{command()}`\n",
             intro.strip() + "\n",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    if notes:
        lines += ["", notes.strip()]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if output:
        with open(os.path.join(ROOT, output) if not os.path.isabs(output) else output, "a") as f:
            f.write(text)
    return text

"""The training-dynamics figure of the DeepEyes paper, drawn from a run's metrics JSONL.

    plot_dynamics("runs/a/metrics.jsonl", "runs/a/dynamics.png")
    plot_dynamics(["runs/cond/metrics.jsonl", "runs/none/metrics.jsonl"], "ablation.png",
                  labels=["conditional tool reward", "no tool reward"])

Panels over steps: accuracy, tool calls per trajectory, response length (policy tokens), grounding
IoU, reward and zoom rate. The paper reads three phases off such curves on V*: exploration (calls and
length rise, IoU low), high-frequency use (calls, accuracy and IoU rise), efficient use (fewer calls,
shorter answers, accuracy and IoU stay high). With one run a panel draws each of its keys (a key
ending in `/*` stands for every key under that prefix, e.g. accuracy per data source); with several
runs each run gets a colour and each key a line style (`/*` families are left out). A panel none of
whose keys is in the data says so instead of failing. Drawn on the Agg canvas: no display, no pyplot
global state.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from deepeyes_jax.rl.writers import read_metrics

_STYLES = ("-", "--", ":", "-.")


@dataclasses.dataclass(frozen=True)
class Panel:
    """One subplot: a title, a y-axis label and the metric keys it draws (the first is the main one)."""

    title: str
    ylabel: str
    keys: tuple[str, ...]


PANELS = (
    Panel("Accuracy", "accuracy", ("reward/acc", "reward/acc/*")),
    Panel("Tool calls per trajectory", "calls", ("tools/calls_mean", "tools/failed_mean")),
    Panel("Response length", "policy tokens", ("response/len_mean",)),
    Panel("Grounding IoU", "IoU", ("iou/mean", "iou/first", "iou/max")),
    Panel("Reward", "reward", ("reward/mean",)),
    Panel("Zoom rate", "fraction of trajectories", ("tools/zoom_rate", "tools/zoom_rate/*")),
)


def _expand(keys: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[str]:
    """Keys with `prefix/*` patterns replaced by the matching keys present in `rows`."""
    present = sorted({k for row in rows for k in row})
    out: list[str] = []
    for key in keys:
        matches = [k for k in present if k.startswith(key[:-1])] if key.endswith("/*") else [key]
        out.extend(k for k in matches if k not in out)
    return out


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(row["step"], float(row[key])) for row in rows if key in row]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pairs, strict=True)
    return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard-style debiased exponential moving average (weight 0 returns the values)."""
    if weight <= 0:
        return values
    out, acc = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out[i] = acc / (1 - weight ** (i + 1))
    return out


def _draw(ax: Any, panel: Panel, runs: Sequence[tuple[str, list[dict[str, Any]]]], smoothing: float) -> None:
    colours = [f"C{i % 10}" for i in range(len(runs))]
    drawn = 0
    for (label, rows), colour in zip(runs, colours, strict=True):
        # Comparing runs: per-prefix families (e.g. accuracy per source) would drown the curves.
        wanted = panel.keys if len(runs) == 1 else [k for k in panel.keys if not k.endswith("/*")]
        keys = _expand(wanted, rows)
        for k, key in enumerate(keys):
            steps, values = _series(rows, key)
            if not len(steps):
                continue
            if len(runs) == 1:  # one run: a colour per key, the main key bold
                colour, style, name = f"C{k % 10}", "-", key
            else:
                style, name = _STYLES[k % len(_STYLES)], f"{label}: {key}" if k else label
            width = 2.0 if k == 0 else 1.0
            if smoothing > 0:
                ax.plot(steps, values, color=colour, linestyle=style, linewidth=width, alpha=0.25)
            ax.plot(steps, ema(values, smoothing), color=colour, linestyle=style, linewidth=width, label=name,
                    marker="o" if len(steps) == 1 else None)
            drawn += 1
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not logged:\n" + "\n".join(panel.keys), ha="center", va="center",
                transform=ax.transAxes, color="gray", fontsize=9)


def plot_dynamics(jsonl: str | os.PathLike | Sequence[str | os.PathLike], png_path: str | os.PathLike, *,
                  labels: Sequence[str] | None = None, title: str | None = None, smoothing: float = 0.0,
                  panels: Sequence[Panel] = PANELS, columns: int = 3) -> pathlib.Path:
    """Draws the training-dynamics figure of one or several runs into a PNG.

    Args:
      jsonl: a `metrics.jsonl` (see `writers.MetricsWriter`), or several to compare.
      png_path: the PNG to write (its directory is created).
      labels: one legend label per JSONL; default: each file's directory name.
      title: figure title.
      smoothing: EMA weight in [0, 1) applied to every curve (the raw curve is drawn faintly under it).
      panels: what to draw (default PANELS).
      columns: panels per row.

    Returns:
      the PNG path.
    """
    paths = [jsonl] if isinstance(jsonl, str | os.PathLike) else list(jsonl)
    if not paths:
        raise ValueError("plot_dynamics needs at least one JSONL file")
    missing = [str(p) for p in paths if not pathlib.Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no metrics JSONL at {missing}; a run writes <workdir>/metrics.jsonl")
    labels = list(labels) if labels is not None else [pathlib.Path(p).resolve().parent.name for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} JSONL files; pass one label per file")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing={smoothing}; use a weight in [0, 1)")
    runs = [(label, read_metrics(p)) for label, p in zip(labels, paths, strict=True)]
    rows_n = -(-len(panels) // columns)
    fig = Figure(figsize=(5 * columns, 3.8 * rows_n), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows_n, columns, squeeze=False).ravel())
    for ax, panel in zip(axes, panels, strict=False):
        _draw(ax, panel, runs, smoothing)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    png = pathlib.Path(png_path)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    return png

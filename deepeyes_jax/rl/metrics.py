"""Rollout statistics for one training step: rewards, tool use, response length, grounding, stops.

Pure host functions over plain values: the step's trajectories (group-contiguous, as the sampler
returns them: trajectory i belongs to prompt group i // group_size), their records (`data/schema.py`
dicts) and their reward outputs (anything with `total`, `components`, `accuracy` and `format_error`,
e.g. the reward module's `RewardOutput`). `rollout_metrics` returns one flat dict of floats keyed by
slash-separated names, ready for `MetricsWriter.write`:

| key | meaning |
|---|---|
| `reward/mean`, `reward/std`, `reward/mean/<source>` | total reward (population std) |
| `reward/component/<name>` | mean of each reward component |
| `reward/acc`, `reward/acc/<source>` | accuracy, overall and per `data_source` |
| `reward/format_error_frac` | fraction of trajectories with a format error |
| `tools/calls_{mean,max,min}` | tool calls per trajectory (successful and failed) |
| `tools/ok_mean`, `tools/failed_mean` | successful / failed calls per trajectory |
| `tools/failed_frac` | failed calls / all calls (0 when there are no calls) |
| `tools/zoom_rate`, `tools/zoom_rate/<source>` | fraction of trajectories with at least one successful zoom |
| `response/len_{mean,max,min}` | policy tokens per trajectory (action-mask sum; no observations) |
| `response/total_len_mean`, `response/turns_mean` | all response tokens incl. observations; turns |
| `iou/first`, `iou/mean`, `iou/max` | grounding IoU of successful zooms against `gt_boxes` (below) |
| `iou/trajs` | how many trajectories the IoU keys average over |
| `stop/<reason>` | fraction of trajectories that ended for each reason (known reasons always present) |
| `groups/zero_std_frac` | fraction of GRPO groups whose rewards are all equal (zero advantage) |
| `groups/all_correct_frac`, `groups/all_wrong_frac` | groups where every / no trajectory is accurate |
| `rollout/trajs`, `rollout/groups` | batch size |

Grounding IoU: each successful zoom's box (in original pixels) scores its best IoU over the record's
ground-truth boxes; a trajectory scores its first call, the mean and the max over its calls; each key
is then averaged over the trajectories that have both ground-truth boxes and a successful zoom. The
`iou/*` keys are absent when no trajectory qualifies (math data, no zooms), as are per-source keys of
sources not in the batch. The reference never computed IoU; the paper's training-dynamics figure does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from deepeyes_jax.tools.zoom import ZOOM_TOOL_NAME

if TYPE_CHECKING:
    from deepeyes_jax.sampling.rollout import ToolCall, Trajectory

# Every way an episode ends (sampling/rollout.py); these `stop/` keys are written even when 0 so that
# curves are continuous. Any other reason met gets its own key too.
STOP_REASONS = ("answer", "no_tool_call", "max_turns", "observation_overflow", "turn_budget",
                "response_budget", "tools_disabled")
# Groups whose rewards differ by less than this have zero GRPO advantage: (r - mean) / (std + 1e-6).
ZERO_STD_TOL = 1e-6


class RewardLike(Protocol):
    """What the metrics read from a reward output (the reward module's `RewardOutput`)."""

    total: float
    components: Mapping[str, float]
    accuracy: float
    format_error: bool


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes in continuous coordinates.

    Boxes that only touch share no area (IoU 0). A degenerate box (x2 <= x1 or y2 <= y1) has IoU 0
    with anything, itself included.
    """
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    if ax2 <= ax1 or ay2 <= ay1 or bx2 <= bx1 or by2 <= by1:
        return 0.0
    iw = min(ax2, bx2) - max(ax1, bx1)
    ih = min(ay2, by2) - max(ay1, by1)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (area_a + area_b - inter)


def best_iou(box: Sequence[float], gt_boxes: Sequence[Sequence[float]]) -> float:
    """The highest IoU of `box` over `gt_boxes` (0 when there are none)."""
    return max((iou(box, g) for g in gt_boxes), default=0.0)


def is_successful_zoom(call: ToolCall) -> bool:
    """A zoom call that ran and produced a crop (its box is in original pixels)."""
    return call.status == "ok" and call.name == ZOOM_TOOL_NAME and call.box_original is not None


def zoom_ious(traj: Trajectory, gt_boxes: Sequence[Sequence[float]]) -> list[float]:
    """Best IoU against `gt_boxes` of each successful zoom of `traj`, in call order."""
    return [best_iou(c.box_original, gt_boxes) for c in traj.tool_calls if is_successful_zoom(c)]


def _stats(prefix: str, values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    return {f"{prefix}_mean": float(v.mean()), f"{prefix}_max": float(v.max()),
            f"{prefix}_min": float(v.min())}


def reward_metrics(records: Sequence[Mapping[str, Any]], rewards: Sequence[RewardLike]) -> dict[str, float]:
    """Reward mean/std, component means, accuracy and format errors, overall and per data source."""
    totals = np.array([float(r.total) for r in rewards])
    acc = np.array([float(r.accuracy) for r in rewards])
    out = {"reward/mean": float(totals.mean()), "reward/std": float(totals.std()),
           "reward/acc": float(acc.mean()),
           "reward/format_error_frac": float(np.mean([bool(r.format_error) for r in rewards]))}
    names = sorted({k for r in rewards for k in r.components})
    for name in names:
        # A component an output lacks counts as 0 (e.g. the tool term on math data).
        values = [float(r.components.get(name, 0.0)) for r in rewards]
        out[f"reward/component/{name}"] = float(np.mean(values))
    sources = np.array([str(rec["data_source"]) for rec in records])
    for src in sorted(set(sources.tolist())):
        sel = sources == src
        out[f"reward/mean/{src}"] = float(totals[sel].mean())
        out[f"reward/acc/{src}"] = float(acc[sel].mean())
    return out


def tool_metrics(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """Tool calls per trajectory (all, successful, failed) and the fraction of trajectories that zoom."""
    calls = [len(t.tool_calls) for t in trajs]
    ok = [sum(c.status == "ok" for c in t.tool_calls) for t in trajs]
    failed = [n - k for n, k in zip(calls, ok, strict=True)]
    out = _stats("tools/calls", calls)
    out["tools/ok_mean"] = float(np.mean(ok))
    out["tools/failed_mean"] = float(np.mean(failed))
    out["tools/failed_frac"] = float(sum(failed) / sum(calls)) if sum(calls) else 0.0
    out["tools/zoom_rate"] = float(np.mean([any(is_successful_zoom(c) for c in t.tool_calls) for t in trajs]))
    return out


def response_metrics(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """Response length in policy tokens (action-mask sum), all response tokens, and turns."""
    out = _stats("response/len", [int(np.sum(t.action_mask)) for t in trajs])
    out["response/total_len_mean"] = float(np.mean([len(t.response_ids) for t in trajs]))
    out["response/turns_mean"] = float(np.mean([len(t.turns) for t in trajs]))
    return out


def grounding_metrics(trajs: Sequence[Trajectory], records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """`iou/first`, `iou/mean`, `iou/max` and `iou/trajs` (see the module docstring); {} if none qualify."""
    first, mean, best = [], [], []
    for traj, rec in zip(trajs, records, strict=True):
        if len(rec["gt_boxes"]) == 0:  # lists, or arrays from a data loader
            continue
        scores = zoom_ious(traj, rec["gt_boxes"])
        if scores:
            first.append(scores[0])
            mean.append(float(np.mean(scores)))
            best.append(max(scores))
    if not first:
        return {}
    return {"iou/first": float(np.mean(first)), "iou/mean": float(np.mean(mean)),
            "iou/max": float(np.mean(best)), "iou/trajs": float(len(first))}


def stop_metrics(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """Fraction of trajectories per stop reason; every reason in STOP_REASONS is present."""
    reasons = [t.stop_reason for t in trajs]
    return {f"stop/{r}": reasons.count(r) / len(reasons) for r in sorted(set(STOP_REASONS) | set(reasons))}


def group_metrics(rewards: Sequence[RewardLike], group_size: int) -> dict[str, float]:
    """GRPO group statistics: zero-std groups (no learning signal), all-correct and all-wrong groups.

    Args:
      rewards: one per trajectory, group-contiguous.
      group_size: rollouts per prompt; must divide len(rewards).
    """
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the {len(rewards)} trajectories")
    totals = np.array([float(r.total) for r in rewards]).reshape(-1, group_size)
    correct = np.array([float(r.accuracy) > 0 for r in rewards]).reshape(-1, group_size)
    return {"groups/zero_std_frac": float(np.mean(np.ptp(totals, axis=1) < ZERO_STD_TOL)),
            "groups/all_correct_frac": float(np.mean(correct.all(axis=1))),
            "groups/all_wrong_frac": float(np.mean(~correct.any(axis=1)))}


def expand_records(records: Sequence[Mapping[str, Any]], num_trajs: int,
                   group_size: int) -> list[Mapping[str, Any]]:
    """One record per trajectory: `records` as given, or one per group repeated group_size times."""
    if len(records) == num_trajs:
        return list(records)
    if len(records) * group_size == num_trajs:
        return [rec for rec in records for _ in range(group_size)]
    raise ValueError(f"{len(records)} records for {num_trajs} trajectories with group_size={group_size}; "
                     "pass one record per trajectory or one per group")


def rollout_metrics(trajs: Sequence[Trajectory], records: Sequence[Mapping[str, Any]],
                    rewards: Sequence[RewardLike], group_size: int) -> dict[str, float]:
    """Every rollout statistic of one step as a flat dict (keys in the module docstring).

    Args:
      trajs: the step's trajectories, group-contiguous (trajectory i is in group i // group_size).
      records: their records (`data/schema.py`), one per trajectory or one per group.
      rewards: one reward output per trajectory.
      group_size: rollouts per prompt.

    Returns:
      {key: value} of Python floats.
    """
    if not trajs:
        raise ValueError("rollout_metrics needs at least one trajectory")
    if len(rewards) != len(trajs):
        raise ValueError(f"{len(rewards)} reward outputs for {len(trajs)} trajectories; "
                         "pass one per trajectory")
    recs = expand_records(records, len(trajs), group_size)
    out = {"rollout/trajs": float(len(trajs))}
    out.update(group_metrics(rewards, group_size))
    out["rollout/groups"] = float(len(trajs) // group_size)
    out.update(reward_metrics(recs, rewards))
    out.update(tool_metrics(trajs))
    sources = np.array([str(r["data_source"]) for r in recs])
    zoomed = np.array([any(is_successful_zoom(c) for c in t.tool_calls) for t in trajs])
    for src in sorted(set(sources)):
        out[f"tools/zoom_rate/{src}"] = float(zoomed[sources == src].mean())
    out.update(response_metrics(trajs))
    out.update(grounding_metrics(trajs, recs))
    out.update(stop_metrics(trajs))
    return out

"""Rollout metrics, the JSONL/TensorBoard writer, sample trajectories and the dynamics figure."""

import dataclasses
import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from conftest import FIXTURES
from deepeyes_jax.rl import metrics, plots, writers
from deepeyes_jax.sampling.rollout import ToolCall, Trajectory
from deepeyes_jax.tools import ROTATE_TOOL_NAME, ZOOM_TOOL_NAME

REPO = FIXTURES.parents[1]


# ----------------------------------------------------------------------------------- IoU


@pytest.mark.parametrize("a, b, expected", [
    ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),                 # identical
    ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),               # disjoint
    ((0, 0, 10, 10), (2, 2, 4, 4), 4 / 100),               # contained
    ((0, 0, 1, 1), (1, 0, 2, 1), 0.0),                     # touching edges
    ((0, 0, 1, 1), (1, 1, 2, 2), 0.0),                     # touching corners
    ((0, 0, 2, 2), (1, 1, 3, 3), 1 / 7),                   # partial overlap
    ((0, 0, 0, 5), (0, 0, 0, 5), 0.0),                     # degenerate, even with itself
    ((0, 0, 10, 10), (5, 5, 5, 8), 0.0),                   # degenerate inside a box
    ((4, 4, 2, 2), (0, 0, 10, 10), 0.0),                   # inverted
])
def test_iou_hand_cases(a, b, expected):
    assert metrics.iou(a, b) == pytest.approx(expected, abs=0, rel=1e-12)
    assert metrics.iou(b, a) == pytest.approx(expected, abs=0, rel=1e-12)


def test_best_iou_takes_the_best_ground_truth_box():
    assert metrics.best_iou((20, 20, 25, 30), [(0, 0, 10, 10), (20, 20, 30, 30)]) == 0.5
    assert metrics.best_iou((0, 0, 1, 1), []) == 0.0


# ------------------------------------------------------------------------- hand-built batch


@dataclasses.dataclass
class Reward:
    total: float
    components: dict
    accuracy: float
    format_error: bool
    answer_text: str = ""


def zoom(turn, box, status="ok"):
    return ToolCall(turn=turn, raw="{}", name=ZOOM_TOOL_NAME if status == "ok" else None, status=status,
                    error=None if status == "ok" else "Invalid tool call format", box_model=box,
                    box_original=box if status == "ok" else None)


def traj(mask, calls=(), turns=1, stop="answer", answer="A"):
    mask = np.asarray(mask, np.int32)
    n = len(mask)
    return Trajectory(prompt_ids=np.arange(3), prompt_positions=np.zeros((3, 3), np.int32),
                      response_ids=np.arange(n), action_mask=mask, logprobs=np.zeros(n, np.float32),
                      source=mask.copy(), response_positions=np.zeros((3, n), np.int32), images=[],
                      pil_images=[], tool_calls=list(calls), turns=[f"turn {i}" for i in range(turns)],
                      answer=answer, stop_reason=stop)


VSTAR = {"id": "v1", "data_source": "vstar", "image": b"png", "question": "What colour?", "options": [],
         "answer": "red", "gt_boxes": [[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]], "category": ""}
MATH = {"id": "m1", "data_source": "thinklite_eureka", "image": b"png", "question": "1+1?", "options": [],
        "answer": "2", "gt_boxes": [], "category": ""}


def batch():
    """Two groups of two: a V* prompt (ground-truth boxes) and a math prompt (none)."""
    rotate = ToolCall(turn=0, raw="{}", name=ROTATE_TOOL_NAME, status="ok", error=None, box_model=None,
                      box_original=None)
    trajs = [
        # zooms scoring IoU 1 and 0.5, then a failed call
        traj([1, 1, 1, 0, 0, 1], [zoom(0, (0, 0, 10, 10)), zoom(1, (20, 20, 25, 30)), zoom(2, None, "error")],
             turns=3),
        traj([1, 1], [zoom(0, (5, 0, 15, 10))], turns=2, stop="max_turns"),  # IoU 1/3
        traj([1, 1, 1], [rotate], stop="answer"),  # a successful call that is not a zoom
        traj([1, 1, 1, 1, 1], [zoom(0, None, "error")], turns=2, stop="turn_budget", answer=None),
    ]
    rewards = [Reward(2.0, {"acc": 0.8, "format": 0.0, "tool": 1.2}, 1.0, False),
               Reward(-0.2, {"acc": 0.0, "format": -0.2, "tool": 0.0}, 0.0, True),
               Reward(1.2, {"acc": 1.2, "format": 0.0}, 1.0, False),
               Reward(1.2, {"acc": 1.2, "format": 0.0}, 1.0, False)]
    return trajs, [VSTAR, MATH], rewards


EXPECTED = {
    "rollout/trajs": 4, "rollout/groups": 2,
    "groups/zero_std_frac": 0.5, "groups/all_correct_frac": 0.5, "groups/all_wrong_frac": 0.0,
    "reward/mean": 1.05, "reward/std": math.sqrt(0.6275), "reward/acc": 0.75,
    "reward/format_error_frac": 0.25,
    "reward/component/acc": 0.8, "reward/component/format": -0.05, "reward/component/tool": 0.3,
    "reward/mean/vstar": 0.9, "reward/acc/vstar": 0.5,
    "reward/mean/thinklite_eureka": 1.2, "reward/acc/thinklite_eureka": 1.0,
    "tools/calls_mean": 1.5, "tools/calls_max": 3, "tools/calls_min": 1,
    "tools/ok_mean": 1.0, "tools/failed_mean": 0.5, "tools/failed_frac": 1 / 3, "tools/zoom_rate": 0.5,
    "tools/zoom_rate/vstar": 1.0, "tools/zoom_rate/thinklite_eureka": 0.0,
    "response/len_mean": 3.5, "response/len_max": 5, "response/len_min": 2,
    "response/total_len_mean": 4.0, "response/turns_mean": 2.0,
    "iou/first": (1 + 1 / 3) / 2, "iou/mean": (0.75 + 1 / 3) / 2, "iou/max": (1 + 1 / 3) / 2, "iou/trajs": 2,
    "stop/answer": 0.5, "stop/max_turns": 0.25, "stop/turn_budget": 0.25, "stop/no_tool_call": 0.0,
    "stop/observation_overflow": 0.0, "stop/response_budget": 0.0, "stop/tools_disabled": 0.0,
}


def test_rollout_metrics_every_key_exact():
    trajs, records, rewards = batch()
    out = metrics.rollout_metrics(trajs, records, rewards, group_size=2)
    assert set(out) == set(EXPECTED)
    for key, value in EXPECTED.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key
        assert type(out[key]) is float, key
    # One record per trajectory gives the same numbers as one per group.
    per_traj = [VSTAR, VSTAR, MATH, MATH]
    assert metrics.rollout_metrics(trajs, per_traj, rewards, group_size=2) == out


def test_rollout_metrics_without_boxes_or_zooms_has_no_iou_keys():
    trajs, _, rewards = batch()
    out = metrics.rollout_metrics(trajs, [MATH, MATH], rewards, group_size=2)
    assert not [k for k in out if k.startswith("iou/")]
    out = metrics.rollout_metrics([traj([1]), traj([1])], [VSTAR], rewards[:2], group_size=2)
    assert not [k for k in out if k.startswith("iou/")] and out["tools/zoom_rate"] == 0.0


def test_unknown_stop_reason_gets_its_own_key():
    _, _, rewards = batch()
    out = metrics.rollout_metrics([traj([1], stop="unknown")], [MATH], rewards[:1], group_size=1)
    assert out["stop/unknown"] == 1.0 and out["stop/answer"] == 0.0


def test_zero_std_group_fraction():
    r = [Reward(t, {}, float(t > 0), False) for t in (1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)]
    out = metrics.group_metrics(r, group_size=3)
    assert out == {"groups/zero_std_frac": 2 / 3, "groups/all_correct_frac": 1 / 3,
                   "groups/all_wrong_frac": 1 / 3}
    # A group of one has no spread.
    assert metrics.group_metrics(r, group_size=1)["groups/zero_std_frac"] == 1.0
    assert metrics.group_metrics(r[:2] + r[4:6], group_size=2)["groups/all_wrong_frac"] == 0.5


def test_bad_shapes_fail_loudly():
    trajs, records, rewards = batch()
    with pytest.raises(ValueError, match="divide the 4 trajectories"):
        metrics.rollout_metrics(trajs, records * 2, rewards, group_size=3)
    with pytest.raises(ValueError, match="one record per trajectory or one per group"):
        metrics.rollout_metrics(trajs, records[:1], rewards, group_size=2)
    with pytest.raises(ValueError, match="3 reward outputs for 4 trajectories"):
        metrics.rollout_metrics(trajs, records, rewards[:3], group_size=2)


# ------------------------------------------------------------------------------- writers


def read_events(logdir):
    """Every event of every TensorBoard file under logdir, checking the TFRecord framing and CRCs."""
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            header = data[i:i + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[i + 8:i + 12])[0] == masked_crc32c(header)
            body = data[i + 12:i + 12 + length]
            assert struct.unpack("<I", data[i + 12 + length:i + 16 + length])[0] == masked_crc32c(body)
            events.append(event_pb2.Event.FromString(body))
            i += 16 + length
    return events


def scalars(events):
    return [(e.step, v.tag, v.simple_value) for e in events if e.HasField("summary") for v in e.summary.value]


def jsonl_rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_writer_jsonl_and_tensorboard(tmp_path):
    with writers.MetricsWriter(tmp_path) as w:
        w.write(1, {"reward/mean": 0.5, "tools/calls_mean": np.float32(1.25)})
        w.write(2, {"reward/mean": np.array(0.75), "bad": float("nan")})
        assert jsonl_rows(tmp_path)[-1]["step"] == 2  # flushed every step, before close
    assert jsonl_rows(tmp_path) == [{"step": 1, "reward/mean": 0.5, "tools/calls_mean": 1.25},
                                    {"step": 2, "reward/mean": 0.75, "bad": None}]
    got = scalars(read_events(tmp_path / "tensorboard"))
    assert got[:3] == [(1, "reward/mean", 0.5), (1, "tools/calls_mean", 1.25), (2, "reward/mean", 0.75)]
    assert got[3][:2] == (2, "bad") and math.isnan(got[3][2])
    assert writers.read_metrics(tmp_path / "metrics.jsonl")[1] == {"step": 2, "reward/mean": 0.75}
    with pytest.raises(RuntimeError, match="is closed"):
        w.write(3, {"reward/mean": 1.0})


def test_writer_resume_drops_redone_steps(tmp_path):
    with writers.MetricsWriter(tmp_path) as w:
        for step in range(1, 5):
            w.write(step, {"x": step})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "x": ')  # torn by a crash
    with writers.MetricsWriter(tmp_path, resume_step=3) as w:
        w.write(3, {"x": 30.0})
    assert [(r["step"], r["x"]) for r in jsonl_rows(tmp_path)] == [(1, 1), (2, 2), (3, 30.0)]
    # No resume step: the first step written decides.
    with writers.MetricsWriter(tmp_path) as w:
        w.write(2, {"x": 20.0})
    assert [(r["step"], r["x"]) for r in jsonl_rows(tmp_path)] == [(1, 1), (2, 20.0)]
    events = read_events(tmp_path / "tensorboard")
    purges = [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]  # START
    assert purges == [3, 2]  # TensorBoard hides the old run's events from these steps on
    assert scalars(events)[-2:] == [(3, "x", 30.0), (2, "x", 20.0)]


def test_only_process_zero_writes(tmp_path):
    trajs, records, rewards = batch()
    with writers.MetricsWriter(tmp_path / "run", process_index=1) as w:
        w.write(1, {"x": 1.0})
    items = [(trajs[0], VSTAR, rewards[0])]
    assert writers.save_trajectories(tmp_path / "run", 1, items, process_index=1) is None
    assert not (tmp_path / "run").exists()


def test_writer_rejects_non_scalars(tmp_path):
    with writers.MetricsWriter(tmp_path) as w, pytest.raises(ValueError, match="'v'=.* is not a scalar"):
        w.write(1, {"v": np.ones(3)})


def test_format_progress():
    m = {"reward/mean": 1.23456, "reward/acc": 0.625, "tools/calls_mean": 1.5, "response/len_mean": 312.4,
         "iou/mean": 0.4, "update/pg_loss": -0.0123456, "update/grad_norm": 0.87, "time/step": 412.34,
         "throughput/tokens_per_s": 1520.2, "other": 3.0}
    assert writers.format_progress(12, m) == (
        "step 12 | reward 1.235 | acc 0.625 | calls 1.50 | len 312 | iou 0.400 | pg_loss -0.01235 | "
        "grad_norm 0.87 | step_s 412.3 | tok/s 1520")
    assert writers.format_progress(3, {"reward/mean": 0.5}) == "step 3 | reward 0.500"


def test_save_trajectories(tmp_path):
    trajs, records, rewards = batch()
    path = writers.save_trajectories(tmp_path, 123, [(trajs[0], VSTAR, rewards[0]), (trajs[2], None, None)])
    assert path == tmp_path / "trajectories" / "step_000123.jsonl"
    first, second = [json.loads(line) for line in path.read_text().splitlines()]
    assert first["id"] == "v1" and first["ground_truth"] == "red" and "image" not in first
    assert first["turns"] == ["turn 0", "turn 1", "turn 2"] and first["answer"] == "A"
    assert [c.get("iou") for c in first["tool_calls"]] == [1.0, 0.5, None]
    assert first["tool_calls"][1]["box_original"] == [20.0, 20.0, 25.0, 30.0]
    assert first["tool_calls"][2]["status"] == "error" and first["tool_calls"][2]["error"]
    assert first["reward"] == {"total": 2.0, "components": {"acc": 0.8, "format": 0.0, "tool": 1.2},
                               "accuracy": 1.0, "format_error": False, "answer_text": ""}
    assert first["policy_tokens"] == 4 and first["response_tokens"] == 6
    assert "reward" not in second and second["tool_calls"][0]["name"] == ROTATE_TOOL_NAME


# -------------------------------------------------------------------------------- figure


def write_run(workdir, steps, scale=1.0, keys=None):
    with writers.MetricsWriter(workdir) as w:
        for s in range(steps):
            m = {"reward/mean": scale * s / steps, "reward/acc": s / steps, "reward/acc/vstar": s / steps,
                 "tools/calls_mean": 1 + np.sin(s), "response/len_mean": 300 + 10 * s, "iou/mean": 0.1 * s,
                 "iou/first": 0.05 * s, "tools/zoom_rate": 0.5}
            w.write(s, {k: v for k, v in m.items() if keys is None or k in keys})
    return workdir / "metrics.jsonl"


def is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_dynamics_one_and_two_runs(tmp_path):
    a = write_run(tmp_path / "a", 8)
    b = write_run(tmp_path / "b", 5, scale=2.0, keys={"reward/mean", "reward/acc"})  # other panels missing
    assert is_png(plots.plot_dynamics(a, tmp_path / "one.png", title="run a", smoothing=0.5))
    png = plots.plot_dynamics([a, b], tmp_path / "out" / "two.png", labels=["cond", "none"])
    assert is_png(png)
    only_reward = write_run(tmp_path / "c", 1, keys={"reward/mean"})
    assert is_png(plots.plot_dynamics(only_reward, tmp_path / "sparse.png"))
    with pytest.raises(ValueError, match="2 labels for 1 JSONL"):
        plots.plot_dynamics(a, tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(FileNotFoundError, match="no metrics JSONL"):
        plots.plot_dynamics(tmp_path / "nope.jsonl", tmp_path / "x.png")


def test_ema_is_debiased():
    assert np.allclose(plots.ema(np.array([2.0, 2.0, 2.0]), 0.9), 2.0)
    assert np.array_equal(plots.ema(np.array([1.0, 3.0]), 0.0), [1.0, 3.0])


def test_launch_plot_dynamics(tmp_path):
    write_run(tmp_path, 4)
    proc = subprocess.run([sys.executable, "launch/plot_dynamics.py", f"--workdir={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert is_png(tmp_path / "dynamics.png")

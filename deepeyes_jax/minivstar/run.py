"""Mini-V* end to end: data -> base model -> format stage -> GRPO -> evaluation -> figure and summary.

Every stage writes under one work directory and is skipped when its output is already there, so a
rerun resumes (the GRPO stage resumes from its last Orbax checkpoint):

  heldout/            the held-out items in V* Bench's folder format (+ oracle.json)
  base/               the randomly initialised Hugging Face directory
  format/             the model after the format stage (Hugging Face directory) + metrics.jsonl; its
                      .done holds the stage's time, `format_stage.probe`, `format_stage.box_prior`
                      and `format_stage.full_view_reading`
  eval_start/         evaluation of format/ on heldout/ (results.json, results.md)
  grpo/               the GRPO run (metrics.jsonl, trajectories, Orbax checkpoints)
  eval_end/           evaluation of the last GRPO checkpoint on heldout/
  dynamics.png        the training-dynamics figure;  summary.md / summary.json  start vs end (with
                      the format-stage diagnostics, `aim_by_frame`, `zoom_by_kind` and
                      `zoom_by_quarter`)
  view.html           the trajectory viewer page of the final evaluation
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from deepeyes_jax.data import synthetic_vstar as sv
from deepeyes_jax.eval import benchmarks as bench_lib
from deepeyes_jax.eval import evaluate as eval_lib
from deepeyes_jax.eval import viewer
from deepeyes_jax.minivstar import base as base_lib
from deepeyes_jax.minivstar import format_stage
from deepeyes_jax.minivstar import tasks as tasks_lib
from deepeyes_jax.model import checkpoint as ckpt_lib
from deepeyes_jax.model import sharding
from deepeyes_jax.rl import checkpoint as rl_ckpt
from deepeyes_jax.rl import plots, trainer, writers
from deepeyes_jax.sampling import Sampler

DONE = ".done"


def _done(path: str) -> bool:
    return os.path.exists(os.path.join(path, DONE))


def _mark(path: str, info: dict[str, Any] | None = None) -> None:
    with open(os.path.join(path, DONE), "w") as f:
        json.dump(info or {}, f)


def _took(path: str, t0: float) -> float:
    """Seconds the finished stage `path` took: what its marker recorded, or, where it has none (the stage
    finished in this invocation), the time since `t0`, then recorded. So a rerun that resumes or reuses
    finished stages (the ablation's shared ones) reports the time each took, not 0. A stage resumed
    after a stop records the time of the invocation that finished it."""
    marker = os.path.join(path, DONE)
    with open(marker) as f:
        info = json.load(f)
    if "seconds" not in info:
        info["seconds"] = time.time() - t0
        with open(marker, "w") as f:
            json.dump(info, f)
    return info["seconds"]


def _log(msg: str) -> None:
    print(f"[mini-v*] {msg}", flush=True)


def heldout(c: ml_collections.ConfigDict, workdir: str) -> str:
    path = os.path.join(workdir, "heldout")
    if not _done(path):
        meta = sv.write_dataset(path, c.data.eval_items, c.data.eval_seed, tasks_lib.SYNTHETIC)
        oracle = sv.oracle_check(path, margin=0.12)
        with open(os.path.join(path, "oracle.json"), "w") as f:
            json.dump(oracle, f, indent=1)
        _mark(path, meta)
        _log(f"held-out set: {meta['counts']}; oracle (full view / crop accuracy): "
             + ", ".join(f"{k} {v['full_view']:.2f}/{v['crop']:.2f}" for k, v in oracle.items()))
    return path


def base_model(c: ml_collections.ConfigDict, workdir: str) -> str:
    path = os.path.join(workdir, "base")
    if not _done(path):
        m = c.model
        cfg = base_lib.model_config(m.hidden, m.layers, m.vision_hidden, m.vision_depth)
        base_lib.write_base(path, c.seed, tasks_lib.SYNTHETIC.max_pixels, cfg)
        _mark(path)
    return path


def format_model(c: ml_collections.ConfigDict, workdir: str, base: str, mesh, rules) -> str:
    path = os.path.join(workdir, "format")
    if _done(path):
        return path
    os.makedirs(path, exist_ok=True)
    pre = ckpt_lib.load_pretrained(base, mesh=mesh, rules=rules)
    tasks = tasks_lib.make_tasks(c.data.train_items, c.data.train_seed)
    writer = writers.MetricsWriter(path)  # format/metrics.jsonl
    t0 = time.time()

    def log(step, m):
        writer.write(step, m)
        total = c.format.pretrain_steps + c.format.steps
        if step % c.format.log_every == 0 or step == total:
            phase = "captions" if m["format/pretraining"] else "protocol"
            _log(f"format step {step}/{total} ({phase}): nll {m['format/nll']:.3f} "
                 f"({m['time/step']:.1f}s/step, {time.time() - t0:.0f}s)")

    fcfg = format_stage.FormatConfig(steps=c.format.steps, batch=c.format.batch,
                                     pretrain_steps=c.format.pretrain_steps,
                                     pretrain_batch=c.format.pretrain_batch, kinds=tuple(c.format.kinds),
                                     crop_first=c.format.crop_first, ground_first=c.format.ground_first,
                                     refresh=c.format.refresh, restate=c.format.restate,
                                     name_zoom=c.format.name_zoom, ground_calls=c.format.ground_calls,
                                     aim=c.format.aim,
                                     crop_as_observation=c.format.crop_as_observation,
                                     lr=c.format.lr,
                                     zoom_prob=c.format.zoom_prob, seed=c.seed,
                                     micro_batches=c.format.micro_batches,
                                     length_multiple=c.format.length_multiple,
                                     window_multiple=c.format.window_multiple)
    rollout = trainer.rollout_config(c.grpo.rollout)
    pre = format_stage.train(pre, tasks, rollout, fcfg, mesh, rules, log)
    writer.close()
    pre.export(path)
    # How GRPO will find it: sampled at the GRPO temperature (the greedy evaluation hides sampling errors),
    # and where its tool call looks, teacher-forced (the prior GRPO has to sharpen).
    sampler = Sampler(pre.model, pre.tokenizer, pre.image_processor, rollout)
    with jax.set_mesh(mesh):
        probe = format_stage.probe(sampler, tasks, c.format.probe_prompts, c.format.probe_samples,
                                   c.grpo.rollout.temperature, seed=c.seed)
        prior = format_stage.box_prior(sampler, tasks, c.format.prior_items)
        reading = format_stage.full_view_reading(sampler, tasks, c.format.prior_items)
    _log("format stage sampled at temperature {}: {}".format(
        c.grpo.rollout.temperature, ", ".join(f"{k} {v:.3f}" for k, v in probe.items())))
    _log("format stage box prior (teacher-forced): " + ", ".join(f"{k} {v:.3f}" for k, v in prior.items()))
    _log("format stage full-view reading of zoom-free items (teacher-forced): "
         + ", ".join(f"{k} {v:.3f}" for k, v in reading.items()))
    _mark(path, {"probe": probe, "box_prior": prior, "full_view": reading})  # its time: `run` (`_took`)
    return path


def evaluate(c: ml_collections.ConfigDict, checkpoint: str, base: str | None, heldout_dir: str, out: str,
             mesh, rules) -> dict[str, Any]:
    """Greedy evaluation of a checkpoint (HF directory, or Orbax run directory over `base`)."""
    if _done(out):  # marked after results.json is written
        with open(os.path.join(out, "results.json")) as f:
            return json.load(f)
    model, pre, step = ckpt_lib.load_for_sampling(checkpoint, base, mesh, rules)
    sampler = Sampler(model, pre.tokenizer, pre.image_processor, trainer.rollout_config(c.grpo.rollout))
    ecfg = eval_lib.EvalConfig(orders=tuple(c.eval.orders), seed=c.eval.seed, batch_size=c.eval.batch,
                               media_max_side=c.eval.media_max_side, progress=False)
    report = eval_lib.evaluate([bench_lib.detect(heldout_dir, "mini_vstar")],
                               eval_lib.GreedyRollout(sampler, mesh), out, ecfg,
                               settings={"checkpoint": os.path.abspath(checkpoint), "step": step})
    _mark(out)
    return report


def _headline(report: dict[str, Any], order: str = "shuffled") -> dict[str, float | None]:
    s = report["benchmarks"]["mini_vstar"]["summary"][order]
    split = s.get("zoom_split", {})
    need, free = split.get("zoom_needed", {}), split.get("zoom_free", {})
    return {"accuracy": s["accuracy"], "zoom_rate": s["zoom_rate"],
            "zoom_needed/accuracy": need.get("accuracy"), "zoom_needed/zoom_rate": need.get("zoom_rate"),
            "zoom_needed/iou_mean": need.get("iou_mean"), "zoom_free/accuracy": free.get("accuracy"),
            "zoom_free/zoom_rate": free.get("zoom_rate"), "calls_per_item": s["calls_per_item"]}


def _eval_rows(eval_dir: str, order: str) -> Iterator[dict[str, Any]]:
    """The per-item results of an evaluation (`evaluate`'s `out`) in one option order."""
    with open(os.path.join(eval_dir, "mini_vstar", "items.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row["order"] == order:
                yield row


def aim_by_frame(eval_dir: str, order: str = "shuffled") -> dict[str, list[int]]:
    """{frame: [boxed, items]} over the zoom-needed items of an evaluation (`evaluate`'s `out`), by
    the frame colour their question names: on how many the first successful zoom boxes the asked card
    (IoU >= 0.5 with its box; a tile box around the right card scores 0.64-0.81, any other tile 0).
    Where a frame sits is a fact the policy has to learn per frame (`synthetic_vstar.FRAME_TILES`), so
    this shows which of them GRPO learned (BENCHMARKS.md, Mini-V* fourteenth runs)."""
    out: dict[str, list[int]] = {}
    for row in _eval_rows(eval_dir, order):
        if not row["zoom_needed"]:
            continue
        m = re.search(r"the (\w+) frame", row["question"])
        if m is None:
            raise ValueError(f"item {row['id']}: no frame named in {row['question']!r}; aim_by_frame "
                             "reads Mini-V* attribute items")
        ious = [c["iou"] for c in row["tool_calls"] if c["status"] == "ok" and "iou" in c]
        n = out.setdefault(m.group(1), [0, 0])
        n[0] += int(bool(ious) and ious[0] >= 0.5)
        n[1] += 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1][0] / kv[1][1], kv[0])))


def zoom_by_kind(eval_dir: str, order: str = "shuffled") -> dict[str, list[int]]:
    """{kind: [items zoomed, items]} over an evaluation (`evaluate`'s `out`): zoom-needed items, and the
    zoom-free ones by kind (`zoom_free/attribute`, `/relative`, `/border`: the picture's border,
    `SyntheticConfig.border_frac`). Selective use shows here: a zoom can only lose a border item."""
    out: dict[str, list[int]] = {}
    for row in _eval_rows(eval_dir, order):
        if row["zoom_needed"]:
            kind = "zoom_needed"
        elif sv.BORDER_TARGET in row["question"]:
            kind = "zoom_free/border"
        else:
            kind = "zoom_free/" + ("relative" if row["category"] == "relative_position" else "attribute")
        n = out.setdefault(kind, [0, 0])
        n[0] += int(any(c["status"] == "ok" for c in row["tool_calls"]))
        n[1] += 1
    return dict(sorted(out.items()))


def zoom_by_quarter(metrics_path: str) -> dict[str, list[float | None]]:
    """{data source: [zoom rate of the training batches over each quarter of the GRPO steps]}, from
    the trainer's `tools/zoom_rate/<source>` (sampled rollouts, not greedy): how tool use moves during
    training on zoom-needed (`vstar`) and zoom-free (`minivstar_free`) prompts, where the greedy
    evaluations see only the two ends. None for a quarter without prompts of that source. Rows as
    `writers.read_metrics` gives them: one per step, so a resumed run's repeated steps count once."""
    rows = writers.read_metrics(metrics_path)
    prefix = "tools/zoom_rate/"
    sources = sorted({k[len(prefix):] for r in rows for k in r if k.startswith(prefix)})
    quarters = [q for q in np.array_split(np.arange(len(rows)), 4) if len(q)]
    out = {}
    for source in sources:
        key = prefix + source
        rates = [[rows[i][key] for i in q if key in rows[i]] for q in quarters]
        out[source] = [float(np.mean(r)) if r else None for r in rates]
    return out


def _aim_text(aim: dict[str, list[int]]) -> str:
    return ", ".join(f"{k} {a}/{n}" for k, (a, n) in aim.items())


def summarize(start: dict[str, Any], end: dict[str, Any], seconds: dict[str, float], path: str,
              label: str, prior: dict[str, float] | None = None,
              reading: dict[str, float] | None = None,
              aim: tuple[dict[str, list[int]], dict[str, list[int]]] | None = None,
              probe: dict[str, float] | None = None, temperature: float | None = None,
              quarters: dict[str, list[float | None]] | None = None,
              kinds: tuple[dict[str, list[int]], dict[str, list[int]]] | None = None) -> dict[str, Any]:
    a, b = _headline(start), _headline(end)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"# Mini-V* ({label})", "", "Held-out items, greedy, options shuffled (seeded).", "",
             "| metric | start (after format stage) | end (after GRPO) | change |", "|---|---|---|---|"]
    for k in a:
        d = None if a[k] is None or b[k] is None else b[k] - a[k]
        lines.append(f"| {k} | {fmt(a[k])} | {fmt(b[k])} | {fmt(d)} |")
    if probe:
        lines += ["", "The format model sampled at the GRPO temperature {} (`format_stage.probe`, {} "
                  "episodes of training prompts): zooms on {:.3f} of episodes, {:.3f} of attribute zooms "
                  "into the asked card, {:.3f} of calls fail, {:.3f} of episodes answered (a broken "
                  "protocol makes GRPO unlearn zooming: BENCHMARKS.md, Mini-V* fourteenth runs), accuracy "
                  "{:.3f}.".format(
                      temperature, "{:.0f}".format(probe["episodes"]) if "episodes" in probe else "its",
                      probe["zoom_rate"], probe["zoom_on_target"], probe["tool_failed_frac"],
                      probe["answered"], probe["accuracy"])]
    if prior:
        lines += ["", "The format model's tool-call box, teacher-forced over the 12 tiles on {:.0f} training "
                  "attribute items (`format_stage.box_prior`): P(asked card's tile) {:.3f}, P(a scene card's "
                  "tile) {:.3f}, P(asked | scene cards) {:.3f} (chance {:.3f}), asked tile the most likely "
                  "on {:.3f} of items.".format(prior["items"], prior["asked_tile"], prior["card_tiles"],
                                               prior["asked_among_cards"], prior["chance_among_cards"],
                                               prior["asked_most_likely"])]
    if reading:
        read = [f"{reading[k]:.3f} of {reading['items_' + k]:.0f} {k} items "
                f"(chance {reading['chance_' + k]:.3f})" for k in ("attribute", "relative", "border")
                if reading.get("items_" + k)]  # a kind without items (a small run) is left out
        lines += ["", "Its answers to zoom-free training items without zooming, teacher-forced over the "
                  "options (`format_stage.full_view_reading`): right on " + ", ".join(read) + "."]
    if aim:
        lines += ["", "Zoom-needed items whose first zoom boxes the asked card (IoU >= 0.5), by the frame "
                  "the question names (`run.aim_by_frame`): start " + _aim_text(aim[0]) + "; end "
                  + _aim_text(aim[1]) + "."]
    if kinds:
        first, last = kinds
        lines += ["", "Held-out items zoomed, greedy, by kind (`run.zoom_by_kind`): " + "; ".join(
            "{} {}/{} -> {}/{}".format(k, *first[k], *last.get(k, [0, 0])) for k in first) + "."]
    if quarters:
        lines += ["", "Zoom rate of the GRPO training batches (sampled) by quarter of the steps "
                  "(`run.zoom_by_quarter`): " + "; ".join(
                      f"{s} " + " -> ".join("-" if v is None else f"{v:.2f}" for v in q)
                      for s, q in quarters.items()) + "."]
    lines += ["", "Wall time (s, each stage when it ran): "
              + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())]
    text = "\n".join(lines) + "\n"
    with open(path + ".md", "w") as f:
        f.write(text)
    out = {"label": label, "start": a, "end": b, "seconds": seconds, "box_prior": prior, "full_view": reading,
           "aim_by_frame": None if aim is None else {"start": aim[0], "end": aim[1]}, "probe": probe,
           "zoom_by_quarter": quarters,
           "zoom_by_kind": None if kinds is None else {"start": kinds[0], "end": kinds[1]}}
    with open(path + ".json", "w") as f:
        json.dump(out, f, indent=1)
    print(text, flush=True)
    return out


def grpo(g: ml_collections.ConfigDict, grpo_dir: str) -> None:
    """The GRPO stage (`trainer.run`), marked done only when its last step is saved: a run stopped by
    SIGTERM (the trainer saves and returns) exits here, and the same command resumes it."""
    if _done(grpo_dir):
        return
    trainer.run(g, grpo_dir)
    ckpt = rl_ckpt.Checkpointer(grpo_dir)
    steps = ckpt.steps()
    ckpt.close()
    if not steps or steps[-1] < g.steps:
        raise SystemExit(f"GRPO stopped at step {steps[-1] if steps else 0} of {g.steps} (preempted); "
                         "rerun the same command to resume it")
    _mark(grpo_dir)


def run(c: ml_collections.ConfigDict, workdir: str, shared: str | None = None) -> dict[str, Any]:
    """Runs every stage (see the module docstring); returns the summary.

    `shared` (default: `workdir`) holds the stages that do not depend on the reward (held-out set, base,
    format stage, starting evaluation), so the ablation's variants share them.
    """
    os.makedirs(workdir, exist_ok=True)
    shared = shared or workdir
    os.makedirs(shared, exist_ok=True)
    mesh = sharding.make_mesh(c.grpo.mesh.shape)
    rules = sharding.get_rules(c.grpo.mesh.rules)
    seconds: dict[str, float] = {}  # each stage's time when it ran (`_took`)
    t = time.time()
    held = heldout(c, shared)
    seconds["data+base"] = _took(held, t)
    t = time.time()
    base = base_model(c, shared)
    seconds["data+base"] += _took(base, t)
    t = time.time()
    fmt = format_model(c, shared, base, mesh, rules)
    seconds["format"] = _took(fmt, t)
    t = time.time()
    start = evaluate(c, fmt, None, held, os.path.join(shared, "eval_start"), mesh, rules)
    seconds["eval_start"] = _took(os.path.join(shared, "eval_start"), t)
    _log("start: " + json.dumps(_headline(start)))
    t = time.time()
    g = c.grpo.copy_and_resolve_references()
    with g.unlocked():
        g.model.checkpoint = fmt
    grpo_dir = os.path.join(workdir, "grpo")
    grpo(g, grpo_dir)
    seconds["grpo"] = _took(grpo_dir, t)
    t = time.time()
    end = evaluate(c, os.path.join(grpo_dir, "checkpoints"), fmt, held, os.path.join(workdir, "eval_end"),
                   mesh, rules)
    seconds["eval_end"] = _took(os.path.join(workdir, "eval_end"), t)
    plots.plot_dynamics(os.path.join(grpo_dir, "metrics.jsonl"), os.path.join(workdir, "dynamics.png"),
                        title=f"Mini-V* GRPO ({c.label})", smoothing=0.6)
    viewer.write_page(os.path.join(workdir, "eval_end"), os.path.join(workdir, "view.html"), None, "all",
                      c.eval.view_items, f"Mini-V* held-out, end of GRPO ({c.label})")
    jax.effects_barrier()
    with open(os.path.join(fmt, DONE)) as f:
        done = json.load(f)  # keys absent in format stages written before they existed
    aim = (aim_by_frame(os.path.join(shared, "eval_start")), aim_by_frame(os.path.join(workdir, "eval_end")))
    out = summarize(start, end, seconds, os.path.join(workdir, "summary"), c.label, done.get("box_prior"),
                    done.get("full_view"), aim, done.get("probe"), c.grpo.rollout.temperature,
                    zoom_by_quarter(os.path.join(grpo_dir, "metrics.jsonl")),
                    (zoom_by_kind(os.path.join(shared, "eval_start")),
                     zoom_by_kind(os.path.join(workdir, "eval_end"))))
    out["viewer"] = os.path.join(workdir, "view.html")
    return out


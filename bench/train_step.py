"""GRPO update step, JAX (`rl/step.py`) against PyTorch (transformers), side by side; BENCHMARKS.md.

  .venv/bin/python bench/train_step.py                         # tiny and 110m, batch 4 x 512, 3 repeats
  .venv/bin/python bench/train_step.py --model=110m --batch=8 --seq=1024
  .venv/bin/python bench/train_step.py --sweep_seq=256,512,1024,2048 --model=110m --batch=1 \
      --micro_batches=1 --image=224                          # peak memory against sequence length

Each row of the synthetic batch is one --image x --image picture (448: 256 image tokens) between
<|vision_start|> and <|vision_end|>, then text up to --seq tokens; every other response token is a
policy token. A `prepare` subprocess initialises the model (seed 0), exports it as a Hugging Face
directory (`export_hf_checkpoint`), builds the batch and fills its old log-probs with the model's own
log-probs plus N(0, 0.5) noise (so the clip and the dual clip both fire), and writes it to an .npz.
Then two worker processes load the same weights and the same batch: `--worker=jax` (this script:
the real jitted step, remat, micro-batch accumulation, AdamW) and bench/torch_train.py under
.venv-ref (the same loss on `Qwen2_5_VLForConditionalGeneration`, gradient checkpointing, AdamW).
Steps ALTERNATE between the two (JAX, torch, JAX, ...), so load from other processes hits both alike.
The first step of each side starts from identical weights, batch and old log-probs: its loss and
gradient norm are the numerical check. It also holds JAX's compilation and is reported apart.
Peak memory is each worker's own peak RSS (ru_maxrss), so the two are comparable.

`--sweep_seq` runs each length in fresh processes (JAX, then torch), one side at a time.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from common import ROOT, append_section, model_config, peak_rss_gib, summary, torch_python
from flax import nnx

from deepeyes_jax.model import checkpoint, config, create, rope, sharding
from deepeyes_jax.model.vision import make_vision_inputs
from deepeyes_jax.rl import batch as batch_lib
from deepeyes_jax.rl import step as step_lib

_MODELS = flags.DEFINE_multi_string("model", ["tiny", "110m"], "tiny | 110m | a preset name")
_BATCH = flags.DEFINE_integer("batch", 4, "Trajectories per step.")
_MICRO = flags.DEFINE_integer("micro_batches", 2, "Micro-batches per step (gradient accumulation).")
_SEQ = flags.DEFINE_integer("seq", 512, "Tokens per trajectory (bucket).")
_IMAGE = flags.DEFINE_integer("image", 448, "Image side in pixels (a multiple of 28).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steps per side (after the first).")
_SWEEP = flags.DEFINE_list("sweep_seq", [], "Sequence lengths: peak memory per length (fresh processes).")
_TORCH_REMAT = flags.DEFINE_bool("torch_remat", True, "Gradient checkpointing on the PyTorch side.")
_OUT = flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file to append to ('' to skip).")
_WORKER = flags.DEFINE_enum("worker", "", ["", "prepare", "jax"], "Internal: run as a subprocess.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Internal: the prepared checkpoint and batch.")

_NOISE = 0.7  # std of the old log-probs' offset from the current ones
_SHARED = ("The machine was shared with another engineer's CPU-heavy experiments during these runs: "
           "times are noisy (hence the alternation and the min-max); memory is not affected.")
_SWEEP_REPEATS = flags.DEFINE_integer("sweep_repeats", 1, "--sweep_seq: timed steps after the first.")


# ------------------------------------------------------------------------------------------ batch


def synthetic_batch(cfg: config.ModelConfig, b: int, t: int, micro: int, image: int,
                    seed: int = 0) -> tuple[batch_lib.TrainBatch, dict[str, np.ndarray]]:
    """The TrainBatch and the raw arrays the PyTorch side needs (pixel_values, image_grid_thw)."""
    rng = np.random.default_rng(seed)
    side = image // cfg.vision.patch_size
    merged = image // (cfg.vision.patch_size * cfg.vision.spatial_merge_size)
    n_img, n_patch = merged * merged, side * side
    prompt = 3 + n_img + 64
    if prompt >= t:
        raise ValueError(f"--seq={t} leaves no response after a {image}px image ({n_img} tokens); "
                         f"use --seq > {prompt} or a smaller --image")
    ids = rng.integers(0, min(cfg.text.vocab_size, 300), (b, t)).astype(np.int32)
    ids[:, 1] = cfg.vision_start_token_id
    ids[:, 2:2 + n_img] = cfg.image_token_id
    ids[:, 2 + n_img] = cfg.vision_end_token_id
    mask = np.ones((b, t), np.int32)
    pos, _ = rope.mrope_positions(ids, mask, np.array([[merged, merged]] * b), cfg.image_token_id)
    pos = np.asarray(pos)
    loss_mask = np.zeros((b, t), np.int32)
    loss_mask[:, prompt::2] = 1
    bm = b // micro
    pixels = rng.normal(size=(micro, bm * n_patch, cfg.vision.patch_dim)).astype(np.float32)
    grid = np.tile(np.array([1, side, side]), (micro, bm, 1))
    vis = [make_vision_inputs(pixels[m], grid[m], cfg.vision) for m in range(micro)]
    vision = vis[0].replace(**{k: np.stack([getattr(v, k) for v in vis]) for k in
                               ("patches", "rows", "cols", "image_ids", "token_index")})
    r = lambda x: x.reshape(micro, bm, *x.shape[1:])
    lp = np.zeros((micro, bm, t), np.float32)  # filled by `prepare` from the model itself
    adv = (np.abs(rng.normal(size=b)) * np.where(np.arange(b) % 2, -1.0, 1.0)).astype(np.float32)  # +-+-
    batch = batch_lib.TrainBatch(
        input_ids=r(ids), attention_mask=r(mask),
        positions=pos.reshape(3, micro, bm, t).transpose(1, 0, 2, 3),
        loss_mask=r(loss_mask), sampler_logprobs=lp, old_logprobs=lp,
        advantages=adv.reshape(micro, bm), vision=vision,
        num_tokens=r(loss_mask).sum(axis=(1, 2)).astype(np.float32))
    return batch, {"pixel_values": pixels, "image_grid_thw": grid}


def _arrays(batch: batch_lib.TrainBatch, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = ("input_ids", "attention_mask", "positions", "loss_mask", "sampler_logprobs", "old_logprobs",
             "advantages", "num_tokens")
    return {**{k: np.asarray(getattr(batch, k)) for k in names}, **raw}


def _from_arrays(z, cfg: config.ModelConfig) -> batch_lib.TrainBatch:
    vis = [make_vision_inputs(p, g, cfg.vision) for p, g in zip(z["pixel_values"], z["image_grid_thw"],
                                                                 strict=True)]
    vision = vis[0].replace(**{k: np.stack([getattr(v, k) for v in vis]) for k in
                               ("patches", "rows", "cols", "image_ids", "token_index")})
    names = ("input_ids", "attention_mask", "positions", "loss_mask", "sampler_logprobs", "old_logprobs",
             "advantages", "num_tokens")
    return batch_lib.TrainBatch(vision=vision, **{k: z[k] for k in names})


# ---------------------------------------------------------------------------------------- workers


def _setup(model):
    mesh = sharding.make_mesh((1, -1, 1))
    rules = sharding.get_rules("fsdp")
    ucfg = step_lib.UpdateConfig(lr=1e-6)  # clip 0.2/0.2, dual clip 3, KL 0, entropy 0, token mean
    opt = step_lib.make_optimizer(model, ucfg)
    graphdef, state = nnx.split((model, opt))
    state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
    return mesh, rules, ucfg, graphdef, state


def prepare(name: str, workdir: str) -> None:
    """Random model -> HF directory; synthetic batch with old log-probs -> batch.npz."""
    cfg = model_config(name)
    mesh = sharding.make_mesh((1, -1, 1))
    model = create.init_model(cfg, seed=0, mesh=mesh, rules=sharding.get_rules("fsdp"))
    checkpoint.export_hf_checkpoint(model, os.path.join(workdir, "hf"))
    batch, raw = synthetic_batch(cfg, _BATCH.value, _SEQ.value, _MICRO.value, _IMAGE.value)
    mesh, rules, ucfg, graphdef, state = _setup(model)
    steps = step_lib.compile_steps(graphdef, state, batch, mesh, rules, ucfg, with_ref=False)
    dev = steps.place(batch)
    with jax.set_mesh(mesh):
        logp = np.asarray(steps.logprobs(state, dev))
    noise = np.random.default_rng(1).normal(scale=_NOISE, size=logp.shape).astype(np.float32)
    old = np.where(batch.loss_mask > 0, logp + noise, 0.0).astype(np.float32)
    batch = batch.replace(old_logprobs=old, sampler_logprobs=old)
    np.savez(os.path.join(workdir, "batch.npz"), **_arrays(batch, raw))
    print(f"prepared {name}: {create.count_params(model)['total']} params", flush=True)


def jax_worker(workdir: str) -> None:
    """Serves `step` / `quit` on stdin like bench/torch_train.py, for the JAX step."""
    model, _ = checkpoint.load_hf_checkpoint(os.path.join(workdir, "hf"))
    batch = _from_arrays(np.load(os.path.join(workdir, "batch.npz")), model.cfg)
    mesh, rules, ucfg, graphdef, state = _setup(model)
    del model
    steps = step_lib.compile_steps(graphdef, state, batch, mesh, rules, ucfg, with_ref=False)
    dev = steps.place(batch)
    print("RESULT " + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            t0 = time.perf_counter()
            with jax.set_mesh(mesh):
                state, m = steps.update(state, dev, None)
                m = jax.device_get(m)
            dt = time.perf_counter() - t0
            print("RESULT " + json.dumps({"step_s": dt, "loss": float(m["update/loss"]),
                                          "grad_norm": float(m["update/grad_norm"]),
                                          "clipfrac": float(m["update/clipfrac"]),
                                          "dual_clipfrac": float(m["update/dual_clipfrac"])}), flush=True)
        elif line.strip() == "quit":
            print("RESULT " + json.dumps({"peak_rss_gib": peak_rss_gib()}), flush=True)
            return


# ----------------------------------------------------------------------------------- orchestration


class Worker:
    """A worker subprocess; `call(cmd)` sends one line and returns its RESULT json."""

    def __init__(self, argv: list[str], log: str):
        self.log = open(log, "w")  # noqa: SIM115 (open for the worker's lifetime; closed in `close`)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)
        self.ready = self.read()

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        raise RuntimeError(f"worker {self.proc.args} exited ({self.proc.wait()}); see {self.log.name}")

    def call(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        out = self.call("quit")
        self.proc.wait(timeout=60)
        self.log.close()
        return out


def _args(name: str, workdir: str, seq: int) -> list[str]:
    return [f"--model={name}", f"--batch={_BATCH.value}", f"--micro_batches={_MICRO.value}", f"--seq={seq}",
            f"--image={_IMAGE.value}", f"--workdir={workdir}"]


def _prepare(name: str, workdir: str, seq: int) -> None:
    with open(os.path.join(workdir, "prepare.log"), "w") as log:
        subprocess.run([sys.executable, __file__, "--worker=prepare", *_args(name, workdir, seq)], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL, stderr=log)


def _start(side: str, name: str, workdir: str, seq: int, tpy: str) -> Worker:
    if side == "jax":
        argv = [sys.executable, __file__, "--worker=jax", *_args(name, workdir, seq)]
    else:
        argv = [tpy, os.path.join(ROOT, "bench", "torch_train.py"), f"--ckpt={workdir}/hf",
                f"--batch={workdir}/batch.npz", *(["--remat"] if _TORCH_REMAT.value else [])]
    return Worker(argv, os.path.join(workdir, f"{side}.log"))


def side_by_side(name: str, tpy: str) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        _prepare(name, workdir, _SEQ.value)
        workers = {"jax": _start("jax", name, workdir, _SEQ.value, tpy)}
        workers["torch"] = _start("torch", name, workdir, _SEQ.value, tpy)
        results = {s: [] for s in workers}
        for i in range(_REPEATS.value + 1):
            for side, w in workers.items():  # alternate: JAX, torch, JAX, torch, ...
                results[side].append(w.call("step"))
                r = results[side][-1]
                print(f"{name} {side} step {i}: {r['step_s']:.2f} s loss {r['loss']:.6g} "
                      f"grad_norm {r['grad_norm']:.6g}", flush=True)
        peaks = {s: w.close()["peak_rss_gib"] for s, w in workers.items()}
    params = create.count_params(create.abstract_model(model_config(name)))["total"]
    return {"model": name, "params": params, "results": results, "peaks": peaks}


def _row(side: str, res: list[dict], peak: float, tokens: int) -> list[object]:
    s = summary([r["step_s"] for r in res[1:]])
    return [side, f"{res[0]['step_s']:.2f}", f"{s['median']:.2f}", f"{s['min']:.2f}-{s['max']:.2f}",
            f"{tokens / s['median']:.0f}", f"{peak:.2f}"]


def main_side_by_side(tpy: str) -> None:
    tokens = _BATCH.value * _SEQ.value
    rows, checks = [], []
    for name in _MODELS.value:
        out = side_by_side(name, tpy)
        for side in ("jax", "torch"):
            rows.append([name, f"{out['params'] / 1e6:.1f} M",
                         *_row(side, out["results"][side], out["peaks"][side], tokens)])
        j, t = out["results"]["jax"][0], out["results"]["torch"][0]
        checks.append(f"{name}: loss JAX {j['loss']:.8g} / torch {t['loss']:.8g} "
                      f"(rel. diff {abs(j['loss'] - t['loss']) / max(abs(t['loss']), 1e-30):.1e}), "
                      f"grad norm JAX {j['grad_norm']:.8g} / torch {t['grad_norm']:.8g} "
                      f"(rel. diff {abs(j['grad_norm'] - t['grad_norm']) / max(t['grad_norm'], 1e-30):.1e}); "
                      f"clipped {j['clipfrac']:.1%}, dual-clipped {j['dual_clipfrac']:.1%} of the tokens")
    intro = (f"Batch {_BATCH.value} x {_SEQ.value} tokens, {_MICRO.value} micro-batches (gradient "
             f"accumulation), one {_IMAGE.value}x{_IMAGE.value} image per row, float32, on the same random "
             "weights and batch. JAX: `rl/step.py` (jitted, per-layer remat, chunked vocabulary "
             "projection, AdamW). PyTorch: `bench/torch_train.py`, transformers "
             "`Qwen2_5_VLForConditionalGeneration` (sdpa, gradient checkpointing "
             f"{'on' if _TORCH_REMAT.value else 'off'}, full logits), the same PPO dual-clip token-mean "
             "loss, AdamW. Steps alternate between the sides; the first step (JAX: with compilation) is "
             f"reported apart, the median and min-max are over the next {_REPEATS.value}. Peak RSS: each "
             "side's own worker process (model, optimiser, batch, compilation).")
    notes = ("Loss agreement on the first step (identical weights, batch and old log-probs, old = "
             f"current + N(0, {_NOISE}) so clip and dual clip fire): " + "; ".join(checks) + ". "
             f"{_SHARED}")
    append_section("GRPO update step, JAX vs PyTorch", intro,
                   ["model", "params", "side", "first step (s)", "step median (s)", "min-max (s)", "tokens/s",
                    "peak RSS (GiB)"], rows, _OUT.value, notes)


def main_sweep(tpy: str) -> None:
    rows, checks = [], []
    for name in _MODELS.value:
        for seq in [int(s) for s in _SWEEP.value]:
            row, first = [name, seq], {}
            with tempfile.TemporaryDirectory() as workdir:
                _prepare(name, workdir, seq)
                for side in ("jax", "torch"):  # fresh processes per length and side: per-length peaks
                    w = _start(side, name, workdir, seq, tpy)
                    res = [w.call("step") for _ in range(_SWEEP_REPEATS.value + 1)]
                    peak = w.close()["peak_rss_gib"]
                    first[side] = res[0]
                    med = summary([r["step_s"] for r in res[1:]])["median"]
                    print(f"{name} seq {seq} {side}: peak {peak:.2f} GiB, step {med:.2f} s", flush=True)
                    row += [f"{peak:.2f}", f"{med:.2f}"]
            rows.append(row)
            j, t = first["jax"], first["torch"]
            checks.append(f"{name} {seq}: loss {j['loss']:.8g} / {t['loss']:.8g}, grad norm "
                          f"{j['grad_norm']:.6g} / {t['grad_norm']:.6g}")
    intro = (f"Peak RSS of each side's worker process against sequence length: batch {_BATCH.value}, "
             f"{_MICRO.value} micro-batch(es), one {_IMAGE.value}x{_IMAGE.value} image per row, float32, "
             "remat / gradient checkpointing on both sides. Each length and side runs in a fresh "
             f"process (load, first step, {_SWEEP_REPEATS.value} more); step time is the median of "
             "those, without compilation.")
    append_section("GRPO trainer memory against sequence length, JAX vs PyTorch", intro,
                   ["model", "seq", "JAX peak RSS (GiB)", "JAX step (s)", "torch peak RSS (GiB)",
                    "torch step (s)"], rows, _OUT.value,
                   "First-step loss and gradient norm, JAX / torch (same weights, batch and old log-probs): "
                   + "; ".join(checks) + ". " + _SHARED)


def main(argv):
    del argv
    if _WORKER.value == "prepare":
        return prepare(_MODELS.value[0], _WORKDIR.value)
    if _WORKER.value == "jax":
        return jax_worker(_WORKDIR.value)
    tpy = torch_python()
    if _SWEEP.value:
        main_sweep(tpy)
    else:
        main_side_by_side(tpy)


if __name__ == "__main__":
    app.run(main)

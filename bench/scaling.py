"""Scaling: decode time per token against context length, vision-tower time against image pixels.

  .venv/bin/python bench/scaling.py --model=110m --contexts=256,1024,4096 --new_tokens=16 \
      --sizes=224,448,896,1344 --repeats=3

(a) A text-only prompt of C random tokens is prefilled, then `--new_tokens` greedy tokens are decoded
(batch 1, end tokens banned). Reported: time per decode step of the decode phase (`engine.decode`,
jitted `lax.while_loop` over a dense KV cache of C + new_tokens slots / transformers `generate` with its
dynamic cache, first to last logits-processor call).
(b) One square image of S x S pixels (S/14 patches a side, random pixel rows) through the vision tower
alone: our jitted `VisionTower` (exact padded window layout) / transformers' `model.visual`.
Each point alternates JAX and torch; the first repetition is a warm-up (JAX compile = its excess).
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from common import append_section, peak_rss_gib, summary
from decode import NO_STOP, TorchWorker, build, fmt, save_inputs
from flax import nnx

from deepeyes_jax.model import make_vision_inputs
from deepeyes_jax.sampling import Greedy, RolloutConfig, engine

FLAGS = flags.FLAGS


@nnx.jit
def _encode(model, vision):
    return model.encode_images(vision)


def decode_point(model, tok, worker, workdir: str, context: int) -> dict:
    n = FLAGS.new_tokens
    rng = np.random.default_rng(context)
    ids = rng.integers(0, tok.special.endoftext, (1, context)).astype(np.int32)  # plain text tokens
    banned = RolloutConfig().banned_tokens + NO_STOP
    suppress = [tok.token_to_id(t) for t in banned]
    limits = engine.Limits(im_end=tok.special.im_end, tool_call_end=tok.special.tool_call_end,
                           pause_at_tool_call=False, banned=tuple(suppress))
    path = save_inputs(os.path.join(workdir, f"ctx{context}.npz"), ids, np.zeros((0, 0), np.float32),
                       np.zeros((0, 3), np.int64))
    out = {"jax": [], "torch": [], "jax_prefill": [], "torch_prefill": []}
    first = 0.0
    for rep in range(FLAGS.repeats + 1):
        t0 = time.perf_counter()
        state, _ = engine.prefill(model, jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)),
                                  jnp.zeros((0, 2), jnp.int32), None, jax.random.key(0), n, group=1,
                                  budget=n, forced_size=1)
        state = jax.block_until_ready(state)
        t1 = time.perf_counter()
        state = jax.block_until_ready(engine.decode(model, state, method=Greedy(), limits=limits))
        t2 = time.perf_counter()
        assert int(state.resp_len[0]) == n
        res = worker(op="generate", inputs=path, new_tokens=n, suppress=suppress)
        if rep == 0:
            first = t2 - t0
            continue
        out["jax"].append((t2 - t1) / n)
        out["jax_prefill"].append(t1 - t0)
        out["torch"].append(res["decode"] / (n - 1))
        out["torch_prefill"].append(res["prefill"])
    out["compile"] = first - summary(out["jax"])["median"] * n - summary(out["jax_prefill"])["median"]
    return out


def vision_point(model, worker, workdir: str, size: int) -> dict:
    cfg = model.cfg.vision
    g = size // cfg.patch_size
    g -= g % cfg.spatial_merge_size
    grid = np.array([[1, g, g]])
    pixels = np.random.default_rng(size).normal(size=(g * g, cfg.patch_dim)).astype(np.float32)
    path = save_inputs(os.path.join(workdir, f"img{size}.npz"), np.zeros((1, 1), np.int64), pixels, grid)
    vis = make_vision_inputs(pixels, grid, cfg)
    out = {"jax": [], "torch": [], "patches": g * g}
    first = 0.0
    for rep in range(FLAGS.repeats + 1):
        t0 = time.perf_counter()
        jax.block_until_ready(_encode(model, vis))
        dt = time.perf_counter() - t0
        res = worker(op="vision", inputs=path)
        if rep == 0:
            first = dt
            continue
        out["jax"].append(dt)
        out["torch"].append(res["seconds"])
    out["compile"] = first - summary(out["jax"])["median"]
    return out


def main(argv):
    del argv
    decode_rows, vision_rows = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for name in FLAGS.model:
            model_dir = os.path.join(workdir, name)
            model, tok, _ = build(name, model_dir)
            worker = TorchWorker(model_dir)
            try:
                for c in FLAGS.contexts:
                    r = decode_point(model, tok, worker, workdir, int(c))
                    j, t = summary(r["jax"]), summary(r["torch"])
                    decode_rows.append([name, c, fmt({k: v * 1e3 for k, v in j.items()}, 1),
                                        fmt({k: v * 1e3 for k, v in t.items()}, 1),
                                        f"{t['median'] / j['median']:.2f}", fmt(summary(r["jax_prefill"])),
                                        fmt(summary(r["torch_prefill"])), f"{r['compile']:.1f}"])
                    print(decode_rows[-1], flush=True)
                for s in FLAGS.sizes:
                    r = vision_point(model, worker, workdir, int(s))
                    j, t = summary(r["jax"]), summary(r["torch"])
                    vision_rows.append([name, f"{s}x{s}", r["patches"], fmt(j, 3), fmt(t, 3),
                                        f"{t['median'] / j['median']:.2f}", f"{r['compile']:.1f}"])
                    print(vision_rows[-1], flush=True)
            finally:
                worker.close()
    notes = ("The 2-core machine was shared with another engineer's CPU-heavy jobs while this ran: read the "
             "min-max spreads.")
    append_section(
        "Scaling (a): decode time per token against context length",
        f"Batch 1, text-only prompt of C random tokens, then {FLAGS.new_tokens} greedy tokens (end tokens "
        f"banned). Per-token time of the decode phase in ms and prefill time in s, median (min-max) of "
        f"{FLAGS.repeats} alternating repetitions after a warm-up. Our KV cache is dense, C + "
        f"{FLAGS.new_tokens} slots; transformers' is its dynamic cache.",
        ["model", "context C", "JAX ms/token", "torch ms/token", "torch/JAX", "JAX prefill s",
         "torch prefill s", "JAX compile s"], decode_rows, output=FLAGS.output, notes=notes)
    append_section(
        "Scaling (b): vision-tower time against image pixels",
        "One square image (random pixel rows) through the vision tower alone: our jitted VisionTower vs "
        f"transformers' `model.visual` (sdpa). Seconds, median (min-max) of {FLAGS.repeats} alternating "
        f"repetitions after a warm-up. Peak RSS of the JAX process: {peak_rss_gib():.2f} GiB.",
        ["model", "image", "patches", "JAX s", "torch s", "torch/JAX", "JAX compile s"], vision_rows,
        output=FLAGS.output, notes=notes)


if __name__ == "__main__":
    flags.DEFINE_multi_string("model", ["110m"], "tiny | 110m")
    flags.DEFINE_list("contexts", ["256", "1024", "4096"], "Prompt lengths for (a).")
    flags.DEFINE_integer("new_tokens", 16, "Decode steps per point in (a).")
    flags.DEFINE_list("sizes", ["224", "448", "896", "1344"], "Square image sides in pixels for (b).")
    flags.DEFINE_integer("repeats", 3, "Timed repetitions per point and side (after one warm-up).")
    flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file to append to ('' to skip).")
    app.run(main)

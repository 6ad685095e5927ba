"""Greedy decode throughput: our Sampler against transformers' generate, same random weights.

  .venv/bin/python bench/decode.py --model=tiny --model=110m --batch=1 --batch=16 --new_tokens=64 --repeats=3

Each model is initialised randomly (`create.init_model`), exported as a Hugging Face directory
(`export_hf_checkpoint` + the test tokenizer and preprocessor side files) and loaded from there by
transformers in `.venv-ref` (bench/torch_ref.py, a worker process). Every row of a batch is one random
448x448 image (256 image tokens) under the same short question. Both sides decode exactly
`--new_tokens` greedy tokens: `<|im_end|>`, `<|endoftext|>` and the vision placeholders are banned on
both (our `Limits.banned`, transformers' `suppress_tokens`), so neither stops early.

Timing: each repetition runs the JAX side then the torch side, so the two alternate under the same
machine load; the first repetition is a warm-up (its excess over the median is JAX's compile time).
End-to-end tok/s = B*N / (wall time of the whole call: Sampler call / `generate`). Decode tok/s = decode
steps / time of the decode phase: on our side the jitted `engine.decode` call (N steps, the first writes
the prompt's last token), on transformers' the time from the first to the last logits-processor call
(N-1 steps after the prefill that yields the first token). Prefill = `engine.prefill` (vision tower +
prompt) / the time to the first logits-processor call. Our end-to-end time includes our image
processing on the host; transformers gets pixel_values ready-made.

The helpers at the top (model set-up, the torch worker) are shared with tool_rollout.py and scaling.py.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from common import ROOT, append_section, model_config, peak_rss_gib, summary, torch_python

from deepeyes_jax.model import checkpoint, config, create
from deepeyes_jax.processing.chat import Tokenizer
from deepeyes_jax.processing.image import ImageProcessor
from deepeyes_jax.sampling import Greedy, Prompt, RolloutConfig, Sampler, engine

SIDE_FILES = os.path.join(ROOT, "tests", "fixtures", "ckpt_tied")  # tokenizer + preprocessor (448^2 max)
NO_STOP = ("<|im_end|>", "<|endoftext|>")
QUESTION = "Describe the image in detail."

# ---------------------------------------------------------------------------------- shared helpers


def bench_config(name: str) -> config.ModelConfig:
    """`common.model_config(name)` with the special token ids of the test tokenizer, so that its
    `<|image_pad|>`/`<|vision_start|>` mark images for both our model and transformers'."""
    cfg, t = model_config(name), config.tiny()
    return cfg.replace(**{k: getattr(t, k) for k in ("image_token_id", "video_token_id",
                                                     "vision_start_token_id", "vision_end_token_id")})


def build(name: str, directory: str, seed: int = 0):
    """Random model `name`, exported to `directory`; returns (model, tokenizer, image processor)."""
    cfg = bench_config(name)
    model = create.init_model(cfg, seed)
    checkpoint.export_hf_checkpoint(model, directory, copy_from=SIDE_FILES)
    return model, Tokenizer.from_dir(SIDE_FILES), ImageProcessor.from_dir(SIDE_FILES)


def images(n: int, size: int = 448, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


class TorchWorker:
    """bench/torch_ref.py in `.venv-ref`, kept alive across requests (one JSON line each way)."""

    def __init__(self, model_dir: str):
        self.proc = subprocess.Popen([torch_python(), os.path.join(ROOT, "bench", "torch_ref.py"),
                                      f"--model_dir={model_dir}"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench/torch_ref.py exited with {self.proc.wait()} (see its stderr above)")
        return json.loads(line)

    def __call__(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


def save_inputs(path: str, ids: np.ndarray, pixel_values: np.ndarray, grid_thw: np.ndarray) -> str:
    np.savez(path, input_ids=ids.astype(np.int64), attention_mask=np.ones_like(ids, np.int64),
             pixel_values=pixel_values.astype(np.float32), image_grid_thw=np.asarray(grid_thw, np.int64))
    return path


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def fmt(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


# ---------------------------------------------------------------------------------- the benchmark

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Called only when this file is the script: the others import its helpers and define their own."""
    flags.DEFINE_multi_string("model", ["tiny", "110m"], "tiny | 110m")
    flags.DEFINE_multi_integer("batch", [1, 16], "Rows (one image each).")
    flags.DEFINE_integer("new_tokens", 64, "Greedy tokens per row.")
    flags.DEFINE_integer("repeats", 3, "Timed repetitions per side (after one warm-up).")
    flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file to append to ('' to skip).")


class PhaseTimes:
    """Wall time of the engine's jitted phases inside a Sampler call (patched in while active)."""

    def __init__(self, *names: str):
        self.names, self.seconds = names, {}

    def __enter__(self):
        self.seconds = dict.fromkeys(self.names, 0.0)
        self.saved = {n: getattr(engine, n) for n in self.names}
        for n, fn in self.saved.items():
            setattr(engine, n, self._timed(n, fn))
        return self

    def _timed(self, name, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*args, **kwargs))  # the Sampler reads it right after anyway
            self.seconds[name] += time.perf_counter() - t0
            return out
        return run

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(engine, n, fn)


def bench(name: str, batches: list[int], workdir: str) -> list[list[object]]:
    model_dir = os.path.join(workdir, name)
    model, tok, proc = build(name, model_dir)
    n = FLAGS.new_tokens
    worker = TorchWorker(model_dir)
    rows = []
    try:
        for b in batches:
            imgs = images(b)
            processed = [proc(im) for im in imgs]
            ids = tok.encode_chat([{"role": "user", "content": "<image>\n" + QUESTION}],
                                  [processed[0].num_tokens])
            banned = RolloutConfig().banned_tokens + NO_STOP
            sampler = Sampler(model, tok, proc, RolloutConfig(
                tools=(), max_turns=1, max_turn_tokens=n, max_response_tokens=n, pause_at_tool_call=False,
                prompt_bucket=len(ids), banned_tokens=banned))
            prompts = [Prompt(image=im, prompt_ids=ids) for im in imgs]
            path = save_inputs(os.path.join(workdir, f"{name}_b{b}.npz"), np.array([ids] * b),
                               np.concatenate([p.pixel_values for p in processed]),
                               [p.grid_thw for p in processed])
            suppress = [tok.token_to_id(t) for t in banned]
            m = {side: {"total": [], "prefill": [], "decode": []} for side in ("jax", "torch")}
            first = 0.0
            for rep in range(FLAGS.repeats + 1):
                with PhaseTimes("prefill", "decode") as ph:
                    dt, trajs = timed(sampler, prompts, 1, Greedy())
                res = worker(op="generate", inputs=path, new_tokens=n, suppress=suppress)
                if rep == 0:
                    first = dt
                    continue
                for k, v in (("total", dt), ("prefill", ph.seconds["prefill"]),
                             ("decode", ph.seconds["decode"])):
                    m["jax"][k].append(v)
                for k in ("total", "prefill", "decode"):
                    m["torch"][k].append(res[k])
            jax_tokens, torch_tokens = [t.response_ids for t in trajs], res["tokens"]
            assert all(len(t) == n for t in jax_tokens) and all(len(t) == n for t in torch_tokens)
            same = sum(np.array_equal(a, np.array(t)) for a, t in zip(jax_tokens, torch_tokens, strict=True))
            prefix = statistics.median(
                int(np.argmin(np.append(np.asarray(a) == np.array(t), False)))
                for a, t in zip(jax_tokens, torch_tokens, strict=True))
            compile_s = first - statistics.median(m["jax"]["total"])
            # JAX's decode loop runs n steps (the first writes the prompt's last token); transformers
            # runs n - 1 after a prefill that yields the first token.
            steps = {"jax": n, "torch": n - 1}
            res = {side: dict(total=summary(v["total"]), prefill=summary(v["prefill"]),
                              e2e=summary([b * n / t for t in v["total"]]),
                              dec=summary([b * steps[side] / t for t in v["decode"]]))
                   for side, v in m.items()}
            ratio_dec = res["jax"]["dec"]["median"] / res["torch"]["dec"]["median"]
            ratio_e2e = res["jax"]["e2e"]["median"] / res["torch"]["e2e"]["median"]
            for side in ("jax", "torch"):
                r, j = res[side], side == "jax"
                rows.append([name, b, side, fmt(r["prefill"]), fmt(r["total"]), fmt(r["dec"], 0),
                             fmt(r["e2e"], 0), f"{ratio_dec:.2f}" if j else "",
                             f"{ratio_e2e:.2f}" if j else "",
                             f"{compile_s:.1f}" if j else "",
                             f"{same}/{b} rows, median first difference at {prefix:.0f}" if j else ""])
            print(rows[-2], rows[-1], flush=True)
    finally:
        worker.close()
    return rows


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as workdir:
        rows = [r for name in FLAGS.model for r in bench(name, FLAGS.batch, workdir)]
    n = FLAGS.new_tokens
    append_section(
        "Greedy decode: our Sampler vs transformers generate",
        f"{n} greedy tokens per row (EOS and image placeholders banned on both sides), one random 448x448 "
        f"image (256 image tokens) + a short question per row, float32, same random weights on both sides. "
        f"Times in seconds, median (min-max) of {FLAGS.repeats} alternating repetitions after a warm-up. "
        f"Decode tok/s = batch x decode steps / decode-phase time; end-to-end tok/s = batch x {n} / wall "
        f"time of the whole call (prefill included). JAX compile = the warm-up's excess. Peak RSS of the "
        f"JAX process: {peak_rss_gib():.2f} GiB.",
        ["model", "batch", "side", "prefill s", f"whole call ({n} tokens) s", "decode tok/s",
         "end-to-end tok/s",
         "JAX/torch decode", "JAX/torch e2e", "JAX compile s", "same tokens"],
        rows, output=FLAGS.output,
        notes=f"{jax.devices()[0].device_kind} JAX {jax.__version__}; torch side: transformers "
              "`Qwen2_5_VLForConditionalGeneration.generate(do_sample=False)`, sdpa attention, dynamic KV "
              "cache. The 2-core machine was shared with another engineer's CPU-heavy jobs while this ran: "
              "read the min-max spreads.")


if __name__ == "__main__":
    define_flags()
    app.run(main)

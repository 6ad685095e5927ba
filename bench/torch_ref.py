"""The PyTorch side of the benchmarks: a worker that loads a Hugging Face Qwen2.5-VL directory with
transformers and times the requests it reads from stdin, one JSON object per line.

  .venv-ref/bin/python bench/torch_ref.py --model_dir=/tmp/ckpt   # Python 3.11, torch CPU, transformers

Requests (one line each; every answer is one JSON line on stdout, everything else goes to stderr):
  {"op": "generate", "inputs": "x.npz", "new_tokens": 64, "suppress": [ids]}
      greedy `generate(do_sample=False, min_new_tokens=max_new_tokens=new_tokens)` on the npz's
      input_ids, attention_mask, pixel_values, image_grid_thw; `suppress` ids are never generated.
      Answer: {"total": wall time of the call, "prefill": time to the first logits-processor call
      (prefill, first token's logits), "decode": first to last logits-processor call (N-1 decode
      steps), "tokens": [[...] per row]}.
  {"op": "vision", "inputs": "x.npz"}: the vision tower on pixel_values, image_grid_thw -> {"seconds"}.
  {"op": "quit"}.
The parent process (bench/decode.py, tool_rollout.py, scaling.py) alternates these requests with its
own JAX runs, so both sides see the same machine load. This file runs only in `.venv-ref`.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, Qwen2_5_VLForConditionalGeneration


def _inputs(path: str) -> dict[str, torch.Tensor]:
    with np.load(path) as z:
        return {k: torch.from_numpy(np.asarray(z[k])) for k in z.files}


class _Stamps(LogitsProcessor):
    """Records when each step's logits arrive (the scores pass through unchanged)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


@torch.inference_mode()
def generate(model, req: dict) -> dict:
    x = _inputs(req["inputs"])
    n = int(req["new_tokens"])
    kwargs = {"suppress_tokens": req["suppress"]} if req.get("suppress") else {}
    if x["pixel_values"].numel():  # text-only inputs carry empty pixel arrays
        # transformers 5 computes M-RoPE positions only when told which tokens are image tokens
        # (its processor returns mm_token_type_ids); without them images get 1-D text positions.
        mm = (x["input_ids"] == model.config.image_token_id).to(torch.int32)
        kwargs.update(pixel_values=x["pixel_values"].float(), image_grid_thw=x["image_grid_thw"].long(),
                      mm_token_type_ids=mm)
    stamps = _Stamps()
    t0 = time.perf_counter()
    out = model.generate(input_ids=x["input_ids"].long(), attention_mask=x["attention_mask"].long(),
                         do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=True,
                         logits_processor=LogitsProcessorList([stamps]), **kwargs)
    total = time.perf_counter() - t0
    return {"total": total, "prefill": stamps.times[0] - t0, "decode": stamps.times[-1] - stamps.times[0],
            "tokens": out[:, x["input_ids"].shape[1]:].tolist()}


@torch.inference_mode()
def vision(model, req: dict) -> dict:
    x = _inputs(req["inputs"])
    t0 = time.perf_counter()
    out = model.model.visual(x["pixel_values"].float(), grid_thw=x["image_grid_thw"].long())
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": int(feats.shape[0])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--attn", default="sdpa", help="transformers attn_implementation (sdpa | eager)")
    args = ap.parse_args()
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # library chatter must not interleave with the answers
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation=args.attn).eval()
    ops = {"generate": generate, "vision": vision}
    out.write(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()})
              + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        out.write(json.dumps(ops[req["op"]](model, req)) + "\n")
        out.flush()


if __name__ == "__main__":
    main()

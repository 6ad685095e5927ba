"""The PyTorch side of bench/train_step.py: the same GRPO update on transformers' Qwen2.5-VL.

Runs under `.venv-ref/bin/python` (torch CPU + transformers; the project never imports torch), started
by bench/train_step.py as a subprocess:

  .venv-ref/bin/python bench/torch_train.py --ckpt=DIR --batch=BATCH.npz [--remat]

It loads the Hugging Face directory (float32), reads the batch written by train_step.py and then serves
one command per stdin line: `step` runs one update and prints `RESULT {"step_s", "loss", "grad_norm"}`;
`quit` prints `RESULT {"peak_rss_gib"}` and exits. Every other line on stdout is library noise.

The update mirrors `deepeyes_jax/rl/step.py` with the DeepEyes recipe: per micro-batch a forward with
`pixel_values` + `image_grid_thw` and the trainer's M-RoPE `position_ids`, full logits, log-softmax and
the log-prob of each next token; the PPO clipped objective (clip 0.2/0.2) with dual clip 3.0 on
negative advantages; token-mean over the action mask of the WHOLE batch (each micro-batch's masked sum
divided by the batch's token count, gradients accumulated); KL 0, entropy 0; then global-norm clipping
to 1.0 and AdamW (lr 1e-6, betas 0.9/0.999, eps 1e-8, weight decay 0.01).
"""

import argparse
import json
import resource
import sys
import time

import numpy as np
import torch
from transformers import Qwen2_5_VLForConditionalGeneration


def ppo_loss(logp, old, adv, clip_low=0.2, clip_high=0.2, dual_clip=3.0):
    ratio = torch.exp(logp - old)
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high))
    return torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)


def micro_loss(model, mb, normaliser):
    out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                position_ids=mb["positions"], pixel_values=mb["pixel_values"],
                image_grid_thw=mb["image_grid_thw"], use_cache=False)
    logits = out.logits[:, :-1].float()  # [b, T-1, V]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, mb["input_ids"][:, 1:, None])[..., 0]
    mask = mb["loss_mask"][:, 1:] > 0
    adv = mb["advantages"][:, None].expand_as(logp)
    tok = ppo_loss(logp, mb["old_logprobs"][:, 1:], adv)
    return torch.where(mask, tok, torch.zeros_like(tok)).sum() / normaliser


def load_batch(path):
    z = np.load(path)
    m = z["input_ids"].shape[0]
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x))
    ints = ("input_ids", "attention_mask", "positions", "image_grid_thw")
    names = (*ints, "loss_mask", "old_logprobs", "advantages", "pixel_values")
    micro = [{k: t(z[k][i]).long() if k in ints else t(z[k][i]) for k in names} for i in range(m)]
    return micro, float(max(z["loss_mask"].sum(), 1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--batch", required=True)
    p.add_argument("--remat", action="store_true", help="gradient checkpointing (as the JAX step's remat)")
    p.add_argument("--lr", type=float, default=1e-6)
    args = p.parse_args()
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.ckpt, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    model.train()
    if args.remat:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    micro, normaliser = load_batch(args.batch)
    print("RESULT " + json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            t0 = time.perf_counter()
            total = 0.0
            for mb in micro:
                loss = micro_loss(model, mb, normaliser)
                loss.backward()
                total += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            print("RESULT " + json.dumps({"step_s": dt, "loss": total, "grad_norm": grad_norm}), flush=True)
        elif cmd == "quit":
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            print("RESULT " + json.dumps({"peak_rss_gib": rss}), flush=True)
            return


if __name__ == "__main__":
    main()

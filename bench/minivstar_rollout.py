"""Mini-V* GRPO rollouts: one sampler call for all of a step's prompts, or several smaller calls.

  .venv/bin/python bench/minivstar_rollout.py --model_dir=runs/mini_vstar/format

A step's rollouts as `rl/trainer.py` samples them (`rollouts`): P training prompts x 4 samples at
T=0.5 with the Mini-V* rollout limits, from a format-stage model directory (the `format/` of a Mini-V*
run: a random model writes every turn to its token cap, a format model writes the protocol). Each
variant rolls out the same prompts with the same key; the first repetition of each shape compiles and is
not timed. Decode, append and prefill are timed around the engine's jitted calls (blocking on their
outputs); "host" is the rest (turn parsing, tools, crops' image processing).
"""

from __future__ import annotations

import collections
import io
import time

import jax
from absl import app, flags
from common import append_section, summary
from PIL import Image

_MODEL = flags.DEFINE_string("model_dir", "runs/mini_vstar/format", "A Mini-V* format-stage directory.")
_PROMPTS = flags.DEFINE_multi_integer("prompts", [16, 24, 32], "Prompts per step.")
_SPLITS = flags.DEFINE_multi_integer("calls", [1, 2], "Sampler calls per step (prompts split evenly).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions per variant (after one warm-up).")
_OUT = flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file to append to ('' to skip).")


def main(_):
    from deepeyes_jax.minivstar import tasks
    from deepeyes_jax.model import checkpoint as hf_checkpoint
    from deepeyes_jax.rl import trainer
    from deepeyes_jax.sampling import Prompt, RolloutConfig, Sample, Sampler, engine

    phases: dict[str, float] = collections.defaultdict(float)

    def timed(name, fn):
        def wrapped(*args, **kwargs):
            t = time.perf_counter()
            out = jax.block_until_ready(fn(*args, **kwargs))
            phases[name] += time.perf_counter() - t
            return out
        return wrapped

    for name in ("prefill", "decode", "append"):
        setattr(engine, name, timed(name, getattr(engine, name)))
    pre = hf_checkpoint.load_pretrained(_MODEL.value)
    cfg = RolloutConfig(max_turns=3, max_turn_tokens=96, max_response_tokens=384, max_prompt_tokens=1024,
                        system_prompt=tasks.SYSTEM_PROMPT)  # configs/mini_vstar.py's limits
    sampler = Sampler(pre.model, pre.tokenizer, pre.image_processor, cfg)
    records = [t.record for t in tasks.make_tasks(max(_PROMPTS.value), 0)]
    method, n = Sample(temperature=0.5), 4
    rows = []
    for p in _PROMPTS.value:
        prompts = [Prompt(image=Image.open(io.BytesIO(r["image"])).convert("RGB"), question=r["question"])
                   for r in records[:p]]
        for calls in _SPLITS.value:
            per_call = -(-p // calls) if calls > 1 else 0
            times, split = [], collections.Counter()
            for rep in range(_REPEATS.value + 1):
                phases.clear()
                t = time.perf_counter()
                trajs = trainer.rollouts(sampler, prompts, n, method, jax.random.key(0), per_call)
                if rep:  # the first repetition compiles
                    times.append(time.perf_counter() - t)
                    split.update(phases)
            tokens = sum(len(tr.input_ids) for tr in trajs) / len(trajs)
            s = summary(times)
            k = _REPEATS.value
            mean = {name: f"{split[name] / k:.2f}" for name in ("decode", "append", "prefill")}
            rows.append([f"{p} x {n}", calls, f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})",
                         mean["decode"], mean["append"], mean["prefill"],
                         f"{(sum(times) - sum(split.values())) / k:.2f}", f"{tokens:.0f}"])
    append_section(
        "Mini-V* rollouts per step: one sampler call or several",
        f"Format model `{_MODEL.value}`; T=0.5, 4 samples a prompt, the Mini-V* rollout limits (3 turns, 96 "
        "tokens a turn, 384 a response). Seconds per step's rollouts, median (min-max) of the timed "
        "repetitions; phases and host are means.",
        ["prompts x samples", "sampler calls", "rollouts (s)", "decode (s)", "append (s)", "prefill (s)",
         "host (s)", "mean tokens a trajectory"], rows, output=_OUT.value)


if __name__ == "__main__":
    app.run(main)

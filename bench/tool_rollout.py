"""A 4-crop DeepEyes trajectory: in-place observation injection against re-prefilling every turn.

  .venv/bin/python bench/tool_rollout.py --model=tiny --model=110m --final_tokens=64 --repeats=3

One prompt (the DeepEyes system prompt, a random 448x448 image, a question), then five assistant
turns: turns 1-4 are teacher-forced zoom calls (four different 224x224 boxes, as launch/demo.py forces
its centre zoom), each followed by the crop's observation; turn 5 decodes `--final_tokens` greedy tokens
(end tokens banned). Three ways to run it, alternating, same random weights:

  in-place    our Sampler: the prompt is prefilled once; each observation (crop encoded once) is
              appended to the live KV cache with `engine.append`.
  re-prefill  the same engine driven verl-style: every turn prefills the whole conversation so far
              from scratch (`engine.prefill`, every image re-encoded), then decodes the turn. Shapes
              are exact per turn (no bucket padding), which favours this variant.
  torch       the same re-prefill loop in transformers: `generate` on the whole conversation per
              turn, as many new tokens as our turn had (its own greedy tokens instead of the forced
              text: same work).

"Prefilled" counts tokens that go through a chunked forward (prefill or append); "decode steps" the
one-token steps. Our prefill leaves a chunk's last token for the first decode step; transformers
prefills its whole input and takes the first new token from the prefill's logits.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import numpy as np
from absl import app, flags
from common import append_section, peak_rss_gib, summary
from decode import NO_STOP, TorchWorker, build, fmt, images, save_inputs, timed
from PIL import Image

from deepeyes_jax.model import make_vision_inputs, rope
from deepeyes_jax.sampling import Greedy, Prompt, RolloutConfig, Sampler, engine
from deepeyes_jax.tools import observation, parsing, registry

FLAGS = flags.FLAGS
QUESTION = "What is written on the small sign?"
BOXES = [(112, 112, 336, 336), (0, 0, 224, 224), (224, 224, 448, 448), (56, 168, 280, 392)]


def zoom_call(box) -> str:
    return ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": '
            f'[{box[0]}, {box[1]}, {box[2]}, {box[3]}]}}}}</tool_call>')


# ------------------------------------------------------------------------ token accounting (pure)


def inplace_counts(prompt_len: int, turn_lens, obs_lens) -> dict[str, int]:
    """Tokens our engine runs for prompt + turns interleaved with observations (obs_lens[i] follows
    turn i): one prefill of the prompt but its last token, one append per observation (the pending
    token + the observation but its last token), one decode step per model-written token."""
    return {"prefilled": prompt_len - 1 + sum(obs_lens), "decode_steps": sum(turn_lens)}


def reprefill_contexts(prompt_len: int, turn_lens, obs_lens) -> list[int]:
    """Length of the conversation each turn starts from when every turn re-prefills it."""
    ctx = [prompt_len]
    for t, o in zip(turn_lens[:-1], obs_lens, strict=True):
        ctx.append(ctx[-1] + t + o)
    return ctx


def reprefill_counts(prompt_len: int, turn_lens, obs_lens, whole_input: bool = False) -> dict[str, int]:
    """Re-prefilling every turn. Our engine (`whole_input=False`) prefills all of a context but its
    last token and decodes each turn token; transformers' generate (`whole_input=True`) prefills the
    whole context and decodes all but the first new token."""
    ctx = reprefill_contexts(prompt_len, turn_lens, obs_lens)
    if whole_input:
        return {"prefilled": sum(ctx), "decode_steps": sum(turn_lens) - len(turn_lens)}
    return {"prefilled": sum(c - 1 for c in ctx), "decode_steps": sum(turn_lens)}


def turn_structure(traj) -> tuple[list[int], list[int]]:
    """(model tokens per turn, observation tokens per observation) of a trajectory."""
    model = traj.source != engine.OBSERVATION
    turns, obs, prev = [], [], None
    for m in model:
        if m and prev is not True:
            turns.append(0)
        if not m and prev is not False:
            obs.append(0)
        if m:
            turns[-1] += 1
        else:
            obs[-1] += 1
        prev = bool(m)
    return turns, obs


# ------------------------------------------------------------------------ the re-prefill variant


def reprefill_rollout(s: Sampler, image: np.ndarray, forced: list[str], method) -> dict:
    """One episode in which every turn prefills the whole conversation from scratch."""
    cfg, tok, vcfg = s.config, s.tokenizer, s.model.cfg.vision
    pil = Image.fromarray(image)
    imgs = [s.processor(pil)]
    context = s.render(QUESTION, imgs[0].num_tokens)
    tcfg = registry.ToolConfig(original_hw=(pil.height, pil.width),
                               resized_hw=tuple(int(v) for v in imgs[0].resized_hw), tools=cfg.tools,
                               box_frame=cfg.box_frame)
    contexts, turns, patches = [], [], 0
    for turn in range(cfg.max_turns):
        ids = np.array([context], np.int32)
        grid = np.array([im.grid_thw for im in imgs])
        vis = make_vision_inputs(np.concatenate([im.pixel_values for im in imgs]), grid, vcfg)
        hw = np.asarray(rope.image_grid_hw(grid, vcfg.spatial_merge_size))
        state, _ = engine.prefill(s.model, ids, np.ones_like(ids), hw, vis, jax.random.key(0),
                                  cfg.max_turn_tokens, group=1, budget=cfg.max_turn_tokens,
                                  forced_size=cfg.max_forced_tokens)
        f, fl = s._forced_array([forced[turn] if turn < len(forced) else None])
        state = engine.set_forced(state, f, fl)
        state = engine.decode(s.model, state, method=method, limits=s.limits)
        stop, resp_len, tokens = jax.device_get((state.stop, state.resp_len, state.tokens))
        turn_ids = tokens[0, : resp_len[0]].tolist()
        contexts.append(len(context))
        turns.append(turn_ids)
        patches += sum(len(im.pixel_values) for im in imgs)
        parsed = parsing.parse_turn(tok.decode(turn_ids))
        if parsed.kind != "tool_call" or turn == cfg.max_turns - 1:
            break
        result = registry.run_tool_call(parsed, pil, tcfg)
        crop = s.processor(result.image)
        obs, _ = observation.observation_ids(result, tok, crop.num_tokens,
                                             close_turn=int(stop[0]) == engine.TOOL_PAUSE)
        context = context + turn_ids + obs
        imgs.append(crop)
    return {"input_ids": np.array(context + turns[-1]), "contexts": contexts, "turns": turns,
            "patches": patches, "images": imgs}


# ------------------------------------------------------------------------ the benchmark


def bench(name: str, workdir: str) -> list[list[object]]:
    model_dir = os.path.join(workdir, name)
    model, tok, proc = build(name, model_dir)
    forced = [zoom_call(b) for b in BOXES]
    longest = max(len(tok.encode(f)) for f in forced)
    if FLAGS.final_tokens <= longest:
        raise app.UsageError(f"--final_tokens must exceed the forced turns' {longest} tokens")
    cfg = RolloutConfig(max_turns=5, max_turn_tokens=FLAGS.final_tokens, max_response_tokens=3072,
                        banned_tokens=RolloutConfig().banned_tokens + NO_STOP + ("</tool_call>",))
    [image] = images(1, seed=1)
    probe = Sampler(model, tok, proc, cfg)
    prompt_len = len(probe.render(QUESTION, proc(Image.fromarray(image)).num_tokens))
    s = Sampler(model, tok, proc, dataclasses.replace(cfg, prompt_bucket=prompt_len))
    method = Greedy()
    worker = TorchWorker(model_dir)
    suppress = [tok.token_to_id(t) for t in cfg.banned_tokens]
    times = {"in-place": [], "re-prefill": [], "torch": []}
    try:
        for _ in range(FLAGS.repeats + 1):
            dt, [traj] = timed(s, [Prompt(image=image, question=QUESTION)], 1, method, forced=[forced])
            times["in-place"].append(dt)
            dt, re = timed(reprefill_rollout, s, image, forced, method)
            times["re-prefill"].append(dt)
            total = 0.0
            for k, (ctx, turn) in enumerate(zip(re["contexts"], re["turns"], strict=True)):
                ims = re["images"][: k + 1]
                path = save_inputs(os.path.join(workdir, f"{name}_turn{k}.npz"),
                                   np.array([re["input_ids"][:ctx]]),
                                   np.concatenate([im.pixel_values for im in ims]),
                                   [im.grid_thw for im in ims])
                total += worker(op="generate", inputs=path, new_tokens=len(turn), suppress=suppress)["total"]
            times["torch"].append(total)
    finally:
        worker.close()
    compile_s = {k: v[0] - summary(v[1:])["median"] for k, v in times.items()}
    turn_lens, obs_lens = turn_structure(traj)
    assert [c.status for c in traj.tool_calls] == ["ok"] * 4 and len(turn_lens) == 5, traj.stop_reason
    assert turn_lens == [len(t) for t in re["turns"]], (turn_lens, [len(t) for t in re["turns"]])
    same = np.array_equal(traj.input_ids, re["input_ids"])
    counts = {"in-place": inplace_counts(prompt_len, turn_lens, obs_lens),
              "re-prefill": reprefill_counts(prompt_len, turn_lens, obs_lens),
              "torch": reprefill_counts(prompt_len, turn_lens, obs_lens, whole_input=True)}
    vision = {"in-place": sum(len(im.pixel_values) for im in traj.images), "re-prefill": re["patches"],
              "torch": re["patches"]}
    base = counts["in-place"]["prefilled"]
    base_t = summary(times["in-place"][1:])["median"]
    rows = []
    for k in ("in-place", "re-prefill", "torch"):
        t = summary(times[k][1:])
        rows.append([name, k, counts[k]["prefilled"], f"{counts[k]['prefilled'] / base:.2f}x",
                     counts[k]["decode_steps"], vision[k], fmt(t), f"{t['median'] / base_t:.2f}x",
                     f"{compile_s[k]:.1f}" if k != "torch" else "",
                     ("yes" if same else "NO") if k == "re-prefill" else ""])
        print(rows[-1], flush=True)
    rows[0][-1] = f"prompt {prompt_len}, turns {turn_lens}, observations {obs_lens}"
    return rows


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as workdir:
        rows = [r for name in FLAGS.model for r in bench(name, workdir)]
    append_section(
        "Tool rollout: in-place observation injection vs re-prefilling every turn",
        "One 4-crop trajectory (batch 1): DeepEyes system prompt + a random 448x448 image + question, four "
        "teacher-forced zoom turns (224x224 boxes -> 64-token crops), each followed by its observation, "
        f"then {FLAGS.final_tokens} greedy tokens. Prefilled = tokens through prefill/append chunks; decode "
        "steps = one-token steps; vision patches = patches through the vision tower. Wall time in seconds, "
        f"median (min-max) of {FLAGS.repeats} alternating repetitions after a warm-up (JAX compile = the "
        f"warm-up's excess). Peak RSS of the JAX process: {peak_rss_gib():.2f} GiB.",
        ["model", "variant", "prefilled tokens", "vs in-place", "decode steps", "vision patches",
         "wall s", "time vs in-place", "JAX compile s", "same sequence / layout"],
        rows, output=FLAGS.output,
        notes="in-place = our Sampler (`engine.append` into the live cache); re-prefill = our engine "
              "prefilling the whole conversation each turn with exact shapes; torch = transformers "
              "`generate` on the whole conversation each turn. 'same sequence' = the re-prefill loop "
              "rebuilt exactly the in-place token sequence. The 2-core machine was shared with another "
              "engineer's CPU-heavy jobs while this ran: read the min-max spreads.")


if __name__ == "__main__":
    flags.DEFINE_multi_string("model", ["tiny", "110m"], "tiny | 110m")
    flags.DEFINE_integer("final_tokens", 64, "Greedy tokens of the last turn (also the per-turn budget).")
    flags.DEFINE_integer("repeats", 3, "Timed repetitions per variant (after one warm-up).")
    flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown file to append to ('' to skip).")
    app.run(main)

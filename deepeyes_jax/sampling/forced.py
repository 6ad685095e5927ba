"""Fully teacher-forced episodes built on the host, without running the model.

When every assistant turn is given (supervised data, the Mini-V* format stage), nothing needs a
forward pass to lay the episode out: the prompt is rendered, each turn tokenised, each tool call run
on the original image and its observation appended, exactly as `Sampler` does with `forced=` turns,
and the M-RoPE positions of the whole sequence come from one `rope.mrope_positions` call. The
result is the same `Trajectory` (tokens, sources, positions, images, tool calls) the sampler would
return, with log-probs left at zero; `tests/test_minivstar.py` checks the two agree token for token.
The sampler's forced mode instead feeds forced tokens through its decode loop one step each, which
for a 60-token turn is 60 sequential model calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from deepeyes_jax.model import rope
from deepeyes_jax.sampling import engine
from deepeyes_jax.sampling.rollout import Prompt, Sampler, Trajectory
from deepeyes_jax.tools import parsing


def forced_trajectory(sampler: Sampler, prompt: Prompt, turns: Sequence[str],
                      max_turns: int | None = None) -> Trajectory:
    """The episode of `prompt` whose assistant turns are exactly `turns`.

    Turns follow the sampler's forced-turn rules: a turn that calls a tool ends at `</tool_call>`
    (the observation, opened by a non-policy `<|im_end|>`, follows), the final turn ends with
    `<|im_end|>`. Like the sampler, the episode stops at a turn with no tool call or at `max_turns`
    (default: the sampler's; at the limit a call runs but its observation is not appended, so
    `max_turns=1` lays out a first turn alone, as scoring it needs); leftover turns raise.

    Raises:
      ValueError: turns left after the episode ended, or a prompt or response over its budget.
    """
    cfg, tok = sampler.config, sampler.tokenizer
    pil = prompt.image if isinstance(prompt.image, Image.Image) else Image.fromarray(np.asarray(prompt.image))
    first = sampler.processor(pil)
    prompt_ids = (list(prompt.prompt_ids) if prompt.prompt_ids is not None
                  else sampler.render(prompt.question, first.num_tokens))
    if len(prompt_ids) > cfg.max_prompt_tokens:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds max_prompt_tokens="
                         f"{cfg.max_prompt_tokens}")
    tcfg = sampler.tool_config(pil, first)
    response: list[int] = []
    source: list[int] = []
    images, pil_images, calls, texts = [first], [pil], [], []
    answer, stop = None, None
    for i, text in enumerate(turns):
        if stop is not None:
            raise ValueError(f"turn {i} follows the end of the episode ({stop}); drop it")
        ids = tok.encode(text)
        response += ids
        source += [engine.FORCED] * len(ids)
        texts.append(text)
        parsed = parsing.parse_turn(text)
        if parsed.kind == "answer":
            answer = parsed.answer
        if parsed.kind != "tool_call" or not cfg.tools:
            ended = "no_tool_call" if cfg.tools else "tools_disabled"
            stop = "answer" if parsed.kind == "answer" else ended
            continue
        call, result = sampler.call_tool(parsed, pil, tcfg, i)
        calls.append(call)
        if len(texts) >= (cfg.max_turns if max_turns is None else max_turns):
            stop = "max_turns"
            continue
        crop, obs = sampler.observe(result, close_turn=True)
        response += obs
        source += [engine.OBSERVATION] * len(obs)
        if crop is not None:
            images.append(crop)
            pil_images.append(result.image)
    if len(response) > cfg.max_response_tokens:
        raise ValueError(f"response of {len(response)} tokens exceeds max_response_tokens="
                         f"{cfg.max_response_tokens}")
    ids = np.asarray(prompt_ids + response, np.int32)
    merge = sampler.model.cfg.vision.spatial_merge_size
    grid = rope.image_grid_hw(np.array([im.grid_thw for im in images], np.int64), merge, xp=np)
    pos, _ = rope.mrope_positions(ids[None], np.ones((1, len(ids)), np.int32), grid,
                                  sampler.model.cfg.image_token_id, xp=np)
    pos = pos[:, 0]
    p = len(prompt_ids)
    src = np.asarray(source, np.int32)
    return Trajectory(prompt_ids=ids[:p], prompt_positions=pos[:, :p], response_ids=ids[p:],
                      action_mask=np.zeros(len(src), np.int32), logprobs=np.zeros(len(src), np.float32),
                      source=src, response_positions=pos[:, p:], images=images, pil_images=pil_images,
                      tool_calls=calls, turns=texts, answer=answer, stop_reason=stop or "unfinished")

"""iMCoT rollouts: the host loop around the jitted engine.

prefill (each prompt once, shared by its group) -> decode until every row stops -> for each stopped
row parse the turn, run its tool on the ORIGINAL image, build the observation -> encode all crops of
the batch in one vision call and append every observation into its row's cache in place -> decode...
until every episode has ended. Trajectories hold everything training needs: token ids, action mask,
sampled log-probs, M-RoPE positions, every image with its patches, and each tool call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from deepeyes_jax import prompts
from deepeyes_jax.model import rope
from deepeyes_jax.model.qwen2_5_vl import Qwen25VL
from deepeyes_jax.model.vision import image_windows, make_vision_inputs, window_layout
from deepeyes_jax.processing.chat import Tokenizer
from deepeyes_jax.processing.image import ImageProcessor, ProcessedImage
from deepeyes_jax.sampling import engine
from deepeyes_jax.tools import observation, parsing, registry
from deepeyes_jax.utils import buckets


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Rollout limits and protocol switches (defaults: the DeepEyes 7B recipe).

    Attributes:
      max_turns: assistant turns per episode (5: at most 4 crops reach the context).
      max_turn_tokens: tokens the model may write in one turn; a turn cut here ends the episode.
      max_response_tokens: whole response budget INCLUDING observation tokens.
      max_prompt_tokens: longest prompt accepted.
      pause_at_tool_call: stop a turn at `</tool_call>` (default) or run it to `<|im_end|>` (the
        reference's behaviour).
      tools: enabled tools ("zoom",) or ("zoom", "rotate"); rotate is then advertised in the prompt.
        () offers none: a plain prompt (default system prompt, no tool instructions), one turn.
      box_frame: "resized" maps boxes from the image the model saw back to original pixels;
        "original" applies them raw (the reference's bug #141).
      prompt_bucket, chunk_bucket, window_bucket: smallest padded sizes; shapes grow in powers of two
        from there so that few programs are compiled.
      max_forced_tokens: room for teacher-forced tokens per turn.
      system_prompt: the system prompt when tools are on; None (default) is the reference's
        byte-exact V2 prompt for the enabled tools. Mini-V* sets a short one to keep CPU sequences short.
      banned_tokens: never sampled. The vision placeholders: a sampled `<|image_pad|>` would have
        no image features (verl's "image features and image tokens do not match"); `<|im_start|>`:
        the reference's V2 bans it against repeated-turn degeneration. Teacher-forced text is not
        restricted, and recorded log-probs are the unmasked model's.
    """

    max_turns: int = 5
    max_turn_tokens: int = 10240
    max_response_tokens: int = 20480
    max_prompt_tokens: int = 8192
    pause_at_tool_call: bool = True
    tools: tuple[str, ...] = ("zoom",)
    box_frame: str = "resized"
    prompt_bucket: int = 128
    chunk_bucket: int = 64
    window_bucket: int = 4
    max_forced_tokens: int = 256
    system_prompt: str | None = None
    banned_tokens: tuple[str, ...] = ("<|image_pad|>", "<|video_pad|>", "<|vision_pad|>", "<|im_start|>")

    def __post_init__(self):
        for name in ("max_turns", "max_turn_tokens", "max_response_tokens", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"RolloutConfig.{name}={getattr(self, name)} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One question about one image. `prompt_ids` (image pads expanded) overrides the rendering."""

    image: Any
    question: str = ""
    prompt_ids: Sequence[int] | None = None


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A tool call as training and analysis see it."""

    turn: int
    raw: str | None
    name: str | None
    status: str
    error: str | None
    box_model: tuple[float, ...] | None
    box_original: tuple[float, ...] | None


@dataclasses.dataclass
class Trajectory:
    """One rollout.

    Attributes:
      prompt_ids: [Tp] the prompt (image pads expanded); prompt_positions: [3, Tp].
      response_ids, action_mask, logprobs: [Tr] every token after the prompt (model turns and
        observations), 1 only on tokens the policy sampled, and the log-prob of every token the
        model wrote or was forced to write (0 for observation tokens).
      source: [Tr] engine.SAMPLED, engine.FORCED or engine.OBSERVATION per response token.
      response_positions: [3, Tr] M-RoPE positions continuing the prompt's.
      images: the original then each crop, processed (patches and grids), in sequence order;
        pil_images: the same as PIL images.
      tool_calls: every tool call; turns: the text of each assistant turn.
      answer: the last `<answer>` body of the final turn (None if none); stop_reason: why it ended.
    """

    prompt_ids: np.ndarray
    prompt_positions: np.ndarray
    response_ids: np.ndarray
    action_mask: np.ndarray
    logprobs: np.ndarray
    source: np.ndarray
    response_positions: np.ndarray
    images: list[ProcessedImage]
    pil_images: list[Image.Image]
    tool_calls: list[ToolCall]
    turns: list[str]
    answer: str | None
    stop_reason: str

    @property
    def input_ids(self) -> np.ndarray:
        return np.concatenate([self.prompt_ids, self.response_ids])

    @property
    def positions(self) -> np.ndarray:
        return np.concatenate([self.prompt_positions, self.response_positions], axis=1)

    @property
    def image_grid_thw(self) -> np.ndarray:
        return np.array([im.grid_thw for im in self.images], np.int64).reshape(-1, 3)

    @property
    def pixel_values(self) -> np.ndarray:
        return np.concatenate([im.pixel_values for im in self.images])


@dataclasses.dataclass
class _Row:
    """Host bookkeeping of one episode."""

    original: Image.Image
    tool_config: registry.ToolConfig
    images: list[ProcessedImage]
    pil_images: list[Image.Image]
    forced: list[str | None]
    turn_start: int = 0
    turns: list[str] = dataclasses.field(default_factory=list)
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)
    answer: str | None = None
    stop_reason: str | None = None


class Sampler:
    """Runs batched iMCoT rollouts of a model (see the module docstring)."""

    def __init__(self, model: Qwen25VL, tokenizer: Tokenizer, image_processor: ImageProcessor,
                 config: RolloutConfig = RolloutConfig()):
        self.model, self.tokenizer, self.processor, self.config = model, tokenizer, image_processor, config
        s = tokenizer.special
        self.limits = engine.Limits(im_end=s.im_end, tool_call_end=s.tool_call_end,
                                    pause_at_tool_call=config.pause_at_tool_call,
                                    banned=tuple(tokenizer.token_to_id(t) for t in config.banned_tokens))
        self.system_prompt = ((config.system_prompt or registry.system_prompt(config.tools))
                              if config.tools else None)
        self.prefill_tokens = 0  # real prompt tokens prefilled so far (counts shared prefill once)

    # -------------------------------------------------------------------------------- prompts

    def render(self, question: str, num_image_tokens: int) -> list[int]:
        """The DeepEyes prompt: system prompt, then `<image>\\n` + question + the user suffix. Without
        tools: the default system prompt and `<image>\\n` + question."""
        if self.system_prompt is None:
            messages = [{"role": "user", "content": "<image>\n" + question}]
        else:
            messages = [{"role": "system", "content": self.system_prompt},
                        {"role": "user", "content": "<image>\n" + question + prompts.USER_SUFFIX_V2}]
        return self.tokenizer.encode_chat(messages, [num_image_tokens])

    # -------------------------------------------------------------------------------- tools

    def tool_config(self, original: Image.Image, processed: ProcessedImage) -> registry.ToolConfig:
        """Tool settings of an episode about `original`, seen by the model as `processed`."""
        return registry.ToolConfig(original_hw=(original.height, original.width),
                                   resized_hw=tuple(int(v) for v in processed.resized_hw),
                                   tools=self.config.tools or ("zoom",), box_frame=self.config.box_frame)

    @staticmethod
    def call_tool(parsed: parsing.ParsedTurn, original: Image.Image, tcfg: registry.ToolConfig,
                  turn: int) -> tuple[ToolCall, registry.ToolResult]:
        """Runs the tool call of turn `turn` on the original image: its record and its result."""
        result = registry.run_tool_call(parsed, original, tcfg)
        return ToolCall(turn=turn, raw=result.call_text, name=result.name, status=result.status,
                        error=result.error, box_model=result.box_model,
                        box_original=result.box_original), result

    def observe(self, result: registry.ToolResult,
                close_turn: bool) -> tuple[ProcessedImage | None, list[int]]:
        """The processed crop (None for an error) and the observation ids that follow a tool call."""
        crop = self.processor(result.image) if result.ok else None
        obs, _ = observation.observation_ids(result, self.tokenizer, crop.num_tokens if crop else None,
                                             close_turn=close_turn)
        return crop, obs

    def _vision(self, images: Sequence[ProcessedImage]):
        """Bucketed VisionInputs for images (None when there are none) and their merged grids."""
        merge = self.model.cfg.vision.spatial_merge_size
        if not images:
            return None, np.zeros((0, 2), np.int32)
        grid = np.array([im.grid_thw for im in images], np.int64)
        cfg = self.model.cfg.vision
        window = cfg.window_patches
        need = len(window_layout(grid, cfg)["src"]) // window
        windows = buckets.pow2(need, self.config.window_bucket)
        largest = min(buckets.pow2(image_windows(grid, cfg), self.config.window_bucket), windows)
        vis = make_vision_inputs(np.concatenate([im.pixel_values for im in images]), grid, cfg,
                                 num_windows=windows, num_tokens=windows * cfg.window_tokens,
                                 max_image_windows=largest)
        hw = rope.image_grid_hw(grid, merge, xp=np)
        hw = np.concatenate([hw, np.ones((buckets.pow2(len(hw), 1) - len(hw), 2), np.int32)])
        return vis, hw

    def _forced_array(self, texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        f = self.config.max_forced_tokens
        out, lens = np.zeros((len(texts), f), np.int32), np.zeros(len(texts), np.int32)
        for i, text in enumerate(texts):
            if text:
                ids = self.tokenizer.encode(text)
                if len(ids) > f:
                    raise ValueError(f"forced turn of {len(ids)} tokens exceeds max_forced_tokens={f}; "
                                     "raise RolloutConfig.max_forced_tokens")
                out[i, : len(ids)], lens[i] = ids, len(ids)
        return out, lens

    # -------------------------------------------------------------------------------- rollout

    def __call__(self, prompts_: Sequence[Prompt], num_samples: int = 1, method: Any = None,
                 rng: jax.Array | None = None,
                 forced: Sequence[Sequence[str | None]] | None = None) -> list[Trajectory]:
        """Rolls out `num_samples` episodes per prompt (rows ordered prompt-major).

        Args:
          prompts_: the prompts.
          num_samples: group size n; each prompt is prefilled once for its n rows.
          method: a sampling method from `sampling.methods` (default greedy).
          rng: sampling key.
          forced: per row (len(prompts) * n), per assistant turn, text to teacher-force at the start
            of that turn (None: let the model write it); the model continues after it.
        """
        from deepeyes_jax.sampling import methods

        cfg, tok = self.config, self.tokenizer
        method = methods.Greedy() if method is None else method
        rng = jax.random.key(0) if rng is None else rng
        b = len(prompts_) * num_samples
        if forced is not None and len(forced) != b:
            raise ValueError(f"forced has {len(forced)} rows; pass one per rollout ({b})")

        originals, processed, ids = [], [], []
        for p in prompts_:
            pil = Image.fromarray(np.asarray(p.image)) if not isinstance(p.image, Image.Image) else p.image
            im = self.processor(pil)
            originals.append(pil)
            processed.append(im)
            seq = list(p.prompt_ids) if p.prompt_ids is not None else self.render(p.question, im.num_tokens)
            if len(seq) > cfg.max_prompt_tokens:
                raise ValueError(f"prompt of {len(seq)} tokens exceeds max_prompt_tokens="
                                 f"{cfg.max_prompt_tokens}")
            ids.append(seq)
        pb = buckets.pow2(max(len(s) for s in ids), cfg.prompt_bucket)
        prompt_ids = np.full((len(ids), pb), tok.special.pad, np.int32)
        prompt_mask = np.zeros((len(ids), pb), np.int32)
        for i, s in enumerate(ids):
            prompt_ids[i, pb - len(s):], prompt_mask[i, pb - len(s):] = s, 1
        self.prefill_tokens += int(prompt_mask.sum())
        vis, hw = self._vision(processed)
        state, prompt_pos = engine.prefill(self.model, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask),
                                           jnp.asarray(hw), vis, rng, cfg.max_turn_tokens,
                                           group=num_samples,
                                           budget=cfg.max_response_tokens,
                                           forced_size=cfg.max_forced_tokens)
        rows = []
        for r in range(b):
            g = r // num_samples
            rows.append(_Row(original=originals[g], tool_config=self.tool_config(originals[g], processed[g]),
                             images=[processed[g]], pil_images=[originals[g]],
                             forced=list(forced[r] or []) if forced else []))
        f, fl = self._forced_array([row.forced[0] if row.forced else None for row in rows])
        state = engine.set_forced(state, jnp.asarray(f), jnp.asarray(fl))

        while True:
            state = engine.decode(self.model, state, method=method, limits=self.limits)
            stop, resp_len, tokens, pending = jax.device_get(
                (state.stop, state.resp_len, state.tokens, state.pending))
            chunks: list[list[int]] = [[] for _ in range(b)]
            crops: list[ProcessedImage] = []
            for r, row in enumerate(rows):
                if row.stop_reason is None:
                    self._end_turn(row, int(stop[r]), tokens[r, row.turn_start:resp_len[r]], int(pending[r]),
                                   int(resp_len[r]), chunks[r], crops)
            if not any(chunks):
                break
            c = buckets.pow2(max(len(ch) for ch in chunks), cfg.chunk_bucket)
            chunk = np.full((b, c), tok.special.pad, np.int32)
            chunk_len = np.zeros(b, np.int32)
            for r, ch in enumerate(chunks):
                chunk[r, : len(ch)], chunk_len[r] = ch, len(ch)
            vis, hw = self._vision(crops)
            f, fl = self._forced_array([
                (row.forced[len(row.turns)] if len(row.forced) > len(row.turns) else None)
                if chunk_len[r] else None for r, row in enumerate(rows)])
            state = engine.append(self.model, state, jnp.asarray(chunk), jnp.asarray(chunk_len),
                                  jnp.asarray(hw), vis, jnp.asarray(f), jnp.asarray(fl))
            for r, row in enumerate(rows):
                if chunk_len[r]:
                    row.turn_start = int(resp_len[r]) + int(chunk_len[r]) - 1

        return self._trajectories(rows, state, prompt_ids, prompt_mask, np.asarray(prompt_pos),
                                  num_samples)

    def _end_turn(self, row: _Row, stop: int, turn_tokens: np.ndarray, pending: int, resp_len: int,
                  chunk: list[int], crops: list[ProcessedImage]) -> None:
        """Decides how a row's finished turn continues; fills `chunk` (and `crops`) to continue it."""
        cfg = self.config
        text = self.tokenizer.decode(turn_tokens.tolist())
        row.turns.append(text)
        parsed = parsing.parse_turn(text)
        if parsed.kind == "answer":
            row.answer = parsed.answer
        if stop in (engine.TURN_BUDGET, engine.RESPONSE_BUDGET):
            row.stop_reason = engine.STOP_NAMES[stop]
            return
        if parsed.kind != "tool_call":
            row.stop_reason = "answer" if parsed.kind == "answer" else "no_tool_call"
            return
        if not cfg.tools:
            row.stop_reason = "tools_disabled"
            return
        call, result = self.call_tool(parsed, row.original, row.tool_config, len(row.turns) - 1)
        row.tool_calls.append(call)
        if len(row.turns) >= cfg.max_turns:
            row.stop_reason = "max_turns"
            return
        crop, obs = self.observe(result, close_turn=stop == engine.TOOL_PAUSE)
        # The observation plus at least one token of the next turn must fit in the budget.
        if resp_len + len(obs) + 1 > cfg.max_response_tokens:
            row.stop_reason = "observation_overflow"
            return
        chunk.extend([pending, *obs])
        if crop is not None:
            crops.append(crop)
            row.images.append(crop)
            row.pil_images.append(result.image)

    def _trajectories(self, rows: list[_Row], state: engine.DecodeState, prompt_ids, prompt_mask,
                      prompt_pos, n: int) -> list[Trajectory]:
        tokens, logprobs, source, positions, resp_len = jax.device_get(
            (state.tokens, state.logprobs, state.source, state.positions, state.resp_len))
        out = []
        for r, row in enumerate(rows):
            g, k = r // n, int(resp_len[r])
            real = prompt_mask[g].astype(bool)
            out.append(Trajectory(
                prompt_ids=prompt_ids[g][real], prompt_positions=prompt_pos[:, g][:, real],
                response_ids=tokens[r, :k], action_mask=(source[r, :k] == engine.SAMPLED).astype(np.int32),
                logprobs=logprobs[r, :k], source=source[r, :k], response_positions=positions[:, r, :k],
                images=row.images, pil_images=row.pil_images, tool_calls=row.tool_calls,
                turns=row.turns, answer=row.answer, stop_reason=row.stop_reason or "unknown"))
        return out

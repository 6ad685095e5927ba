"""A small tokenizer for Mini-V*: byte-level BPE in Qwen2's layout, with Qwen's added tokens.

The base vocabulary is learned from the text Mini-V* shows the model (the DeepEyes system prompt and
user suffix, the question templates, option lists, tool calls, answers); the 22 added tokens follow it
in Qwen2.5-VL's order and with its flags, so `<|im_start|>`, `<|image_pad|>`, `<tool_call>` ... are
single tokens and `chat.Tokenizer` finds them by name. Digits are split one per token (Qwen's
pre-tokenizer regex), as in the real model. Deterministic: the same files on every machine.
"""

from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from deepeyes_jax import prompts
from deepeyes_jax.data import choices
from deepeyes_jax.data.synthetic_vstar import FRAMES, PAIRS

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
           "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
NONSPECIAL = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
              "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
BASE_VOCAB = 672


def corpus() -> list[str]:
    """The texts the BPE merges are learned from (each weighted by repetition)."""
    from deepeyes_jax.minivstar.tasks import SYSTEM_PROMPT, restate, think_zoom

    texts = [prompts.SYSTEM_PROMPT_V2, prompts.USER_SUFFIX_V2, SYSTEM_PROMPT, SYSTEM_PROMPT]
    for frame in FRAMES:  # with the reasoning that names frames, so each frame word is one token
        texts.append(f"Which two colors make up the stripes on the card with the {frame} frame? "
                     + restate([f"card with the {frame} frame"]) + " " + think_zoom(frame))
    for p1 in PAIRS:
        for p2 in PAIRS:
            for how in ("on the left or right side of", "above or below"):
                texts.append(f"Is the card with {p1} stripes {how} the card with {p2} stripes?")
            for side in ("on the left side of", "on the right side of", "above", "below"):
                texts.append(f"The card with {p1} stripes is {side} the card with {p2} stripes.")
    texts.append(choices.format_question("Which one?", list(PAIRS)))
    texts += ['<think>I need a closer look at the card.</think>\n<tool_call>\n{"name": "image_zoom_in_tool", '
              '"arguments": {"bbox_2d": [63, 56, 126, 112], "label": "card"}}\n</tool_call>',
              "<think>I can answer now.</think>\n<answer>A</answer>", "<answer>B</answer> <answer>C</answer> "
              "<answer>D</answer>", "user\nassistant\nsystem\n"]
    return texts * 8


def build() -> Tokenizer:
    """The tokenizer (base vocabulary `BASE_VOCAB`, then Qwen's 22 added tokens)."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus(), trainer)
    if tok.get_vocab_size() != BASE_VOCAB:
        raise RuntimeError(f"BPE learned {tok.get_vocab_size()} tokens, not {BASE_VOCAB}; lower BASE_VOCAB")
    # Qwen2's tokenizer.json flags (the python constructors do not expose all of them).
    j = json.loads(tok.to_str())
    j["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=False, trim_offsets=False, use_regex=False)
    j["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False}
    j["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tok = Tokenizer.from_str(json.dumps(j))
    flags = dict(normalized=False, single_word=False, lstrip=False, rstrip=False)
    tok.add_special_tokens([AddedToken(t, special=True, **flags) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, **flags) for t in NONSPECIAL])
    return tok


def token_id(name: str) -> int:
    """The id of an added token (`BASE_VOCAB` + its index in Qwen's order)."""
    return BASE_VOCAB + (SPECIAL + NONSPECIAL).index(name)


def write(path: str | os.PathLike) -> None:
    """Writes `tokenizer.json` and `tokenizer_config.json` into the directory `path`."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    build().save(os.path.join(path, "tokenizer.json"))
    added = {str(token_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": t in SPECIAL} for t in SPECIAL + NONSPECIAL}
    config = {"added_tokens_decoder": added, "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "model_max_length": 32768, "tokenizer_class": "Qwen2Tokenizer",
              "errors": "replace", "clean_up_tokenization_spaces": False, "split_special_tokens": False}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)

"""The Mini-V* model: Qwen2.5-VL's architecture at a CPU size, written as a Hugging Face directory.

Real patch (14 px), temporal patch (2), 2x2 merge, 112 px windows with full-attention layers, M-RoPE,
biased q/k/v, SwiGLU, tied embeddings; only the widths and depths are small. `write_base` creates the
randomly initialised directory (`config.json`, `model.safetensors`, the Mini-V* tokenizer and a
`preprocessor_config.json` at the Mini-V* image budget), which everything downstream loads with
`load_pretrained` exactly as it loads Qwen2.5-VL-7B.
"""

from __future__ import annotations

import dataclasses
import json
import os

from deepeyes_jax.minivstar import tokenizer as tok_lib
from deepeyes_jax.model import checkpoint, config, create

VOCAB_ROWS = 704  # 694 tokens, padded like Qwen's 151,665 -> 151,936 rows
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def model_config(hidden: int = 128, layers: int = 4, vision_hidden: int = 64, vision_depth: int = 4
                 ) -> config.ModelConfig:
    """Text `hidden` x `layers` (heads of 32, half as many KV heads), vision `vision_hidden` x `vision_depth`
    (2 heads; window attention except the last block of each half).

    The text RoPE base is 10,000 rather than Qwen's 1,000,000: with 32-dim heads the larger base
    leaves only three or four of the 16 frequencies turning fast enough to tell nearby tokens apart.
    """
    c = config.tiny(tied=True)
    text = dataclasses.replace(c.text, vocab_size=VOCAB_ROWS, hidden_size=hidden, num_layers=layers,
                               num_heads=hidden // 32, num_kv_heads=max(1, hidden // 64),
                               intermediate_size=2 * hidden, mrope_section=(4, 6, 6), rope_theta=10_000.0,
                               max_position_embeddings=8192)
    vision = dataclasses.replace(c.vision, depth=vision_depth, hidden_size=vision_hidden, num_heads=2,
                                 intermediate_size=2 * vision_hidden, out_hidden_size=hidden,
                                 fullatt_block_indexes=(vision_depth // 2 - 1, vision_depth - 1))
    return c.replace(text=text, vision=vision, image_token_id=tok_lib.token_id("<|image_pad|>"),
                     video_token_id=tok_lib.token_id("<|video_pad|>"),
                     vision_start_token_id=tok_lib.token_id("<|vision_start|>"),
                     vision_end_token_id=tok_lib.token_id("<|vision_end|>"))


def write_side_files(path: str, max_pixels: int, min_pixels: int = 3136) -> None:
    """Tokenizer, image processor (at the image budget) and generation config for a Mini-V* directory."""
    tok_lib.write(path)
    pre = {"min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": 14, "temporal_patch_size": 2,
           "merge_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
           "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
    gen = {"bos_token_id": tok_lib.token_id("<|endoftext|>"), "do_sample": False,
           "eos_token_id": [tok_lib.token_id("<|im_end|>"), tok_lib.token_id("<|endoftext|>")],
           "pad_token_id": tok_lib.token_id("<|endoftext|>")}
    for name, obj in (("preprocessor_config.json", pre), ("generation_config.json", gen)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f, indent=1)


def write_base(path: str | os.PathLike, seed: int, max_pixels: int, cfg: config.ModelConfig | None = None
               ) -> str:
    """Writes the randomly initialised Mini-V* checkpoint directory; returns its path."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model = create.init_model(cfg or model_config(), seed=seed)
    checkpoint.export_hf_checkpoint(model, path)
    write_side_files(path, max_pixels)
    return path

"""Qwen2.5-VL configuration: named presets and the Hugging Face `config.json` reader/writer.

Presets are frozen dataclasses (`qwen2p5_vl_7b()`, ...). `from_hf_config` accepts both layouts seen in the
wild: the flat hub layout (text fields at the top level, `rope_scaling: {"type": "mrope", ...}`, vision
`in_chans`) and the nested transformers-5 layout (`text_config`, `vision_config`, `rope_parameters`). The
transformers class defaults are 72B-like, so every field the model needs must be present: a missing one
is an error naming the key, never a silent default.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower (a ViT with 2-D rotary, window attention and a 2x2 patch merger)."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    window_size: int = 112
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    tokens_per_second: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch row: channels x temporal x patch x patch (1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_merge_units(self) -> int:
        """Side of an attention window in merge units (112 px / 14 px / 2 = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def window_patches(self) -> int:
        """Patches in one attention window (4 x 4 merge units of 2 x 2 patches = 64)."""
        return self.window_merge_units**2 * self.merge_unit

    @property
    def window_tokens(self) -> int:
        """Merged image tokens one attention window holds (16)."""
        return self.window_merge_units**2

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.head_dim % 4:
            raise ValueError(f"vision head_dim={self.head_dim} must be a multiple of 4 (2-D rotary)")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} out of range for depth={self.depth}")
        if self.window_merge_units < 1:
            raise ValueError(f"window_size={self.window_size} is smaller than one merge unit")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder with multimodal rotary positions (M-RoPE)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    intermediate_size: int = 18944
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    mrope_section: tuple[int, ...] = (16, 24, 24)
    hidden_act: str = "silu"
    max_position_embeddings: int = 128000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"text hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(
                f"mrope_section={list(self.mrope_section)} sums to {sum(self.mrope_section)}, but must "
                f"sum to head_dim/2={self.head_dim // 2}"
            )
        if len(self.mrope_section) != 3:
            raise ValueError(f"mrope_section={list(self.mrope_section)} must have 3 entries (t, h, w)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A whole Qwen2.5-VL model plus its dtype policy.

    `param_dtype` is the dtype of the stored parameters (float32 for tests and training masters);
    `dtype` is the compute dtype (bfloat16 for speed). Norms, rotary and softmax always run in float32.
    """

    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        self.text.validate()
        self.vision.validate()
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {sorted(_DTYPES)}")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(
                f"vision out_hidden_size={self.vision.out_hidden_size} must equal text "
                f"hidden_size={self.text.hidden_size}"
            )

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self) -> Any:
        return _DTYPES[self.param_dtype]

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


# --------------------------------------------------------------------------------------- presets


def qwen2p5_vl_3b() -> ModelConfig:
    """Qwen/Qwen2.5-VL-3B-Instruct."""
    return ModelConfig(
        text=TextConfig(vocab_size=151936, hidden_size=2048, num_layers=36, num_heads=16,
                        num_kv_heads=2, intermediate_size=11008),
        vision=VisionConfig(out_hidden_size=2048),
        tie_word_embeddings=True,
    )


def qwen2p5_vl_7b() -> ModelConfig:
    """Qwen/Qwen2.5-VL-7B-Instruct (the DeepEyes base model)."""
    return ModelConfig(text=TextConfig(), vision=VisionConfig(), tie_word_embeddings=False)


def qwen2p5_vl_32b() -> ModelConfig:
    """Qwen/Qwen2.5-VL-32B-Instruct (Qwen2.5-32B decoder; vision MLP 3456 wide)."""
    return ModelConfig(
        text=TextConfig(vocab_size=152064, hidden_size=5120, num_layers=64, num_heads=40,
                        num_kv_heads=8, intermediate_size=27648),
        vision=VisionConfig(intermediate_size=3456, out_hidden_size=5120),
        tie_word_embeddings=False,
    )


def tiny(tied: bool = True) -> ModelConfig:
    """A prime-ish sized random test model with the real patch/window geometry.

    Special-token ids follow the tiny fixture tokenizer (base vocabulary 320, Qwen's added tokens after).
    """
    return ModelConfig(
        text=TextConfig(vocab_size=352, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=37, mrope_section=(2, 2, 2), max_position_embeddings=4096),
        vision=VisionConfig(depth=3, hidden_size=24, num_heads=2, intermediate_size=29,
                            out_hidden_size=48, fullatt_block_indexes=(1,)),
        tie_word_embeddings=tied,
        image_token_id=332, video_token_id=333, vision_start_token_id=329, vision_end_token_id=330,
    )


PRESETS = {
    "qwen2p5_vl_3b": qwen2p5_vl_3b,
    "qwen2p5_vl_7b": qwen2p5_vl_7b,
    "qwen2p5_vl_32b": qwen2p5_vl_32b,
    "tiny": tiny,
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# ------------------------------------------------------------------------------ Hugging Face json


def _need(d: dict, key: str, where: str) -> Any:
    if key not in d:
        raise ValueError(f"Hugging Face config: missing {where}{key!r}")
    return d[key]


def from_hf_config(hf: dict | str | os.PathLike, **overrides) -> ModelConfig:
    """Reads a Hugging Face Qwen2.5-VL `config.json` (flat hub or nested transformers-5 layout).

    Args:
      hf: the parsed dict, or a path to `config.json` or to the checkpoint directory.
      **overrides: ModelConfig fields to set (e.g. `dtype="bfloat16"`).
    """
    if not isinstance(hf, dict):
        path = os.fspath(hf)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            hf = json.load(f)
    model_type = hf.get("model_type")
    if model_type not in ("qwen2_5_vl", None):
        raise ValueError(f"config.json has model_type={model_type!r}; expected 'qwen2_5_vl'")
    text = hf.get("text_config") or {}
    # Nested layout: text fields live in text_config; flat layout: at the top level.
    t = {**hf, **text} if text else dict(hf)
    where = "text_config." if text else ""
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    mrope = rope.get("mrope_section")
    if mrope is None:
        raise ValueError(f"Hugging Face config: missing {where}rope_parameters.mrope_section "
                         "(or rope_scaling.mrope_section in the flat layout)")
    rope_theta = rope.get("rope_theta", t.get("rope_theta"))
    if rope_theta is None:
        raise ValueError(f"Hugging Face config: missing {where}rope_theta")
    if t.get("use_sliding_window"):
        raise ValueError("config.json sets use_sliding_window=true; Qwen2.5-VL checkpoints do not use "
                         "it and this port does not implement it")
    n_heads = _need(t, "num_attention_heads", where)
    text_cfg = TextConfig(
        vocab_size=_need(t, "vocab_size", where),
        hidden_size=_need(t, "hidden_size", where),
        num_layers=_need(t, "num_hidden_layers", where),
        num_heads=n_heads,
        num_kv_heads=t.get("num_key_value_heads") or n_heads,
        intermediate_size=_need(t, "intermediate_size", where),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(_need(t, "rms_norm_eps", where)),
        mrope_section=tuple(int(s) for s in mrope),
        hidden_act=t.get("hidden_act", "silu"),
        max_position_embeddings=t.get("max_position_embeddings", 128000),
    )
    v = _need(hf, "vision_config", "")
    vrope = v.get("rope_parameters") or {}
    vision_cfg = VisionConfig(
        depth=_need(v, "depth", "vision_config."),
        hidden_size=_need(v, "hidden_size", "vision_config."),
        num_heads=_need(v, "num_heads", "vision_config."),
        intermediate_size=_need(v, "intermediate_size", "vision_config."),
        out_hidden_size=_need(v, "out_hidden_size", "vision_config."),
        fullatt_block_indexes=tuple(_need(v, "fullatt_block_indexes", "vision_config.")),
        window_size=_need(v, "window_size", "vision_config."),
        patch_size=v.get("patch_size", 14),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        in_channels=v.get("in_channels", v.get("in_chans", 3)),
        hidden_act=v.get("hidden_act", "silu"),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
        tokens_per_second=v.get("tokens_per_second", 2),
    )
    tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    fields = dict(
        text=text_cfg,
        vision=vision_cfg,
        tie_word_embeddings=bool(tie),
        image_token_id=_need(hf, "image_token_id", ""),
        video_token_id=hf.get("video_token_id", 151656),
        vision_start_token_id=_need(hf, "vision_start_token_id", ""),
        vision_end_token_id=hf.get("vision_end_token_id", 151653),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def to_hf_config(cfg: ModelConfig, torch_dtype: str = "bfloat16") -> dict:
    """The flat hub layout of `config.json` (what Qwen publishes; vLLM and transformers read it)."""
    t, v = cfg.text, cfg.vision
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": t.hidden_act,
        "hidden_size": t.hidden_size,
        "image_token_id": cfg.image_token_id,
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_position_embeddings,
        "num_attention_heads": t.num_heads,
        "num_hidden_layers": t.num_layers,
        "num_key_value_heads": t.num_kv_heads,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
        "rope_theta": t.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "use_sliding_window": False,
        "video_token_id": cfg.video_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_token_id": 151654,
        "vocab_size": t.vocab_size,
        "vision_config": {
            "depth": v.depth,
            "hidden_act": v.hidden_act,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_chans": v.in_channels,
            "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "spatial_patch_size": v.patch_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "tokens_per_second": v.tokens_per_second,
            "temporal_patch_size": v.temporal_patch_size,
        },
    }

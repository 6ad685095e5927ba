"""Qwen2.5-VL: vision tower + text decoder, image features merged at `<|image_pad|>` positions.

Letters: B batch, T sequence, D text width, V vocab, M image tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepeyes_jax.model import layers, rope, sharding, text
from deepeyes_jax.model.config import ModelConfig
from deepeyes_jax.model.vision import VisionInputs, VisionTower


class Qwen25VL(nnx.Module):
    """The whole model. Parameters carry logical axes; `rules` maps activation axes under a mesh."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs,
                 rules: sharding.Rules = sharding.RULE_SETS["fsdp"]):
        self.cfg = cfg
        self.rules = tuple(rules)
        self.remat = False  # rematerialise each layer in the backward pass (set by the trainer)
        t, pd = cfg.text, cfg.weight_dtype
        self.visual = VisionTower(cfg.vision, dtype=cfg.compute_dtype, param_dtype=pd, rngs=rngs)
        self.embed = layers.param(rngs, (t.vocab_size, t.hidden_size), ("vocab", "embed"), pd)
        self.layers = nnx.List([text.DecoderLayer(t, dtype=pd, rngs=rngs)
                                for _ in range(t.num_layers)])
        self.norm = layers.RMSNorm(t.hidden_size, t.rms_norm_eps, dtype=pd, rngs=rngs)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        layers.param(rngs, (t.hidden_size, t.vocab_size), ("embed", "vocab"), pd))

    # ------------------------------------------------------------------------------------ pieces

    def encode_images(self, vision: VisionInputs) -> jax.Array:
        """Image features [M, D] in token order."""
        return self.visual(vision, remat=self.remat)

    def embed_tokens(self, input_ids: jax.Array, image_features: jax.Array | None = None) -> jax.Array:
        """Token embeddings [B, T, D]; the k-th `<|image_pad|>` of the batch (row-major) takes row k
        of `image_features`. Counts are checked on the host by `check_image_tokens`."""
        dtype = self.cfg.compute_dtype
        x = self.embed[...].astype(dtype)[input_ids]
        if image_features is not None:
            is_img = input_ids == self.cfg.image_token_id
            ordinal = jnp.cumsum(is_img.reshape(-1)).reshape(is_img.shape) - 1
            feats = image_features.astype(dtype)[jnp.clip(ordinal, 0, image_features.shape[0] - 1)]
            x = jnp.where(is_img[..., None], feats, x)
        return sharding.constrain(x, ("act_batch", None, None), self.rules)

    def decode(self, x: jax.Array, positions: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Runs the decoder over embeddings x [B, T, D]; returns final-normed hidden states."""
        t = self.cfg.text
        cos, sin = rope.mrope_tables(positions, t.head_dim, t.rope_theta, t.mrope_section)
        mask = text.causal_mask(attention_mask)
        run = nnx.remat(lambda layer, x: layer(x, cos, sin, mask)) if self.remat else (
            lambda layer, x: layer(x, cos, sin, mask))
        for layer in self.layers:
            x = run(layer, x)
            x = sharding.constrain(x, ("act_batch", None, None), self.rules)
        return self.norm(x)

    def extend(self, x: jax.Array, positions: jax.Array, token_valid: jax.Array,
               cache: text.KVCache, advance: jax.Array | None = None
               ) -> tuple[jax.Array, text.KVCache]:
        """Runs a chunk x [B, T, D] against the cache, writing its keys/values at each row's
        `cache.length`; returns final-normed hidden states and the updated cache.

        Args:
          x: chunk embeddings (prefill, one decode step, or an observation).
          positions: [3, B, T] M-RoPE positions of the chunk.
          token_valid: [B, T] real tokens (False for padding; rows with nothing to add are all False).
          cache: the cache; its `length` advances by `advance` [B] (default T).
        """
        t = self.cfg.text
        cos, sin = rope.mrope_tables(positions, t.head_dim, t.rope_theta, t.mrope_section)
        valid, mask = cache.chunk_mask(token_valid)
        slots = cache.slots(x.shape[1])
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, (k, v) = layer(x, cos, sin, mask, (cache.k[i], cache.v[i], slots))
            x = sharding.constrain(x, ("act_batch", None, None), self.rules)
            ks.append(k)
            vs.append(v)
        advance = jnp.full_like(cache.length, x.shape[1]) if advance is None else advance
        cache = cache.replace(k=jnp.stack(ks), v=jnp.stack(vs), valid=valid,
                              length=cache.length + advance.astype(jnp.int32))
        return self.norm(x), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, T, V] float32."""
        if self.lm_head is None:
            w = self.embed[...].astype(hidden.dtype)
            out = jnp.einsum("BTD,VD->BTV", hidden, w)
        else:
            out = jnp.einsum("BTD,DV->BTV", hidden, self.lm_head[...].astype(hidden.dtype))
        out = sharding.constrain(out, ("act_batch", None, "act_vocab"), self.rules)
        return out.astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, positions: jax.Array, attention_mask: jax.Array,
                 vision: VisionInputs | None = None) -> jax.Array:
        """Logits [B, T, V] for token ids [B, T] with M-RoPE positions [3, B, T]."""
        feats = self.encode_images(vision) if vision is not None else None
        x = self.embed_tokens(input_ids, feats)
        return self.logits(self.decode(x, positions, attention_mask))


def check_image_tokens(input_ids: np.ndarray, num_features: int, image_token_id: int) -> None:
    """Raises when the `<|image_pad|>` count differs from the number of image features."""
    n = int(np.sum(np.asarray(input_ids) == image_token_id))
    if n != num_features:
        raise ValueError(
            f"image features and image tokens do not match: {n} <|image_pad|> tokens (id "
            f"{image_token_id}) in input_ids but {num_features} image features; expand each image "
            f"placeholder to grid_t*grid_h*grid_w/4 tokens and never truncate inside an image")


@nnx.jit
def _forward(model: Qwen25VL, input_ids, attention_mask, image_grid_hw, vision):
    positions, _ = rope.mrope_positions(input_ids, attention_mask, image_grid_hw,
                                        model.cfg.image_token_id)
    return model(input_ids, positions, attention_mask, vision)


def forward(model: Qwen25VL, input_ids, attention_mask=None, vision: VisionInputs | None = None,
            image_grid_thw=None) -> jax.Array:
    """Logits for a batch of prompts with images, positions computed from the token layout.

    Args:
      model: the model.
      input_ids: [B, T] ids with each image placeholder expanded.
      attention_mask: [B, T] (1 real, 0 padding); all ones if None.
      vision: the images' `VisionInputs` (see `vision.make_vision_inputs`), or None for text only.
      image_grid_thw: [I, 3] grids of the images, in order of appearance.
    """
    input_ids = np.asarray(input_ids, np.int32)
    attention_mask = (np.ones_like(input_ids) if attention_mask is None
                      else np.asarray(attention_mask, np.int32))
    n_feat = 0 if vision is None else int(np.asarray(image_grid_thw).reshape(-1, 3).prod(1).sum()
                                          // model.cfg.vision.merge_unit)
    check_image_tokens(input_ids * attention_mask + (1 - attention_mask) * -1, n_feat,
                       model.cfg.image_token_id)
    grid_hw = (np.zeros((0, 2), np.int32) if image_grid_thw is None else
               rope.image_grid_hw(image_grid_thw, model.cfg.vision.spatial_merge_size, xp=np))
    return _forward(model, input_ids, attention_mask, grid_hw, vision)

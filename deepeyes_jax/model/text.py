"""The Qwen2 text decoder: GQA attention with biased q/k/v, M-RoPE, SwiGLU, RMSNorm.

Letters: B batch, T query length, S key length, N heads, K kv heads, H head dim, D model dim, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from deepeyes_jax.model import layers
from deepeyes_jax.model.config import TextConfig


@struct.dataclass
class KVCache:
    """A dense per-row KV cache.

    Attributes:
      k, v: [L, B, S, K, H] keys (rotated) and values of every layer.
      valid: [B, S] slots that hold real tokens (prompt padding and unused slots are False).
      length: [B] the next slot each row writes to.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    length: jax.Array

    @classmethod
    def zeros(cls, cfg: TextConfig, batch: int, size: int, dtype) -> KVCache:
        shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, size), bool), length=jnp.zeros((batch,), jnp.int32))

    @property
    def size(self) -> int:
        return self.valid.shape[1]

    def slots(self, t: int) -> jax.Array:
        """[B, t] slots a chunk of t tokens is written to."""
        return self.length[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]

    def chunk_mask(self, token_valid: jax.Array) -> jax.Array:
        """Validity [B, S] after writing a chunk with `token_valid` [B, T], and the attention mask
        [B, T, S]: a query sees valid keys at or before its own slot."""
        slots = self.slots(token_valid.shape[1])
        rows = jnp.arange(self.valid.shape[0])[:, None]
        valid = self.valid.at[rows, slots].set(token_valid.astype(bool), mode="drop")
        keys = jnp.arange(self.size, dtype=jnp.int32)
        mask = valid[:, None, :] & (keys[None, None, :] <= slots[:, :, None])
        return valid, mask


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q = layers.Dense((d,), (n, h), ("embed",), ("heads", "head_dim"), bias=True, dtype=dtype,
                              rngs=rngs)
        self.k = layers.Dense((d,), (k, h), ("embed",), ("kv_heads", "head_dim"), bias=True,
                              dtype=dtype, rngs=rngs)
        self.v = layers.Dense((d,), (k, h), ("embed",), ("kv_heads", "head_dim"), bias=True,
                              dtype=dtype, rngs=rngs)
        self.o = layers.Dense((n, h), (d,), ("heads", "head_dim"), ("embed",), bias=False, dtype=dtype,
                              rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 kv: tuple[jax.Array, jax.Array, jax.Array] | None = None):
        """x [B, T, D]; cos/sin [B, T, H]; mask [B, T, S] boolean.

        Without `kv` the keys are the chunk itself (S = T). With `kv = (k_cache, v_cache, slots)`
        ([B, S, K, H] twice, slots [B, T]) the chunk's keys and values are written at `slots` first
        and attention runs over the whole cache; the updated (k_cache, v_cache) are returned too.
        """
        q = layers.apply_rotary(self.q(x), cos, sin)  # [B, T, N, H]
        k = layers.apply_rotary(self.k(x), cos, sin)  # [B, T, K, H]
        v = self.v(x)
        if kv is None:
            return self.o(layers.attention(q, k, v, mask))
        k_cache, v_cache, slots = kv
        rows = jnp.arange(x.shape[0])[:, None]
        k_cache = k_cache.at[rows, slots].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[rows, slots].set(v.astype(v_cache.dtype), mode="drop")
        out = layers.attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask)
        return self.o(out), (k_cache, v_cache)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.input_norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attn_norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype,
                                             rngs=rngs)
        self.mlp = layers.GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False,
                                   dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv=None):
        h = self.attn(self.input_norm(x), cos, sin, mask, kv)
        h, new_kv = h if kv is not None else (h, None)
        x = x + h
        x = x + self.mlp(self.post_attn_norm(x))
        return x if kv is None else (x, new_kv)


def causal_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, T, T]: query t sees real keys s <= t of its own sequence.

    `attention_mask` is 0 on padding and 1 on real tokens, or, in rows packed with several sequences
    (`rl/batch.pack`), each sequence's segment number (1, 2, ...). A padding query sees every real key
    before it (its output is never used; no row of the mask is empty unless the row is all padding).
    """
    t = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    q, k = attention_mask[:, :, None], attention_mask[:, None, :]
    return causal[None] & (k > 0) & ((q == k) | (q == 0))

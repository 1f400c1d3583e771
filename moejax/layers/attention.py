"""Causal grouped-query self-attention (Ainslie et al. 2023, GQA) with RoPE.

H query heads share G = num_kv_heads key/value heads (H % G == 0); G = H is multi-head attention,
G = 1 multi-query. Scores and softmax in f32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.layers.rope import apply_rope

Array = jax.Array


def _proj(features, axes, name, dtype, in_axes=-1):
  init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
  return nn.DenseGeneral(features, axis=in_axes, use_bias=False, name=name, dtype=dtype,
                         kernel_init=nn.with_logical_partitioning(init, axes))


class Attention(nn.Module):
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, positions: Array) -> Array:
    b, l, d = x.shape
    h, g, dh = self.num_heads, self.num_kv_heads, self.head_dim
    q = _proj((h, dh), ("embed", "heads", "kv"), "query", self.dtype)(x)
    k = _proj((g, dh), ("embed", "kv_heads", "kv"), "key", self.dtype)(x)
    v = _proj((g, dh), ("embed", "kv_heads", "kv"), "value", self.dtype)(x)
    q, k = apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta)
    q = q.reshape(b, l, g, h // g, dh).astype(self.dtype)
    scores = jnp.einsum("bqgrd,bkgd->bgrqk", q, k.astype(self.dtype),
                        preferred_element_type=jnp.float32) / jnp.sqrt(dh).astype(jnp.float32)
    causal = positions[:, None, None, :, None] >= positions[:, None, None, None, :]
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v.astype(self.dtype)).reshape(b, l, h, dh)
    return _proj(d, ("heads", "kv", "embed"), "out", self.dtype, in_axes=(-2, -1))(out).astype(self.dtype)

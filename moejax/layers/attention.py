"""Causal grouped-query self-attention (Ainslie et al. 2023, GQA) with RoPE.

H query heads share G = num_kv_heads key/value heads (H % G == 0); G = H is multi-head attention,
G = 1 multi-query. Scores and softmax in f32. Projections are explicit [D, heads, head_dim]
weights so each axis carries its logical name.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.layers.dense import kernel_init
from moejax.layers.rope import apply_rope

Array = jax.Array


class Attention(nn.Module):
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  dtype: jnp.dtype = jnp.float32

  def _weight(self, name, shape, axes, in_axis, out_axis):
    init = kernel_init(in_axis, out_axis)
    w = self.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
    return w.astype(self.dtype)

  @nn.compact
  def __call__(self, x: Array, positions: Array) -> Array:
    out, wo, _ = self.head_outputs(x, positions)
    return jnp.einsum("blhk,hkd->bld", out, wo)

  def head_outputs(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
    """Per-head attention outputs [B, L, H, head_dim], the output projection [H, dh, D] and the
    queries [B, L, H, dh] (how heads combine is the caller's: a plain sum here, gated in
    mixture-of-heads, whose parameter-free router reads the queries)."""
    b, l, d = x.shape
    h, g, dh = self.num_heads, self.num_kv_heads, self.head_dim
    x = x.astype(self.dtype)
    wq = self._weight("query", (d, h, dh), ("embed", "heads", "kv"), 0, (1, 2))
    wk = self._weight("key", (d, g, dh), ("embed", "kv_heads", "kv"), 0, (1, 2))
    wv = self._weight("value", (d, g, dh), ("embed", "kv_heads", "kv"), 0, (1, 2))
    wo = self._weight("out", (h, dh, d), ("heads", "kv", "embed"), (0, 1), 2)
    heads, kv_heads = ("batch", "length", "heads", "kv"), ("batch", "length", "kv_heads", "kv")
    q = apply_rope(jnp.einsum("bld,dhk->blhk", x, wq), positions, self.rope_theta)
    k = apply_rope(jnp.einsum("bld,dhk->blhk", x, wk), positions, self.rope_theta)
    v = jnp.einsum("bld,dhk->blhk", x, wv)
    q = nn.with_logical_constraint(q, heads)
    k, v = nn.with_logical_constraint(k, kv_heads), nn.with_logical_constraint(v, kv_heads)
    queries = q
    q = q.reshape(b, l, g, h // g, dh)
    scores = jnp.einsum("bqgrd,bkgd->bgrqk", q, k,
                        preferred_element_type=jnp.float32) / jnp.sqrt(dh).astype(jnp.float32)
    causal = positions[:, None, None, :, None] >= positions[:, None, None, None, :]
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v).reshape(b, l, h, dh)
    return nn.with_logical_constraint(out, heads), wo, queries

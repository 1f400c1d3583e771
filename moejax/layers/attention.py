"""Causal grouped-query self-attention (Ainslie et al. 2023, GQA) with RoPE.

H query heads share G = num_kv_heads key/value heads (H % G == 0); G = H is multi-head attention,
G = 1 multi-query. Scores and softmax in f32. Projections are explicit [D, heads, head_dim]
weights so each axis carries its logical name.

Options (each a field, usable from ``config.model``):
  qkv_bias  biases on the query/key/value projections (Qwen2, Qwen2-MoE).
  qk_norm   RMSNorm of queries and keys before RoPE: "head" normalises each head's vector over
            head_dim with one scale shared by the heads (Qwen3, Qwen3-MoE); "full" normalises
            the concatenation of all heads (H*head_dim for q, G*head_dim for k; OLMoE).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.layers.dense import kernel_init
from moejax.layers.kv_cache import causal_mask, write_cache
from moejax.layers.norms import RMSNorm
from moejax.layers.rope import apply_rope

QK_NORMS = ("none", "head", "full")

Array = jax.Array


class Attention(nn.Module):
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  dtype: jnp.dtype = jnp.float32
  qkv_bias: bool = False
  qk_norm: str = "none"
  norm_eps: float = 1e-6

  def _weight(self, name, shape, axes, in_axis, out_axis):
    init = kernel_init(in_axis, out_axis)
    w = self.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
    return w.astype(self.dtype)

  @nn.compact
  def __call__(self, x: Array, positions: Array, cache_mode: str | None = None) -> Array:
    """``cache_mode``: None (full sequence), "prefill" or "decode" (layers/kv_cache.py)."""
    out, wo, _ = self.head_outputs(x, positions, cache_mode)
    return jnp.einsum("blhk,hkd->bld", out, wo)

  def head_outputs(self, x: Array, positions: Array,
                   cache_mode: str | None = None) -> tuple[Array, Array, Array]:
    """Per-head attention outputs [B, L, H, head_dim], the output projection [H, dh, D] and the
    queries [B, L, H, dh] (how heads combine is the caller's: a plain sum here, gated in
    mixture-of-heads, whose parameter-free router reads the queries)."""
    q, k, v, wo = self.project(x, positions)
    return self.attend(q, *self.cached_kv(k, v, positions, cache_mode)), wo, q

  def cached_kv(self, k: Array, v: Array, positions: Array, cache_mode: str | None):
    """-> (keys, values, query positions, key positions) to attend over: the layer's own, or
    its decoding cache (layers/kv_cache.py)."""
    kv, key_positions = write_cache(self, {"key": k, "value": v}, positions, cache_mode)
    return kv["key"], kv["value"], positions, key_positions

  def project(self, x: Array, positions: Array) -> tuple[Array, Array, Array, Array]:
    """-> queries [B, L, H, dh], keys and values [B, L, G, dh] (normed, RoPE applied) and the
    output projection [H, dh, D]."""
    d = x.shape[-1]
    h, g, dh = self.num_heads, self.num_kv_heads, self.head_dim
    x = x.astype(self.dtype)
    wq = self._weight("query", (d, h, dh), ("embed", "heads", "kv"), 0, (1, 2))
    wk = self._weight("key", (d, g, dh), ("embed", "kv_heads", "kv"), 0, (1, 2))
    wv = self._weight("value", (d, g, dh), ("embed", "kv_heads", "kv"), 0, (1, 2))
    wo = self._weight("out", (h, dh, d), ("heads", "kv", "embed"), (0, 1), 2)
    heads, kv_heads = ("batch", "length", "heads", "kv"), ("batch", "length", "kv_heads", "kv")
    q, k, v = (self._project(x, w, name) for w, name in ((wq, "query"), (wk, "key"),
                                                          (wv, "value")))
    q = apply_rope(self._qk_norm(q, "query_norm"), positions, self.rope_theta)
    k = apply_rope(self._qk_norm(k, "key_norm"), positions, self.rope_theta)
    q = nn.with_logical_constraint(q, heads)
    k, v = nn.with_logical_constraint(k, kv_heads), nn.with_logical_constraint(v, kv_heads)
    return q, k, v, wo

  def attend(self, q: Array, k: Array, v: Array, positions: Array,
             key_positions: Array | None = None, *, constrain: bool = True) -> Array:
    """Causal attention of q [B, L, H, dh] over k, v [B, S, G, dh] -> [B, L, H, dh]; a key is
    seen when its position (``key_positions`` [B, S], default ``positions``) is <= the
    query's. ``constrain=False`` for a subset of heads that need not divide the 'heads' axis."""
    b, l, h, dh = q.shape
    g = k.shape[2]
    q = q.reshape(b, l, g, h // g, dh)
    scores = jnp.einsum("bqgrd,bkgd->bgrqk", q, k,
                        preferred_element_type=jnp.float32) / jnp.sqrt(dh).astype(jnp.float32)
    causal = causal_mask(positions, positions if key_positions is None else key_positions)
    scores = jnp.where(causal[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v).reshape(b, l, h, dh)
    if not constrain:
      return out
    return nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))

  def _project(self, x: Array, w: Array, name: str) -> Array:
    y = jnp.einsum("bld,dhk->blhk", x, w)
    if not self.qkv_bias:
      return y
    axes = ("heads", "kv") if name == "query" else ("kv_heads", "kv")
    b = self.param(f"{name}_bias", nn.with_logical_partitioning(nn.initializers.zeros, axes),
                   w.shape[1:], jnp.float32)
    return y + b.astype(self.dtype)

  def _qk_norm(self, y: Array, name: str) -> Array:
    if self.qk_norm == "head":
      return RMSNorm(self.norm_eps, self.dtype, axes=("kv",), name=name)(y)
    if self.qk_norm == "full":
      flat = y.reshape(*y.shape[:2], -1)
      return RMSNorm(self.norm_eps, self.dtype, axes=(None,), name=name)(flat).reshape(y.shape)
    return y

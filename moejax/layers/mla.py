"""Multi-head latent attention (MLA; DeepSeek-V2, arXiv 2405.04434, Sec. 2.1; used by DeepSeek-V3).

Keys and values come from one low-rank latent per token, and RoPE lives in a few extra
dimensions whose key is shared by all heads ("decoupled RoPE"):

  c_kv = RMSNorm(x W_dkv)                   [r_kv]        (kv_down, first r_kv columns)
  k_R  = RoPE(x W_kr)                       [d_R], shared by the heads (kv_down, last d_R)
  [k_C; v] = c_kv W_ukv                     per head: [d_nope + d_v]   (kv_up)
  q = x W_q, or RMSNorm(x W_dq) W_uq        per head: [d_nope + d_R]   (q_lora_rank > 0)
  q = [q_C; RoPE(q_R)],  k = [k_C; k_R]
  o_h = softmax(q_h k_h^T / sqrt(d_nope + d_R)) v_h,   y = [o_1..o_H] W_o

Decoding caches only RMSNorm(c_kv) and k_R (r_kv + d_R numbers per token instead of 2 H d_h:
``"latent"`` and ``"rope_key"`` in the layer's cache). ``decode_form`` says how a new query
reads them:
  "absorbed"  (DeepSeek-V2 Sec. 2.1.2) W_uk is absorbed into the query and W_uv applied after
              the value sum, so the cache is never expanded: q~_h = q_C,h W_uk,h^T [r_kv],
              score = q~_h c_kv + q_R,h k_R, o_h = (sum_t p_t c_kv,t) W_uv,h.
  "expanded"  every cached latent is projected to per-head keys and values at each step.
Both equal the full forward (tested); experiments/bench_decode.py measures which is faster. RoPE uses moejax's rotate-half layout; DeepSeek's released weights lay the RoPE pairs
out interleaved, which the converter turns into this layout by permuting weight rows (an exact
rewrite: attention scores are invariant to the same permutation of q_R and k_R).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.layers.dense import kernel_init
from moejax.layers.kv_cache import causal_mask, write_cache
from moejax.layers.norms import RMSNorm
from moejax.layers.rope import apply_rope

Array = jax.Array


class LatentAttention(nn.Module):
  num_heads: int
  kv_lora_rank: int                 # r_kv
  qk_nope_head_dim: int             # d_nope
  qk_rope_head_dim: int             # d_R
  v_head_dim: int                   # d_v
  q_lora_rank: int = 0              # r_q; 0 = a full-rank query projection
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  latent_norm_eps: float | None = None   # eps of the q/kv latent norms (None = norm_eps)
  decode_form: str = "absorbed"     # "absorbed" | "expanded" (see the module docstring)

  def _weight(self, name, shape, axes, in_axis, out_axis):
    w = self.param(name, nn.with_logical_partitioning(kernel_init(in_axis, out_axis), axes),
                   shape, jnp.float32)
    return w.astype(self.dtype)

  @nn.compact
  def __call__(self, x: Array, positions: Array, cache_mode: str | None = None) -> Array:
    """``cache_mode``: None (full sequence), "prefill" or "decode" (layers/kv_cache.py)."""
    b, l, d = x.shape
    h, dn, dr, dv, r = (self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim,
                        self.v_head_dim, self.kv_lora_rank)
    x = x.astype(self.dtype)
    eps = self.norm_eps if self.latent_norm_eps is None else self.latent_norm_eps
    norm = lambda name: RMSNorm(eps, self.dtype, axes=(None,), name=name)
    if self.q_lora_rank:
      wq_down = self._weight("q_down", (d, self.q_lora_rank), ("embed", None), 0, 1)
      wq_up = self._weight("q_up", (self.q_lora_rank, h, dn + dr), (None, "heads", "kv"), 0,
                           (1, 2))
      q = jnp.einsum("blr,rhk->blhk", norm("q_norm")(x @ wq_down), wq_up)
    else:
      wq = self._weight("query", (d, h, dn + dr), ("embed", "heads", "kv"), 0, (1, 2))
      q = jnp.einsum("bld,dhk->blhk", x, wq)
    w_down = self._weight("kv_down", (d, r + dr), ("embed", None), 0, 1)
    w_up = self._weight("kv_up", (r, h, dn + dv), (None, "heads", "kv"), 0, (1, 2))
    wo = self._weight("out", (h, dv, d), ("heads", "kv", "embed"), (0, 1), 2)
    latent = x @ w_down
    c_kv = norm("kv_norm")(latent[..., :r])
    k_rope = apply_rope(latent[:, :, None, r:], positions, self.rope_theta)[:, :, 0]  # shared
    q_nope, q_rope = q[..., :dn], apply_rope(q[..., dn:], positions, self.rope_theta)
    cache, key_positions = write_cache(self, {"latent": c_kv, "rope_key": k_rope}, positions,
                                       cache_mode)
    c_kv, k_rope = cache["latent"], cache["rope_key"]
    causal = causal_mask(positions, key_positions)[:, None]
    scale = 1.0 / jnp.sqrt(jnp.float32(dn + dr))
    rope_scores = jnp.einsum("bqhd,bkd->bhqk", q_rope, k_rope, preferred_element_type=jnp.float32)
    if cache_mode == "decode" and self.decode_form == "absorbed":
      q_latent = jnp.einsum("bqhd,rhd->bqhr", q_nope, w_up[..., :dn])
      scores = (jnp.einsum("bqhr,bkr->bhqk", q_latent, c_kv, preferred_element_type=jnp.float32)
                + rope_scores) * scale
      probs = _causal_softmax(scores, causal).astype(self.dtype)
      out = jnp.einsum("bqhr,rhd->bqhd", jnp.einsum("bhqk,bkr->bqhr", probs, c_kv),
                       w_up[..., dn:])
    else:
      kv = jnp.einsum("blr,rhk->blhk", c_kv, w_up)
      k_nope, v = kv[..., :dn], kv[..., dn:]
      scores = (jnp.einsum("bqhd,bkhd->bhqk", q_nope, k_nope,
                           preferred_element_type=jnp.float32) + rope_scores) * scale
      probs = _causal_softmax(scores, causal).astype(self.dtype)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    return jnp.einsum("blhk,hkd->bld", out, wo)


def _causal_softmax(scores: Array, causal: Array) -> Array:
  return jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(jnp.float32).min), axis=-1)

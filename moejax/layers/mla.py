"""Multi-head latent attention (MLA; DeepSeek-V2, arXiv 2405.04434, Sec. 2.1; used by DeepSeek-V3).

Keys and values come from one low-rank latent per token, and RoPE lives in a few extra
dimensions whose key is shared by all heads ("decoupled RoPE"):

  c_kv = RMSNorm(x W_dkv)                   [r_kv]        (kv_down, first r_kv columns)
  k_R  = RoPE(x W_kr)                       [d_R], shared by the heads (kv_down, last d_R)
  [k_C; v] = c_kv W_ukv                     per head: [d_nope + d_v]   (kv_up)
  q = x W_q, or RMSNorm(x W_dq) W_uq        per head: [d_nope + d_R]   (q_lora_rank > 0)
  q = [q_C; RoPE(q_R)],  k = [k_C; k_R]
  o_h = softmax(q_h k_h^T / sqrt(d_nope + d_R)) v_h,   y = [o_1..o_H] W_o

Only c_kv and k_R would be cached at inference (r_kv + d_R numbers per token instead of
2 H d_h). RoPE uses moejax's rotate-half layout; DeepSeek's released weights lay the RoPE pairs
out interleaved, which the converter turns into this layout by permuting weight rows (an exact
rewrite: attention scores are invariant to the same permutation of q_R and k_R).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.layers.dense import kernel_init
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

  def _weight(self, name, shape, axes, in_axis, out_axis):
    w = self.param(name, nn.with_logical_partitioning(kernel_init(in_axis, out_axis), axes),
                   shape, jnp.float32)
    return w.astype(self.dtype)

  @nn.compact
  def __call__(self, x: Array, positions: Array) -> Array:
    b, l, d = x.shape
    h, dn, dr, dv, r = (self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim,
                        self.v_head_dim, self.kv_lora_rank)
    x = x.astype(self.dtype)
    norm = lambda name: RMSNorm(self.norm_eps, self.dtype, axes=(None,), name=name)
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
    c_kv, k_rope = latent[..., :r], latent[..., r:]
    kv = jnp.einsum("blr,rhk->blhk", norm("kv_norm")(c_kv), w_up)
    k_nope, v = kv[..., :dn], kv[..., dn:]
    q_nope, q_rope = q[..., :dn], apply_rope(q[..., dn:], positions, self.rope_theta)
    k_rope = apply_rope(k_rope[:, :, None, :], positions, self.rope_theta)      # one shared head
    scale = 1.0 / jnp.sqrt(jnp.float32(dn + dr))
    scores = (jnp.einsum("bqhd,bkhd->bhqk", q_nope, k_nope, preferred_element_type=jnp.float32)
              + jnp.einsum("bqhd,bkd->bhqk", q_rope, k_rope[:, :, 0],
                           preferred_element_type=jnp.float32)) * scale
    causal = positions[:, None, :, None] >= positions[:, None, None, :]
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    return jnp.einsum("blhk,hkd->bld", out, wo)

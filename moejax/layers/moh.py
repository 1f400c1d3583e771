"""Mixture-of-Head attention (MoH: Jin et al. 2024, arXiv 2410.11842; code SkyworkAI/MoH).

Heads are experts: instead of the plain sum over heads, MoH(X) = sum_i g_i H^i W_O^i with
h_s shared heads (always on) and h - h_s routed heads of which each token uses its top K:

  shared  g_i = a_1 softmax(W_s x)_i                     i <= h_s
  routed  g_i = a_2 softmax(W_r x)_{i - h_s}  if i - h_s in TopK(W_r x), else 0
  [a_1, a_2] = softmax(W_h x)                            two-stage weights (W_h: 2 x d)

``gating="paper"`` is these equations. ``gating="code"`` is the released code's form, the default:
routed weights are the softmax over the top-K logits only (renormalised) times K, shared ones
times h_s and [a_1, a_2] times 2, so uniform router outputs give every active head weight 1 and
MoH with every head active is exactly standard attention (the property the paper's continue-
tuning relies on). Head load balance, sown like the FFN losses:

  L_b = E sum_i f_i P_i over the E = h - h_s routed heads,
  f_i = #{t: i in TopK_t} / (T K),  P_i = mean_t softmax(W_r x_t)_i

(equals 1 when balanced; the paper's f_i omits the 1/K, a constant folded into its weight
beta = 0.01). Works with grouped-query attention and RoPE (the gates act on query heads).

Continue-tuning a trained standard-attention model (the paper's LLaMA3 setting):
``router="query_norm"`` is the parameter-free router (score of routed head i = the L2 norm of
its query, standardised across the routed heads, softmax, top-K) and ``gating="binary_ste"``
gives gates of exactly 0/1 (shared heads 1, selected routed heads 1) with a straight-through
estimator (value mask, gradient of the softmax). With every head active this is exactly the
trained model, so conversion (``upcycle.source`` = the standard-attention run) keeps every
head's weights and starts from the same function.
Compute (``head_compute``): "all" computes every head and masks the unselected ones (needed by
``binary_ste``, whose straight-through gradient reads every head's output). "selected" computes
only what the routing asks for: the shared heads densely, and for each (token, selected routed
head) pair its score row, softmax, value sum and output projection, as grouped matmuls with
the routed heads as the groups (``moejax.ops.gmm``: rows sorted by (head, batch); per group the
"weights" are that batch row's keys, then its values, then the head's W_O). Query, key and
value projections stay dense (every key/value is read by some token's selected head, and the
parameter-free router reads every query). Attention FLOPs of the routed heads fall to K/(h-h_s).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.layers.attention import Attention
from moejax.layers.dense import kernel_init
from moejax.layers.kv_cache import self_mask
from moejax.ops.grouped_matmul import gmm

Array = jax.Array


def head_gates(x: Array, w_shared: Array, w_routed: Array, w_stage: Array, k: int,
               gating: str = "code"):
  """x [..., D] -> (gates [..., h], routed probs [..., E], routed top-k mask [..., E])."""
  x = x.astype(jnp.float32)
  hs, e = (0 if w_shared is None else w_shared.shape[-1]), w_routed.shape[-1]
  stage = jax.nn.softmax(x @ w_stage, axis=-1)                         # [a1, a2]
  logits = x @ w_routed
  probs = jax.nn.softmax(logits, axis=-1)
  top = jax.lax.top_k(logits, k)[1]
  mask = jnp.sum(jax.nn.one_hot(top, e, dtype=jnp.float32), axis=-2)   # [..., E] 0/1
  if gating == "code":
    routed = jnp.where(mask > 0, logits, -jnp.inf)
    routed = jax.nn.softmax(routed, axis=-1) * k
    shared = jax.nn.softmax(x @ w_shared, axis=-1) * hs if hs else None
    stage = stage * 2
  else:
    routed = probs * mask
    shared = jax.nn.softmax(x @ w_shared, axis=-1) if hs else None
  parts = [stage[..., 1:2] * routed]
  if hs:
    parts.insert(0, stage[..., 0:1] * shared)
  return jnp.concatenate(parts, axis=-1), probs, mask


def query_norm_logits(queries: Array, shared: int) -> Array:
  """Parameter-free router: ||q_i|| of the routed heads, standardised across them."""
  norms = jnp.linalg.norm(queries[..., shared:, :].astype(jnp.float32), axis=-1)
  mean = jnp.mean(norms, axis=-1, keepdims=True)
  return (norms - mean) / (jnp.std(norms, axis=-1, keepdims=True) + 1e-6)


def binary_gates(logits: Array, k: int, shared: int):
  """0/1 gates with a straight-through estimator: -> (gates [..., h], probs, mask)."""
  probs = jax.nn.softmax(logits, axis=-1)
  mask = jnp.sum(jax.nn.one_hot(jax.lax.top_k(logits, k)[1], logits.shape[-1],
                                dtype=jnp.float32), axis=-2)
  routed = mask + probs - jax.lax.stop_gradient(probs)
  ones = jnp.ones(logits.shape[:-1] + (shared,), jnp.float32)
  return jnp.concatenate([ones, routed], axis=-1), probs, mask


def head_balance_loss(probs: Array, mask: Array, k: int) -> Array:
  e = probs.shape[-1]
  f = jnp.sum(mask.reshape(-1, e), axis=0) / (mask.reshape(-1, e).shape[0] * k)
  p = jnp.mean(probs.reshape(-1, e), axis=0)
  return e * jnp.sum(f * p)


def selected_heads_output(q: Array, k: Array, v: Array, wo: Array, positions: Array, top: Array,
                          gates: Array, shared: int, backend: str = "auto") -> Array:
  """Sum over each token's selected routed heads of gate x head output x W_O, computing nothing
  for the unselected ones.

  q [B, L, H, dh]; k, v [B, L, G, dh]; wo [H, dh, D]; top [B, L, K] routed head indices
  (0 .. H - shared - 1); gates [B, L, K] -> [B, L, D].
  """
  b, l, h, dh = q.shape
  e, kk = h - shared, top.shape[-1]
  kv_of = jnp.arange(shared, h) // (h // k.shape[2])           # kv group of each routed head
  gid = (top * b + jnp.arange(b)[:, None, None]).reshape(-1)   # group (head, batch) of each row
  order = jnp.argsort(gid, stable=True)
  sizes = jnp.bincount(gid, length=e * b).astype(jnp.int32)
  token = jnp.repeat(jnp.arange(b * l), kk)[order]              # flat token index of each row
  rows = jnp.take_along_axis(q[:, :, shared:], top[..., None], axis=2).reshape(-1, dh)[order]
  per_group = lambda t: jnp.transpose(t[:, :, kv_of], (2, 0, 1, 3)).reshape(e * b, l, dh)
  scores = gmm(rows, per_group(k), sizes, backend=backend, transpose_rhs=True,
               preferred_element_type=jnp.float32) / jnp.sqrt(dh).astype(jnp.float32)
  causal = self_mask(positions).reshape(b * l, l)[token]        # [N, L]: keys each row sees
  probs = jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(jnp.float32).min), axis=-1)
  out = gmm(probs.astype(q.dtype), per_group(v), sizes, backend=backend)          # [N, dh]
  out = out * gates.reshape(-1)[order][:, None].astype(out.dtype)
  y = gmm(out, wo[shared:], sizes.reshape(e, b).sum(axis=1), backend=backend)      # [N, D]
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  return jnp.sum(y[inverse].reshape(b, l, kk, -1), axis=2)


class MixtureOfHeadsAttention(Attention):
  shared_heads: int = 0
  active_heads: int = 1              # K routed heads per token
  gating: str = "code"               # "code" (default) | "paper" | "binary_ste"
  router: str = "learned"            # "learned" (W_r) | "query_norm" (parameter-free)
  balance_weight: float = 0.01
  head_compute: str = "all"          # "all" (compute every head, mask) | "selected"
  gmm_backend: str = "auto"          # grouped-matmul backend of head_compute="selected"

  @nn.compact
  def __call__(self, x: Array, positions: Array, cache_mode: str | None = None) -> Array:
    """``cache_mode`` as in ``Attention``; at decode (one query per row) every head's score row
    is computed over the cache and the unselected heads are masked by their zero gates (the
    same values as "selected")."""
    if self.head_compute == "selected" and self.gating == "binary_ste":
      raise ValueError("model.moh.head_compute='selected' needs gating 'code' or 'paper': "
                       "binary_ste's straight-through gradient reads every head's output")
    queries, keys, values, wo = self.project(x, positions)             # q [B, L, H, dh]
    keys, values, _, key_positions = self.cached_kv(keys, values, positions, cache_mode)
    h, hs, d = self.num_heads, self.shared_heads, x.shape[-1]
    param = lambda name, n: self.param(
        name, nn.with_logical_partitioning(kernel_init(0, 1), ("embed", None)), (d, n),
        jnp.float32)
    if self.gating == "binary_ste":
      logits = (query_norm_logits(queries, hs) if self.router == "query_norm"
                else x.astype(jnp.float32) @ param("head_router", h - hs))
      gates, probs, mask = binary_gates(logits, self.active_heads, hs)
    else:
      gates, probs, mask = head_gates(x, param("shared_router", hs) if hs else None,
                                      param("head_router", h - hs), param("stage_router", 2),
                                      self.active_heads, self.gating)
    loss = head_balance_loss(probs, mask, self.active_heads)
    if self.balance_weight > 0:
      self.sow("losses", "head_balance", self.balance_weight * loss)
    self.sow("intermediates", "head_balance", loss)
    self.sow("intermediates", "head_load", jnp.mean(mask.reshape(-1, h - hs), axis=0))
    self.sow("intermediates", "active_heads", jnp.asarray(hs + self.active_heads, jnp.float32))
    if self.head_compute == "all" or cache_mode == "decode":
      out = self.attend(queries, keys, values, positions, key_positions)
      return jnp.einsum("blhk,hkd->bld", out * gates.astype(out.dtype)[..., None], wo)
    top = jax.lax.top_k(mask, self.active_heads)[1]                    # the K selected heads
    y = selected_heads_output(queries, keys, values, wo, positions, top,
                              jnp.take_along_axis(gates[..., hs:], top, axis=-1), hs,
                              self.gmm_backend)
    if hs:
      groups = jnp.arange(hs) // (h // self.num_kv_heads)
      out = self.attend(queries[:, :, :hs], keys[:, :, groups], values[:, :, groups], positions,
                        constrain=False)
      y = y + jnp.einsum("blhk,hkd->bld", out * gates[..., :hs, None].astype(out.dtype), wo[:hs])
    return y.astype(self.dtype)

"""Soft merging of experts: the router's probabilities average the experts' *parameters* and
one merged expert runs (no discrete routing, fully differentiable).

SMEAR (Muqeeth et al. 2023, arXiv 2306.03745), per example (``merge="sequence"``):

  p_b = softmax(W_r mean_t u_{b,t})            router on the mean of the sequence's layer input
  W-bar_b = sum_i p_{b,i} W_i                  for every expert weight (gate/up and down)
  y_{b,t} = FFN(u_{b,t}; W-bar_b)

Not causal: position t's merged expert depends on the whole sequence, so generation merges SMEAR
once from the prompt's mean, as Lory's prompt routing does (below). Lory (Zhong et al. 2024,
arXiv 2405.03133) makes it causal for language modelling (``merge="causal_segments"``): the
sequence is cut into segments of ``merge_segment`` tokens and segment s uses the weights routed
from the mean of segment s-1; segment 0, which has no past, uses the uniform average (our
choice: Lory's first segment is a detail to check). Changing token t then changes only its own
output and the segments after its segment (tested). At inference Lory routes once, on the
prompt (``merge_inference="prompt"``): when the sampler passes ``prompt_length`` n, every token
of the sequence uses the one expert merged with p_b = softmax(W_r mean_{t<n} u_{b,t}), so the
generated tokens never change the merge; "segments" (default) decodes exactly as trained: the
decoding cache (layers/kv_cache.py) keeps each row's current merge and the running sum of its
current segment, and a row that reaches a segment boundary re-routes on that segment's mean.

SMEAR's router as published also normalises its input with LayerNorm and drops experts at
random during training (expert dropout); neither is implemented: the router here is a linear
map of the plain mean, without dropout.

The merge is one contraction per layer (einsum over experts of [.., E] x [E, D, 2, H]), costing
E x the expert's parameters per example or segment; it runs wherever the expert weights live
(sharded over 'expert', XLA reduces across it). Shared experts add as in the routed block.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.layers.dense import SwiGLU, swiglu
from moejax.layers.experts import SwiGLUExperts
from moejax.layers.routers import router_logits
from moejax.layers.moe import shared_output

Array = jax.Array


def sequence_merge_probs(logits_fn, x: Array) -> Array:
  """SMEAR: [B, L, D] -> [B, 1, E], routed on the mean over the sequence."""
  return jax.nn.softmax(logits_fn(jnp.mean(x, axis=1, keepdims=True)), axis=-1)


def prompt_merge_probs(logits_fn, x: Array, prompt_length: Array) -> Array:
  """Lory at inference: [B, L, D] -> [B, 1, E], routed on the mean of the first
  ``prompt_length`` (at least 1; a scalar or one per row [B]) positions."""
  n = jnp.maximum(jnp.broadcast_to(jnp.asarray(prompt_length, jnp.int32), x.shape[:1]), 1)
  keep = (jnp.arange(x.shape[1])[None, :] < n[:, None])[:, :, None]
  mean = jnp.sum(jnp.where(keep, x, 0), axis=1, keepdims=True) / n[:, None, None].astype(x.dtype)
  return jax.nn.softmax(logits_fn(mean), axis=-1)


def segment_merge_probs(logits_fn, x: Array, segment: int, num_experts: int) -> Array:
  """Lory: [B, L, D] -> [B, S, E] for S = L / segment segments; segment s is routed on the mean
  of segment s-1, segment 0 gets the uniform average."""
  b, l, d = x.shape
  means = jnp.mean(x.reshape(b, l // segment, segment, d), axis=2)          # [B, S, D]
  probs = jax.nn.softmax(logits_fn(means[:, :-1]), axis=-1)                 # from s-1
  uniform = jnp.full((b, 1, num_experts), 1.0 / num_experts, probs.dtype)
  return jnp.concatenate([uniform, probs], axis=1)


def merge_weights(probs: Array, wi: Array, wo: Array, dtype=jnp.float32) -> tuple[Array, Array]:
  """The merge: probs [B, S, E] x wi [E, D, 2, H], wo [E, H, D] -> one expert per (b, s),
  [B, S, D, 2, H] and [B, S, H, D]: one contraction over the experts per weight."""
  return (jnp.einsum("bse,edch->bsdch", probs.astype(dtype), wi.astype(dtype)),
          jnp.einsum("bse,ehd->bshd", probs.astype(dtype), wo.astype(dtype)))


def grouped_swiglu(x: Array, wi_m: Array, wo_m: Array) -> Array:
  """x [B, S, G, D] through group (b, s)'s own SwiGLU weights wi_m [B, S, D, 2, H],
  wo_m [B, S, H, D] -> [B, S, G, D]."""
  h = jnp.einsum("bsgd,bsdch->bsgch", x.astype(wi_m.dtype), wi_m)
  return jnp.einsum("bsgh,bshd->bsgd", swiglu(h), wo_m)


def merged_swiglu(x: Array, probs: Array, wi: Array, wo: Array, dtype=jnp.float32) -> Array:
  """x [B, S, G, D] (S merge groups of G tokens), probs [B, S, E] -> [B, S, G, D]."""
  return grouped_swiglu(x, *merge_weights(probs, wi, wo, dtype))


class SoftMergeBlock(nn.Module):
  """Drop-in for ``MoEBlock`` (same parameter names: router/kernel, experts/wi|wo, shared) with
  the experts merged instead of routed (``spec.merge``)."""
  spec: object
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, prompt_length: Array | None = None,
               positions: Array | None = None, cache_mode: str | None = None) -> Array:
    s = self.spec
    b, l, d = x.shape
    router = _Router(s.num_routed, name="router")
    prompt_routed = s.merge_inference == "prompt" or s.merge == "sequence"
    if prompt_length is not None and prompt_routed:
      probs, groups = prompt_merge_probs(router, x, prompt_length), x[:, None]
    elif cache_mode is not None and prompt_routed:      # decode: the merge made at prefill
      probs, groups = self.variable("cache", "merge_probs", jnp.zeros,
                                    (b, 1, s.num_routed), jnp.float32).value, x[:, None]
    elif cache_mode == "decode":
      probs, groups = self._decode_segment_probs(router, x, positions), x[:, :, None]
    elif s.merge == "sequence":
      probs, groups = sequence_merge_probs(router, x), x[:, None]
    else:
      if l % s.merge_segment and cache_mode is None:
        raise ValueError(f"merge='causal_segments': the sequence length {l} must be a multiple "
                         f"of merge_segment={s.merge_segment}")
      pad = -l % s.merge_segment               # a prefill of any length: causal, so padding at
      xp = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))  # the end changes no earlier output
      probs = segment_merge_probs(router, xp, s.merge_segment, s.num_routed)
      groups = xp.reshape(b, -1, s.merge_segment, d)
      if cache_mode == "prefill":
        self._store_segment_state(xp, probs, prompt_length)
    if cache_mode == "prefill" and prompt_routed:
      self.variable("cache", "merge_probs", jnp.zeros, probs.shape, jnp.float32).value = probs
    bank = SwiGLUExperts(s.num_routed, d, s.fine_hidden, self.dtype, name="experts")
    wi, wo = bank.weights()
    y = merged_swiglu(groups, probs, wi, wo, self.dtype).reshape(b, -1, d)[:, :l]
    if s.num_shared_experts:
      y = y + shared_output(self, SwiGLU(s.shared_hidden, self.dtype, name="shared"), x,
                            s.shared_expert_gate)
    p = probs.reshape(-1, s.num_routed)
    self.sow("intermediates", "expert_load", jnp.mean(p, axis=0))   # soft load
    self.sow("intermediates", "router_entropy",
             jnp.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1)))
    return y.astype(self.dtype)

  def _segment_state(self, b: int, d: int):
    return (self.variable("cache", "segment_sum", jnp.zeros, (b, d), jnp.float32),
            self.variable("cache", "segment_probs", jnp.zeros, (b, self.spec.num_routed),
                          jnp.float32))

  def _store_segment_state(self, xp: Array, probs: Array, prompt_length) -> None:
    """After a prefill: each row's merge for the segment holding its last prompt token, and the
    sum of that segment's inputs up to it (``prompt_length`` [B]: the rows' real lengths)."""
    b, lp, d = xp.shape
    seg = self.spec.merge_segment
    n = jnp.broadcast_to(jnp.asarray(lp if prompt_length is None else prompt_length, jnp.int32),
                         (b,))
    current = (n - 1) // seg
    pos = jnp.arange(lp)[None, :]
    inside = (pos >= (current * seg)[:, None]) & (pos < n[:, None])
    total, merge = self._segment_state(b, d)
    total.value = jnp.sum(jnp.where(inside[..., None], xp.astype(jnp.float32), 0.0), axis=1)
    merge.value = jnp.take_along_axis(probs, current[:, None, None], axis=1)[:, 0]

  def _decode_segment_probs(self, router, x: Array, positions: Array) -> Array:
    """One new token per row: at a segment boundary the row re-routes on the mean of the
    segment just finished, then the token joins the running sum. -> [B, 1, E]."""
    b, _, d = x.shape
    total, merge = self._segment_state(b, d)
    boundary = (positions[:, 0] % self.spec.merge_segment == 0)[:, None]
    routed = jax.nn.softmax(router(total.value / self.spec.merge_segment), axis=-1)
    merge.value = jnp.where(boundary, routed, merge.value)
    total.value = jnp.where(boundary, 0.0, total.value) + x[:, 0].astype(jnp.float32)
    return merge.value[:, None]


class _Router(nn.Module):
  num_experts: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    lead = x.shape[:-1]
    return router_logits(self, x.reshape(-1, x.shape[-1]), self.num_experts).reshape(
        *lead, self.num_experts)

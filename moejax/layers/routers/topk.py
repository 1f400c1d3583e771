"""Top-k softmax gating, optionally with null experts (AdaMoE)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.layers.routers.result import RoutingResult, router_logits

Array = jax.Array


def topk_softmax(logits: Array, k: int, renormalize: bool, num_null: int = 0) -> RoutingResult:
  """Top-k softmax gating (Shazeer et al. 2017; GShard; Switch; Mixtral).

  p = softmax(logits); S = TopK(p, k); g_i = p_i for i in S, else 0.
  With ``renormalize``: g_i = p_i / sum_{j in S} p_j (Mixtral, GShard top-2);
  without it the gates are the raw probabilities (Switch top-1, DeepSeekMoE).
  ``num_null``: the last ``num_null`` logits belong to null experts (see ``TopKSoftmaxRouter``).
  """
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  weight, index = jax.lax.top_k(probs, k)
  if renormalize:
    weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
  return RoutingResult(expert_index=index.astype(jnp.int32), weight=weight, probs=probs,
                       logits=logits, num_null=num_null)


class TopKSoftmaxRouter(nn.Module):
  """Linear router W_r [D, E] followed by ``topk_softmax``.

  Exploration noise, both off by default and only when ``deterministic=False``:
    jitter_eps: multiply router inputs by U(1 - eps, 1 + eps) (Switch Transformer, Sec. 2.4).
    noise_std:  add N(0, noise_std^2) to the logits before selection (noisy top-k gating,
                Shazeer et al. 2017, with a fixed instead of learned scale).
  Randomness comes from the ``router`` RNG stream.

  null_experts: AdaMoE (Zeng et al. 2024, arXiv 2406.13233): n extra experts whose output is
    zero. The softmax and top-k run over E + n experts, so a token that picks m null experts
    uses k - m real ones (adaptive compute); null slots are never computed and the balance
    loss counts them (their load is logged as ``null_fraction``). With ``renormalize`` the
    gates are renormalised over all k picks, null ones included, as in the paper (eq. 4).
  """
  num_experts: int
  k: int
  renormalize: bool = True
  jitter_eps: float = 0.0
  noise_std: float = 0.0
  null_experts: int = 0

  @classmethod
  def from_spec(cls, spec, **kwargs) -> "TopKSoftmaxRouter":
    return cls(num_experts=spec.num_routed, k=spec.routed_k, renormalize=spec.renormalize,
               jitter_eps=spec.jitter_eps, noise_std=spec.noise_std,
               null_experts=spec.null_experts, **kwargs)

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> RoutingResult:
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if self.jitter_eps > 0 and not deterministic:
      x = x * jax.random.uniform(self.make_rng("router"), x.shape, jnp.float32,
                                 1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
    logits = router_logits(self, x, self.num_experts)
    if self.null_experts:    # own weight: E + n need not divide the expert mesh axis
      null = self.param("null_kernel", nn.with_logical_partitioning(
          nn.initializers.normal(stddev=0.02), ("embed", None)),
          (x.shape[-1], self.null_experts), jnp.float32)
      logits = jnp.concatenate([logits, x @ null], axis=-1)
    if self.noise_std > 0 and not deterministic:
      logits = logits + self.noise_std * jax.random.normal(self.make_rng("router"), logits.shape)
    return topk_softmax(logits, self.k, self.renormalize, self.null_experts)

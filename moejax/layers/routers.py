"""Routers: token representations -> ``RoutingResult``.

Every router returns the same typed result, so dispatch, losses and metrics never need to know
which router made it. Routers compute in float32 whatever the model's compute dtype: top-k is
sensitive to ties and small logit differences that bf16 rounds away.

New routers (sigmoid + bias, top-p, expert choice, ...) add a module and a line in ``ROUTERS``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

Array = jax.Array


@struct.dataclass
class RoutingResult:
  """What every router returns (a registered pytree).

  expert_index: [T, k] int32 chosen experts (-1 marks an unused slot for variable-k routers).
  weight:       [T, k] float32 combine weights (0 where the slot is unused).
  probs:        [T, E] float32 router probabilities, used by balance losses and metrics.
  logits:       [T, E] float32 router logits, used by the z-loss.
  """
  expert_index: Array
  weight: Array
  probs: Array
  logits: Array

  @property
  def num_experts(self) -> int:
    return self.probs.shape[-1]

  @property
  def k(self) -> int:
    return self.expert_index.shape[-1]


def topk_softmax(logits: Array, k: int, renormalize: bool) -> RoutingResult:
  """Top-k softmax gating (Shazeer et al. 2017; GShard; Switch; Mixtral).

  p = softmax(logits); S = TopK(p, k); g_i = p_i for i in S, else 0.
  With ``renormalize``: g_i = p_i / sum_{j in S} p_j (Mixtral, GShard top-2);
  without it the gates are the raw probabilities (Switch top-1, DeepSeekMoE).
  """
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  weight, index = jax.lax.top_k(probs, k)
  if renormalize:
    weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
  return RoutingResult(expert_index=index.astype(jnp.int32), weight=weight, probs=probs,
                       logits=logits)


class TopKSoftmaxRouter(nn.Module):
  """Linear router W_r [D, E] followed by ``topk_softmax``.

  Exploration noise, both off by default and only when ``deterministic=False``:
    jitter_eps: multiply router inputs by U(1 - eps, 1 + eps) (Switch Transformer, Sec. 2.4).
    noise_std:  add N(0, noise_std^2) to the logits before selection (noisy top-k gating,
                Shazeer et al. 2017, with a fixed instead of learned scale).
  Randomness comes from the ``router`` RNG stream.
  """
  num_experts: int
  k: int
  renormalize: bool = True
  jitter_eps: float = 0.0
  noise_std: float = 0.0

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> RoutingResult:
    x = x.astype(jnp.float32)
    if self.jitter_eps > 0 and not deterministic:
      x = x * jax.random.uniform(self.make_rng("router"), x.shape, jnp.float32,
                                 1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("embed", "expert")),
        (x.shape[-1], self.num_experts), jnp.float32)
    logits = x @ kernel
    if self.noise_std > 0 and not deterministic:
      logits = logits + self.noise_std * jax.random.normal(self.make_rng("router"), logits.shape)
    return topk_softmax(logits, self.k, self.renormalize)


# Name -> module. Config validation lists these names in its error message.
ROUTERS = {
    "topk_softmax": TopKSoftmaxRouter,
}

"""Stochastic experts (THOR: Zuo et al. 2022, "Taming Sparsely Activated Transformer with
Stochastic Experts", arXiv 2110.04260).

No router: during training every token goes to k experts drawn uniformly at random (distinct,
gate 1/k) from the ``router`` RNG stream, which the train step folds with the step number. The
paper trains with a consistency-regularised loss: two forward passes with independent draws,

  L = (CE(p1) + CE(p2)) / 2 + alpha * (KL(p1 || p2) + KL(p2 || p1)) / 2,

so experts learn from each other (``consistency_loss_weight`` = alpha; the train step runs the
second pass, see ``train/steps.py:loss_fn``). Our reading, to check against the paper: the draw
is per token (the paper's may be per batch), and the loss halves both terms. At evaluation
(``deterministic=True``) without a ``router`` RNG the draw uses a fixed key, so evaluation is
deterministic; the paper also evaluates with randomly chosen experts.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.layers.routers.result import RoutingResult

Array = jax.Array


def random_experts(rng: jax.Array, num_tokens: int, num_experts: int, k: int) -> Array:
  """[T, k] distinct experts per token, uniform."""
  keys = jax.random.split(rng, num_tokens)
  pick = lambda key: jax.random.choice(key, num_experts, (k,), replace=False)
  return jax.vmap(pick)(keys).astype(jnp.int32)


class StochasticRouter(nn.Module):
  num_experts: int
  k: int

  @classmethod
  def from_spec(cls, spec, **kwargs) -> "StochasticRouter":
    return cls(num_experts=spec.num_routed, k=spec.routed_k, **kwargs)

  def __call__(self, x: Array, *, deterministic: bool = True) -> RoutingResult:
    t = x.reshape(-1, x.shape[-1]).shape[0]
    rng = (self.make_rng("router") if not deterministic or self.has_rng("router")
           else jax.random.key(0))
    index = random_experts(rng, t, self.num_experts, self.k)
    probs = jnp.sum(jax.nn.one_hot(index, self.num_experts), axis=1) / self.k
    return RoutingResult(expert_index=index, weight=jnp.full((t, self.k), 1.0 / self.k),
                         probs=probs, logits=jnp.zeros((t, self.num_experts), jnp.float32))

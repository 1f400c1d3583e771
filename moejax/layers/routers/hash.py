"""Hash routing: a token's experts are a fixed function of its token id.

Hash Layers (Roller et al. 2021, arXiv 2106.04426): no router parameters; token id v goes to
expert h(v) for a fixed random hash h chosen before training (their "random hash"; the
frequency-balanced and clustered hashes of the paper are not implemented). With k > 1 each id
gets k distinct experts, each with gate 1/k (the paper's MultiHash splits the input instead).
The hash is a keyed PRNG of the id (``salt``), so it needs no vocabulary table and is the same
on every device and in every run.
"""
from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.layers.routers.result import RoutingResult

Array = jax.Array


def hash_experts(token_ids: Array, num_experts: int, k: int, salt: int = 0) -> Array:
  """[...] int ids -> [T, k] distinct experts, a fixed function of (id, salt)."""
  key = jax.random.key(salt)
  pick = lambda v: jax.random.choice(jax.random.fold_in(key, v), num_experts, (k,),
                                     replace=False)
  return jax.vmap(pick)(token_ids.reshape(-1)).astype(jnp.int32)


class HashRouter(nn.Module):
  num_experts: int
  k: int
  salt: int = 0
  needs_token_ids: ClassVar[bool] = True

  @classmethod
  def from_spec(cls, spec, **kwargs) -> "HashRouter":
    return cls(num_experts=spec.num_routed, k=spec.routed_k, **kwargs)

  def __call__(self, x: Array, *, deterministic: bool = True,
               token_ids: Array | None = None) -> RoutingResult:
    del deterministic
    if token_ids is None:
      raise ValueError("router 'hash' routes by token id: call the MoE block with token_ids")
    index = hash_experts(token_ids, self.num_experts, self.k, self.salt)
    t = index.shape[0]
    probs = jnp.sum(jax.nn.one_hot(index, self.num_experts), axis=1) / self.k
    return RoutingResult(expert_index=index, weight=jnp.full((t, self.k), 1.0 / self.k),
                         probs=probs, logits=jnp.zeros((t, self.num_experts), jnp.float32))

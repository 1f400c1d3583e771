"""Routing onto merged experts: the router keeps one output per original expert, and
``expert_map`` sends each output to the merged expert that now holds its weights.

M-SMoE (Li et al. 2024, arXiv 2310.01334) merges a group of experts into one and lets every
token routed to a member use the merged expert. The router is folded, not retrained:

  S = TopK(router(x)) over the original E outputs (unchanged),
  y = sum_{m in map(S)} (sum_{i in S, map(i) = m} g_i) FFN_m(x),

so a token's selection and gates are exactly the original model's, and two selected members of
one group become one slot holding their summed gate (the duplicate slot is left unused, -1, and
costs nothing). The router probabilities are summed the same way, so balance losses, metrics and
traces count merged experts.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from moejax.layers.routers import RoutingResult


def fold_routing(routing: RoutingResult, expert_map: tuple[int, ...]) -> RoutingResult:
  """Maps the router's expert ids through ``expert_map`` and merges duplicate slots."""
  emap = jnp.asarray(expert_map, jnp.int32)
  index = routing.expert_index
  mapped = jnp.where(index >= 0, emap[jnp.maximum(index, 0)], -1)
  k = index.shape[-1]
  same = (mapped[..., :, None] == mapped[..., None, :]) & (mapped[..., :, None] >= 0)
  earlier = jnp.asarray(np.tril(np.ones((k, k), bool), -1))        # [j, i]: i < j
  duplicate = jnp.any(same & earlier, axis=-1)                       # an earlier slot has it
  weight = jnp.where(duplicate, 0.0, jnp.einsum("...ij,...j->...i", same.astype(routing.weight.dtype),
                                                routing.weight))
  onehot = jnp.asarray(np.eye(max(expert_map) + 1, dtype=np.float32)[list(expert_map)])
  return routing.replace(expert_index=jnp.where(duplicate, -1, mapped), weight=weight,
                         probs=routing.probs @ onehot)

"""Parameter counts: total, and active per token (what a token's forward pass touches)."""
from __future__ import annotations

import jax


def param_counts(model, params) -> tuple[int, int]:
  """(total, active per token). Active leaves out the routed experts a token does not use:
  (num_routed - routed_k) SwiGLU experts of 3 * d_model * hidden weights in every MoE layer.
  Heterogeneous experts: what a token uses depends on its route, so active counts routed_k
  experts of the mean size (the value under uniform routing; the measured one is logged as
  ``routed_params``)."""
  total = sum(x.size for x in jax.tree.leaves(params))
  c = model.cfg
  if c.moe is None:
    return total, total
  s = c.moe
  n_moe = sum(c.is_moe_layer(i) for i in range(c.num_layers))
  sizes = s.routed_sizes
  mean = sum(sizes) / len(sizes)
  inactive = n_moe * round((len(sizes) - s.routed_k) * 3 * c.d_model * mean)
  return total, total - inactive

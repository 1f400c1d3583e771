"""Parameter counts: total, and active per token (what a token's forward pass touches)."""
from __future__ import annotations

import jax


def param_counts(model, params) -> tuple[int, int]:
  """(total, active per token). Active leaves out the routed experts a token does not use:
  (num_routed - routed_k) SwiGLU experts of 3 * d_model * hidden weights in every MoE layer."""
  total = sum(x.size for x in jax.tree.leaves(params))
  c = model.cfg
  if c.moe is None:
    return total, total
  s = c.moe
  n_moe = sum(c.is_moe_layer(i) for i in range(c.num_layers))
  inactive = n_moe * (s.num_routed - s.routed_k) * 3 * c.d_model * s.fine_hidden
  return total, total - inactive

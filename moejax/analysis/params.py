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
  inactive = 0
  for i in c.moe_layer_ids:
    sizes = c.moe_spec(i).routed_sizes
    mean = sum(sizes) / len(sizes)
    inactive += round(max(len(sizes) - c.moe_spec(i).routed_k, 0) * 3 * c.d_model * mean)
  return total, total - inactive


COMPONENTS = ("routed experts", "shared experts", "routers", "attention", "dense FFN", "other")


def component_of(path) -> str:
  """The component a parameter path (tuple of keys) belongs to."""
  keys = [str(k) for k in path]
  if "moe" in keys:
    part = keys[keys.index("moe") + 1] if keys.index("moe") + 1 < len(keys) else ""
    if part == "experts":
      return "routed experts"
    if part in ("shared", "shared_gate"):
      return "shared experts"
    return "routers"
  if any(k in ("attn", "attention") for k in keys):
    return "attention"
  if "mlp" in keys or "ffn" in keys:
    return "dense FFN"
  return "other"


def memory_by_component(params) -> dict[str, int]:
  """Bytes of ``params`` per component (their stored dtypes: packed 2-bit experts count one byte
  per four weights), in COMPONENTS order, components with no parameter left out."""
  out = dict.fromkeys(COMPONENTS, 0)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [getattr(k, "key", getattr(k, "name", k)) for k in path]
    out[component_of(keys)] += int(leaf.size) * leaf.dtype.itemsize
  return {k: v for k, v in out.items() if v}

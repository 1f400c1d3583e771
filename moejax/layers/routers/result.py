"""``RoutingResult``: what every router returns, and the linear scoring every router shares."""
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
                Ids >= num_real_experts are null experts (zero-FLOP: counted by the balance
                loss, never computed; see ``dispatch_index``).
  weight:       [T, k] float32 combine weights (0 where the slot is unused).
  probs:        [T, E] float32 router probabilities (E counts null experts), used by balance
                losses and metrics.
  logits:       [T, E] float32 router logits, used by the z-loss.
  num_null:     static number of null experts (the last ``num_null`` ids).
  losses:       the router's own auxiliary losses {name: unweighted value}; the block sows
                them with ``loss_weights`` (static {name: weight}) like its balance losses.
  """
  expert_index: Array
  weight: Array
  probs: Array
  logits: Array
  num_null: int = struct.field(pytree_node=False, default=0)
  losses: dict = struct.field(default_factory=dict)
  loss_weights: tuple = struct.field(pytree_node=False, default=())   # ((name, weight), ...)

  @property
  def num_experts(self) -> int:
    return self.probs.shape[-1]

  @property
  def num_real_experts(self) -> int:
    return self.num_experts - self.num_null

  @property
  def k(self) -> int:
    return self.expert_index.shape[-1]

  @property
  def dispatch_index(self) -> Array:
    """expert_index with null-expert slots turned into unused slots (-1): what is computed."""
    if not self.num_null:
      return self.expert_index
    return jnp.where(self.expert_index < self.num_real_experts, self.expert_index, -1)


def router_logits(module: nn.Module, x: Array, num_experts: int,
                  in_axis: str | None = "embed") -> Array:
  """x [T, D] @ W_r [D, E] in float32 (top-k is sensitive to small differences bf16 rounds
  away); W_r is the module's ``kernel``, sharded like the other expert-indexed weights
  (``in_axis``: the logical axis of D; None when x is not in the model width)."""
  kernel = module.param(
      "kernel",
      nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), (in_axis, "expert")),
      (x.shape[-1], num_experts), jnp.float32)
  return x.astype(jnp.float32) @ kernel

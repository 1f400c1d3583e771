"""Top-p (dynamic) routing: each token takes the fewest experts whose probability reaches p.

"Harder Tasks Need More Experts: Dynamic Routing in MoE Models" (Huang et al. 2024,
arXiv 2403.07652, eq. 4-6): with P the softmax over experts sorted in descending order,

  t = argmin_k { sum_{j <= k} P_(j) >= p },   S = the t most probable experts,
  g_i = P_i for i in S (not renormalised, as in the paper; ``renormalize`` divides by
  sum_{j in S} P_j, HMoE's variant),

capped at ``max_k`` experts (the spec's active experts; the static width of the result). Unused
slots are -1 with gate 0 and are never computed. The paper adds a dynamic loss that lowers the
router's entropy (eq. 7), so tokens do not spread probability to use many experts:

  L_d = -(1/T) sum_t sum_i P_{t,i} log P_{t,i}      (``entropy_loss_weight``; paper: 1e-4)

and the usual load balance loss (the block's ``load_balance_weight``). Logged:
``experts_per_token``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.layers.routers.result import RoutingResult, router_logits

Array = jax.Array


def top_p_select(probs: Array, p: float, max_k: int, renormalize: bool = False):
  """-> (index [T, max_k] with -1 for unused slots, gates [T, max_k])."""
  top, index = jax.lax.top_k(probs, max_k)
  before = jnp.cumsum(top, axis=-1) - top      # probability mass of the better experts
  used = before < p                            # include the expert that reaches p
  used = used.at[:, 0].set(True)               # at least one expert, even for p <= 0
  gates = jnp.where(used, top, 0.0)
  if renormalize:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  return jnp.where(used, index, -1).astype(jnp.int32), gates


def entropy(probs: Array) -> Array:
  return jnp.mean(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1))


class TopPRouter(nn.Module):
  num_experts: int
  max_k: int
  p: float = 0.4
  renormalize: bool = False
  entropy_loss_weight: float = 0.0

  @classmethod
  def from_spec(cls, spec, **kwargs) -> "TopPRouter":
    return cls(num_experts=spec.num_routed, max_k=spec.routed_k, p=spec.top_p,
               renormalize=spec.renormalize, entropy_loss_weight=spec.entropy_loss_weight,
               **kwargs)

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> RoutingResult:
    del deterministic
    logits = router_logits(self, x.reshape(-1, x.shape[-1]), self.num_experts)
    probs = jax.nn.softmax(logits, axis=-1)
    index, gates = top_p_select(probs, self.p, self.max_k, self.renormalize)
    losses = {"router_entropy_loss": entropy(probs)} if self.entropy_loss_weight > 0 else {}
    return RoutingResult(expert_index=index, weight=gates, probs=probs, logits=logits,
                         losses=losses,
                         loss_weights=(("router_entropy_loss", self.entropy_loss_weight),))

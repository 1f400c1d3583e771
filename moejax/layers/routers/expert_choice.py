"""Expert choice routing: every expert takes its top-C tokens (Zhou et al. 2022,
arXiv 2202.09368, eq. 1-2).

  S = softmax(X W_r)  [T, E];   G, I = TopK(S^T, C) per expert,   C = T k / E  (x capacity_factor)

so load is balanced by construction and a token gets between 0 and E experts (k on average);
a token's gate for expert e is S[t, e]. The result is token-major with one slot per expert
([T, E], -1 where expert e did not take token t; only taken slots are computed).

Not causal in training: whether expert e takes token t depends on the scores of every token of
the batch, later positions included, so a language model trained this way sees a little of the
future through its routing. For evaluation and decoding (``deterministic=True``) the default
form is causal: each expert keeps a threshold tau_e, an exponential moving average of the score
of its C-th token during training (tau <- m tau + (1 - m) S_(C),e, m = ``threshold_momentum``),
and takes token t when S[t, e] >= tau_e, one token at a time. ``eval_form="batch"`` evaluates
with the training form instead (not usable for decoding).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.layers.routers.result import RoutingResult, router_logits

Array = jax.Array


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
  return max(1, min(num_tokens, math.ceil(num_tokens * k * capacity_factor / num_experts)))


def expert_choice_select(probs: Array, capacity: int):
  """-> (index [T, E] with -1 where not taken, gates [T, E], C-th score per expert [E])."""
  t, e = probs.shape
  top, token = jax.lax.top_k(probs.T, capacity)                          # [E, C]
  taken = jnp.zeros((e, t), bool).at[jnp.arange(e)[:, None], token].set(True).T
  index = jnp.where(taken, jnp.arange(e)[None, :], -1).astype(jnp.int32)
  return index, jnp.where(taken, probs, 0.0), top[:, -1]


def threshold_select(probs: Array, threshold: Array):
  taken = probs >= threshold[None, :]
  index = jnp.where(taken, jnp.arange(probs.shape[1])[None, :], -1).astype(jnp.int32)
  return index, jnp.where(taken, probs, 0.0)


class ExpertChoiceRouter(nn.Module):
  num_experts: int
  k: int                             # average experts per token
  capacity_factor: float = 1.0
  threshold_momentum: float = 0.95
  eval_form: str = "threshold"       # "threshold" (causal) | "batch" (the training form)

  @classmethod
  def from_spec(cls, spec, **kwargs) -> "ExpertChoiceRouter":
    return cls(num_experts=spec.num_routed, k=spec.routed_k,
               capacity_factor=spec.capacity_factor, eval_form=spec.expert_choice_eval,
               **kwargs)

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> RoutingResult:
    logits = router_logits(self, x.reshape(-1, x.shape[-1]), self.num_experts)
    probs = jax.nn.softmax(logits, axis=-1)
    tau = jax.lax.stop_gradient(self.param(
        "threshold", nn.with_logical_partitioning(nn.initializers.zeros, ("expert",)),
        (self.num_experts,), jnp.float32))
    if deterministic and self.eval_form == "threshold":
      index, gates = threshold_select(probs, tau)
    else:
      c = expert_capacity(probs.shape[0], self.num_experts, self.k, self.capacity_factor)
      index, gates, kth = expert_choice_select(probs, c)
      if not deterministic:   # EMA of the C-th score, applied after the optimiser step
        self.sow("param_updates", "threshold",
                 (1.0 - self.threshold_momentum) * (jax.lax.stop_gradient(kth) - tau))
    return RoutingResult(expert_index=index, weight=gates, probs=probs, logits=logits)

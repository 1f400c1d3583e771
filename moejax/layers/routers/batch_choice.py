"""Routers that choose over the whole batch: expert choice and Expert Race.

Both are non-causal in training (a token's experts depend on later tokens of the batch) and
decode causally with a threshold learned as an exponential moving average during training.

Expert choice: every expert takes its top-C tokens (Zhou et al. 2022, arXiv 2202.09368, eq. 1-2).

  S = softmax(X W_r)  [T, E];   G, I = TopK(S^T, C) per expert,
  C = min(T, max(1, ceil(capacity_factor x T k / E)))   (``expert_capacity``: rounded up)

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


def race_select(probs: Array, k: int):
  """Expert Race: the top T*k of all T x E scores. -> (index [T, E], gates [T, E], K-th score)."""
  t, e = probs.shape
  top, flat = jax.lax.top_k(probs.reshape(-1), t * k)
  taken = jnp.zeros((t * e,), bool).at[flat].set(True).reshape(t, e)
  index = jnp.where(taken, jnp.arange(e)[None, :], -1).astype(jnp.int32)
  return index, jnp.where(taken, probs, 0.0), top[-1]


def router_similarity_loss(probs: Array, taken: Array) -> Array:
  """sum_{i != j} w_ij cos(P_:i, P_:j), w = M^T M / sum_{i != j} (M^T M)_ij.

  P [T, E] scores, M [T, E] the 0/1 selection. Experts that are chosen for the same tokens
  (large co-occurrence) and score tokens alike (similar columns) are pushed apart, so they do
  not collapse into one mode. Our reading of Expert Race's router similarity loss (Sec. 5,
  "P^T P weighted by the selection co-occurrence"); check against the paper before citing
  numbers that depend on it.
  """
  m = taken.astype(jnp.float32)
  co = m.T @ m
  off = 1.0 - jnp.eye(probs.shape[1])
  w = jax.lax.stop_gradient(co * off / jnp.maximum(jnp.sum(co * off), 1.0))
  unit = probs / jnp.maximum(jnp.linalg.norm(probs, axis=0, keepdims=True), 1e-12)
  return jnp.sum(w * (unit.T @ unit))


def threshold_select(probs: Array, threshold: Array):
  taken = probs >= jnp.broadcast_to(threshold, probs.shape[1:])[None, :]
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


class ExpertRaceRouter(nn.Module):
  """Expert Race (Yuan et al. 2025, arXiv 2503.16057, Sec. 4): tokens and experts race
  together: the T*k largest of all T x E scores are routed, so a token may get 0..E experts and
  an expert 0..T tokens (k per token on average). Scores: the softmax over experts (our choice
  of affinity; the paper's gating function is a "(check)" in METHODS.md).

  Losses: the router similarity loss (``router_similarity_loss``, weight
  ``similarity_loss_weight``); the block's load balance loss still applies if its weight is set.
  Inference (``deterministic=True``, ``eval_form="threshold"``): a single threshold tau, the EMA
  of the T*k-th score during training (tau <- m tau + (1 - m) s_(Tk)); token t goes to expert
  e when s_{t,e} >= tau: causal, one token at a time.
  """
  num_experts: int
  k: int
  similarity_loss_weight: float = 0.0
  threshold_momentum: float = 0.95
  eval_form: str = "threshold"

  @classmethod
  def from_spec(cls, spec, **kwargs) -> "ExpertRaceRouter":
    return cls(num_experts=spec.num_routed, k=spec.routed_k,
               similarity_loss_weight=spec.similarity_loss_weight,
               eval_form=spec.expert_choice_eval, **kwargs)

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> RoutingResult:
    logits = router_logits(self, x.reshape(-1, x.shape[-1]), self.num_experts)
    probs = jax.nn.softmax(logits, axis=-1)
    tau = jax.lax.stop_gradient(self.param("threshold", nn.initializers.zeros, (), jnp.float32))
    if deterministic and self.eval_form == "threshold":
      index, gates = threshold_select(probs, tau)
    else:
      index, gates, kth = race_select(probs, self.k)
      if not deterministic:
        self.sow("param_updates", "threshold",
                 (1.0 - self.threshold_momentum) * (jax.lax.stop_gradient(kth) - tau))
    losses = ({"router_similarity": router_similarity_loss(probs, index >= 0)}
              if self.similarity_loss_weight > 0 else {})
    return RoutingResult(expert_index=index, weight=gates, probs=probs, logits=logits,
                         losses=losses,
                         loss_weights=(("router_similarity", self.similarity_loss_weight),))

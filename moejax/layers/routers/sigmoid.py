"""Normalised sigmoid gating with a selection bias and group-limited top-k (DeepSeek-V3).

DeepSeek-V3 (arXiv 2412.19437, Sec. 2.1.2-2.1.3), with E routed experts and k active:

  s_{t,i} = sigmoid(u_t^T e_i)                                   affinity (eq. 15)
  select  TopK(s_{t,i} + b_i, k)                                 bias for selection only (eq. 16)
  g_{t,i} = s_{t,i} / sum_{j selected} s_{t,j}  x  scaling       gates (eq. 13, and the
                                                                 released config's
                                                                 routed_scaling_factor)

Auxiliary-loss-free balancing: b is not trained by gradients. After every optimiser step,
b_i <- b_i + gamma * sign(mean_j load_j - load_i), from the load of the whole (global) batch;
implemented as a ``param_updates`` delta the train step adds after the optimiser (so b lives in
the params tree: saved in checkpoints, restored on resume, identical on every device).

Group-limited routing (the released code; ``num_groups`` > 1): experts form G contiguous groups,
a group's score is the sum of its top-2 biased scores, the top ``groups_per_token`` groups are
kept and the others' experts are masked before the top-k. What a masked expert's score becomes is
``group_mask_fill``: "neg_inf" (the official code: masked experts can never be chosen) or
"zero" (transformers' DeepseekV3: 0.0, so a masked expert can still win once biases push kept
scores below zero).

"balanced" groups (Mixture of Grouped Experts, Pangu Pro MoE, arXiv 2505.21411): exactly k/G
experts from every group, so each device group gets the same load by construction.

Sequence-wise balance loss (eq. 17-20), weight alpha (1e-4 in V3), per sequence of L tokens:
  L_seq = sum_i f_i P_i,  f_i = E / (k L) sum_t 1[i selected for t],  P_i = mean_t s'_{t,i},
  s'_{t,i} = s_{t,i} / sum_j s_{t,j}, averaged over the batch's sequences.
``probs`` in the RoutingResult is s' (so the block's balance losses and metrics see a
distribution per token).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.layers.routers.result import RoutingResult, router_logits

Array = jax.Array


def _top2_sum(x: Array) -> Array:
  return jnp.sum(jax.lax.top_k(x, min(2, x.shape[-1]))[0], axis=-1)


def sigmoid_select(scores: Array, bias: Array, k: int, *, num_groups: int = 1,
                   groups_per_token: int = 1, group_mask_fill: str = "neg_inf",
                   group_routing: str = "limited") -> Array:
  """Indices [T, k] of the selected experts from scores [T, E] and the selection bias [E]."""
  t, e = scores.shape
  choice = scores + bias[None, :]
  if num_groups == 1:
    return jax.lax.top_k(choice, k)[1]
  grouped = choice.reshape(t, num_groups, e // num_groups)
  if group_routing == "balanced":          # exactly k/G from each group
    per = k // num_groups
    idx = jax.lax.top_k(grouped, per)[1] + (jnp.arange(num_groups) * (e // num_groups))[:, None]
    return idx.reshape(t, k)
  group_score = _top2_sum(grouped)                                       # [T, G]
  keep = jax.lax.top_k(group_score, groups_per_token)[1]                  # [T, kg]
  group_mask = jnp.zeros((t, num_groups), bool).at[jnp.arange(t)[:, None], keep].set(True)
  mask = jnp.repeat(group_mask, e // num_groups, axis=1)
  fill = -jnp.inf if group_mask_fill == "neg_inf" else 0.0
  return jax.lax.top_k(jnp.where(mask, choice, fill), k)[1]


def sequence_balance_loss(index: Array, probs: Array, num_experts: int, seq_len: int) -> Array:
  """DeepSeek-V3's sequence-wise loss sum_i f_i P_i per sequence, averaged over sequences."""
  t, k = index.shape
  idx = index.reshape(t // seq_len, seq_len * k)
  counts = jax.vmap(lambda i: jnp.zeros((num_experts,), jnp.float32).at[i].add(1.0))(idx)
  f = num_experts / (k * seq_len) * counts                                       # [S, E]
  p = probs.reshape(t // seq_len, seq_len, num_experts).mean(axis=1)             # [S, E]
  return jnp.mean(jnp.sum(f * p, axis=-1))


def bias_update(index: Array, num_experts: int, rate: float) -> Array:
  """Aux-loss-free balancing step: rate * sign(mean load - load_i), from this batch's counts."""
  load = jnp.zeros((num_experts,), jnp.float32).at[index.reshape(-1)].add(1.0)
  return rate * jnp.sign(jnp.mean(load) - load)


class SigmoidRouter(nn.Module):
  """DeepSeek-V3 routing (see the module docstring for the equations and options)."""
  num_experts: int
  k: int
  renormalize: bool = True           # g normalised over the selected experts (V3: True)
  scaling: float = 1.0               # routed_scaling_factor (V3's config: 2.5)
  bias_update_rate: float = 0.0      # gamma of aux-loss-free balancing (V3: 0.001); 0 = off
  num_groups: int = 1
  groups_per_token: int = 1
  group_mask_fill: str = "neg_inf"   # "neg_inf" (official code) | "zero" (transformers)
  group_routing: str = "limited"     # "limited" (V3) | "balanced" (MoGE: k/G per group)
  sequence_balance_weight: float = 0.0   # alpha of the sequence-wise loss (V3: 1e-4)

  @classmethod
  def from_spec(cls, spec, **kwargs) -> "SigmoidRouter":
    return cls(num_experts=spec.num_routed, k=spec.routed_k, renormalize=spec.renormalize,
               scaling=spec.routed_scaling_factor, bias_update_rate=spec.bias_update_rate,
               num_groups=spec.num_expert_groups, groups_per_token=spec.groups_per_token,
               group_mask_fill=spec.group_mask_fill, group_routing=spec.group_routing,
               sequence_balance_weight=spec.sequence_balance_weight, **kwargs)

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> RoutingResult:
    seq_len = x.shape[-2] if x.ndim >= 3 else x.shape[0]
    x = x.reshape(-1, x.shape[-1])
    logits = router_logits(self, x, self.num_experts)
    scores = jax.nn.sigmoid(logits)
    # Not trained by gradients: changed only by the balancing update below (1-D, so AdamW's
    # weight decay mask leaves it alone too).
    bias = jax.lax.stop_gradient(self.param(
        "selection_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("expert",)),
        (self.num_experts,), jnp.float32))
    index = sigmoid_select(scores, bias, self.k, num_groups=self.num_groups,
                           groups_per_token=self.groups_per_token,
                           group_mask_fill=self.group_mask_fill, group_routing=self.group_routing)
    gates = jnp.take_along_axis(scores, index, axis=-1)
    if self.renormalize:
      gates = gates / (jnp.sum(gates, axis=-1, keepdims=True) + 1e-20)
    gates = gates * self.scaling
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    if self.bias_update_rate > 0 and not deterministic:
      self.sow("param_updates", "selection_bias",
               bias_update(index, self.num_experts, self.bias_update_rate))
    losses = {}
    if self.sequence_balance_weight > 0:
      losses["sequence_balance"] = sequence_balance_loss(index, probs, self.num_experts, seq_len)
    return RoutingResult(expert_index=index.astype(jnp.int32), weight=gates, probs=probs,
                         logits=logits, losses=losses,
                         loss_weights=(("sequence_balance", self.sequence_balance_weight),))

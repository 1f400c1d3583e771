"""Router auxiliary losses and routing metrics: pure functions of a ``RoutingResult``.

Notation: T tokens, E routed experts, k slots per token, p_{t,i} router probabilities,
count_i = #{(t, s): expert_index[t, s] = i} (unused slots, index -1, are not counted).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.layers.routers import RoutingResult

Array = jax.Array


def expert_counts(expert_index: Array, num_experts: int) -> Array:
  """count_i over all (token, slot) pairs; index -1 (unused slot) is ignored. -> [E] f32."""
  idx = expert_index.reshape(-1)
  idx = jnp.where(idx >= 0, idx, num_experts)  # out of range -> dropped by the scatter
  return jnp.zeros((num_experts,), jnp.float32).at[idx].add(1.0, mode="drop")


def expert_fraction(routing: RoutingResult) -> Array:
  """f_i = count_i / (T k): the share of routed slots that expert i receives. -> [E]."""
  t, k = routing.expert_index.shape
  return expert_counts(routing.expert_index, routing.num_experts) / (t * k)


def load_balance_loss(routing: RoutingResult, micro_batches: int = 1,
                      scope: str = "micro_batch") -> Array:
  """L = E * sum_i f_i P_i,  f_i = count_i / (T k),  P_i = (1/T) sum_t p_{t,i}.

  Switch Transformer (Fedus et al. 2021, eq. 4) for k = 1, and its top-k generalisation. It is
  exactly DeepSeekMoE's expert-level balance loss (arXiv 2401.06066, eq. 12-14):
  L_ExpBal = sum_i f'_i P_i with f'_i = N'/(K'T) count_i, N' = E, K' = k. Equals 1 when routing is
  uniform. The coefficient (Switch 1e-2, DeepSeekMoE a1) is applied by the caller.

  The T tokens (batch-major) are split into ``micro_batches`` equal groups j, as data-parallel
  ranks or accumulation steps would see them, and L is averaged over j:
    scope="micro_batch":  L = mean_j E sum_i f_i^j P_i^j   (the usual per-rank loss)
    scope="global_batch": L = mean_j E sum_i fbar_i P_i^j  (Qiu et al. 2025, "Demons in the
                          Detail", arXiv 2501.11873: frequencies fbar over the global batch; only
                          the E counts need an all-reduce, P stays local).
  With one micro-batch the two coincide.
  """
  t, k = routing.expert_index.shape
  if t % micro_batches:
    raise ValueError(f"balance_micro_batches={micro_batches} must divide the {t} tokens")
  e = routing.num_experts
  idx = routing.expert_index.reshape(micro_batches, -1, k)
  p_mean = routing.probs.reshape(micro_batches, -1, e).mean(axis=1)            # P_i^j
  if scope == "global_batch":
    f = jnp.broadcast_to(expert_fraction(routing), p_mean.shape)               # fbar_i
  elif scope == "micro_batch":
    f = jax.vmap(lambda i: expert_counts(i, e))(idx) / (idx.shape[1] * k)      # f_i^j
  else:
    raise ValueError(f"load_balance_scope={scope!r}; allowed: 'micro_batch', 'global_batch'")
  return e * jnp.mean(jnp.sum(f * p_mean, axis=-1))


def parameter_penalty_loss(routing: RoutingResult, sizes) -> Array:
  """HMoE's parameter penalty (Wang et al. 2024, arXiv 2408.10681, eq. 7-8): the balance loss
  with each expert's frequency weighted by its size, so routing to large experts costs more:

    L_PP = E * sum_i M_i P_i,   M_i = f_i * h_i / hbar,   f_i = count_i / (T k),
    P_i = (1/T) sum_t p_{t,i}.

  The paper writes M_i with the absolute size h_i and says L_PP reduces to the usual balance loss
  when sizes are equal; sizes relative to their mean hbar make that exact (our reading).
  """
  h = jnp.asarray(sizes, jnp.float32)
  return routing.num_experts * jnp.sum(expert_fraction(routing) * h / jnp.mean(h)
                                       * jnp.mean(routing.probs, axis=0))


def routed_params_per_token(routing: RoutingResult, sizes, d_model: int) -> Array:
  """[T] routed expert parameters each token activates: sum over its computed slots of the
  SwiGLU's 3 * D * h_i (unused slots, -1, and null experts count 0)."""
  h = jnp.concatenate([jnp.asarray(sizes, jnp.float32), jnp.zeros((1,), jnp.float32)])
  idx = routing.expert_index
  idx = jnp.where((idx >= 0) & (idx < len(sizes)), idx, len(sizes))
  return 3.0 * d_model * jnp.sum(h[idx], axis=-1)


def device_balance_loss(routing: RoutingResult, num_groups: int) -> Array:
  """DeepSeekMoE device-level balance loss (arXiv 2401.06066, eq. 15-17).

  Routed experts are split into D = ``num_groups`` contiguous groups E_d (one per device):
  L_DevBal = sum_d f''_d P''_d,  f''_d = mean_{j in E_d} f'_j,  P''_d = sum_{j in E_d} P_j,
  with f'_j = E/(kT) count_j as in the expert-level loss.
  """
  e = routing.num_experts
  if e % num_groups:
    raise ValueError(f"num_device_groups={num_groups} must divide the routed experts ({e})")
  f = e * expert_fraction(routing)
  p_mean = jnp.mean(routing.probs, axis=0)
  f_dev = f.reshape(num_groups, -1).mean(axis=1)
  p_dev = p_mean.reshape(num_groups, -1).sum(axis=1)
  return jnp.sum(f_dev * p_dev)


def router_z_loss(routing: RoutingResult) -> Array:
  """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): (1/T) sum_t (logsumexp_i logits_{t,i})^2."""
  return jnp.mean(jax.nn.logsumexp(routing.logits, axis=-1) ** 2)


def router_entropy(routing: RoutingResult) -> Array:
  """Mean over tokens of H(p_t) = -sum_i p_{t,i} log p_{t,i} (nats)."""
  p = routing.probs
  return jnp.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1))

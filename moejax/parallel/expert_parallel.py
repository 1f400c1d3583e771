"""Expert parallelism: experts split over the ``expert`` mesh axis, tokens moved by all-to-all.

Inside ``shard_map`` every device holds a contiguous slice of the batch (split over
data x fsdp x expert) and E_l = E / ep experts (device j of the expert axis owns experts
[j E_l, (j+1) E_l)). For one MoE layer:

  1. capacity mode only: decide which (token, slot) pairs are kept *before* moving anything.
     Per-(slot, expert) counts are all-gathered over the batch shards, so each pair's rank is
     its position in the global slot-major, token-order priority: the same decision as the
     single-device planner (``dispatch.plan_capacity``), with C computed from the global T.
  2. group the local pairs by expert (``plan_dropless``); expert order is device order.
  3. padded all-to-all over ``expert``: a [ep, M, D] buffer, M = local pairs (worst case: all go
     to one device), plus the per-expert counts.
  4. regroup received rows by local expert, run the expert bank on local weights only.
  5. inverse all-to-all, then the usual gate-weighted combine.

Numerically this is the single-device layer; only the layout differs. The padded buffer costs
ep x M x D per device; a ragged all-to-all (GPU/TPU; XLA:CPU does not implement it) would
send only the rows that exist.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.layers.dispatch import combine, dispatch, expert_capacity, plan_dropless

Array = jax.Array
BATCH_AXES = ("data", "fsdp", "expert")


def expert_axis_size() -> int:
  """Size of the ``expert`` axis of the mesh current at trace time (1 if none)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "expert" not in mesh.axis_names:
    return 1
  return mesh.shape["expert"]


def _global_capacity_mask(idx: Array, num_experts: int, capacity_factor: float) -> tuple[Array, Array]:
  """Marks pairs beyond their expert's global capacity with -1. Runs inside shard_map."""
  t_local, k = idx.shape
  counts = jnp.sum(jax.nn.one_hot(idx.T, num_experts, dtype=jnp.int32), axis=1)   # [k, E]
  every = jax.lax.all_gather(counts, BATCH_AXES)                                  # [S, k, E]
  me = jax.lax.axis_index(BATCH_AXES)
  shards = every.shape[0]
  earlier_slots = jnp.cumsum(every.sum(0), axis=0) - every.sum(0)                 # [k, E]
  earlier_shards = jnp.sum(jnp.where((jnp.arange(shards) < me)[:, None, None], every, 0), 0)
  base = earlier_slots + earlier_shards                                           # [k, E]
  onehot = jax.nn.one_hot(idx.T, num_experts, dtype=jnp.int32)                    # [k, T_l, E]
  local_rank = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)        # [k, T_l]
  rank = jnp.take_along_axis(base, jnp.maximum(idx.T, 0), axis=1) + local_rank
  cap = expert_capacity(t_local * shards, k, num_experts, capacity_factor)
  kept = (rank < cap).T & (idx >= 0)
  dropped = jax.lax.psum(jnp.sum((idx >= 0) & ~kept), BATCH_AXES)
  return jnp.where(kept, idx, -1), dropped


def _exchange_and_run(x: Array, idx: Array, weight: Array, expert_params, run_experts: Callable,
                      num_experts: int):
  ep = jax.lax.axis_size("expert")
  e_local = num_experts // ep
  plan = plan_dropless(idx, num_experts)
  xs = dispatch(x, plan)                                            # [M, D] grouped by expert
  m = xs.shape[0]
  per_dev = plan.group_sizes.reshape(ep, e_local)                  # rows for each device's experts
  dev_count = per_dev.sum(1)
  dev_start = jnp.cumsum(dev_count) - dev_count
  row = jnp.arange(m)
  dev = jnp.clip(jnp.searchsorted(jnp.cumsum(dev_count), row, side="right"), 0, ep - 1)
  valid = row < dev_count.sum()
  slot = jnp.where(valid, dev * m + row - dev_start[dev], ep * m)  # position in the send buffer
  send = jnp.zeros((ep * m, xs.shape[1]), xs.dtype).at[slot].set(xs, mode="drop")
  recv = jax.lax.all_to_all(send.reshape(ep, m, -1), "expert", 0, 0, tiled=True)
  recv_counts = jax.lax.all_to_all(per_dev, "expert", 0, 0, tiled=True)   # [src, E_l]

  # Regroup rows from all sources by local expert.
  j = jnp.arange(m)
  local_expert = jax.vmap(lambda c: jnp.searchsorted(jnp.cumsum(c), j, side="right"))(recv_counts)
  key = jnp.where(j[None, :] < recv_counts.sum(1, keepdims=True), local_expert, e_local).reshape(-1)
  order = jnp.argsort(key, stable=True)
  ys = run_experts(expert_params, recv.reshape(ep * m, -1)[order], recv_counts.sum(0))
  back = jnp.zeros_like(ys).at[order].set(ys).reshape(ep, m, -1)
  back = jax.lax.all_to_all(back, "expert", 0, 0, tiled=True).reshape(ep * m, -1)
  ys_local = jnp.take(back, slot, axis=0, mode="fill", fill_value=0)   # [M, D] in plan order
  return combine(ys_local, plan, weight)


def expert_parallel_ffn(x: Array, idx: Array, weight: Array, expert_params, expert_specs,
                        run_experts: Callable, *, num_experts: int, capacity_factor: float | None):
  """Routed-expert output [T, D] and the global dropped-pair count, computed with experts split
  over the ``expert`` mesh axis. ``run_experts(params, rows, group_sizes)`` is the expert bank on
  local weights; ``expert_specs`` are the PartitionSpecs it receives them with.
  ``capacity_factor=None`` is dropless.
  """
  def body(x, idx, weight, params):
    dropped = jnp.zeros((), jnp.int32)
    if capacity_factor is not None:
      idx, dropped = _global_capacity_mask(idx, num_experts, capacity_factor)
    return _exchange_and_run(x, idx, weight, params, run_experts, num_experts), dropped

  batch = P(BATCH_AXES, None)
  return jax.shard_map(body, in_specs=(batch, batch, batch, expert_specs),
                       out_specs=(batch, P()), check_vma=False)(x, idx, weight, expert_params)

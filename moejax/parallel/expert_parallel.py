"""Expert parallelism: experts split over the ``expert`` mesh axis, tokens moved by all-to-all.

Inside ``shard_map`` every device holds a contiguous slice of the batch (split over
data x fsdp x expert) and E_l = E / ep experts (device j of the expert axis owns experts
[j E_l, (j+1) E_l)). For one MoE layer:

  1. capacity mode only: decide which (token, slot) pairs are kept *before* moving anything.
     Per-(slot, expert) counts are all-gathered over the batch shards, so each pair's rank is
     its position in the global slot-major, token-order priority: the same decision as the
     single-device planner (``dispatch.plan_capacity``), with C computed from the global T.
  2. group the local pairs by expert (``plan_dropless``); expert order is device order.
  3. move rows to the devices owning their experts, run the expert bank on local weights only,
     move the outputs back, then the usual gate-weighted combine. Two exchanges
     (``model.moe.all_to_all``):

     padded  ``all_to_all`` of a [ep, M, D] buffer (M = local pairs, the worst case of all going
             to one device) plus the counts; received rows are regrouped by local expert.
             Sends ep x M rows per device whatever the routing.
     ragged  ``ragged_all_to_all`` with one slice per expert: per-(source, expert) counts are
             all-gathered ([ep, E] ints) so every device knows every receiver's layout, and each
             slice is written straight to its place in the receiver's buffer, grouped by local
             expert (expert-major, source-minor): no regrouping, and only existing rows travel.
             The receive buffer is the worst case ep * T_l * min(k, E_l) rows (E_l * C with
             capacity), or ``ragged_buffer_factor`` x the balanced M rows; then the rows that do
             not fit are dropped and counted, never silently: a receiver keeps the prefix of
             its layout (lower local experts, then lower sources, first choices first).
     auto    ragged where XLA implements it (GPU, TPU), padded on CPU.

Numerically this is the single-device layer; only the layout differs.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.layers import expert_execution
from moejax.layers.dispatch import combine, dispatch, expert_capacity, plan_dropless
from moejax.parallel.ragged_all_to_all import RaggedExchange, ragged_all_to_all

Array = jax.Array
BATCH_AXES = ("data", "fsdp", "expert")


def expert_axis_size() -> int:
  """Size of the ``expert`` axis of the mesh current at trace time (1 if none)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "expert" not in mesh.axis_names:
    return 1
  return mesh.shape["expert"]


def _global_capacity_mask(idx: Array, num_experts: int, cap: int) -> tuple[Array, Array]:
  """Marks pairs beyond their expert's global capacity ``cap`` with -1. Runs inside shard_map."""
  onehot = jax.nn.one_hot(idx.T, num_experts, dtype=jnp.int32)                    # [k, T_l, E]
  counts = jnp.sum(onehot, axis=1)                                                # [k, E]
  every = jax.lax.all_gather(counts, BATCH_AXES)                                  # [S, k, E]
  me = jax.lax.axis_index(BATCH_AXES)
  shards = every.shape[0]
  earlier_slots = jnp.cumsum(every.sum(0), axis=0) - every.sum(0)                 # [k, E]
  earlier_shards = jnp.sum(jnp.where((jnp.arange(shards) < me)[:, None, None], every, 0), 0)
  base = earlier_slots + earlier_shards                                           # [k, E]
  local_rank = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)        # [k, T_l]
  rank = jnp.take_along_axis(base, jnp.maximum(idx.T, 0), axis=1) + local_rank
  kept = (rank < cap).T & (idx >= 0)
  dropped = jax.lax.psum(jnp.sum((idx >= 0) & ~kept), BATCH_AXES)
  return jnp.where(kept, idx, -1), dropped


def _exclusive_cumsum(a: Array, axis: int) -> Array:
  return jnp.cumsum(a, axis=axis) - a


def _padded_exchange(xs: Array, group_sizes: Array, expert_params, run_experts: Callable,
                     num_experts: int) -> Array:
  """Expert outputs for the rows ``xs`` [M, D] (grouped by global expert), via padded a2a."""
  ep = jax.lax.axis_size("expert")
  e_local = num_experts // ep
  m = xs.shape[0]
  per_dev = group_sizes.reshape(ep, e_local)                        # rows for each device's experts
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
  return jnp.take(back, slot, axis=0, mode="fill", fill_value=0)


def _by_receiver(a: Array, ep: int) -> Array:
  """[src, E] -> [dst, E_l * src]: each receiver's rows in its buffer order (expert-major)."""
  return a.reshape(ep, ep, -1).transpose(1, 2, 0).reshape(ep, -1)


def _from_receiver(a: Array, ep: int) -> Array:
  """Inverse of ``_by_receiver``."""
  return a.reshape(ep, -1, ep).transpose(2, 0, 1).reshape(ep, -1)


def fit_to_buffer(counts: Array, rows: int) -> Array:
  """[src, E] rows each receiver accepts when its buffer holds ``rows``: slices are laid out
  expert-major, source-minor and the ones past the end are cut (every device computes the same
  answer from the all-gathered counts, so senders and receivers agree without talking)."""
  ep = counts.shape[0]
  end = jnp.minimum(jnp.cumsum(_by_receiver(counts, ep), axis=1), rows)
  return _from_receiver(jnp.diff(end, axis=1, prepend=0), ep)


def ragged_exchange_plan(counts: Array, sent: Array, me: Array) -> RaggedExchange:
  """The exchange of device ``me`` of the expert axis, one slice per global expert.

  counts [src, E]: rows each device holds per expert (its plan's group sizes, so expert e's
  rows start at the exclusive cumsum); sent [src, E] <= counts: rows that fit the receivers.
  """
  ep, num_experts = counts.shape
  e_local = num_experts // ep
  where = _from_receiver(_exclusive_cumsum(_by_receiver(sent, ep), 1), ep)  # row on receiver
  starts = _exclusive_cumsum(counts, 1)                                     # row on sender
  mine = lambda a: jax.lax.dynamic_slice_in_dim(a, me * e_local, e_local, axis=1).reshape(-1)
  return RaggedExchange(
      input_offsets=starts[me], send_sizes=sent[me], output_offsets=where[me],
      recv_sizes=mine(sent), recv_offsets=mine(where), source_offsets=mine(starts))


def ragged_buffer_rows(local_pairs: int, k: int, num_experts: int, ep: int,
                       capacity: int | None, buffer_factor: float) -> int:
  """Static receive-buffer rows of the ragged exchange. A token sends at most min(k, E_l) of
  its k pairs to one device, so ep * T_l * min(k, E_l) rows never overflow (MaxText's
  worst-case bound); with capacity, no local expert gets more than C rows."""
  e_local = num_experts // ep
  worst = ep * (local_pairs // k) * min(k, e_local)
  if capacity is not None:
    worst = min(worst, e_local * capacity)
  if buffer_factor > 0:
    return max(1, min(worst, math.ceil(buffer_factor * local_pairs)))
  return max(1, worst)


def _ragged_exchange(xs: Array, group_sizes: Array, expert_params, run_experts: Callable,
                     num_experts: int, rows: int, emulate: bool) -> tuple[Array, Array]:
  """Expert outputs for ``xs`` (zero where cut by the buffer) and the number of rows cut."""
  ep = jax.lax.axis_size("expert")
  me = jax.lax.axis_index("expert")
  e_local = num_experts // ep
  counts = jax.lax.all_gather(group_sizes, "expert")                 # [src, E]
  sent = fit_to_buffer(counts, rows)
  plan = ragged_exchange_plan(counts, sent, me)
  recv = ragged_all_to_all(xs, plan, rows, "expert", emulate)        # grouped by local expert
  local_sizes = jax.lax.dynamic_slice_in_dim(sent, me * e_local, e_local, axis=1).sum(0)
  ys = run_experts(expert_params, recv, local_sizes)
  back = ragged_all_to_all(ys, plan.reversed(), xs.shape[0], "expert", emulate)
  return back, jnp.sum(counts[me] - sent[me])


def _backend() -> str:
  """The platform programs are built for (a hook: tests lower for GPU/TPU from a CPU host)."""
  return jax.default_backend()


def resolve_all_to_all(choice: str) -> tuple[str, bool]:
  """(exchange, emulate) for ``model.moe.all_to_all`` on the current backend."""
  native = _backend() in ("gpu", "tpu")
  if choice == "auto":
    return ("ragged" if native else "padded"), False
  if choice == "ragged" and not native:
    warnings.warn("model.moe.all_to_all='ragged': XLA:%s has no ragged all-to-all, so an "
                  "all-gather emulation with the same result runs instead (n x the traffic; "
                  "for tests). Use 'auto' or 'padded' for speed." % _backend().upper(),
                  stacklevel=2)
  return choice, choice == "ragged" and not native


def expert_parallel_ffn(x: Array, idx: Array, weight: Array, expert_params, expert_specs,
                        run_experts: Callable, *, num_experts: int, capacity_factor: float | None,
                        all_to_all: str = "auto", buffer_factor: float = 0.0):
  """Routed-expert output [T, D] and the global dropped-pair count, computed with experts split
  over the ``expert`` mesh axis. ``run_experts(params, rows, group_sizes)`` is the expert bank on
  local weights; ``expert_specs`` are the PartitionSpecs it receives them with.
  ``capacity_factor=None`` is dropless; ``all_to_all`` and ``buffer_factor`` are described in
  the module docstring.
  """
  exchange, emulate = resolve_all_to_all(all_to_all)

  def body(x, idx, weight, params):
    dropped = jnp.zeros((), jnp.int32)
    t_local, k = idx.shape
    cap = None                         # C from the global T, as the single-device planner has it
    if capacity_factor is not None:
      cap = expert_capacity(t_local * jax.lax.axis_size(BATCH_AXES), k, num_experts,
                            capacity_factor)
      idx, dropped = _global_capacity_mask(idx, num_experts, cap)
    plan = plan_dropless(idx, num_experts)
    xs = dispatch(x, plan)                                          # [M, D] grouped by expert
    if exchange == "ragged":
      rows = ragged_buffer_rows(t_local * k, k, num_experts, jax.lax.axis_size("expert"), cap,
                                buffer_factor)
      ys, cut = _ragged_exchange(xs, plan.group_sizes, params, run_experts, num_experts, rows,
                                 emulate)
      dropped = dropped + jax.lax.psum(cut, BATCH_AXES)
    else:
      ys = _padded_exchange(xs, plan.group_sizes, params, run_experts, num_experts)
    return combine(ys, plan, weight), dropped

  batch = P(BATCH_AXES, None)
  return jax.shard_map(body, in_specs=(batch, batch, batch, expert_specs),
                       out_specs=(batch, P()), check_vma=False)(x, idx, weight, expert_params)


class ExpertParallelExecution:
  """The MoE block's execution over the ``expert`` mesh axis (layers/expert_execution.py): the
  bank's weights arrive split by its ``weight_specs``, rows move by ``spec.all_to_all``."""
  name = "expert_parallel"

  def ways(self, spec) -> int:
    return expert_axis_size()

  def run(self, tokens, routing, bank, spec):
    return expert_parallel_ffn(
        tokens, routing.dispatch_index, routing.weight, bank.weights(), bank.weight_specs(),
        bank.run, num_experts=spec.num_routed,
        capacity_factor=spec.capacity_factor if spec.dispatch == "capacity" else None,
        all_to_all=spec.all_to_all, buffer_factor=spec.ragged_buffer_factor)

  def describe(self, spec, ways: int) -> str:
    return (f"expert-parallel: shard_map over mesh axis 'expert' ({ways} devices, "
            f"{spec.num_routed // ways} experts each), all_to_all={spec.all_to_all}")


expert_execution.register(ExpertParallelExecution())

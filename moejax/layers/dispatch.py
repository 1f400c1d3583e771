"""Dispatch: where each (token, slot) goes while the experts run, and back again.

A planner turns ``RoutingResult.expert_index`` into a ``DispatchPlan`` using index arithmetic
only (no FLOPs, no [T, E, C] one-hot tensors). ``dispatch`` then gathers tokens once into the
experts' layout (rows grouped by expert: ``group_sizes``), the experts keep that layout through
up-projection, activation and down-projection, and ``combine`` gathers the rows back and takes
the gate-weighted sum. Both planners share ``dispatch``/``combine``, so a new layout (tile-aligned
padding, expert-parallel all-to-all) is a new planner, not a new MoE layer.

Why one gather each way: measured on CPU, padding and un-padding rows
inside every grouped matmul costs about half of a layer's time; doing it once per layer does not.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


@struct.dataclass
class DispatchPlan:
  """Layout of the experts' input rows.

  row_token:   [M] token feeding each expert row; T (one past the last token) marks an empty
               row (capacity padding or an unused slot), which reads zeros.
  slot_row:    [T, k] expert row holding each (token, slot); M marks a dropped/unused slot.
  row_pair:    [M] slot-major index s*T + t of the (token, slot) in each row; T*k if empty.
  group_sizes: [E] rows per expert, rows sorted by expert (the gmm contract).
  kept:        [T, k] bool, False where the slot was dropped by capacity or unused.
  num_dropped: [] int32, routed slots lost to capacity (always reported, never silent).
  """
  row_token: Array
  slot_row: Array
  row_pair: Array
  group_sizes: Array
  kept: Array
  num_dropped: Array

  @property
  def num_rows(self) -> int:
    return self.row_token.shape[0]


def _sort_slots(expert_index: Array, num_experts: int):
  """Stable sort of all (slot, token) pairs by expert, slot-major.

  Slot-major order means every token's first choice precedes any second choice inside an expert,
  and earlier tokens precede later ones: the priority GShard and Switch use when capacity binds.
  Unused slots (index -1) sort after every expert.
  """
  num_tokens = expert_index.shape[0]
  flat = expert_index.T.reshape(-1)                       # i = slot * T + token
  key = jnp.where(flat >= 0, flat, num_experts)
  order = jnp.argsort(key, stable=True)
  sorted_key = key[order]
  counts = jnp.zeros((num_experts + 1,), jnp.int32).at[key].add(1)
  return order, order % num_tokens, sorted_key, counts


def _unflatten(flat: Array, num_tokens: int) -> Array:
  return flat.reshape(-1, num_tokens).T                  # slot-major [k*T] -> [T, k]


def _round_up(x, multiple):
  return (x + multiple - 1) // multiple * multiple


def _place(sorted_key, counts, num_experts, stride, cap, num_rows):
  """Rows for sorted slots: expert e's r-th slot goes to row base_e + r if r < cap.

  ``stride`` [E] is the rows reserved per expert (its count, rounded up for alignment, or the
  capacity); rows past a group's real slots stay empty (row_token = T reads zeros).
  """
  starts = jnp.cumsum(counts) - counts
  base = jnp.cumsum(stride) - stride
  rank = jnp.arange(sorted_key.shape[0]) - starts[sorted_key]
  keep = (sorted_key < num_experts) & (rank < cap)
  dest = jnp.where(keep, base[jnp.minimum(sorted_key, num_experts - 1)] + rank, num_rows)
  return dest.astype(jnp.int32)


def _plan(expert_index, order, token, dest, num_rows, group_sizes):
  num_tokens = expert_index.shape[0]
  row_token = jnp.full((num_rows,), num_tokens, jnp.int32).at[dest].set(
      token.astype(jnp.int32), mode="drop")
  slot_row = _unflatten(jnp.zeros_like(dest).at[order].set(dest), num_tokens)
  row_pair = jnp.full((num_rows,), order.shape[0], jnp.int32).at[dest].set(
      order.astype(jnp.int32), mode="drop")
  kept = slot_row < num_rows
  num_dropped = (jnp.sum(expert_index >= 0) - jnp.sum(kept)).astype(jnp.int32)
  return DispatchPlan(row_token=row_token, slot_row=slot_row, row_pair=row_pair,
                      group_sizes=group_sizes.astype(jnp.int32), kept=kept, num_dropped=num_dropped)


def plan_dropless(expert_index: Array, num_experts: int, align: int = 1) -> DispatchPlan:
  """Dropless grouping (MegaBlocks-style): every routed slot gets a row, nothing is dropped.

  ``align`` > 1 starts every expert's rows on a multiple of ``align`` (each group padded with
  empty rows), so a tiled grouped matmul with tile ``align`` never splits a tile between two
  experts: no tile is computed twice and no row masks or partial-tile accumulation are needed.
  Rows: T*k (align 1), else the static bound round_up(T*k + E*(align-1), align); the kernels
  only visit rows up to sum(group_sizes).
  """
  num_tokens, k = expert_index.shape
  order, token, sorted_key, counts = _sort_slots(expert_index, num_experts)
  stride = _round_up(counts[:num_experts], align)
  num_rows = _round_up(num_tokens * k + num_experts * (align - 1), align)   # = T*k if align 1
  dest = _place(sorted_key, counts, num_experts, stride, num_tokens * k, num_rows)
  return _plan(expert_index, order, token, dest, num_rows, stride)


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
  """C = ceil(capacity_factor * T * k / E): slots per expert (GShard; Switch eq. 3)."""
  return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


def plan_capacity(expert_index: Array, num_experts: int, capacity_factor: float,
                  align: int = 1) -> DispatchPlan:
  """Capacity-based dispatch (GShard, Switch): each expert holds C rows; overflow is dropped.

  Expert e owns rows [e*S, e*S + C) with S = round_up(C, align) (S = C unless aligned; the
  S - C rows are empty). Dropped slots contribute zero to the routed output (the residual
  carries the token) and are counted in ``num_dropped``.
  """
  num_tokens, k = expert_index.shape
  cap = expert_capacity(num_tokens, k, num_experts, capacity_factor)
  stride = _round_up(cap, align)
  order, token, sorted_key, counts = _sort_slots(expert_index, num_experts)
  strides = jnp.full((num_experts,), stride, jnp.int32)
  dest = _place(sorted_key, counts, num_experts, strides, cap, num_experts * stride)
  return _plan(expert_index, order, token, dest, num_experts * stride, strides)


def _pad_row(x: Array) -> Array:
  return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)], axis=0)


# Both directions are gathers. Each row holds at most one (token, slot) and the plan stores the
# map both ways, so the VJPs gather through the inverse map instead of letting autodiff emit
# scatter-adds (slow on CPU, and atomics on GPU).
@jax.custom_vjp
def dispatch(x: Array, plan: DispatchPlan) -> Array:
  """[T, D] tokens -> [M, D] expert rows (one gather; empty rows are zeros)."""
  return _pad_row(x)[plan.row_token]


def _dispatch_fwd(x, plan):
  return dispatch(x, plan), plan


def _dispatch_bwd(plan, dxs):
  # dx_t = sum over slots s of d xs[slot_row[t, s]]; dropped slots point at the zero row.
  return jnp.sum(_pad_row(dxs)[plan.slot_row], axis=1, dtype=jnp.float32).astype(dxs.dtype), None


dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def combine(ys: Array, plan: DispatchPlan, weight: Array) -> Array:
  """[M, D] expert outputs -> [T, D]: y_t = sum_s kept[t,s] * weight[t,s] * ys[slot_row[t,s]]."""
  y = _pad_row(ys)[plan.slot_row]                          # [T, k, D]
  w = jnp.where(plan.kept, weight, 0.0).astype(jnp.float32)
  return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), w).astype(ys.dtype)


def _combine_fwd(ys, plan, weight):
  return combine(ys, plan, weight), (ys, plan, weight)


def _combine_bwd(res, dy):
  ys, plan, weight = res
  w = jnp.where(plan.kept, weight, 0.0).astype(jnp.float32)
  w_pair = _pad_row(w.T.reshape(-1))                       # slot-major, zero for empty rows
  dy32 = dy.astype(jnp.float32)
  dys = w_pair[plan.row_pair][:, None] * _pad_row(dy32)[plan.row_token]
  y = _pad_row(ys)[plan.slot_row].astype(jnp.float32)      # [T, k, D]
  dw = jnp.where(plan.kept, jnp.einsum("tkd,td->tk", y, dy32), 0.0)
  return dys.astype(ys.dtype), None, dw.astype(weight.dtype)


combine.defvjp(_combine_fwd, _combine_bwd)


# Name -> planner(expert_index, num_experts, *, capacity_factor, align). Validation lists names.
PLANNERS = {
    "dropless": lambda idx, e, *, capacity_factor, align=1: plan_dropless(idx, e, align),
    "capacity": lambda idx, e, *, capacity_factor, align=1: plan_capacity(idx, e, capacity_factor,
                                                                          align),
}

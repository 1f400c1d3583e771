"""Grouped matmul kernels for GPU (Pallas / Triton).

Triton has no scalar prefetch, so these kernels take whole-array refs and compute their own
offsets from the schedule (``metadata.make_group_metadata``), loading tiles with ``pl.ds``.

gmm   out[M, N]:     one program per (pair, N tile). It loops over K tiles, then stores only
                     the rows of its group (masked store): programs of one row tile write
                     disjoint rows, so they run in parallel without atomics. The output aliases
                     ``existing`` (zeros unless the caller passes a buffer), so rows no program
                     owns keep it.
tgmm  out[G, K, N]:  one program per (local group, K tile, N tile). It loops over the row tiles
                     of its group (a dynamic trip count from ``starts``/``ends``), masks rows of
                     neighbouring groups and writes existing + its sum once (empty groups write
                     existing unchanged).

Inputs must be tile-aligned (``ops.py`` pads): M % tm == 0, K % tk == 0, N % tn == 0, with tile
sizes powers of two >= 16 (``tl.dot``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.metadata import GroupMetadata

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("tm", "tk", "tn", "transpose_rhs", "interpret"))
def gmm(lhs: Array, rhs: Array, meta: GroupMetadata, existing: Array, *, tm: int, tk: int,
        tn: int, transpose_rhs: bool = False, interpret=False) -> Array:
  """lhs [M, K] x rhs [L, K, N] (or [L, N, K] if transpose_rhs) -> [M, N] in existing.dtype;
  rows outside the local groups keep ``existing``. Accumulation is f32."""
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]

  def kernel(tile_ref, group_ref, valid_ref, starts_ref, ends_ref, lhs_ref, rhs_ref,
             existing_ref, out_ref):
    del existing_ref                       # aliased to out
    p, j = pl.program_id(0), pl.program_id(1)

    @pl.when(valid_ref[p] != 0)
    def _():
      r0 = pl.multiple_of(tile_ref[p] * tm, tm)
      n0 = pl.multiple_of(j * tn, tn)
      g = group_ref[p]

      def body(i, acc):
        k0 = pl.multiple_of(i * tk, tk)
        x = lhs_ref[pl.ds(r0, tm), pl.ds(k0, tk)]
        if transpose_rhs:
          w = rhs_ref[g, pl.ds(n0, tn), pl.ds(k0, tk)]
          return acc + plt.dot(x, w, trans_b=True)
        return acc + plt.dot(x, rhs_ref[g, pl.ds(k0, tk), pl.ds(n0, tn)])

      acc = jax.lax.fori_loop(0, k // tk, body, jnp.zeros((tm, tn), jnp.float32))
      rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
      mask = (rows >= starts_ref[g]) & (rows < ends_ref[g])
      plt.store(out_ref.at[pl.ds(r0, tm), pl.ds(n0, tn)], acc.astype(out_ref.dtype), mask=mask)

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), existing.dtype),
      grid=(meta.num_pairs, n // tn),
      input_output_aliases={7: 0},
      interpret=interpret,
      name="moejax_gmm",
  )(meta.tile, meta.group, meta.valid.astype(jnp.int32), meta.starts, meta.ends, lhs, rhs,
    existing)


@functools.partial(jax.jit, static_argnames=("tm", "tk", "tn", "interpret"))
def tgmm(lhs: Array, grad: Array, meta: GroupMetadata, existing: Array, *, tm: int, tk: int,
         tn: int, interpret=False) -> Array:
  """out[g] = existing[g] + sum over rows i of local group g of lhs[i]^T grad[i]
  ([M, K], [M, N], [L, K, N] -> [L, K, N] in existing.dtype)."""
  num_local = existing.shape[0]
  k, n = lhs.shape[1], grad.shape[1]

  def kernel(starts_ref, ends_ref, lhs_ref, grad_ref, existing_ref, out_ref):
    g, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k0, n0 = pl.multiple_of(i * tk, tk), pl.multiple_of(j * tn, tn)
    start, end = starts_ref[g], ends_ref[g]
    first = start // tm
    num_tiles = jnp.where(end > start, (end - 1) // tm - first + 1, 0)

    def body(t, acc):
      r0 = pl.multiple_of((first + t) * tm, tm)
      rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
      x = lhs_ref[pl.ds(r0, tm), pl.ds(k0, tk)]
      x = jnp.where((rows >= start) & (rows < end), x, jnp.zeros((), x.dtype))
      return acc + plt.dot(x, grad_ref[pl.ds(r0, tm), pl.ds(n0, tn)], trans_a=True)

    acc = jax.lax.fori_loop(0, num_tiles, body, jnp.zeros((tk, tn), jnp.float32))
    block = (g, pl.ds(k0, tk), pl.ds(n0, tn))
    out_ref[block] = (acc + existing_ref[block].astype(jnp.float32)).astype(out_ref.dtype)

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_local, k, n), existing.dtype),
      grid=(num_local, k // tk, n // tn),
      input_output_aliases={4: 0},
      interpret=interpret,
      name="moejax_tgmm",
  )(meta.starts, meta.ends, lhs, grad, existing)

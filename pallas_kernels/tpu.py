"""Grouped matmul kernels for TPU (Pallas / Mosaic), in the BlockSpec-pipelined style of megablox.

The grid walks the (tile, group) schedule of ``metadata.make_group_metadata``; the schedule is
scalar-prefetched into SMEM so the BlockSpec index maps can read it, and Mosaic double-buffers
the next pair's blocks while the current one multiplies on the MXU.

gmm   out[M, N]:     grid (N tiles, pairs, K tiles). Consecutive pairs of one row tile share the
                     output block, which stays resident in VMEM: the first visit starts from the
                     aliased zero block, later visits merge their group's rows.
tgmm  out[G, K, N]:  grid (K tiles, N tiles, pairs). Consecutive pairs of one group accumulate
                     lhs_tile^T @ grad_tile in an f32 scratch; the group's last pair writes it.

Both outputs alias an input buffer (``existing``: zeros unless the caller passes one), so blocks
the schedule never visits (rows outside the local groups, empty groups) come back as that
buffer rather than uninitialised HBM. gmm overwrites the rows of local groups; tgmm adds its
sums to the buffer (megablox's ``existing_out`` semantics). Inputs must be
tile-aligned (``ops.py`` pads): M % tm == 0, K % tk == 0, N % tn == 0, with tm a multiple of
8 (16 for bf16) and tk, tn multiples of 128 or the full dimension.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.metadata import GroupMetadata

Array = jax.Array


def _prefetch(meta: GroupMetadata):
  return (meta.tile, meta.group, meta.valid.astype(jnp.int32), meta.starts, meta.ends)


def _row_mask(tile_ref, group_ref, valid_ref, starts_ref, ends_ref, p, shape):
  rows = tile_ref[p] * shape[0] + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  g = group_ref[p]
  return (rows >= starts_ref[g]) & (rows < ends_ref[g]) & (valid_ref[p] != 0)


@functools.partial(jax.jit, static_argnames=("tm", "tk", "tn", "transpose_rhs", "interpret"))
def gmm(lhs: Array, rhs: Array, meta: GroupMetadata, existing: Array, *, tm: int, tk: int,
        tn: int, transpose_rhs: bool = False, interpret=False) -> Array:
  """lhs [M, K] x rhs [L, K, N] (or [L, N, K] if transpose_rhs) -> [M, N] in existing.dtype;
  rows outside the local groups keep ``existing``. Accumulation is f32."""
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  grid = (n // tn, meta.num_pairs, k // tk)
  dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def kernel(tile_ref, group_ref, valid_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, existing_ref,
             out_ref, acc_ref):
    p, kk = pl.program_id(1), pl.program_id(2)

    @pl.when(kk == 0)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(valid_ref[p] != 0)
    def _():
      acc_ref[...] += jax.lax.dot_general(lhs_ref[...], rhs_ref[...], dims,
                                          preferred_element_type=jnp.float32)

    @pl.when(kk == pl.num_programs(2) - 1)
    def _():
      first = (p == 0) | (tile_ref[p] != tile_ref[jnp.maximum(p - 1, 0)])
      base = jnp.where(first, existing_ref[...], out_ref[...])
      mask = _row_mask(tile_ref, group_ref, valid_ref, starts_ref, ends_ref, p, (tm, tn))
      out_ref[...] = jnp.where(mask, acc_ref[...].astype(out_ref.dtype), base)

  def rhs_map(n_, p, k_, tile, group, *_):
    return (group[p], n_, k_) if transpose_rhs else (group[p], k_, n_)

  rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  out_spec = pl.BlockSpec((tm, tn), lambda n_, p, k_, tile, *_: (tile[p], n_))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), existing.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5, grid=grid,
          in_specs=[pl.BlockSpec((tm, tk), lambda n_, p, k_, tile, *_: (tile[p], k_)),
                    pl.BlockSpec(rhs_block, rhs_map), out_spec],
          out_specs=out_spec,
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
      input_output_aliases={7: 0},
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="moejax_gmm",
  )(*_prefetch(meta), lhs, rhs, existing)


@functools.partial(jax.jit, static_argnames=("tm", "tk", "tn", "interpret"))
def tgmm(lhs: Array, grad: Array, meta: GroupMetadata, existing: Array, *, tm: int, tk: int,
         tn: int, interpret=False) -> Array:
  """out[g] = existing[g] + sum over rows i of local group g of lhs[i]^T grad[i]
  ([M, K], [M, N], [L, K, N] -> [L, K, N] in existing.dtype)."""
  num_local = existing.shape[0]
  k, n = lhs.shape[1], grad.shape[1]
  grid = (k // tk, n // tn, meta.num_pairs)

  def kernel(tile_ref, group_ref, valid_ref, starts_ref, ends_ref, lhs_ref, grad_ref,
             existing_ref, out_ref, acc_ref):
    p = pl.program_id(2)
    last_p = pl.num_programs(2) - 1
    g = group_ref[p]

    @pl.when((p == 0) | (g != group_ref[jnp.maximum(p - 1, 0)]))
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(valid_ref[p] != 0)
    def _():
      mask = _row_mask(tile_ref, group_ref, valid_ref, starts_ref, ends_ref, p, (tm, tk))
      x = jnp.where(mask, lhs_ref[...], jnp.zeros((), lhs_ref.dtype))
      acc_ref[...] += jax.lax.dot_general(x, grad_ref[...], (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)

    @pl.when((p == last_p) | (g != group_ref[jnp.minimum(p + 1, last_p)]))
    def _():
      out_ref[...] = (acc_ref[...] + existing_ref[...].astype(jnp.float32)).astype(out_ref.dtype)

  out_spec = pl.BlockSpec((None, tk, tn), lambda k_, n_, p, tile, group, *_: (group[p], k_, n_))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_local, k, n), existing.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5, grid=grid,
          in_specs=[pl.BlockSpec((tm, tk), lambda k_, n_, p, tile, *_: (tile[p], k_)),
                    pl.BlockSpec((tm, tn), lambda k_, n_, p, tile, *_: (tile[p], n_)),
                    out_spec],
          out_specs=out_spec,
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
      input_output_aliases={7: 0},
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="moejax_tgmm",
  )(*_prefetch(meta), lhs, grad, existing)

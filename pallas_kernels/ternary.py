"""Grouped matmul over 2-bit packed ternary weights: the weights stay packed in HBM and are
unpacked tile by tile inside the kernel, so weight traffic is 2 bits per value (16x less than
f32, 8x less than bf16).

Packed layout ("K-planar"): codes W in {-1, 0, 1} of rhs [L, K, N] are split along K into four
planes of P rows (P = ceil(K / 4) rounded up to ``PLANE_ALIGN``, rows past K are 0); byte
(l, r, n) holds the codes of rows q * P + r for q = 0..3 as (code + 1) << 2q. Then

  x @ W = sum_q x[:, qP:(q+1)P] @ decode_q(packed),  decode_q(b) = ((b >> 2q) & 3) - 1

so a kernel loads one [tk, tn] packed block, decodes four [tk, tn] planes with shifts and masks
(no reshape or lane interleave, which Mosaic and Triton lower poorly) and multiplies them with
four [tm, tk] lhs blocks at column offsets qP. One scale per (group, output column) multiplies
the f32 accumulator at the end (MoTE / BitNet: mean|W| per expert matrix, broadcast over its
columns).

Kernels (same schedule as tpu.py / gpu.py, ``metadata.make_group_metadata``):
  TPU: grid (N tiles, pairs, P tiles); lhs, viewed as [M, 4, P] (a free reshape), is passed
       four times with BlockSpecs on its four planes, so Mosaic pipelines all five blocks (the
       lhs blocks' last dimension is a multiple of 128 or the whole plane).
  GPU: one program per (pair, N tile), a loop over P tiles loading the four lhs slices.
Rows of other groups keep ``existing`` (zeros unless given), as in gmm.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt

from pallas_kernels.metadata import GroupMetadata
from pallas_kernels.ops import _round_up
from pallas_kernels.tpu import _prefetch, _row_mask

Array = jax.Array
PLANE_ALIGN = 8       # plane rows stored: a contraction that is a multiple of 32 needs no
                      # padding; kernels that need more (Triton's dot: 16) pad at call time


def plane_rows(k: int) -> int:
  """P: rows per plane for a contraction of k (ceil(k / 4) rounded up to PLANE_ALIGN)."""
  quarter = max(-(-k // 4), 1)
  return -(-quarter // PLANE_ALIGN) * PLANE_ALIGN


def pack_planes(codes) -> np.ndarray:
  """int codes in {-1, 0, 1} [L, K, N] -> uint8 [L, P, N] (K-planar, see module doc)."""
  codes = np.asarray(codes)
  if codes.ndim != 3:
    raise ValueError(f"pack_planes: expected codes [L, K, N], got shape {codes.shape}")
  if codes.size and (codes.min() < -1 or codes.max() > 1):
    raise ValueError("pack_planes: values must be in {-1, 0, 1}")
  l, k, n = codes.shape
  p = plane_rows(k)
  c = np.zeros((l, 4 * p, n), np.uint8)
  c[:, :k] = codes + 1
  c[:, k:] = 1                                   # value 0
  planes = c.reshape(l, 4, p, n)
  return (planes[:, 0] | (planes[:, 1] << 2) | (planes[:, 2] << 4) | (planes[:, 3] << 6))


def decode_plane(packed: Array, q: int, dtype) -> Array:
  """Plane q of a packed block as values in {-1, 0, 1} of ``dtype``."""
  return (((packed.astype(jnp.int32) >> (2 * q)) & 3) - 1).astype(dtype)


def unpack_planes(packed: Array, k: int) -> Array:
  """uint8 [L, P, N] -> int8 codes [L, K, N] (inverse of ``pack_planes``); jit-able."""
  planes = [decode_plane(packed, q, jnp.int8) for q in range(4)]
  return jnp.concatenate(planes, axis=1)[:, :k]


@functools.partial(jax.jit, static_argnames=("tm", "tk", "tn", "interpret"))
def gmm_tpu(lhs: Array, packed: Array, scale: Array, meta: GroupMetadata, existing: Array, *,
            tm: int, tk: int, tn: int, interpret=False) -> Array:
  """lhs [M, 4P] x unpack(packed [L, P, N]) * scale [L, 1, N] -> [M, N] (existing.dtype)."""
  m = lhs.shape[0]
  p_rows, n = packed.shape[1], packed.shape[2]
  planes = lhs.reshape(m, 4, p_rows)
  kt = p_rows // tk
  grid = (n // tn, meta.num_pairs, kt)

  def kernel(tile_ref, group_ref, valid_ref, starts_ref, ends_ref, x0, x1, x2, x3, w_ref,
             s_ref, existing_ref, out_ref, acc_ref):
    p, kk = pl.program_id(1), pl.program_id(2)

    @pl.when(kk == 0)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(valid_ref[p] != 0)
    def _():
      w = w_ref[...]
      for q, x_ref in enumerate((x0, x1, x2, x3)):
        x = x_ref[...]
        acc_ref[...] += jnp.dot(x, decode_plane(w, q, x.dtype),
                                preferred_element_type=jnp.float32)

    @pl.when(kk == pl.num_programs(2) - 1)
    def _():
      first = (p == 0) | (tile_ref[p] != tile_ref[jnp.maximum(p - 1, 0)])
      base = jnp.where(first, existing_ref[...], out_ref[...])
      mask = _row_mask(tile_ref, group_ref, valid_ref, starts_ref, ends_ref, p, (tm, tn))
      out = acc_ref[...] * s_ref[...].astype(jnp.float32)
      out_ref[...] = jnp.where(mask, out.astype(out_ref.dtype), base)

  def x_spec(q):
    return pl.BlockSpec((tm, None, tk), lambda n_, p, k_, tile, *_: (tile[p], q, k_))

  out_spec = pl.BlockSpec((tm, tn), lambda n_, p, k_, tile, *_: (tile[p], n_))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), existing.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5, grid=grid,
          in_specs=[x_spec(0), x_spec(1), x_spec(2), x_spec(3),
                    pl.BlockSpec((None, tk, tn),
                                 lambda n_, p, k_, tile, group, *_: (group[p], k_, n_)),
                    pl.BlockSpec((None, 1, tn), lambda n_, p, k_, tile, group, *_: (group[p], 0, n_)),
                    out_spec],
          out_specs=out_spec,
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
      input_output_aliases={11: 0},
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="moejax_gmm_ternary",
  )(*_prefetch(meta), planes, planes, planes, planes, packed, scale, existing)


@functools.partial(jax.jit, static_argnames=("tm", "tk", "tn", "interpret"))
def gmm_gpu(lhs: Array, packed: Array, scale: Array, meta: GroupMetadata, existing: Array, *,
            tm: int, tk: int, tn: int, interpret=False) -> Array:
  """As ``gmm_tpu``, for Triton: whole-array refs and explicit offsets."""
  m = lhs.shape[0]
  p_rows, n = packed.shape[1], packed.shape[2]

  def kernel(tile_ref, group_ref, valid_ref, starts_ref, ends_ref, lhs_ref, w_ref, s_ref,
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
        w = w_ref[g, pl.ds(k0, tk), pl.ds(n0, tn)]
        for q in range(4):
          x = lhs_ref[pl.ds(r0, tm), pl.ds(q * p_rows + k0, tk)]
          acc = acc + plt.dot(x, decode_plane(w, q, x.dtype))
        return acc

      acc = jax.lax.fori_loop(0, p_rows // tk, body, jnp.zeros((tm, tn), jnp.float32))
      acc = acc * s_ref[g, pl.ds(0, 1), pl.ds(n0, tn)].astype(jnp.float32)
      rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
      mask = (rows >= starts_ref[g]) & (rows < ends_ref[g])
      plt.store(out_ref.at[pl.ds(r0, tm), pl.ds(n0, tn)], acc.astype(out_ref.dtype), mask=mask)

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), existing.dtype),
      grid=(meta.num_pairs, n // tn),
      input_output_aliases={8: 0},
      interpret=interpret,
      name="moejax_gmm_ternary",
  )(meta.tile, meta.group, meta.valid.astype(jnp.int32), meta.starts, meta.ends, lhs, packed,
    scale, existing)


# ------------------------------------------------------------------ differentiable entry point
def _tiling(target: str, m: int, p_rows: int, n: int, dtype) -> tuple[int, int, int]:
  sub = 16 if jnp.dtype(dtype).itemsize == 2 else 8
  if target == "tpu":
    tk = next((t for t in (512, 256, 128) if p_rows % t == 0), p_rows)
    return min(128, _round_up(m, sub)), tk, min(512, _round_up(n, 128))
  if target == "gpu":
    tk = next(t for t in (64, 32, 16) if p_rows % t == 0)
    return min(64, max(16, 1 << (max(m, 1) - 1).bit_length())), tk, 64
  raise ValueError(f"pallas_kernels target={target!r} is unknown; allowed: ('tpu', 'gpu')")


def _forward(lhs, packed, scale, group_sizes, group_offset, target, interpret, out_dtype):
  from pallas_kernels.metadata import make_group_metadata
  m = lhs.shape[0]
  p_rows, n = packed.shape[1], packed.shape[2]
  tm, tk, tn = _tiling(target, m, _round_up(p_rows, 16) if target == "gpu" else p_rows, n,
                       lhs.dtype)
  mp, np_ = _round_up(m, tm), _round_up(n, tn)
  meta = make_group_metadata(group_sizes, mp, tm, group_offset=group_offset,
                             num_local=packed.shape[0])
  x = jnp.pad(lhs, ((0, mp - m), (0, 4 * p_rows - lhs.shape[1])))
  w = jnp.pad(packed, ((0, 0), (0, 0), (0, np_ - n)))
  p_kernel = _round_up(p_rows, 16) if target == "gpu" else p_rows
  if p_kernel != p_rows:         # zero lhs columns meet the padded planes' rows
    x = jnp.pad(x.reshape(mp, 4, p_rows), ((0, 0), (0, 0), (0, p_kernel - p_rows)))
    x = x.reshape(mp, 4 * p_kernel)
    w = jnp.pad(w, ((0, 0), (0, p_kernel - p_rows), (0, 0)))
  s = jnp.pad(scale.astype(jnp.float32).reshape(packed.shape[0], 1, n),
              ((0, 0), (0, 0), (0, np_ - n)))
  kernel = gmm_tpu if target == "tpu" else gmm_gpu
  out = kernel(x, w, s, meta, jnp.zeros((mp, np_), out_dtype), tm=tm, tk=tk, tn=tn,
               interpret=interpret)
  return out[:m, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _gmm_ternary(lhs, packed, scale, group_sizes, group_offset, target, interpret, out_dtype):
  return _forward(lhs, packed, scale, group_sizes, group_offset, target, interpret, out_dtype)


def _fwd(lhs, packed, scale, group_sizes, group_offset, target, interpret, out_dtype):
  out = _forward(lhs, packed, scale, group_sizes, group_offset, target, interpret, out_dtype)
  return out, (lhs, packed, scale, group_sizes, group_offset)


def _row_scales(scale, group_sizes, group_offset, num_rows: int):
  """[M, N] the column scales of each row's own group (rows outside the local groups get the
  nearest local group's: gmm zeroes those rows anyway)."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  gid = jnp.searchsorted(ends, jnp.arange(num_rows, dtype=jnp.int32), side="right")
  local = jnp.clip(gid - jnp.asarray(group_offset, jnp.int32), 0, scale.shape[0] - 1)
  return scale.reshape(scale.shape[0], -1)[local]


def _bwd(target, interpret, out_dtype, res, dout):
  """d_lhs = (dout * scale) @ W^T on the dense gmm kernel with the codes unpacked: the packed
  form is for inference, so codes and scales get no gradient."""
  from pallas_kernels.ops import gmm
  lhs, packed, scale, group_sizes, group_offset = res
  codes = unpack_planes(packed, lhs.shape[1]).astype(lhs.dtype)
  scaled = dout.astype(jnp.float32) * _row_scales(scale, group_sizes, group_offset,
                                                  dout.shape[0])
  # [M, N] @ codes[g]^T: codes [L, K, N] is the transposed-rhs layout ([L, N_out, K_in]).
  dlhs = gmm(scaled.astype(lhs.dtype), codes, group_sizes, transpose_rhs=True,
             group_offset=group_offset, target=target, interpret=interpret)
  return dlhs.astype(lhs.dtype), None, None, None, None


_gmm_ternary.defvjp(_fwd, _bwd)


def gmm_ternary(lhs: Array, packed: Array, scale: Array, group_sizes: Array, *, group_offset=0,
                preferred_element_type=None, target: str = "auto", interpret=False) -> Array:
  """Grouped matmul over packed ternary weights: out[i] = lhs[i] @ (W_g * scale_g) for rows of
  local groups (W_g = codes of ``packed[g]``, ``pack_planes`` layout; scale [L, N] or any shape
  with L * N values), 0 elsewhere. Differentiable in lhs."""
  from pallas_kernels.ops import default_target
  if packed.ndim != 3 or packed.dtype != jnp.uint8:
    raise ValueError(f"gmm_ternary: packed must be uint8 [L, P, N] (pack_planes), got "
                     f"{packed.dtype} {packed.shape}")
  if lhs.ndim != 2 or plane_rows(lhs.shape[1]) != packed.shape[1]:
    raise ValueError(f"gmm_ternary: lhs [M, K] with K={lhs.shape[-1]} needs planes of "
                     f"{plane_rows(lhs.shape[-1])} rows, packed has {packed.shape[1]}")
  if scale.size != packed.shape[0] * packed.shape[2]:
    raise ValueError(f"gmm_ternary: scale needs L * N = {packed.shape[0] * packed.shape[2]} "
                     f"values (one per group and output column), got shape {scale.shape}")
  target = default_target() if target == "auto" else target
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  return _gmm_ternary(lhs, packed, scale, group_sizes.astype(jnp.int32),
                      jnp.asarray(group_offset, jnp.int32), target, interpret, out_dtype)

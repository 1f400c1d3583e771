"""Grouped matmul over 2-bit packed ternary weights (MoTE's inference form), on every backend:

  gmm_ternary(lhs [M, K], packed [L, P, N] uint8, scale [L, N], group_sizes) -> [M, N]
      out[i] = lhs[i] @ (W_g * scale_g) for rows of local groups, 0 elsewhere,

with W_g the {-1, 0, 1} codes in ``pallas_kernels.ternary``'s K-planar layout (``pack_planes``).
Backends: "reference" unpacks every weight and runs the per-group reference; "ragged_dot"
unpacks every weight and runs ``jax.lax.ragged_dot`` on them; "xla" (the CPU
path) decodes each tile's weight inside the tile loop from the packed bytes
(the dense weights never exist in memory); "pallas" runs the kernels that decode tile by tile
in VMEM/shared memory. Differentiable in lhs (d_lhs = (dout * scale) @ W^T); codes and scales
are inference weights with no gradient.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels.ternary import decode_plane, plane_rows, unpack_planes
from moejax.ops.grouped_matmul import (_ragged_dot, _tiled_gmm, default_tile_m, gmm_reference,
                                       resolve_backend)

Array = jax.Array


def _dense(packed, scale, k):
  return unpack_planes(packed, k).astype(jnp.float32) * scale.reshape(packed.shape[0], 1, -1)


def _decoded(packed, scale, k):
  """weight_at(g): group g's [K, N] f32 weight, decoded from its packed planes."""
  def weight_at(g):
    w = packed[g]
    planes = jnp.concatenate([decode_plane(w, q, jnp.float32) for q in range(4)], axis=0)
    return planes[:k] * scale[g][None, :]
  return weight_at


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _xla(lhs, packed, scale, group_sizes, group_offset, tile_m):
  k, (l, _, n) = lhs.shape[1], packed.shape
  return _tiled_gmm(lhs, None, group_sizes, group_offset, tile_m, False, lhs.dtype,
                    weight_at=_decoded(packed, scale, k), shape=(l, n))


def _xla_fwd(lhs, packed, scale, group_sizes, group_offset, tile_m):
  return (_xla(lhs, packed, scale, group_sizes, group_offset, tile_m),
          (lhs, packed, scale, group_sizes, group_offset))


def _xla_bwd(tile_m, res, dout):
  lhs, packed, scale, group_sizes, group_offset = res
  k, l = lhs.shape[1], packed.shape[0]
  codes = unpack_planes(packed, k).astype(jnp.float32)          # [L, K, N]: rhs^T layout
  weight_at = lambda g: codes[g] * scale[g][None, :]
  dlhs = _tiled_gmm(dout, None, group_sizes, group_offset, tile_m, True, lhs.dtype,
                    weight_at=weight_at, shape=(l, k))
  return dlhs, None, None, None, None


_xla.defvjp(_xla_fwd, _xla_bwd)


def gmm_ternary(lhs: Array, packed: Array, scale: Array, group_sizes: Array, *,
                backend: str = "auto", group_offset=0, tile_m: int | None = None) -> Array:
  """See the module docstring. ``scale``: one value per (group, output column), any shape
  holding L * N values (MoTE's per-matrix scales broadcast over their columns)."""
  lhs, packed, group_sizes = jnp.asarray(lhs), jnp.asarray(packed), jnp.asarray(group_sizes)
  l, p_rows, n = packed.shape
  if packed.dtype != jnp.uint8 or plane_rows(lhs.shape[1]) != p_rows:
    raise ValueError(f"gmm_ternary: lhs K={lhs.shape[1]} needs packed uint8 planes of "
                     f"{plane_rows(lhs.shape[1])} rows (pallas_kernels.pack_planes), got "
                     f"{packed.dtype} {packed.shape}")
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32).reshape(l, -1), (l, n))
  backend = resolve_backend(backend)
  if backend == "pallas":
    on_cpu = jax.default_backend() == "cpu"   # the interpreter, TPU semantics (tests only)
    return pallas_kernels.gmm_ternary(lhs, packed, scale, group_sizes, group_offset=group_offset,
                                      target="tpu" if on_cpu else "auto", interpret=on_cpu)
  if backend == "xla":
    tile_m = tile_m or default_tile_m(lhs.shape[0], group_sizes.shape[0])
    return _xla(lhs, packed, scale, group_sizes.astype(jnp.int32),
                jnp.asarray(group_offset, jnp.int32), tile_m)
  dense = _dense(packed, scale, lhs.shape[1]).astype(lhs.dtype)
  if backend == "ragged_dot":
    return _ragged_dot(lhs, dense, group_sizes.astype(jnp.int32), group_offset=group_offset)
  if backend == "reference":
    return gmm_reference(lhs, dense, group_sizes.astype(jnp.int32), group_offset=group_offset)
  raise ValueError(f"gmm_ternary: backend {backend!r} has no ternary form; use 'auto', 'xla', "
                   "'pallas', 'ragged_dot' or 'reference'")

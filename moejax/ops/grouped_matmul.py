"""One grouped matmul for every expert layer: ``gmm(lhs, rhs, group_sizes, backend=...)``.

Contract (shared by every backend, so they are interchangeable):
  lhs [M, K] rows sorted by group; rhs [G, K, N]; group_sizes [G] int32 with sum <= M.
  out[i] = lhs[i] @ rhs[g(i)] for row i of group g; rows past sum(group_sizes) are 0.

Backends:
  "reference"  a per-group loop, obviously right, O(G) dense matmuls: the test oracle.
  "ragged_dot" ``jax.lax.ragged_dot``: native on GPU/TPU, but computes every group densely on CPU.
  "xla"        tiled: rows are cut into tiles of ``tile_m``; a small schedule lists the
               (tile, group) pairs that overlap (at most num_tiles + G - 1) and a loop runs one
               [tile_m, K] @ [K, N] matmul per pair. Custom VJP: d_lhs is the same op on the
               transposed weights, d_rhs is the transposed op ``tgmm``.
  "pallas"     the Pallas kernels of ``pallas_kernels/`` (Mosaic on TPU, Triton on GPU); on CPU
               they run in the Pallas interpreter (slow: for tests only).
  "auto"       "pallas" on TPU/GPU, "xla" on CPU.

New backends register with ``register_backend(name, fn)``; the MoE layer only ever calls ``gmm``.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels.metadata import GroupMetadata, make_group_metadata

Array = jax.Array

_BACKENDS: dict[str, Callable[..., Array]] = {}


def register_backend(name: str, fn: Callable[..., Array]) -> None:
  """Registers ``fn(lhs, rhs, group_sizes, *, tile_m) -> [M, N]`` under ``name``."""
  _BACKENDS[name] = fn


def backends() -> tuple[str, ...]:
  return tuple(sorted(_BACKENDS)) + ("auto",)


def resolve_backend(backend: str) -> str:
  if backend == "auto":
    platform = jax.default_backend()
    if platform == "cpu":
      return "xla"
    return "pallas"
  if backend not in _BACKENDS:
    raise ValueError(f"gmm backend={backend!r} is unknown; allowed: {backends()}")
  return backend


XLA_TILE_M = 128   # rows per tile of the "xla" backend (measured best on CPU)


def gmm(lhs: Array, rhs: Array, group_sizes: Array, *, backend: str = "auto",
        tile_m: int = XLA_TILE_M) -> Array:
  """Grouped matmul ``[M, K] x [G, K, N] -> [M, N]`` (see module docstring)."""
  if lhs.ndim != 2 or rhs.ndim != 3:
    raise ValueError(f"gmm expects lhs [M, K] and rhs [G, K, N]; got {lhs.shape} and {rhs.shape}")
  if lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"gmm contraction mismatch: lhs K={lhs.shape[1]}, rhs K={rhs.shape[1]}")
  if group_sizes.shape != (rhs.shape[0],):
    raise ValueError(f"gmm group_sizes shape {group_sizes.shape} != (G,)=({rhs.shape[0]},)")
  if tile_m <= 0:
    raise ValueError(f"gmm tile_m must be positive, got {tile_m}")
  return _BACKENDS[resolve_backend(backend)](
      lhs, rhs, group_sizes.astype(jnp.int32), tile_m=tile_m)


# ----------------------------------------------------------------------------- reference
def gmm_reference(lhs: Array, rhs: Array, group_sizes: Array, **_) -> Array:
  """Per-group loop: row i uses rhs[g] iff start_g <= i < end_g."""
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  rows = jnp.arange(lhs.shape[0])
  out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
  for g in range(rhs.shape[0]):
    mask = (rows >= starts[g]) & (rows < ends[g])
    y = jnp.dot(lhs, rhs[g], preferred_element_type=jnp.float32)
    out = out + jnp.where(mask[:, None], y, 0.0)
  return out.astype(lhs.dtype)


def _ragged_dot(lhs, rhs, group_sizes, **_):
  return jax.lax.ragged_dot(lhs, rhs, group_sizes)


# ----------------------------------------------------------------------------- tiled XLA path
def _row_mask(s: GroupMetadata, p, tile_m):
  rows = s.tile[p] * tile_m + jnp.arange(tile_m)
  g = s.group[p]
  return (rows >= s.starts[g]) & (rows < s.ends[g]) & s.valid[p]


def _pad_rows(x, tile_m):
  pad = (-x.shape[0]) % tile_m
  return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


def _f32(x):
  """XLA:CPU has no bf16 x bf16 -> f32 dot kernel: once a one-pair loop is simplified away, its
  dot runs as a lone DotThunk and fails ("Unsupported element type"). Its bf16 dots upcast to
  f32 internally anyway, so the CPU path computes in f32 and rounds the result once."""
  return x if x.dtype == jnp.float32 else x.astype(jnp.float32)


def _tiled_gmm(lhs, rhs, group_sizes, tile_m, transpose_rhs=False):
  out_dtype, lhs, rhs = lhs.dtype, _f32(lhs), _f32(rhs)
  m = lhs.shape[0]
  tile_m = min(tile_m, max(m, 1))
  s = make_group_metadata(group_sizes, m, tile_m)
  x = _pad_rows(lhs, tile_m)
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def body(p, out):
    r0 = s.tile[p] * tile_m
    xt = jax.lax.dynamic_slice_in_dim(x, r0, tile_m)
    y = jax.lax.dot_general(xt, rhs[s.group[p]], dims, preferred_element_type=jnp.float32)
    y = jnp.where(_row_mask(s, p, tile_m)[:, None], y, 0.0)
    # Read-modify-write: a tile shared by two groups gets both contributions. (Skipping the read
    # for unshared tiles with lax.cond measured slower on CPU.)
    cur = jax.lax.dynamic_slice_in_dim(out, r0, tile_m)
    return jax.lax.dynamic_update_slice_in_dim(out, cur + y, r0, axis=0)

  # Only the real pairs run (a dynamic trip count): padding pairs would be whole wasted tiles.
  out = jnp.zeros((x.shape[0], n), jnp.float32)
  out = jax.lax.fori_loop(0, s.num_valid, body, out)
  return out[:m].astype(out_dtype)


def tgmm(lhs: Array, grad: Array, group_sizes: Array, num_groups: int, *,
         tile_m: int = XLA_TILE_M) -> Array:
  """Transposed grouped matmul: out[g] = sum_{i in group g} lhs[i]^T grad[i] -> [G, K, N].

  Pairs of one group are consecutive in the schedule, so the loop accumulates the current
  group's [K, N] block in its carry and stores it once, at the group's last pair (measured
  ~10% faster on CPU than updating out[g] every tile). lhs is transposed once, not per tile.
  """
  m = lhs.shape[0]
  tile_m = min(tile_m, max(m, 1))
  s = make_group_metadata(group_sizes, m, tile_m)
  xt_all, dy = _pad_rows(_f32(lhs), tile_m).T, _pad_rows(_f32(grad), tile_m)

  def body(p, carry):
    acc, out = carry
    r0 = s.tile[p] * tile_m
    xt = jax.lax.dynamic_slice_in_dim(xt_all, r0, tile_m, axis=1)
    xt = jnp.where(_row_mask(s, p, tile_m)[None, :], xt, jnp.zeros((), xt.dtype))
    gt = jax.lax.dynamic_slice_in_dim(dy, r0, tile_m)
    acc = acc + jnp.dot(xt, gt, preferred_element_type=jnp.float32)
    g = s.group[p]
    last = (p == s.num_valid - 1) | (s.group[jnp.minimum(p + 1, s.num_pairs - 1)] != g)
    out = jax.lax.cond(last, lambda o: jax.lax.dynamic_update_index_in_dim(o, acc, g, 0),
                       lambda o: o, out)
    return jnp.where(last, 0.0, acc), out

  k, n = lhs.shape[1], grad.shape[1]
  init = (jnp.zeros((k, n), jnp.float32), jnp.zeros((num_groups, k, n), jnp.float32))
  return jax.lax.fori_loop(0, s.num_valid, body, init)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gmm_xla(lhs, rhs, group_sizes, tile_m=128):
  return _tiled_gmm(lhs, rhs, group_sizes, tile_m)


def _gmm_xla_fwd(lhs, rhs, group_sizes, tile_m):
  return _tiled_gmm(lhs, rhs, group_sizes, tile_m), (lhs, rhs, group_sizes)


def _gmm_xla_bwd(tile_m, res, dout):
  lhs, rhs, group_sizes = res
  dlhs = _tiled_gmm(dout, rhs, group_sizes, tile_m, transpose_rhs=True).astype(lhs.dtype)
  drhs = tgmm(lhs, dout, group_sizes, rhs.shape[0], tile_m=tile_m).astype(rhs.dtype)
  return dlhs, drhs, None


gmm_xla.defvjp(_gmm_xla_fwd, _gmm_xla_bwd)

register_backend("reference", gmm_reference)
register_backend("ragged_dot", _ragged_dot)


def _pallas(lhs, rhs, group_sizes, **_):
  if jax.default_backend() == "cpu":   # the interpreter, with TPU semantics (tests only)
    return pallas_kernels.gmm(lhs, rhs, group_sizes, target="tpu", interpret=True)
  return pallas_kernels.gmm(lhs, rhs, group_sizes)


register_backend("pallas", _pallas)
register_backend("xla", lambda lhs, rhs, gs, *, tile_m: gmm_xla(lhs, rhs, gs, tile_m))

"""One grouped matmul for every expert layer: ``gmm(lhs, rhs, group_sizes, backend=...)``.

Contract (shared by every backend, so they are interchangeable):
  lhs [M, K] rows sorted by group; group_sizes [G] int32 with sum <= M; rhs [L, K, N] holds
  groups group_offset .. group_offset + L - 1 (L = G, offset 0 unless expert-parallel).
  out[i] = lhs[i] @ rhs[g(i) - group_offset] for rows of those groups; all other rows are 0.
Options, with megablox's names and meanings, on every backend:
  transpose_rhs           rhs is [L, N, K]; row i uses rhs[g]^T.
  preferred_element_type  output dtype (default lhs.dtype); products accumulate in f32.
  existing_out            [M, N]: rows of the local groups are written, the others keep it.
  group_offset            first global group in rhs (int or traced int32).

Backends:
  "reference"  a per-group loop, obviously right, O(G) dense matmuls: the test oracle.
  "ragged_dot" ``jax.lax.ragged_dot``: native on GPU/TPU, but computes every group densely on CPU.
  "xla"        tiled: each group's rows are cut into tiles of ``tile_m`` starting at the group's
               first row (default tile: ``default_tile_m``, sized to the mean group); a loop
               runs one [tile_m, K] @ [K, N] matmul per tile. Custom VJP: d_lhs is the same
               op on the transposed weights, d_rhs is the transposed op ``tgmm``.
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
from pallas_kernels.metadata import GroupTiles, local_rows, make_group_tiles

Array = jax.Array

_BACKENDS: dict[str, Callable[..., Array]] = {}


def register_backend(name: str, fn: Callable[..., Array]) -> None:
  """Registers ``fn(lhs, rhs, group_sizes, *, tile_m, group_offset, transpose_rhs, out_dtype)
  -> [M, N]`` under ``name``: rows outside the local groups must be 0 (``gmm`` merges
  ``existing_out`` itself; a backend that can write into it natively registers
  ``fn.existing_out = True`` and also receives ``existing_out=``)."""
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


XLA_TILE_M = 128   # largest row tile of the "xla" backend (measured best on CPU for big groups)


def default_tile_m(num_rows: int, num_groups: int) -> int:
  """Row tile of the "xla" backend: the largest power of two <= the mean rows per group, in
  [32, XLA_TILE_M]. A tile much larger than a group is mostly masked rows computed for nothing
  (each boundary tile is visited once per group in it); measured fwd+bwd of the whole layer on
  CPU (experiments/bench_moe.py sweep): 64 rows/group: tile 64 1.5x faster than 128; 48 rows/group
  (fine-grained, T=512): tile 32 2x faster; 384-512 rows/group: 128 within 7% of the best."""
  mean = max(num_rows // max(num_groups, 1), 1)
  return max(32, min(XLA_TILE_M, 1 << (mean.bit_length() - 1)))


def gmm(lhs: Array, rhs: Array, group_sizes: Array, *, backend: str = "auto",
        tile_m: int | None = None, group_offset=0, transpose_rhs: bool = False,
        preferred_element_type=None, existing_out: Array | None = None) -> Array:
  """Grouped matmul ``[M, K] x [L, K, N] -> [M, N]`` (see module docstring)."""
  lhs, rhs, group_sizes = jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes)
  if lhs.ndim != 2 or rhs.ndim != 3:
    raise ValueError(f"gmm expects lhs [M, K] and rhs [L, K, N]; got {lhs.shape} and {rhs.shape}")
  k_rhs, n = (rhs.shape[2], rhs.shape[1]) if transpose_rhs else (rhs.shape[1], rhs.shape[2])
  if lhs.shape[1] != k_rhs:
    raise ValueError(f"gmm contraction mismatch: lhs K={lhs.shape[1]}, rhs K={k_rhs}"
                     f"{' (rhs is [L, N, K] with transpose_rhs)' if transpose_rhs else ''}")
  num_local = rhs.shape[0]
  if group_sizes.ndim != 1 or group_sizes.shape[0] < num_local:
    raise ValueError(f"gmm group_sizes shape {group_sizes.shape}: expected (G,) with G >= the "
                     f"{num_local} groups of rhs")
  if isinstance(group_offset, int) and not 0 <= group_offset <= group_sizes.shape[0] - num_local:
    raise ValueError(f"gmm group_offset={group_offset} with {num_local} local groups must lie in "
                     f"[0, {group_sizes.shape[0] - num_local}]")
  if existing_out is not None and existing_out.shape != (lhs.shape[0], n):
    raise ValueError(f"gmm existing_out must have the output shape {(lhs.shape[0], n)}, got "
                     f"{existing_out.shape}")
  tile_m = default_tile_m(lhs.shape[0], group_sizes.shape[0]) if tile_m is None else tile_m
  if tile_m <= 0:
    raise ValueError(f"gmm tile_m must be positive, got {tile_m}")
  fn = _BACKENDS[resolve_backend(backend)]
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  group_sizes = group_sizes.astype(jnp.int32)
  kw = dict(tile_m=tile_m, group_offset=group_offset, transpose_rhs=bool(transpose_rhs),
            out_dtype=out_dtype)
  if existing_out is not None and getattr(fn, "existing_out", False):
    return fn(lhs, rhs, group_sizes, existing_out=existing_out, **kw)
  out = fn(lhs, rhs, group_sizes, **kw)
  if existing_out is None:
    return out
  keep = ~local_rows(group_sizes, lhs.shape[0], group_offset, num_local)
  return out + jnp.where(keep[:, None], existing_out.astype(out_dtype), jnp.zeros((), out_dtype))


# ----------------------------------------------------------------------------- reference
def _as_kn(rhs, transpose_rhs):
  return jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs


def gmm_reference(lhs: Array, rhs: Array, group_sizes: Array, *, group_offset=0,
                  transpose_rhs=False, out_dtype=None, **_) -> Array:
  """Per-group loop: row i uses local group j iff start_(offset+j) <= i < end_(offset+j)."""
  rhs = _as_kn(rhs, transpose_rhs)
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  rows = jnp.arange(lhs.shape[0])
  out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
  for j in range(rhs.shape[0]):
    g = group_offset + j
    mask = (rows >= starts[g]) & (rows < ends[g])
    y = jnp.dot(lhs, rhs[j], preferred_element_type=jnp.float32)
    out = out + jnp.where(mask[:, None], y, 0.0)
  return out.astype(out_dtype or lhs.dtype)


def _ragged_dot(lhs, rhs, group_sizes, *, group_offset=0, transpose_rhs=False, out_dtype=None,
                **_):
  """``jax.lax.ragged_dot`` has no group offset: the local groups' rows are rolled to the top,
  multiplied with the local sizes (later rows come back 0) and rolled back."""
  rhs = _as_kn(rhs, transpose_rhs)
  out_dtype = out_dtype or lhs.dtype
  num_local = rhs.shape[0]
  if num_local == group_sizes.shape[0] and isinstance(group_offset, int) and group_offset == 0:
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=out_dtype)
  ends = jnp.cumsum(group_sizes)
  off = jnp.asarray(group_offset, jnp.int32)
  first = jnp.where(off > 0, ends[jnp.maximum(off - 1, 0)], 0)
  local = jax.lax.dynamic_slice_in_dim(group_sizes, off, num_local)
  out = jax.lax.ragged_dot(jnp.roll(lhs, -first, axis=0), rhs, local,
                           preferred_element_type=out_dtype)
  out = jnp.roll(out, first, axis=0)
  keep = local_rows(group_sizes, lhs.shape[0], off, num_local)
  return jnp.where(keep[:, None], out, jnp.zeros((), out_dtype))


# ----------------------------------------------------------------------------- tiled XLA path
def tile_window(s: GroupTiles, p, tile_m, num_rows):
  """(first row of the slice, [tile_m] mask of the rows tile p owns). The last tiles are
  slid back to end at row M (no padded copy of the operands); rows before the tile's own
  start then belong to earlier tiles and are masked, as are rows past its group's end."""
  r0 = jnp.minimum(s.row[p], num_rows - tile_m)
  rows = r0 + jnp.arange(tile_m)
  return r0, (rows >= s.row[p]) & (rows < s.ends[s.group[p]])


def _f32(x):
  """XLA:CPU has no bf16 x bf16 -> f32 dot kernel: once a one-pair loop is simplified away, its
  dot runs as a lone DotThunk and fails ("Unsupported element type"). Its bf16 dots upcast to
  f32 internally anyway, so the CPU path computes in f32 and rounds the result once."""
  return x if x.dtype == jnp.float32 else x.astype(jnp.float32)


def _tiled_gmm(lhs, rhs, group_sizes, group_offset, tile_m, transpose_rhs, out_dtype,
               weight_at=None, shape=None):
  """The tile loop over group-anchored tiles (``make_group_tiles``: a group of n rows costs
  ceil(n / tile_m) tiles; measured 4-12% faster than the aligned schedule's one extra tile per
  group boundary, under multinomial routing). ``weight_at(g) -> [K, N]`` with
  ``shape=(L, N)`` replaces ``rhs[g]`` (a weight built per tile, e.g. decoded from packed
  codes: ops/ternary_matmul.py)."""
  lhs = _f32(lhs)
  if weight_at is None:
    rhs = _f32(rhs)
    weight_at, shape = (lambda g: rhs[g]), (rhs.shape[0], rhs.shape[1] if transpose_rhs
                                             else rhs.shape[2])
  m, n = lhs.shape[0], shape[1]
  if m == 0:
    return jnp.zeros((0, n), out_dtype)
  tile_m = min(tile_m, m)
  s = make_group_tiles(group_sizes, m, tile_m, group_offset=group_offset, num_local=shape[0])
  dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def product(r0, p):
    xt = jax.lax.dynamic_slice_in_dim(lhs, r0, tile_m)
    return jax.lax.dot_general(xt, weight_at(s.group[p]), dims,
                               preferred_element_type=jnp.float32)

  def whole_tile(p, out):
    # Stored whole, without mask or read: rows past the group's end belong to later tiles in
    # row order, which overwrite them (measured 0.67x -> 0.76x dense for the forward gmm at
    # D=2048 under Zipf routing, against a masked read-modify-write of the last tiles).
    r0 = s.row[p]
    return jax.lax.dynamic_update_slice_in_dim(out, product(r0, p), r0, axis=0)

  def end_tile(p, out):   # slid back to end at row M: only its own rows are replaced
    r0, mask = tile_window(s, p, tile_m, m)
    cur = jax.lax.dynamic_slice_in_dim(out, r0, tile_m)
    y = jnp.where(mask[:, None], product(r0, p), cur)
    return jax.lax.dynamic_update_slice_in_dim(out, y, r0, axis=0)

  # Dynamic trip counts: only real tiles run. Tiles that fit before row M are a prefix in row
  # order; the few slid-back ones at the end follow.
  in_range = (s.row <= m - tile_m) & (jnp.arange(s.row.shape[0]) < s.num_valid)
  num_whole = jnp.sum(in_range).astype(jnp.int32)
  out = jax.lax.fori_loop(0, num_whole, whole_tile, jnp.zeros((m, n), jnp.float32))
  out = jax.lax.fori_loop(num_whole, s.num_valid, end_tile, out)
  # Rows after the last local group are 0: clear what its last tile wrote past its end.
  end = s.ends[-1]
  r0 = jnp.minimum(end, m - tile_m)
  keep = (r0 + jnp.arange(tile_m) < end)[:, None]
  cur = jax.lax.dynamic_slice_in_dim(out, r0, tile_m)
  out = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(keep, cur, 0.0), r0, axis=0)
  return out.astype(out_dtype)


def tgmm(lhs: Array, grad: Array, group_sizes: Array, num_groups: int, *,
         tile_m: int | None = None, group_offset=0, preferred_element_type=jnp.float32,
         existing_out: Array | None = None) -> Array:
  """Transposed grouped matmul on the CPU path: out[j] = existing_out[j] (or 0) +
  sum over rows i of group group_offset + j of lhs[i]^T grad[i] -> [num_groups, K, N].

  A group's tiles are consecutive (``make_group_tiles``), so the loop sums the current group's
  [K, N] block in its carry and stores it once, at the group's last tile (measured ~10% faster
  on CPU than updating out[g] every tile); rows outside a tile's own are masked in lhs. lhs is
  transposed once.
  """
  m, k, n = lhs.shape[0], lhs.shape[1], grad.shape[1]
  out = jnp.zeros((num_groups, k, n), jnp.float32)
  tile_m = default_tile_m(m, group_sizes.shape[0]) if tile_m is None else tile_m
  tile_m = min(tile_m, m)
  if m > 0:
    s = make_group_tiles(group_sizes.astype(jnp.int32), m, tile_m, group_offset=group_offset,
                         num_local=num_groups)
    xt_all, dy = _f32(lhs).T, _f32(grad)

    def body(p, carry):   # a group's tiles are consecutive: sum them in the carry
      acc, out = carry
      r0, mask = tile_window(s, p, tile_m, m)
      xt = jax.lax.dynamic_slice_in_dim(xt_all, r0, tile_m, axis=1)
      xt = jnp.where(mask[None, :], xt, jnp.zeros((), xt.dtype))
      gt = jax.lax.dynamic_slice_in_dim(dy, r0, tile_m)
      acc = acc + jnp.dot(xt, gt, preferred_element_type=jnp.float32)
      g = s.group[p]
      last = (p == s.num_valid - 1) | (s.group[jnp.minimum(p + 1, s.row.shape[0] - 1)] != g)
      out = jax.lax.cond(last, lambda o: jax.lax.dynamic_update_index_in_dim(o, acc, g, 0),
                         lambda o: o, out)
      return jnp.where(last, 0.0, acc), out

    init = (jnp.zeros((k, n), jnp.float32), out)
    out = jax.lax.fori_loop(0, s.num_valid, body, init)[1]
  if existing_out is not None:
    out = out + existing_out.astype(jnp.float32)
  return out.astype(preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def gmm_xla(lhs, rhs, group_sizes, group_offset=0, tile_m=XLA_TILE_M, transpose_rhs=False,
            out_dtype=None):
  return _tiled_gmm(lhs, rhs, group_sizes, group_offset, tile_m, transpose_rhs,
                    out_dtype or lhs.dtype)


def _gmm_xla_fwd(lhs, rhs, group_sizes, group_offset, tile_m, transpose_rhs, out_dtype):
  out = _tiled_gmm(lhs, rhs, group_sizes, group_offset, tile_m, transpose_rhs,
                   out_dtype or lhs.dtype)
  return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_xla_bwd(tile_m, transpose_rhs, out_dtype, res, dout):
  lhs, rhs, group_sizes, group_offset = res
  dlhs = _tiled_gmm(dout, rhs, group_sizes, group_offset, tile_m, not transpose_rhs, lhs.dtype)
  a, b = (dout, lhs) if transpose_rhs else (lhs, dout)
  drhs = tgmm(a, b, group_sizes, rhs.shape[0], tile_m=tile_m, group_offset=group_offset,
              preferred_element_type=rhs.dtype)
  return dlhs, drhs, None, None


gmm_xla.defvjp(_gmm_xla_fwd, _gmm_xla_bwd)

register_backend("reference", gmm_reference)
register_backend("ragged_dot", _ragged_dot)


def _pallas(lhs, rhs, group_sizes, *, group_offset=0, transpose_rhs=False, out_dtype=None,
            existing_out=None, **_):
  kw = dict(group_offset=group_offset, transpose_rhs=transpose_rhs,
            preferred_element_type=out_dtype, existing_out=existing_out)
  if jax.default_backend() == "cpu":   # the interpreter, with TPU semantics (tests only)
    return pallas_kernels.gmm(lhs, rhs, group_sizes, target="tpu", interpret=True, **kw)
  return pallas_kernels.gmm(lhs, rhs, group_sizes, **kw)


_pallas.existing_out = True   # the kernels write into the buffer (aliased), no extra pass
register_backend("pallas", _pallas)
register_backend("xla", lambda lhs, rhs, gs, *, tile_m, group_offset, transpose_rhs, out_dtype:
                 gmm_xla(lhs, rhs, gs, group_offset, tile_m, transpose_rhs, out_dtype))

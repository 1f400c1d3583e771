"""Differentiable grouped matmul on Pallas kernels: ``gmm`` (forward and d_lhs) + ``tgmm`` (d_rhs).

  gmm(lhs [M, K], rhs [L, K, N], group_sizes [G]) -> [M, N]
      out[i] = lhs[i] @ rhs[g(i) - group_offset] for rows of local groups
      group_offset .. group_offset + L - 1; every other row (other shards' groups, rows past
      sum(group_sizes)) is 0, or existing_out's row when one is given.
  tgmm(lhs [M, K], grad [M, N], group_sizes) -> [L, K, N]
      out[g] = existing_out[g] (or 0) + sum over rows i of local group g of lhs[i]^T grad[i].

Options as in megablox: ``preferred_element_type`` (output dtype; accumulation is f32),
``transpose_rhs`` (rhs [L, N, K]), ``existing_out``, ``group_offset``.

The VJP of gmm is d_lhs = gmm(d_out, rhs^T) (the kernel reads rhs transposed, nothing is
materialised) and d_rhs = tgmm(lhs, d_out) (tgmm(d_out, lhs) for a transposed rhs). Rows must
be sorted by group and sum(group_sizes) <= M (a data-dependent precondition, not checked under
jit).

Shapes need not be tile-aligned: inputs are zero-padded to the tile grid here and the result
sliced back, which costs a copy only when a dimension is not a multiple of its tile. Tile sizes
default per target (``default_tiling``); any (tm, tk, tn) that the target accepts gives the same
result, so tuning never changes correctness.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import gpu, tpu
from pallas_kernels.metadata import local_rows, make_group_metadata

Array = jax.Array
TARGETS = ("tpu", "gpu")
_KERNELS = {"tpu": tpu, "gpu": gpu}


@dataclasses.dataclass(frozen=True)
class Tiling:
  tm: int
  tk: int
  tn: int


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pow2_at_least(x: int, lo: int = 16) -> int:
  return max(lo, 1 << (max(x, 1) - 1).bit_length())


def default_tiling(target: str, m: int, k: int, n: int, dtype) -> Tiling:
  """Good defaults per target; small dimensions get one (padded) tile instead of a big one.

  TPU: row tiles of 128 (sublane multiple of 8/16), K/N tiles of 512 (4 MXU passes) or the
  whole dimension when it is smaller. GPU (Triton): 64x64x64 tiles, powers of two for tl.dot.
  """
  sub = 16 if jnp.dtype(dtype).itemsize == 2 else 8
  if target == "tpu":
    tm = min(128, _round_up(m, sub))
    pick = lambda d: d if d <= 512 else next((t for t in (512, 256, 128) if d % t == 0), 512)
    return Tiling(tm, pick(k), pick(n))
  if target == "gpu":
    return Tiling(min(64, _pow2_at_least(m)), min(64, _pow2_at_least(k)),
                  min(64, _pow2_at_least(n)))
  raise ValueError(f"pallas_kernels target={target!r} is unknown; allowed: {TARGETS}")


def default_target() -> str:
  platform = jax.default_backend()
  if platform == "tpu":
    return "tpu"
  if platform in ("gpu", "cuda", "rocm"):
    return "gpu"
  raise ValueError(f"Pallas grouped-matmul kernels run on TPU or GPU, not {platform!r}: pass "
                   f"target='tpu'|'gpu' with interpret=True to run them in the interpreter")


def _pad_to(x: Array, shape) -> Array:
  pads = [(0, s - d) for d, s in zip(x.shape, shape)]
  return jnp.pad(x, pads) if any(p for _, p in pads) else x


@dataclasses.dataclass(frozen=True)
class _Config:
  target: str
  tiling: Tiling | None
  interpret: object        # False, True, or a hashable interpreter config (pltpu.InterpretParams)
  transpose_rhs: bool = False
  out_dtype: object = None


def _tiles(cfg: _Config, m, k, n, dtype) -> Tiling:
  return cfg.tiling or default_tiling(cfg.target, m, k, n, dtype)


def _gmm_impl(lhs, rhs, group_sizes, group_offset, existing, cfg: _Config, transpose_rhs: bool,
              out_dtype):
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  t = _tiles(cfg, m, k, n, lhs.dtype)
  mp, kp, np_ = _round_up(m, t.tm), _round_up(k, t.tk), _round_up(n, t.tn)
  rhs_shape = (rhs.shape[0], np_, kp) if transpose_rhs else (rhs.shape[0], kp, np_)
  meta = make_group_metadata(group_sizes, mp, t.tm, group_offset=group_offset,
                             num_local=rhs.shape[0])
  existing = (jnp.zeros((mp, np_), out_dtype) if existing is None
              else _pad_to(existing.astype(out_dtype), (mp, np_)))
  out = _KERNELS[cfg.target].gmm(_pad_to(lhs, (mp, kp)), _pad_to(rhs.astype(lhs.dtype), rhs_shape),
                                 meta, existing, tm=t.tm, tk=t.tk, tn=t.tn,
                                 transpose_rhs=transpose_rhs, interpret=cfg.interpret)
  return out[:m, :n]


def _tgmm_impl(lhs, grad, group_sizes, group_offset, num_local, existing, out_dtype,
               cfg: _Config):
  m, k = lhs.shape
  n = grad.shape[1]
  t = _tiles(cfg, m, k, n, lhs.dtype)
  mp, kp, np_ = _round_up(m, t.tm), _round_up(k, t.tk), _round_up(n, t.tn)
  meta = make_group_metadata(group_sizes, mp, t.tm, group_offset=group_offset,
                             num_local=num_local)
  existing = (jnp.zeros((num_local, kp, np_), out_dtype) if existing is None
              else _pad_to(existing.astype(out_dtype), (num_local, kp, np_)))
  out = _KERNELS[cfg.target].tgmm(_pad_to(lhs, (mp, kp)), _pad_to(grad.astype(lhs.dtype), (mp, np_)),
                                  meta, existing, tm=t.tm, tk=t.tk, tn=t.tn,
                                  interpret=cfg.interpret)
  return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gmm(lhs, rhs, group_sizes, group_offset, existing, cfg):
  return _gmm_impl(lhs, rhs, group_sizes, group_offset, existing, cfg, cfg.transpose_rhs,
                   cfg.out_dtype)


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, existing, cfg):
  out = _gmm_impl(lhs, rhs, group_sizes, group_offset, existing, cfg, cfg.transpose_rhs,
                  cfg.out_dtype)
  return out, (lhs, rhs, group_sizes, group_offset, existing)


def _gmm_bwd(cfg, res, dout):
  """d_lhs = gmm(dout, rhs) with the other orientation of rhs; d_rhs = tgmm (lhs^T dout, or
  dout^T lhs for a transposed rhs); d_existing = dout on the rows the product did not write.
  The cotangent is cast to the input dtype first (bf16 in, f32 out: the backward matmuls run in
  bf16 with f32 accumulation, like the forward)."""
  lhs, rhs, group_sizes, group_offset, existing = res
  d = dout.astype(lhs.dtype)
  dlhs = _gmm_impl(d, rhs, group_sizes, group_offset, None, cfg, not cfg.transpose_rhs,
                   lhs.dtype)
  a, b = (d, lhs) if cfg.transpose_rhs else (lhs, d)
  drhs = _tgmm_impl(a, b, group_sizes, group_offset, rhs.shape[0], None, rhs.dtype, cfg)
  dexisting = None
  if existing is not None:
    keep = ~local_rows(group_sizes, lhs.shape[0], group_offset, rhs.shape[0])
    dexisting = jnp.where(keep[:, None], dout, 0).astype(existing.dtype)
  return dlhs, drhs, None, None, dexisting


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _config(target, tiling, interpret, **kw) -> _Config:
  target = default_target() if target == "auto" and not interpret else target
  if target == "auto":
    raise ValueError("pallas_kernels: interpret=True needs an explicit target='tpu'|'gpu'")
  if target not in TARGETS:
    raise ValueError(f"pallas_kernels target={target!r} is unknown; allowed: {TARGETS}")
  if tiling is not None and not isinstance(tiling, Tiling):
    tiling = Tiling(*tiling)
  return _Config(target, tiling, interpret, **kw)


def _check(name, lhs, k_rhs, group_sizes, num_local, group_offset):
  if lhs.ndim != 2:
    raise ValueError(f"pallas_kernels.{name}: lhs must be [M, K], got shape {lhs.shape}")
  if lhs.shape[1] != k_rhs:
    raise ValueError(f"pallas_kernels.{name}: contraction mismatch, lhs K={lhs.shape[1]} "
                     f"vs rhs K={k_rhs}")
  if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"pallas_kernels.{name}: group_sizes must be a 1-D integer array, got "
                     f"{group_sizes.dtype}{list(group_sizes.shape)}")
  if num_local > group_sizes.shape[0]:
    raise ValueError(f"pallas_kernels.{name}: rhs holds {num_local} groups but group_sizes "
                     f"lists only {group_sizes.shape[0]}")
  if isinstance(group_offset, int) and not 0 <= group_offset <= group_sizes.shape[0] - num_local:
    raise ValueError(f"pallas_kernels.{name}: group_offset={group_offset} with {num_local} local "
                     f"groups must lie in [0, {group_sizes.shape[0] - num_local}]")


def _check_existing(name, existing_out, shape):
  if existing_out is not None and tuple(existing_out.shape) != tuple(shape):
    raise ValueError(f"pallas_kernels.{name}: existing_out must have the output shape {shape}, "
                     f"got {existing_out.shape}")


def gmm(lhs: Array, rhs: Array, group_sizes: Array, *, preferred_element_type=None,
        transpose_rhs: bool = False, existing_out: Array | None = None, group_offset=0,
        target: str = "auto", tiling: Tiling | tuple[int, int, int] | None = None,
        interpret=False) -> Array:
  """Grouped matmul [M, K] x [L, K, N] -> [M, N] (see module docstring); differentiable.

  Args (megablox's names and meanings):
    preferred_element_type: output dtype (default lhs.dtype); accumulation is always f32, so
      bf16 inputs with ``jnp.float32`` give an f32 result without a bf16 rounding.
    transpose_rhs: rhs is [L, N, K] and row i uses rhs[g]^T (read transposed, not copied).
    existing_out: [M, N] buffer; rows of the local groups are written, every other row keeps
      its value, so the expert shards of an expert-parallel layer can fill one buffer in turn.
      Differentiable: its cotangent is dout on the rows it kept.
    group_offset: first global group held in rhs (expert-parallel shard); an int or a traced
      int32 scalar.
  """
  if rhs.ndim != 3:
    raise ValueError(f"pallas_kernels.gmm: rhs must be [L, K, N] ([L, N, K] with transpose_rhs), "
                     f"got shape {rhs.shape}")
  k_rhs, n = (rhs.shape[2], rhs.shape[1]) if transpose_rhs else (rhs.shape[1], rhs.shape[2])
  _check("gmm", lhs, k_rhs, group_sizes, rhs.shape[0], group_offset)
  _check_existing("gmm", existing_out, (lhs.shape[0], n))
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  cfg = _config(target, tiling, interpret, transpose_rhs=bool(transpose_rhs), out_dtype=out_dtype)
  return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), jnp.asarray(group_offset, jnp.int32),
              existing_out, cfg)


def tgmm(lhs: Array, grad: Array, group_sizes: Array, *, num_local: int | None = None,
         group_offset=0, preferred_element_type=None, existing_out: Array | None = None,
         target: str = "auto", tiling: Tiling | tuple[int, int, int] | None = None,
         interpret=False) -> Array:
  """Transposed grouped matmul: [M, K], [M, N] -> [L, K, N] (L = num_local, default G).

  existing_out [L, K, N] is added to (gradient accumulation across micro-batches or shards);
  preferred_element_type is the output dtype (default lhs.dtype), accumulation f32.
  """
  num_local = group_sizes.shape[0] if num_local is None else num_local
  _check("tgmm", lhs, lhs.shape[-1], group_sizes, num_local, group_offset)
  if grad.ndim != 2 or grad.shape[0] != lhs.shape[0]:
    raise ValueError(f"pallas_kernels.tgmm: grad must be [M={lhs.shape[0]}, N], got {grad.shape}")
  _check_existing("tgmm", existing_out, (num_local, lhs.shape[1], grad.shape[1]))
  cfg = _config(target, tiling, interpret)
  return _tgmm_impl(lhs, grad, group_sizes.astype(jnp.int32),
                    jnp.asarray(group_offset, jnp.int32), num_local, existing_out,
                    jnp.dtype(preferred_element_type or lhs.dtype), cfg)

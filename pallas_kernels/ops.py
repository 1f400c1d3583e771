"""Differentiable grouped matmul on Pallas kernels: ``gmm`` (forward and d_lhs) + ``tgmm`` (d_rhs).

  gmm(lhs [M, K], rhs [L, K, N], group_sizes [G]) -> [M, N]
      out[i] = lhs[i] @ rhs[g(i) - group_offset] for rows of local groups
      group_offset .. group_offset + L - 1; every other row (other shards' groups, rows past
      sum(group_sizes)) is 0.
  tgmm(lhs [M, K], grad [M, N], group_sizes) -> [L, K, N]
      out[g] = sum over rows i of local group g of lhs[i]^T grad[i].

The VJP of gmm is d_lhs = gmm(d_out, rhs^T) (the kernel reads rhs transposed, nothing is
materialised) and d_rhs = tgmm(lhs, d_out). Rows must be sorted by group and sum(group_sizes)
<= M (a data-dependent precondition, not checked under jit).

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
from pallas_kernels.metadata import make_group_metadata

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


def _tiles(cfg: _Config, m, k, n, dtype) -> Tiling:
  return cfg.tiling or default_tiling(cfg.target, m, k, n, dtype)


def _gmm_impl(lhs, rhs, group_sizes, group_offset, cfg: _Config, transpose_rhs: bool):
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  t = _tiles(cfg, m, k, n, lhs.dtype)
  mp, kp, np_ = _round_up(m, t.tm), _round_up(k, t.tk), _round_up(n, t.tn)
  rhs_shape = (rhs.shape[0], np_, kp) if transpose_rhs else (rhs.shape[0], kp, np_)
  meta = make_group_metadata(group_sizes, mp, t.tm, group_offset=group_offset,
                             num_local=rhs.shape[0])
  out = _KERNELS[cfg.target].gmm(_pad_to(lhs, (mp, kp)), _pad_to(rhs.astype(lhs.dtype), rhs_shape),
                                 meta, tm=t.tm, tk=t.tk, tn=t.tn, transpose_rhs=transpose_rhs,
                                 interpret=cfg.interpret)
  return out[:m, :n]


def _tgmm_impl(lhs, grad, group_sizes, group_offset, num_local, out_dtype, cfg: _Config):
  m, k = lhs.shape
  n = grad.shape[1]
  t = _tiles(cfg, m, k, n, lhs.dtype)
  mp, kp, np_ = _round_up(m, t.tm), _round_up(k, t.tk), _round_up(n, t.tn)
  meta = make_group_metadata(group_sizes, mp, t.tm, group_offset=group_offset,
                             num_local=num_local)
  out = _KERNELS[cfg.target].tgmm(_pad_to(lhs, (mp, kp)), _pad_to(grad.astype(lhs.dtype), (mp, np_)),
                                  meta, num_local=num_local, out_dtype=out_dtype, tm=t.tm,
                                  tk=t.tk, tn=t.tn, interpret=cfg.interpret)
  return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm(lhs, rhs, group_sizes, group_offset, cfg):
  return _gmm_impl(lhs, rhs, group_sizes, group_offset, cfg, transpose_rhs=False)


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, cfg):
  out = _gmm_impl(lhs, rhs, group_sizes, group_offset, cfg, transpose_rhs=False)
  return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(cfg, res, dout):
  lhs, rhs, group_sizes, group_offset = res
  dlhs = _gmm_impl(dout, rhs, group_sizes, group_offset, cfg, transpose_rhs=True)
  drhs = _tgmm_impl(lhs, dout, group_sizes, group_offset, rhs.shape[0], rhs.dtype, cfg)
  return dlhs.astype(lhs.dtype), drhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _config(target, tiling, interpret) -> _Config:
  target = default_target() if target == "auto" and not interpret else target
  if target == "auto":
    raise ValueError("pallas_kernels: interpret=True needs an explicit target='tpu'|'gpu'")
  if target not in TARGETS:
    raise ValueError(f"pallas_kernels target={target!r} is unknown; allowed: {TARGETS}")
  if tiling is not None and not isinstance(tiling, Tiling):
    tiling = Tiling(*tiling)
  return _Config(target, tiling, interpret)


def _check(lhs, k_rhs, group_sizes):
  if lhs.ndim != 2:
    raise ValueError(f"pallas_kernels.gmm: lhs must be [M, K], got shape {lhs.shape}")
  if lhs.shape[1] != k_rhs:
    raise ValueError(f"pallas_kernels.gmm: contraction mismatch, lhs K={lhs.shape[1]} "
                     f"vs rhs K={k_rhs}")
  if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"pallas_kernels.gmm: group_sizes must be a 1-D integer array, got "
                     f"{group_sizes.dtype}{list(group_sizes.shape)}")


def gmm(lhs: Array, rhs: Array, group_sizes: Array, *, group_offset=0, target: str = "auto",
        tiling: Tiling | tuple[int, int, int] | None = None, interpret=False) -> Array:
  """Grouped matmul [M, K] x [L, K, N] -> [M, N] (see module docstring); differentiable."""
  if rhs.ndim != 3:
    raise ValueError(f"pallas_kernels.gmm: rhs must be [L, K, N], got shape {rhs.shape}")
  _check(lhs, rhs.shape[1], group_sizes)
  if rhs.shape[0] > group_sizes.shape[0]:
    raise ValueError(f"pallas_kernels.gmm: rhs holds {rhs.shape[0]} groups but group_sizes "
                     f"lists only {group_sizes.shape[0]}")
  cfg = _config(target, tiling, interpret)
  return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), jnp.asarray(group_offset, jnp.int32), cfg)


def tgmm(lhs: Array, grad: Array, group_sizes: Array, *, num_local: int | None = None,
         group_offset=0, target: str = "auto",
         tiling: Tiling | tuple[int, int, int] | None = None, interpret=False) -> Array:
  """Transposed grouped matmul: [M, K], [M, N] -> [L, K, N] (L = num_local, default G)."""
  _check(lhs, lhs.shape[-1], group_sizes)
  if grad.ndim != 2 or grad.shape[0] != lhs.shape[0]:
    raise ValueError(f"pallas_kernels.tgmm: grad must be [M={lhs.shape[0]}, N], got {grad.shape}")
  num_local = group_sizes.shape[0] if num_local is None else num_local
  cfg = _config(target, tiling, interpret)
  return _tgmm_impl(lhs, grad, group_sizes.astype(jnp.int32),
                    jnp.asarray(group_offset, jnp.int32), num_local, lhs.dtype, cfg)

"""Grouped SwiGLU experts in one op of tile loops (CPU path): ``grouped_swiglu``.

  out[i] = swiglu(xs[i] @ wi[g(i)]) @ wo[g(i)]     (rows of no listed group: 0)

where the experts come as classes ``((wi_c, wo_c), ...)`` of consecutive groups starting at
``offsets[c]``, each class one hidden size (wi_c [L_c, D, 2, H_c] gate and up, wo_c [L_c, H_c,
D]): the heterogeneous bank passes one class per run of same-size experts, a homogeneous bank
one class.

Two grouped matmuls (``ops/grouped_matmul.py``) compute one class through an [M, 2H]
intermediate that covers every row, zeros included; with several sizes that is one [M, .] pass
(buffer, mask, sum) per size, the cost that grows with the number of sizes. Here each row tile
of a class's group runs up-projection, activation and down-projection back to back and writes
its own rows of the one output, so a class costs its own tiles only, and nothing [M, .]-sized
exists per class, forward or backward.

Custom VJP over the same tiles: the backward recomputes each tile's activations (no residuals
beyond the inputs: 8 instead of 6 D x H multiply-adds per row, against two gmm passes), writes
d xs for the tile's rows into one buffer and adds its group's weight gradients. Tiles are
``make_group_tiles``' group-anchored schedule, as in the "xla" gmm backend.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.ops.grouped_matmul import default_tile_m, resolve_backend, tile_window
from pallas_kernels.metadata import make_group_tiles

Array = jax.Array


def use_fused(path: str, backend: str, other: str) -> bool:
  """Whether a bank runs this op: ``path`` "fused" (the CPU "xla" backend only), ``other``
  (the bank's grouped-matmul path, every backend) or "auto" ("fused" on the CPU path)."""
  if path not in ("auto", "fused", other):
    raise ValueError(f"path={path!r}; allowed: 'auto', 'fused', {other!r}")
  cpu = resolve_backend(backend) == "xla"
  if path == "fused" and not cpu:
    raise ValueError(f"path='fused' is the CPU tile loop; gmm backend {backend!r} runs {other!r}")
  return path == "fused" or (path == "auto" and cpu)


def grouped_swiglu(xs: Array, classes, group_sizes: Array, *, offsets=(0,),
                   tile_m: int | None = None) -> Array:
  """xs [M, D] rows sorted by group; classes ((wi [L, D, 2, H], wo [L, H, D]), ...), class c
  holding groups offsets[c] .. offsets[c] + L_c - 1; group_sizes [G] -> [M, D] in xs' dtype
  (products accumulate in float32)."""
  classes = tuple((jnp.asarray(wi), jnp.asarray(wo)) for wi, wo in classes)
  offsets = tuple(int(o) for o in offsets)
  if len(offsets) != len(classes):
    raise ValueError(f"grouped_swiglu: {len(classes)} classes but {len(offsets)} offsets")
  m = xs.shape[0]
  experts = sum(wi.shape[0] for wi, _ in classes)
  tile_m = min(tile_m or default_tile_m(m, experts), max(m, 1))
  return _grouped_swiglu(xs, classes, group_sizes.astype(jnp.int32), offsets, tile_m)


def _tile_inputs(xs, wi, s, p, tile_m, m):
  """(first row, row mask, group, x tile f32, wi[g] as [D, 2H] f32, gate and up [T, H])."""
  r0, mask = tile_window(s, p, tile_m, m)
  g = s.group[p]
  x = jax.lax.dynamic_slice_in_dim(xs, r0, tile_m).astype(jnp.float32)
  w = wi[g].astype(jnp.float32)
  w2 = w.reshape(w.shape[0], -1)
  up = x @ w2
  h = w.shape[-1]
  return r0, mask, g, x, w2, up[:, :h], up[:, h:]


def _forward(xs, classes, group_sizes, offsets, tile_m):
  m = xs.shape[0]
  out = jnp.zeros((m, classes[0][1].shape[-1]), jnp.float32)
  if m == 0:
    return out.astype(xs.dtype)
  for (wi, wo), offset in zip(classes, offsets):
    s = make_group_tiles(group_sizes, m, tile_m, group_offset=offset, num_local=wi.shape[0])

    def tile(p, out, wi=wi, wo=wo, s=s):
      r0, mask, g, _, _, gate, up = _tile_inputs(xs, wi, s, p, tile_m, m)
      y = (jax.nn.silu(gate) * up) @ wo[g].astype(jnp.float32)
      cur = jax.lax.dynamic_slice_in_dim(out, r0, tile_m)
      return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mask[:, None], y, cur), r0,
                                                 axis=0)
    out = jax.lax.fori_loop(0, s.num_valid, tile, out)
  return out.astype(xs.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_swiglu(xs, classes, group_sizes, offsets, tile_m):
  return _forward(xs, classes, group_sizes, offsets, tile_m)


def _fwd(xs, classes, group_sizes, offsets, tile_m):
  return _forward(xs, classes, group_sizes, offsets, tile_m), (xs, classes, group_sizes)


def _bwd(offsets, tile_m, res, dout):
  xs, classes, group_sizes = res
  m = xs.shape[0]
  dx = jnp.zeros(xs.shape, jnp.float32)
  grads = []
  for (wi, wo), offset in zip(classes, offsets):
    dwi, dwo = jnp.zeros(wi.shape, jnp.float32), jnp.zeros(wo.shape, jnp.float32)
    if m == 0:
      grads.append((dwi.astype(wi.dtype), dwo.astype(wo.dtype)))
      continue
    s = make_group_tiles(group_sizes, m, tile_m, group_offset=offset, num_local=wi.shape[0])

    def tile(p, carry, wi=wi, wo=wo, s=s):
      dx, dwi, dwo = carry
      r0, mask, g, x, w2, gate, up = _tile_inputs(xs, wi, s, p, tile_m, m)
      dy = jnp.where(mask[:, None], jax.lax.dynamic_slice_in_dim(dout, r0, tile_m)
                     .astype(jnp.float32), 0.0)
      sig = jax.nn.sigmoid(gate)
      act = gate * sig
      dh = dy @ wo[g].astype(jnp.float32).T                      # [T, H]
      d_up = jnp.concatenate([dh * up * sig * (1 + gate * (1 - sig)), dh * act], axis=1)
      cur = jax.lax.dynamic_slice_in_dim(dx, r0, tile_m)
      dx = jax.lax.dynamic_update_slice_in_dim(dx, jnp.where(mask[:, None], d_up @ w2.T, cur),
                                               r0, axis=0)
      dwi = dwi.at[g].add((x.T @ d_up).reshape(dwi.shape[1:]))
      dwo = dwo.at[g].add((act * up).T @ dy)
      return dx, dwi, dwo

    dx, dwi, dwo = jax.lax.fori_loop(0, s.num_valid, tile, (dx, dwi, dwo))
    grads.append((dwi.astype(wi.dtype), dwo.astype(wo.dtype)))
  return dx.astype(xs.dtype), tuple(grads), None


_grouped_swiglu.defvjp(_fwd, _bwd)

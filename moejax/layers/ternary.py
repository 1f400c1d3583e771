"""Ternary experts (MoTE, arXiv 2506.14435): weights in {-1, 0, 1} x a scale, trained with a
straight-through estimator, stored 2 bits per weight for inference.

Quantisers (BitNet b1.58's, which MoTE builds on; METHODS.md marks this a "(check)": the MoTE
text confirms ternary weights, 8-bit activations and STE training, not the exact scaling):

  weights, per expert matrix:  s = 1 / mean|W|,   Q(W) = clip(round(W s), -1, 1) / s
  activations, per row (token): s = 127 / max|x|,  Q(x) = clip(round(x s), -128, 127) / s
  straight-through:             w + stop_gradient(Q(w) - w)  (value Q(w), gradient of identity)

Training keeps full-precision latent weights (the same parameters as ``SwiGLUExperts``, so
up-cycling, sharding and expert parallelism are unchanged); only ``run`` quantises.
Inference form: ``pack_bank`` stores each value as a 2-bit code (value + 1 in {0, 1, 2}), four
per byte in the grouped-matmul kernels' K-planar layout, with one float scale per expert matrix:
16x less weight memory than float32, 8x less than bfloat16; ``PackedTernarySwiGLUExperts`` runs
from it with kernels that decode the codes tile by tile. The PyTorch export stores the same
layout (convert/torch_model.py decodes it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flax import linen as nn
from jax.sharding import PartitionSpec as P

from moejax.layers.dense import swiglu
from moejax.layers.experts import SwiGLUExperts
from moejax.ops.grouped_matmul import gmm
from moejax.ops.ternary_matmul import gmm_ternary
from pallas_kernels.ternary import pack_planes, plane_rows

Array = jax.Array


def _ste(x: Array, q: Array) -> Array:
  return x + jax.lax.stop_gradient(q - x)


# The axes one scale is taken over: each expert's matrix. The fused gate/up weight
# wi [E, D, 2, H] holds two matrices per expert (gate and up), each with its own scale.
WI_AXES, WO_AXES = (1, 3), (1, 2)


def ternary_values(w: Array, axes) -> tuple[Array, Array]:
  """-> (codes in {-1, 0, 1} as int8, scale = mean|W| over ``axes`` (kept as size 1)):
  W ~ codes * scale."""
  scale = jnp.maximum(jnp.mean(jnp.abs(w), axis=axes, keepdims=True), 1e-8)
  return jnp.clip(jnp.round(w / scale), -1, 1).astype(jnp.int8), scale


def quantize_weights(w: Array, axes) -> Array:
  """Q(W) with the straight-through estimator."""
  codes, scale = ternary_values(w, axes)
  return _ste(w, codes.astype(w.dtype) * scale.astype(w.dtype))


def quantize_activations(x: Array, bits: int = 8) -> Array:
  """Per-row absmax int8 fake quantisation with the straight-through estimator."""
  top = 2 ** (bits - 1) - 1
  s = top / jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 1e-8)
  q = jnp.clip(jnp.round(x * s), -top - 1, top) / s
  return _ste(x, q.astype(x.dtype))


# ------------------------------------------------------------------ 2-bit storage
def pack_wi(wi) -> tuple[np.ndarray, np.ndarray]:
  """Latent wi [E, D, 2, H] -> (codes [E, P(D), 2H] uint8 in the kernels' K-planar layout,
  scale [E, 2H]: the matrix's scale broadcast to its output columns)."""
  e, d, _, h = wi.shape
  codes, scale = ternary_values(jnp.asarray(wi, jnp.float32), WI_AXES)
  return (pack_planes(np.asarray(codes).reshape(e, d, 2 * h)),
          np.broadcast_to(np.asarray(scale), (e, 1, 2, h)).reshape(e, 2 * h).copy())


def pack_wo(wo) -> tuple[np.ndarray, np.ndarray]:
  """Latent wo [E, H, D] -> (codes [E, P(H), D] uint8, scale [E, D])."""
  e, _, d = wo.shape
  codes, scale = ternary_values(jnp.asarray(wo, jnp.float32), WO_AXES)
  return pack_planes(np.asarray(codes)), np.broadcast_to(np.asarray(scale), (e, 1, d)).reshape(
      e, d).copy()


def pack_bank(wi: Array, wo: Array) -> dict:
  """Latent expert weights (wi [E, D, 2, H], wo [E, H, D]) -> the inference form that
  ``PackedTernarySwiGLUExperts`` reads: 2-bit codes in the grouped-matmul kernels' K-planar
  layout (``pallas_kernels.pack_planes``) and each expert matrix's scale, broadcast to its
  output columns: wi_packed [E, P(D), 2H] uint8, wi_scale [E, 2H], wo_packed [E, P(H), D],
  wo_scale [E, D]."""
  (wi_packed, wi_scale), (wo_packed, wo_scale) = pack_wi(wi), pack_wo(wo)
  return {"wi_packed": wi_packed, "wi_scale": wi_scale, "wo_packed": wo_packed,
          "wo_scale": wo_scale}


PACKED_NAMES = ("wi_packed", "wi_scale", "wo_packed", "wo_scale")


def run_packed_ternary_experts(weights, xs: Array, group_sizes: Array, *,
                               backend: str = "auto", dtype=jnp.float32) -> Array:
  """The ternary bank's forward pass from the packed form: the grouped matmuls read 2-bit
  codes and decode them tile by tile (``moejax.ops.gmm_ternary``); equals
  ``run_ternary_experts`` on the latent weights the codes came from."""
  wi_p, wi_s, wo_p, wo_s = weights
  h = wi_s.shape[1] // 2
  up = gmm_ternary(quantize_activations(xs.astype(dtype)), wi_p, wi_s, group_sizes,
                   backend=backend)
  act = quantize_activations(swiglu(up.reshape(-1, 2, h)))
  return gmm_ternary(act, wo_p, wo_s, group_sizes, backend=backend).astype(dtype)


def run_ternary_experts(weights, xs: Array, group_sizes: Array, *, backend: str = "auto",
                        dtype=jnp.float32) -> Array:
  """The SwiGLU bank with ternary weights and 8-bit activations (STE): rows [M, D] -> [M, D]."""
  wi, wo = weights
  e, d, _, h = wi.shape
  wi_q = quantize_weights(wi.astype(dtype), WI_AXES).reshape(e, d, 2 * h)
  wo_q = quantize_weights(wo.astype(dtype), WO_AXES)
  up = gmm(quantize_activations(xs.astype(dtype)), wi_q, group_sizes, backend=backend)
  act = quantize_activations(swiglu(up.reshape(-1, 2, h)))
  return gmm(act, wo_q, group_sizes, backend=backend)


def run_mixed_experts(weights, xs: Array, group_sizes: Array, ternary: int, *,
                      backend: str = "auto", dtype=jnp.float32) -> Array:
  """Experts 0 .. E-n-1 at full precision, the last n = ``ternary`` as ``run_ternary_experts``
  (ternary weights, 8-bit activations, STE): two grouped-matmul pairs over their own experts'
  rows (``group_offset``), summed."""
  wi, wo = weights
  e, d, _, h = wi.shape
  full = e - ternary
  if group_sizes.shape[0] != e:
    raise ValueError("mixed-precision experts (model.moe.ternary_experts) run on one device's "
                     "experts only: expert parallelism would split the full and ternary ranges")
  y = jnp.zeros((xs.shape[0], wo.shape[-1]), dtype)
  xs = xs.astype(dtype)
  if full:
    up = gmm(xs, wi[:full].astype(dtype).reshape(full, d, 2 * h), group_sizes, backend=backend)
    y = y + gmm(swiglu(up.reshape(-1, 2, h)), wo[:full].astype(dtype), group_sizes,
                backend=backend)
  if ternary:
    wi_q = quantize_weights(wi[full:].astype(dtype), WI_AXES).reshape(ternary, d, 2 * h)
    up = gmm(quantize_activations(xs), wi_q, group_sizes, group_offset=full, backend=backend)
    act = quantize_activations(swiglu(up.reshape(-1, 2, h)))
    y = y + gmm(act, quantize_weights(wo[full:].astype(dtype), WO_AXES), group_sizes,
                group_offset=full, backend=backend)
  return y


def run_packed_mixed_experts(weights, xs: Array, group_sizes: Array, *, backend: str = "auto",
                             dtype=jnp.float32) -> Array:
  """``run_mixed_experts`` from the mixed bank's inference form: the full-precision experts'
  wi, wo and the ternary experts' 2-bit codes + scales (``pack_bank``), ternary last."""
  wi, wo, wi_p, wi_s, wo_p, wo_s = weights
  full, ternary = wi.shape[0], wi_p.shape[0]
  if group_sizes.shape[0] != full + ternary:
    raise ValueError("mixed-precision experts (model.moe.ternary_experts) run on one device's "
                     "experts only: expert parallelism would split the full and ternary ranges")
  d, h = xs.shape[1], wi_s.shape[1] // 2
  xs = xs.astype(dtype)
  y = jnp.zeros((xs.shape[0], wo_s.shape[-1]), dtype)
  if full:
    up = gmm(xs, wi.astype(dtype).reshape(full, d, 2 * h), group_sizes, backend=backend)
    y = y + gmm(swiglu(up.reshape(-1, 2, h)), wo.astype(dtype), group_sizes, backend=backend)
  if ternary:
    up = gmm_ternary(quantize_activations(xs), wi_p, wi_s, group_sizes, group_offset=full,
                     backend=backend)
    act = quantize_activations(swiglu(up.reshape(-1, 2, h)))
    y = y + gmm_ternary(act, wo_p, wo_s, group_sizes, group_offset=full,
                        backend=backend).astype(dtype)
  return y


class PackedMixedExperts(nn.Module):
  """The mixed bank's inference form (``expert_bank=ternary_packed`` with ``ternary_experts``
  = n > 0): full-precision wi [E-n, D, 2, H], wo [E-n, H, D] and the last n experts as 2-bit
  codes + scales (``PACKED_NAMES``). Made by ``python -m moejax.convert --from=moejax
  --to=packed`` from a mixed-precision workdir; like the packed ternary bank it has no
  gradient (evaluation and sampling only)."""
  num_experts: int
  d_model: int
  hidden: int
  dtype: jnp.dtype = jnp.float32
  gmm_backend: str = "auto"
  ternary: int = 0

  def setup(self):
    full, n, d, h = self.num_experts - self.ternary, self.ternary, self.d_model, self.hidden
    zeros = lambda shape, dtype=jnp.float32: (lambda key: jnp.zeros(shape, dtype))
    shapes = {"wi": (full, d, 2, h), "wo": (full, h, d), "wi_packed": (n, plane_rows(d), 2 * h),
              "wi_scale": (n, 2 * h), "wo_packed": (n, plane_rows(h), d), "wo_scale": (n, d)}
    self.packed = tuple(
        self.param(name, nn.with_logical_partitioning(
            zeros(shape, jnp.uint8 if name.endswith("packed") else jnp.float32),
            ("expert",) + (None,) * (len(shape) - 1)))
        for name, shape in shapes.items())

  def weights(self):
    return self.packed

  def weight_specs(self):
    return tuple(P("expert") for _ in self.packed)

  def run(self, weights, xs, group_sizes):
    return run_packed_mixed_experts(weights, xs, group_sizes, backend=self.gmm_backend,
                                    dtype=self.dtype)

  def __call__(self, xs: Array, group_sizes: Array) -> Array:
    return self.run(self.weights(), xs, group_sizes)


class MixedTernarySwiGLUExperts(SwiGLUExperts):
  """``SwiGLUExperts`` whose last ``ternary`` experts run ternary (MC#-style mixed precision:
  moejax/compress/methods.py). Same parameters as the full-precision bank (latent weights, so
  it trains with the straight-through estimator like ``TernarySwiGLUExperts``)."""
  ternary: int = 0
  run_gathered = None          # the small-batch form would run every expert at full precision

  def run(self, weights, xs, group_sizes):
    return run_mixed_experts(weights, xs, group_sizes, self.ternary, backend=self.gmm_backend,
                             dtype=self.dtype)


class TernarySwiGLUExperts(SwiGLUExperts):
  """``SwiGLUExperts`` whose ``run`` uses ternary weights and 8-bit activations (QAT)."""
  run_gathered = None          # no small-batch form: inference keeps the grouped path

  def run(self, weights, xs, group_sizes):
    return run_ternary_experts(weights, xs, group_sizes, backend=self.gmm_backend,
                               dtype=self.dtype)


class PackedTernarySwiGLUExperts(nn.Module):
  """The ternary bank in its inference form (``model.moe.expert_bank=ternary_packed``): 2-bit
  codes + scales as parameters (uint8 and float32), 16x less routed-expert memory than float32.
  Made from a trained ``ternary_swiglu`` run by ``python -m moejax.convert --from=moejax
  --to=packed``; it has no gradient, so such a workdir evaluates and samples but does not
  train."""
  num_experts: int
  d_model: int
  hidden: int
  dtype: jnp.dtype = jnp.float32
  gmm_backend: str = "auto"

  def setup(self):
    e, d, h = self.num_experts, self.d_model, self.hidden
    zero = lambda shape: (lambda key: jnp.full(shape, 0b01010101, jnp.uint8))   # codes 0
    shapes = {"wi_packed": (e, plane_rows(d), 2 * h), "wi_scale": (e, 2 * h),
              "wo_packed": (e, plane_rows(h), d), "wo_scale": (e, d)}
    self.packed = tuple(
        self.param(n, nn.with_logical_partitioning(
            zero(shapes[n]) if n.endswith("packed") else (lambda key, s=shapes[n]: jnp.ones(s)),
            ("expert",) + (None,) * (len(shapes[n]) - 1)))
        for n in PACKED_NAMES)

  def weights(self):
    return self.packed

  def weight_specs(self):
    return tuple(P("expert") for _ in PACKED_NAMES)

  def run(self, weights, xs, group_sizes):
    return run_packed_ternary_experts(weights, xs, group_sizes, backend=self.gmm_backend,
                                      dtype=self.dtype)

  def __call__(self, xs: Array, group_sizes: Array) -> Array:
    return self.run(self.weights(), xs, group_sizes)

"""Ternary experts (MoTE, arXiv 2506.14435): weights in {-1, 0, 1} x a scale, trained with a
straight-through estimator, stored 2 bits per weight for inference.

Quantisers (BitNet b1.58's, which MoTE builds on; METHODS.md marks this a "(check)": the MoTE
text confirms ternary weights, 8-bit activations and STE training, not the exact scaling):

  weights, per expert matrix:  s = 1 / mean|W|,   Q(W) = clip(round(W s), -1, 1) / s
  activations, per row (token): s = 127 / max|x|,  Q(x) = clip(round(x s), -128, 127) / s
  straight-through:             w + stop_gradient(Q(w) - w)  (value Q(w), gradient of identity)

Training keeps full-precision latent weights (the same parameters as ``SwiGLUExperts``, so
up-cycling, sharding and expert parallelism are unchanged); only ``run`` quantises.
Inference form: ``pack_ternary`` stores each value as a 2-bit code (value + 1 in {0, 1, 2}),
four per byte along the last axis, with one float scale per expert matrix: 16x less weight
memory than float32, 8x less than bfloat16.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax.layers.dense import swiglu
from moejax.layers.experts import SwiGLUExperts
from moejax.ops.grouped_matmul import gmm

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
def pack_ternary(codes) -> np.ndarray:
  """int codes in {-1, 0, 1} [..., n] -> uint8 [..., ceil(n / 4)], value j of a byte in bits
  2j..2j+1 (code + 1; padding codes are 1, i.e. value 0)."""
  codes = np.asarray(codes)
  if codes.size and (codes.min() < -1 or codes.max() > 1):
    raise ValueError("pack_ternary: values must be in {-1, 0, 1}")
  n = codes.shape[-1]
  pad = (-n) % 4
  c = (np.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)], constant_values=0) + 1)
  c = c.astype(np.uint8).reshape(*codes.shape[:-1], -1, 4)
  return (c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).astype(np.uint8)


def unpack_ternary(packed: Array, n: int) -> Array:
  """uint8 [..., m] -> int8 codes [..., n] (inverse of ``pack_ternary``); jit-able."""
  shifts = jnp.arange(4, dtype=jnp.uint8) * 2
  c = (packed[..., None] >> shifts) & 3
  return (c.reshape(*packed.shape[:-1], -1)[..., :n].astype(jnp.int8) - 1)


def pack_bank(wi: Array, wo: Array) -> dict:
  """Latent expert weights -> their inference form: 2-bit codes + one scale per expert matrix."""
  out = {}
  for name, w, axes in (("wi", wi, WI_AXES), ("wo", wo, WO_AXES)):
    codes, scale = ternary_values(jnp.asarray(w, jnp.float32), axes)
    out[name] = {"packed": pack_ternary(np.asarray(codes)), "scale": np.asarray(scale),
                 "n": int(w.shape[-1])}
  return out


def unpacked_weight(entry: dict, dtype=jnp.float32) -> Array:
  return (unpack_ternary(jnp.asarray(entry["packed"]), entry["n"]).astype(dtype)
          * jnp.asarray(entry["scale"], dtype))


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


class TernarySwiGLUExperts(SwiGLUExperts):
  """``SwiGLUExperts`` whose ``run`` uses ternary weights and 8-bit activations (QAT)."""

  def run(self, weights, xs, group_sizes):
    return run_ternary_experts(weights, xs, group_sizes, backend=self.gmm_backend,
                               dtype=self.dtype)

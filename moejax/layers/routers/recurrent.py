"""Layerwise recurrent router (RMoE: Qiu et al. 2025, "Layerwise Recurrent Router for
Mixture-of-Experts", arXiv 2408.06793, eq. 4-6).

Routers of consecutive MoE layers share information through a GRU that runs over *layers*
(not over the sequence, so it stays causal and parallel over tokens). In MoE layer i:

  x'_i = x_i W_p^i                     per-layer projection to the router dimension  (eq. 4)
  h_i  = GRU(x'_i, h_{i-1}), h_0 = 0   one GRU shared by every layer                 (eq. 5)
  p_i  = softmax(h_i W_r^i); top-k     per-layer router on the GRU output            (eq. 6)

The shared GRU lives in the transformer (``router_gru``), which threads h from layer to layer
and hands the block ``router_state=(gru, h)``; the block returns the new h with its output.
"""
from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.layers.routers.result import RoutingResult, router_logits
from moejax.layers.routers.topk import topk_softmax

Array = jax.Array
_INIT = nn.initializers.normal(stddev=0.02)


class GRU(nn.Module):
  """h' = (1 - z) n + z h,  r = s(x Wr + h Ur + br),  z = s(x Wz + h Uz + bz),
  n = tanh(x Wn + bn + r (h Un + bhn)) (Cho et al. 2014; PyTorch's placement of bhn)."""
  features: int

  @nn.compact
  def __call__(self, h: Array, x: Array) -> Array:
    f = self.features
    param = lambda name, shape, init: self.param(
        name, nn.with_logical_partitioning(init, (None,) * len(shape)), shape, jnp.float32)
    wx = param("input_kernel", (x.shape[-1], 3 * f), _INIT)
    wh = param("recurrent_kernel", (f, 3 * f), _INIT)
    bx = param("input_bias", (3 * f,), nn.initializers.zeros)
    bh = param("recurrent_bias", (3 * f,), nn.initializers.zeros)
    gx, gh = x @ wx + bx, h @ wh + bh
    r = jax.nn.sigmoid(gx[:, :f] + gh[:, :f])
    z = jax.nn.sigmoid(gx[:, f:2 * f] + gh[:, f:2 * f])
    n = jnp.tanh(gx[:, 2 * f:] + r * gh[:, 2 * f:])
    return (1 - z) * n + z * h


class RecurrentRouter(nn.Module):
  num_experts: int
  k: int
  renormalize: bool = True
  dim: int = 0                          # router dimension; 0 = the model width
  recurrent: ClassVar[bool] = True

  @classmethod
  def from_spec(cls, spec, **kwargs) -> "RecurrentRouter":
    return cls(num_experts=spec.num_routed, k=spec.routed_k, renormalize=spec.renormalize,
               dim=spec.recurrent_router_dim, **kwargs)

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True, gru: GRU | None = None,
               carry: Array | None = None) -> tuple[RoutingResult, Array]:
    del deterministic
    if gru is None:
      raise ValueError("router 'recurrent' needs the shared GRU: the transformer passes "
                       "router_state=(gru, carry) to the MoE block")
    tokens = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    dim = gru.features
    proj = self.param("proj", nn.with_logical_partitioning(_INIT, ("embed", None)),
                      (tokens.shape[-1], dim), jnp.float32)
    carry = jnp.zeros((tokens.shape[0], dim), jnp.float32) if carry is None else carry
    carry = gru(carry, tokens @ proj)
    logits = router_logits(self, carry, self.num_experts, in_axis=None)
    return topk_softmax(logits, self.k, self.renormalize), carry

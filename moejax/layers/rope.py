"""Rotary position embeddings (Su et al. 2021, RoFormer), "rotate-half" layout as in LLaMA.

For a head vector split into halves (a, b) and frequency w_j = theta^(-2j/d):
  rope(x, p) = (a cos(p w) - b sin(p w), b cos(p w) + a sin(p w)).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """x [B, L, H, Dh] (Dh even), positions [B, L] -> same shape, rotated in f32."""
  dh = x.shape[-1]
  freq = theta ** (-jnp.arange(0, dh // 2, dtype=jnp.float32) * 2.0 / dh)
  angle = positions[..., None].astype(jnp.float32) * freq          # [B, L, Dh/2]
  cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
  a, b = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(x.dtype)

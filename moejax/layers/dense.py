"""Dense feed-forward: SwiGLU (Shazeer 2020), FFN(x) = (silu(x W_g) * (x W_u)) W_o."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array

# Fan-in scaled init; the gate and up projections share one [D, 2, H] weight so a single matmul
# computes both (the "2" axis is never sharded).
def kernel_init(fan_in_axes=(0,)):
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                          in_axis=fan_in_axes, out_axis=-1)


def swiglu(h: Array) -> Array:
  """[..., 2, H] fused gate/up activations -> [..., H]."""
  return jax.nn.silu(h[..., 0, :]) * h[..., 1, :]


class SwiGLU(nn.Module):
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    wi = self.param("wi", nn.with_logical_partitioning(kernel_init((0,)), ("embed", None, "mlp")),
                    (d, 2, self.hidden), jnp.float32)
    wo = self.param("wo", nn.with_logical_partitioning(kernel_init((0,)), ("mlp", "embed")),
                    (self.hidden, d), jnp.float32)
    h = jnp.einsum("...d,dch->...ch", x.astype(self.dtype), wi.astype(self.dtype))
    return swiglu(h) @ wo.astype(self.dtype)

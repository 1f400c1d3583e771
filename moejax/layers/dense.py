"""Dense feed-forward: SwiGLU (Shazeer 2020), FFN(x) = (silu(x W_g) * (x W_u)) W_o."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array

def kernel_init(in_axis, out_axis, batch_axis=()):
  """Truncated normal with variance 1/fan_in, fan_in = product of the ``in_axis`` sizes.

  Every axis must be named: variance_scaling counts unnamed axes as a convolution's receptive
  field and would multiply them into fan_in (an expert bank [E, D, 2, H] would get D*E*2).
  """
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                          out_axis=out_axis, batch_axis=batch_axis)


def swiglu(h: Array) -> Array:
  """[..., 2, H] fused gate/up activations -> [..., H]."""
  return jax.nn.silu(h[..., 0, :]) * h[..., 1, :]


class SwiGLU(nn.Module):
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    # Gate and up projections share one [D, 2, H] weight so one matmul computes both.
    wi = self.param("wi", nn.with_logical_partitioning(kernel_init(0, (1, 2)),
                                                       ("embed", None, "mlp")),
                    (d, 2, self.hidden), jnp.float32)
    wo = self.param("wo", nn.with_logical_partitioning(kernel_init(0, 1), ("mlp", "embed")),
                    (self.hidden, d), jnp.float32)
    h = jnp.einsum("...d,dch->...ch", x.astype(self.dtype), wi.astype(self.dtype))
    return swiglu(h) @ wo.astype(self.dtype)

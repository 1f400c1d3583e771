"""Expert weight banks: E SwiGLU FFNs applied to rows grouped by expert.

The bank only sees the dispatcher's layout (rows + ``group_sizes``), never tokens or routing,
so variants of the weights (heterogeneous widths, ternary, LoRA, merged) are new banks with the
same call signature.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.layers.dense import kernel_init, swiglu
from moejax.ops.grouped_matmul import gmm

Array = jax.Array


class SwiGLUExperts(nn.Module):
  """E independent SwiGLU experts of hidden size ``hidden``.

  wi [E, D, 2, H] fuses gate and up projections so one grouped matmul computes both;
  wo [E, H, D]. Two gmm calls per layer, both in the dispatcher's row layout.
  """
  num_experts: int
  hidden: int
  dtype: jnp.dtype = jnp.float32
  gmm_backend: str = "auto"

  @nn.compact
  def __call__(self, xs: Array, group_sizes: Array) -> Array:
    e, h, d = self.num_experts, self.hidden, xs.shape[-1]
    wi = self.param("wi", nn.with_logical_partitioning(
        kernel_init(1, (2, 3), 0), ("expert", "embed", None, "mlp")), (e, d, 2, h), jnp.float32)
    wo = self.param("wo", nn.with_logical_partitioning(
        kernel_init(1, 2, 0), ("expert", "mlp", "embed")), (e, h, d), jnp.float32)
    xs = xs.astype(self.dtype)
    up = gmm(xs, wi.astype(self.dtype).reshape(e, d, 2 * h), group_sizes,
             backend=self.gmm_backend)
    act = swiglu(up.reshape(-1, 2, h))
    return gmm(act, wo.astype(self.dtype), group_sizes, backend=self.gmm_backend)

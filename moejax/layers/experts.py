"""Expert weight banks: E SwiGLU FFNs applied to rows grouped by expert.

The bank only sees the dispatcher's layout (rows + ``group_sizes``), never tokens or routing,
so variants of the weights (heterogeneous widths, ternary, LoRA, merged) are new banks with the
same call signature. The bank contract: ``weights()`` (a pytree), ``weight_specs()`` (their
PartitionSpecs over the 'expert' mesh axis) and a pure ``run(weights, rows, group_sizes)``, so
expert parallelism runs any bank on each device's slice without the layer knowing its weights.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from moejax.layers.dense import kernel_init, swiglu
from moejax.ops.grouped_matmul import gmm
from moejax.ops.grouped_swiglu import grouped_swiglu, use_fused

Array = jax.Array


def run_swiglu_experts(weights, xs: Array, group_sizes: Array, *, backend: str = "auto",
                       dtype=jnp.float32, path: str = "auto") -> Array:
  """rows [M, D] grouped by expert -> [M, D]; weights = (wi [E, D, 2, H], wo [E, H, D]).

  ``path``: "gmm" runs two grouped matmuls through an [M, 2H] intermediate (every backend; the
  Pallas kernels' path); "fused" (CPU "xla" backend only) runs up-projection, SwiGLU and
  down-projection tile by tile (ops/grouped_swiglu.py: nothing [M, 2H]-sized, forward or
  backward); "auto" picks "fused" on the CPU path."""
  wi, wo = weights
  e, d, _, h = wi.shape
  if use_fused(path, backend, "gmm"):
    return grouped_swiglu(xs.astype(dtype), [(wi.astype(dtype), wo.astype(dtype))], group_sizes)
  up = gmm(xs.astype(dtype), wi.astype(dtype).reshape(e, d, 2 * h), group_sizes, backend=backend)
  return gmm(swiglu(up.reshape(-1, 2, h)), wo.astype(dtype), group_sizes, backend=backend)


def run_gathered_swiglu_experts(weights, xs: Array, index: Array, gate: Array, *,
                                dtype=jnp.float32, form: str = "auto") -> Array:
  """The small-batch form: tokens [T, D] with their selected experts ``index`` [T, k] (-1 =
  unused) and combine weights ``gate`` [T, k] -> [T, D], with no sort, no tile schedule and
  nothing padded. ``form``: "batched" gathers each row's k experts' weights and runs batched
  dots (one gather, one batched matmul: accelerators); "loop" runs one (token, slot) at a time,
  reading the expert's weights in place (a dynamic slice fused into the dot: no copy of the
  weights, which on CPU halves the bytes moved; measured 2.6x faster than "batched" at one row
  of 6 of 64 experts); "auto" is "loop" on CPU, else "batched"."""
  wi, wo = weights
  t, k = index.shape
  e, d, _, h = wi.shape
  safe = jnp.maximum(index, 0)
  x = xs.astype(dtype)
  if form == "auto":
    form = "loop" if jax.default_backend() == "cpu" else "batched"
  if form == "batched":
    hid = jnp.einsum("td,tkdch->tkch", x, wi.astype(dtype)[safe])
    y = jnp.einsum("tkh,tkhd->tkd", swiglu(hid), wo.astype(dtype)[safe])
  else:
    wi2, wo2, flat = wi.astype(dtype).reshape(e, d, 2 * h), wo.astype(dtype), safe.reshape(-1)

    def one(i, out):
      up = x[i // k] @ jax.lax.dynamic_index_in_dim(wi2, flat[i], keepdims=False)
      return out.at[i].set(swiglu(up.reshape(2, h)) @ jax.lax.dynamic_index_in_dim(
          wo2, flat[i], keepdims=False))
    y = jax.lax.fori_loop(0, t * k, one, jnp.zeros((t * k, d), dtype)).reshape(t, k, d)
  w = jnp.where(index >= 0, gate, 0.0).astype(jnp.float32)
  return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), w).astype(dtype)


class SwiGLUExperts(nn.Module):
  """E independent SwiGLU experts of hidden size ``hidden``.

  wi [E, D, 2, H] fuses gate and up projections so one grouped matmul computes both;
  wo [E, H, D]. On GPU/TPU two gmm calls per layer, both in the dispatcher's row layout; on the
  CPU path one fused tile loop (``run_swiglu_experts``' ``path``).
  """
  num_experts: int
  d_model: int
  hidden: int
  dtype: jnp.dtype = jnp.float32
  gmm_backend: str = "auto"

  def setup(self):
    e, h, d = self.num_experts, self.hidden, self.d_model
    self.wi = self.param("wi", nn.with_logical_partitioning(
        kernel_init(1, (2, 3), 0), ("expert", "embed", None, "mlp")), (e, d, 2, h), jnp.float32)
    self.wo = self.param("wo", nn.with_logical_partitioning(
        kernel_init(1, 2, 0), ("expert", "mlp", "embed")), (e, h, d), jnp.float32)

  def weights(self):
    """The pytree ``run`` takes (what expert parallelism hands each device a slice of)."""
    return self.wi, self.wo

  def weight_specs(self):
    """PartitionSpecs of ``weights()`` inside shard_map: the expert dimension over the mesh
    axis 'expert' (a bank with other weights, packed or per-size, declares its own)."""
    return P("expert"), P("expert")

  def run(self, weights, xs, group_sizes):
    return run_swiglu_experts(weights, xs, group_sizes, backend=self.gmm_backend, dtype=self.dtype)

  def run_gathered(self, weights, xs, index, gate):
    """Small-batch inference (MoEBlock's decode path): see ``run_gathered_swiglu_experts``."""
    return run_gathered_swiglu_experts(weights, xs, index, gate, dtype=self.dtype)

  def __call__(self, xs: Array, group_sizes: Array) -> Array:
    return self.run(self.weights(), xs, group_sizes)

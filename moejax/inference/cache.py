"""The decoding cache of a whole model: its shapes, a zero-filled cache, its bytes by layer kind.

The cache is Flax's ``"cache"`` collection of the model (layers/kv_cache.py): every attention
layer's keys and values (or MLA's latent and RoPE key), and the merge state of Lory/SMEAR
layers. Its shapes come from tracing ``model.init`` at the cache's batch and length (no
compute, nothing allocated), once per (model, batch, length).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# cache variable name -> the layer kind it belongs to (for the memory report)
KINDS = {"key": "attention", "value": "attention", "latent": "latent_attention",
         "rope_key": "latent_attention", "merge_probs": "merge_state",
         "segment_sum": "merge_state", "segment_probs": "merge_state"}


@functools.lru_cache(maxsize=32)
def cache_shapes(model, batch: int, length: int):
  """The cache's ShapeDtypeStructs for ``batch`` rows of ``length`` positions."""
  def init():
    return model.init({"params": jax.random.key(0)}, jnp.zeros((batch, length), jnp.int32),
                      prompt_length=jnp.ones((batch,), jnp.int32), cache_mode="prefill")["cache"]
  return jax.eval_shape(init)


def init_cache(model, batch: int, length: int):
  """A zero-filled cache (what ``"prefill"`` expects)."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(model, batch, length))


def cache_bytes(shapes) -> dict[str, int]:
  """Bytes of a cache (or its shapes) by layer kind: attention (K and V), latent_attention
  (MLA's latent and RoPE key), merge_state (Lory/SMEAR merges)."""
  out: dict[str, int] = {}
  for path, leaf in traverse_util.flatten_dict(jax.tree.map(lambda x: x, shapes)).items():
    kind = KINDS.get(path[-1], "other")
    out[kind] = out.get(kind, 0) + int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  return out


def bytes_per_token(shapes, batch: int, length: int) -> dict[str, float]:
  """The attention kinds' bytes per cached position of one sequence (all layers together);
  the merge state does not grow with length and is left out."""
  return {kind: b / (batch * length) for kind, b in cache_bytes(shapes).items()
          if kind in ("attention", "latent_attention")}

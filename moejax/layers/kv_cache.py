"""The decoding cache of one attention layer, kept in Flax's ``"cache"`` collection.

Three ways to call a layer (``cache_mode``):
  None       the full-sequence forward (training, evaluation): no cache.
  "prefill"  the prompt, padded to a common length, at positions 0..L-1 of every row: attention
             runs over the prompt itself (causal) and every position's key/value is written.
  "decode"   one new position per row (``positions`` [B, 1], each row its own): its key/value is
             written at that index and the query attends over the whole cache, masked to the
             indices <= its position.

Rows of different prompt lengths need no other bookkeeping: the cache index of a key is its
position, so the padding a short row wrote during prefill sits at indices its own decode steps
overwrite before its queries can see them (the causal mask hides every index > position).
The cache is created at the length of the tokens the model is initialised with
(``moejax.inference.cache.init_cache``), and read back by ``"prefill"``/``"decode"`` calls that
pass it in ``{"cache": ...}`` with ``mutable=["cache"]``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

CACHE_MODES = (None, "prefill", "decode")

Array = jax.Array


def write_cache(module: nn.Module, values: dict[str, Array], positions: Array,
                cache_mode: str | None) -> tuple[dict[str, Array], Array]:
  """Writes each ``values[name]`` [B, L, ...] at its rows' ``positions`` [B, L] into
  ``module``'s cache and returns (what to attend over, their key positions [B, S]): the values
  themselves and ``positions`` without a cache or at prefill, the whole cache at decode."""
  if cache_mode is None:
    return values, positions
  if cache_mode not in CACHE_MODES:
    raise ValueError(f"cache_mode must be one of {CACHE_MODES}, got {cache_mode!r}")
  rows = jnp.arange(positions.shape[0])[:, None]
  cached = {}
  for name, x in values.items():
    var = module.variable("cache", name, jnp.zeros, x.shape, x.dtype)
    var.value = var.value.at[rows, positions].set(x.astype(var.value.dtype))
    cached[name] = var.value
  if cache_mode == "prefill":
    return values, positions
  length = next(iter(cached.values())).shape[1]
  return cached, jnp.broadcast_to(jnp.arange(length), (positions.shape[0], length))


def causal_mask(positions: Array, key_positions: Array) -> Array:
  """[B, Lq] query and [B, Lk] key positions -> [B, Lq, Lk] bool: which keys a query sees.

  Keys read from the cache (decode): key position <= query position (a key's cache index is its
  position). Keys that are the queries themselves (``key_positions is positions``: no cache, or
  prefill): ``self_mask``, which also separates packed documents."""
  if key_positions is positions:
    return self_mask(positions)
  return positions[:, :, None] >= key_positions[:, None, :]


def self_mask(positions: Array) -> Array:
  """[B, L] positions of a sequence attending to itself -> [B, L, L]: key index <= query index
  and both in the same document. A document starts wherever the position does not increase
  (packed documents restarting at 0: [0 1 2 3 0 1] is two), so no token sees a later one or
  another document's, whatever positions are passed."""
  restart = jnp.concatenate([jnp.zeros_like(positions[:, :1], bool),
                             positions[:, 1:] <= positions[:, :-1]], axis=1)
  doc = jnp.cumsum(restart, axis=1)
  index = jnp.arange(positions.shape[1])
  return (index[None, :, None] >= index[None, None, :]) & (doc[:, :, None] == doc[:, None, :])

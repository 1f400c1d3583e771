"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

For logits z of one row, with T = ``temperature`` > 0:
  p = softmax(z / T) over the ``top_k`` largest (all when 0), renormalised;
  top-p keeps the smallest set of the most probable tokens whose probability reaches ``top_p``:
  sorted by probability, token r stays when the mass before it, sum_{j<r} p_j, is < top_p
  (Holtzman et al. 2020, arXiv 1904.09751); the draw is from the kept tokens, renormalised.
Temperature 0 is greedy (argmax; ties to the lowest id, as ``np.argmax``). Every row draws with
its own key, so a row's tokens do not depend on which other rows share its batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def filter_logits(logits: Array, temperature, top_k, top_p) -> tuple[Array, Array]:
  """[B, V] logits -> (scaled logits sorted descending with the dropped ones at -inf, the
  token id of each sorted position), for the top-k and top-p rules above."""
  scaled = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
  order = jnp.argsort(-scaled, axis=-1, stable=True)
  ranked = jnp.take_along_axis(scaled, order, axis=-1)
  rank = jnp.arange(logits.shape[-1])[None, :]
  top_k = jnp.asarray(top_k, jnp.int32)
  keep = (top_k <= 0) | (rank < top_k)
  probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  keep = keep & (before < jnp.asarray(top_p, jnp.float32))
  return jnp.where(keep, ranked, -jnp.inf), order


def next_tokens(logits: Array, keys: Array, temperature, top_k, top_p, *,
                greedy: bool) -> Array:
  """[B, V] logits and one PRNG key per row [B] -> [B] int32 token ids."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  ranked, order = filter_logits(logits, temperature, top_k, top_p)
  pick = jax.vmap(jax.random.categorical)(keys, ranked)
  return jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)


def row_keys(seed: Array, rows: int, step) -> Array:
  """One key per row for decoding step ``step``: fold_in(fold_in(key(seed), row), step)."""
  base = jax.random.key(seed)
  return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), step))(
      jnp.arange(rows))

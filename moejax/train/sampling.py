"""Autoregressive sampling: greedy (temperature 0) or temperature sampling.

No KV cache yet: each new token re-runs the model over a fixed [1, seq_len] window (one compiled
shape), which is simple and fast enough for the tiny models trained here. Because attention is
causal, right-padding the window does not change the logits at the last real position.
The model is told how many of the window's tokens are the prompt (``prompt_length``, at least
1 once the prompt has scrolled out): layers that route once on the prompt at inference (Lory's
merge with ``merge_inference="prompt"``) read it, every other layer ignores it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def sample(model, params, prompt: np.ndarray, num_tokens: int, seq_len: int,
           temperature: float, rng: jax.Array) -> np.ndarray:
  """Returns prompt + ``num_tokens`` generated tokens (int32 numpy)."""
  if len(prompt) == 0:
    raise ValueError("sample.prompt must contain at least one token")

  tokens = list(np.asarray(prompt, np.int32))
  for i in range(num_tokens):
    ctx = tokens[-seq_len:]
    window = np.zeros((seq_len,), np.int32)
    window[:len(ctx)] = ctx
    in_window = max(len(prompt) - (len(tokens) - len(ctx)), 1)
    tok = _next_token(model, float(temperature), params, window, len(ctx) - 1, in_window,
                      jax.random.fold_in(rng, i))
    tokens.append(int(tok))
  return np.asarray(tokens, np.int32)


# Compiled once per (model, temperature): repeated sample() calls reuse it.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _next_token(model, temperature, params, window, pos, prompt_length, rng):
  logits = model.apply({"params": params}, window[None], deterministic=True,
                       prompt_length=prompt_length)[0, pos]
  if temperature == 0:
    return jnp.argmax(logits).astype(jnp.int32)
  return jax.random.categorical(rng, logits / temperature).astype(jnp.int32)

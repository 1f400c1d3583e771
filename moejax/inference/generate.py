"""Batched generation from a KV cache: one prefill over the prompts, then one position per step.

    result = moejax.generate(model, params, [[72, 105], [84, 104, 101, 32]], 32,
                             temperature=0.8, top_p=0.9, seed=0, stop="\\n")
    result.tokens            # one int32 array per prompt: the new tokens only
    result.cache_bytes       # {"attention": ..., "latent_attention": ..., "merge_state": ...}
    result.decode_tokens_per_s

Compiled once per (batch bucket, prompt-length bucket, cache-length bucket) and sampling kind
(greedy or not, stop length): prompts are padded to a power-of-two batch and length, the cache
to a power-of-two length (capped at the model's ``max_length``), and the whole decode loop is
one ``lax.while_loop`` that stops when every row has met ``stop`` or made ``max_new_tokens``.
Another call in the same buckets (other prompts, another count, temperature, top-k/top-p or
seed) compiles nothing.

Each row keeps its own positions: the cache index of a key is its position
(layers/kv_cache.py), so a padded row never changes another row's tokens. Routing at decode is
per token and dropless (``dispatch="capacity"`` is a training-time limit on a batch: a token's
experts must not depend on which other prompts share its batch); routers that choose across the
batch decode with their causal threshold form (``expert_choice_eval="threshold"``) and
``"batch"`` is refused. Lory's and SMEAR's merges: layers/merging.py. Stochastic routing (THOR)
draws its experts at random at every step, as its evaluation does.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moejax.errors import ConfigError
from moejax.inference import cache as cache_lib
from moejax.inference import steer as steer_lib
from moejax.inference.sampling import next_tokens, row_keys

Array = jax.Array


class GenerationError(ConfigError):
  """A generation request that cannot run; the message names the argument and what is allowed."""


@dataclasses.dataclass
class GenerateResult:
  """What ``generate`` returns.

  tokens:           one int32 array per prompt, the new tokens only (ending with the stop
                    sequence when it was met).
  cache_bytes:      the cache's bytes by layer kind (attention, latent_attention, merge_state).
  cache_bytes_per_token: the attention kinds' bytes per cached position of one sequence.
  prefill_seconds / decode_seconds: wall time of the prefill and of the decode loop
                    (compilation included when ``compiled`` is True).
  prompt_tokens:    real prompt tokens processed; decode_steps: decode steps run.
  batch / prompt_length / cache_length: the buckets the call ran in.
  """
  tokens: list
  cache_bytes: dict
  cache_bytes_per_token: dict
  prefill_seconds: float
  decode_seconds: float
  prompt_tokens: int
  decode_steps: int
  batch: int
  prompt_length: int
  cache_length: int
  compiled: bool

  @property
  def prefill_tokens_per_s(self) -> float:
    return self.prompt_tokens / max(self.prefill_seconds, 1e-9)

  @property
  def decode_tokens_per_s(self) -> float:
    """New tokens per second of the decode loop (one per real prompt per step)."""
    return len(self.tokens) * self.decode_steps / max(self.decode_seconds, 1e-9)


def _bucket(n: int, minimum: int) -> int:
  return max(minimum, 1 << max(n - 1, 0).bit_length())


def _fail(name: str, message: str):
  raise GenerationError(f"generate: {name}: {message}")


def _as_ids(value, name: str, vocab: int) -> np.ndarray:
  if isinstance(value, str):
    value = value.encode("utf-8")
  if isinstance(value, (bytes, bytearray)):
    value = list(value)
  try:
    ids = np.asarray(value)
  except (TypeError, ValueError):
    _fail(name, f"must be a sequence of token ids, got {type(value).__name__}")
  if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
    _fail(name, f"must be a flat sequence of integer token ids, got shape {ids.shape} "
          f"dtype {ids.dtype}")
  if ids.size == 0:
    _fail(name, "is empty; give at least one token")
  bad = ids[(ids < 0) | (ids >= vocab)]
  if bad.size:
    _fail(name, f"token {int(bad[0])} is outside the vocabulary [0, {vocab})")
  return ids.astype(np.int32)


def check_request(model, prompts, max_new_tokens, temperature, top_k, top_p, stop):
  """Every bad request is one ``GenerationError`` line, before anything is computed.
  -> (prompt id arrays, stop ids)."""
  cfg = model.cfg
  if hasattr(prompts, "ndim") and getattr(prompts, "ndim", 0) == 2:   # [B, L] equal lengths
    prompts = list(np.asarray(prompts))
  if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
    _fail("prompts", "must be a non-empty list of token-id sequences (one per prompt; "
          "moejax.train.data.encode(text) gives a byte-level model's ids)")
  ids = [_as_ids(p, f"prompts[{i}]", cfg.vocab_size) for i, p in enumerate(prompts)]
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
    _fail("max_new_tokens", f"must be a positive integer, got {max_new_tokens!r}")
  longest = max(len(p) for p in ids)
  if cfg.max_length and longest + max_new_tokens > cfg.max_length:
    _fail("max_new_tokens", f"the longest prompt ({longest} tokens) + max_new_tokens "
          f"({max_new_tokens}) exceeds the model's max_length={cfg.max_length} "
          "(config model.max_length; default data.seq_len)")
  if not temperature >= 0:
    _fail("temperature", f"must be >= 0 (0 = greedy), got {temperature}")
  if not isinstance(top_k, (int, np.integer)) or top_k < 0:
    _fail("top_k", f"must be an integer >= 0 (0 = no limit), got {top_k!r}")
  if not 0 < top_p <= 1:
    _fail("top_p", f"must be in (0, 1], got {top_p}")
  stop_ids = np.zeros((0,), np.int32) if stop is None else _as_ids(stop, "stop", cfg.vocab_size)
  s = cfg.moe
  if s is not None and s.router in ("expert_choice", "expert_race") and (
      s.expert_choice_eval == "batch"):
    _fail("model", f"router {s.router!r} with expert_choice_eval='batch' chooses tokens across "
          "the whole sequence and cannot decode one token at a time; use "
          "model.moe.expert_choice_eval='threshold' (its causal form)")
  return ids, stop_ids


def generation_model(model):
  """The model as generation runs it: dropless routing (see the module docstring)."""
  s = model.cfg.moe
  if s is None or s.dispatch == "dropless":
    return model
  return model.clone(cfg=dataclasses.replace(model.cfg,
                                             moe=dataclasses.replace(s, dispatch="dropless")))


def generate(model, params, prompts, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop=None, steer=None,
             calibration=None, weak_model=None, contrast_weight: float = 0.0) -> GenerateResult:
  """Continues each prompt (a list of token-id sequences, lengths may differ) by up to
  ``max_new_tokens`` tokens. Temperature 0 is greedy; ``top_k`` 0 and ``top_p`` 1 keep every
  token; ``seed`` makes sampling reproducible; ``stop`` (token ids, or a str/bytes for a
  byte-level model) ends a row once its new tokens end with it.

  ``steer``: the ``steer`` config group's options as a dict (moejax/inference/steer.py), e.g.
  ``{"deactivate": "1:3", "contrast_weight": 0.5}``; ``skip_rate`` calibrates on
  ``calibration`` (token arrays [B, L]). Self-contrast decoding samples from
  (1 + b) x the model's logits - b x ``weak_model``'s (``contrast_weight`` b), each with its own
  cache; ``steer`` with ``contrast_weight`` builds the weak model itself."""
  if steer:
    model = steer_lib.steered(model, steer, params, calibration)
    if steer_lib.options(steer)["contrast_weight"] > 0:
      weak_model = steer_lib.weak_model(model, steer)
      contrast_weight = float(steer_lib.options(steer)["contrast_weight"])
  ids, stop_ids = check_request(model, prompts, max_new_tokens, temperature, top_k, top_p, stop)
  model = generation_model(model)
  models = (model,) if weak_model is None or not contrast_weight else (
      model, generation_model(weak_model))
  n, longest = len(ids), max(len(p) for p in ids)
  batch = _bucket(n, 1)
  length = _bucket(longest + max_new_tokens, 16)
  if model.cfg.max_length:
    length = min(length, model.cfg.max_length)
  prompt_len = min(_bucket(longest, 8), length)
  tokens = np.zeros((batch, prompt_len), np.int32)
  lengths = np.ones((batch,), np.int32)
  for i, p in enumerate(ids):
    tokens[i, :len(p)], lengths[i] = p, len(p)
  shapes = cache_lib.cache_shapes(model, batch, length)
  cache = tuple(cache_lib.init_cache(m, batch, length) for m in models)
  greedy = float(temperature) == 0.0
  knobs = (jnp.int32(seed), jnp.float32(temperature or 1.0), jnp.int32(top_k),
           jnp.float32(top_p))
  before = _compiles()
  start = time.perf_counter()
  contrast = float(contrast_weight) if len(models) > 1 else 0.0
  first, cache = _prefill(models, params, cache, jnp.asarray(tokens), jnp.asarray(lengths),
                          *knobs, greedy=greedy, contrast=contrast)
  first.block_until_ready()
  prefill_s = time.perf_counter() - start
  start = time.perf_counter()
  out, steps = _decode(models, params, cache, first, jnp.asarray(lengths),
                       jnp.int32(max_new_tokens), *knobs, jnp.asarray(stop_ids),
                       jnp.zeros((batch, length), jnp.int32), greedy=greedy, contrast=contrast)
  out = np.asarray(out)
  decode_s = time.perf_counter() - start
  steps = int(steps)
  new = [_until_stop(out[i, :min(steps, max_new_tokens)], stop_ids) for i in range(n)]
  return GenerateResult(
      tokens=new, cache_bytes={kind: n * len(models)
                                for kind, n in cache_lib.cache_bytes(shapes).items()},
      cache_bytes_per_token=cache_lib.bytes_per_token(shapes, batch, length),
      prefill_seconds=prefill_s, decode_seconds=decode_s, prompt_tokens=int(sum(map(len, ids))),
      decode_steps=steps - 1, batch=batch, prompt_length=prompt_len, cache_length=length,
      compiled=_compiles() != before)


def _until_stop(row: np.ndarray, stop: np.ndarray) -> np.ndarray:
  k = len(stop)
  for j in range(k - 1, len(row)) if k else ():
    if np.array_equal(row[j - k + 1:j + 1], stop):
      return row[:j + 1].copy()
  return row.copy()


def _compiles() -> int:
  return _prefill._cache_size() + _decode._cache_size()


def _apply(models, params, caches, tokens, contrast: float, **kwargs):
  """Every model on its own cache -> (logits, new caches); two models are self-contrast's
  strong and weak: (1 + b) strong - b weak."""
  outs = [m.apply({"params": params, "cache": c}, tokens, mutable=["cache"], **kwargs)
          for m, c in zip(models, caches)]
  logits = outs[0][0]
  if len(outs) > 1:
    logits = steer_lib.contrast_logits(logits, outs[1][0], contrast)
  return logits, tuple(mutated["cache"] for _, mutated in outs)


@functools.partial(jax.jit, static_argnames=("models", "greedy", "contrast"),
                   donate_argnames=("cache",))
def _prefill(models, params, cache, tokens, lengths, seed, temperature, top_k, top_p, *, greedy,
             contrast):
  logits, cache = _apply(models, params, cache, tokens, contrast, prompt_length=lengths,
                         cache_mode="prefill")
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  keys = row_keys(seed, tokens.shape[0], 0)
  return next_tokens(last, keys, temperature, top_k, top_p, greedy=greedy), cache


def _stopped(out: Array, i: Array, stop: Array) -> Array:
  """[B] bool: the new tokens out[:, :i+1] end with ``stop``."""
  k = stop.shape[0]
  if k == 0:
    return jnp.zeros(out.shape[:1], bool)
  tail = jax.lax.dynamic_slice_in_dim(out, jnp.maximum(i - k + 1, 0), k, axis=1)
  return (i + 1 >= k) & jnp.all(tail == stop[None, :], axis=1)


# (the cache is consumed by the loop, not returned: nothing to donate it to)
@functools.partial(jax.jit, static_argnames=("models", "greedy", "contrast"))
def _decode(models, params, cache, first, lengths, num_new, seed, temperature, top_k, top_p,
            stop, out, *, greedy, contrast):
  """Decodes until every row stopped or ``num_new`` tokens exist -> (tokens [B, S], count)."""
  out = out.at[:, 0].set(first)

  def cond(carry):
    i, _, _, _, done = carry
    return (i < num_new) & ~jnp.all(done)

  def body(carry):
    i, tok, cache, out, done = carry
    logits, cache = _apply(models, params, cache, tok[:, None], contrast,
                           positions=(lengths + i - 1)[:, None], cache_mode="decode")
    nxt = next_tokens(logits[:, 0], row_keys(seed, tok.shape[0], i), temperature, top_k, top_p,
                      greedy=greedy)
    out = out.at[:, i].set(nxt)
    return i + 1, nxt, cache, out, done | _stopped(out, i, stop)

  init = (jnp.int32(1), first, cache, out, _stopped(out, jnp.int32(0), stop))
  steps, _, _, out, _ = jax.lax.while_loop(cond, body, init)
  return out, steps

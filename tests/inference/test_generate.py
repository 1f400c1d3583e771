"""moejax.generate: sampling rules against NumPy, one compilation per bucket, rows independent of
their batch, reproducible seeds, stop sequences, and every bad request refused in one line."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import moejax
from moejax.inference import GenerationError, generate
from moejax.inference.generate import _decode, _prefill
from moejax.inference.sampling import filter_logits, next_tokens, row_keys
from moejax.layers.experts import run_gathered_swiglu_experts
from moejax.layers.moe import MoEBlock, MoESpec
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def lm():
  c = tiny_config("deepseekmoe")
  c.data.seq_len = 96
  model = moejax.build_model(c)
  return model, moejax.init_params(model, c, seed=0)


def np_filter(z, temperature, top_k, top_p):
  """The rule in words: softmax at temperature over the top-k, then the smallest most-probable
  set whose mass reaches top_p -> boolean mask over the vocabulary."""
  z = np.asarray(z, np.float64) / temperature
  order = np.argsort(-z, kind="stable")
  keep = np.zeros(len(z), bool)
  allowed = order[:top_k] if top_k else order
  p = np.exp(z[allowed] - z[allowed].max())
  p /= p.sum()
  mass = 0.0
  for tok, pi in zip(allowed, p):
    keep[tok] = True
    mass += pi
    if mass >= top_p:
      break
  return keep


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0),
                                                     (1.3, 0, 0.6), (1.0, 4, 0.5), (0.5, 0, 0.05)])
def test_filter_keeps_exactly_the_numpy_set(temperature, top_k, top_p):
  logits = jax.random.normal(jax.random.key(3), (6, 40)) * 2
  ranked, order = filter_logits(logits, temperature, top_k, top_p)
  for row in range(6):
    kept = np.zeros(40, bool)
    kept[np.asarray(order[row])[np.isfinite(np.asarray(ranked[row]))]] = True
    np.testing.assert_array_equal(kept, np_filter(logits[row], temperature, top_k, top_p))


def test_draws_follow_the_renormalised_kept_distribution():
  logits = jnp.asarray([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0]])
  n = 20000
  keys = jax.random.split(jax.random.key(0), n)
  draw = jax.jit(jax.vmap(lambda k: next_tokens(logits, k[None], 0.9, 0, 0.8, greedy=False)[0]))
  counts = np.bincount(np.asarray(draw(keys)), minlength=6) / n
  keep = np_filter(logits[0], 0.9, 0, 0.8)
  p = np.where(keep, np.exp(np.asarray(logits[0]) / 0.9), 0)
  p /= p.sum()
  np.testing.assert_allclose(counts, p, atol=0.015)
  assert counts[~keep].sum() == 0
  greedy = next_tokens(logits, row_keys(0, 1, 0), 1.0, 0, 1.0, greedy=True)
  assert int(greedy[0]) == 0


def test_one_compilation_per_bucket_over_50_steps(lm):
  model, params = lm
  generate(model, params, [[1, 2, 3], [4, 5]], 50)
  sizes = (_prefill._cache_size(), _decode._cache_size())
  r = generate(model, params, [[9, 9, 9, 9, 9, 1], [7]], 41, temperature=0.0)
  assert (_prefill._cache_size(), _decode._cache_size()) == sizes and not r.compiled
  assert r.decode_steps == 40 and all(len(t) == 41 for t in r.tokens)
  counter = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _d, **kw: counter.append(event) if "backend_compile" in event else None)
  generate(model, params, [[3, 1, 4, 1, 5]], 50, temperature=0.7, top_p=0.9, seed=4)
  n_first = len(counter)
  generate(model, params, [[2, 7, 1]], 50, temperature=1.1, top_k=3, seed=5)
  assert len(counter) == n_first        # sampling knobs are data, not recompilation


def test_rows_do_not_depend_on_their_batch_and_seeds_reproduce(lm):
  model, params = lm
  prompts = [[72, 101, 108, 108, 111], [1], [44, 45, 46, 47, 48, 49, 50, 51, 52]]
  for kw in ({}, {"temperature": 0.9, "top_k": 20, "seed": 3}):
    alone = generate(model, params, prompts[:1], 24, **kw).tokens[0]
    batched = generate(model, params, prompts, 24, **kw).tokens
    np.testing.assert_array_equal(batched[0], alone)
  a = generate(model, params, prompts, 16, temperature=1.0, seed=11).tokens
  b = generate(model, params, prompts, 16, temperature=1.0, seed=11).tokens
  c = generate(model, params, prompts, 16, temperature=1.0, seed=12).tokens
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_stop_sequence_ends_each_row_where_it_appears(lm):
  model, params = lm
  free = generate(model, params, [[10, 20, 30], [40]], 30).tokens
  stop = list(free[0][5:7])
  got = generate(model, params, [[10, 20, 30], [40]], 30, stop=stop).tokens
  ends = [j for j in range(1, 30) if list(free[0][j - 1:j + 1]) == stop]
  np.testing.assert_array_equal(got[0], free[0][:ends[0] + 1])
  other = [j for j in range(1, 30) if list(free[1][j - 1:j + 1]) == stop]
  np.testing.assert_array_equal(got[1], free[1][:other[0] + 1] if other else free[1])


@pytest.mark.parametrize("args,kwargs,match", [
    (([[1, 2]], 95), {}, r"max_new_tokens: the longest prompt \(2 tokens\) \+ max_new_tokens "
                         r"\(95\) exceeds the model's max_length=96"),
    (([[1, 2], []], 4), {}, r"prompts\[1\]: is empty"),
    (([[1, 2]], 0), {}, "max_new_tokens: must be a positive integer, got 0"),
    (([[1, 2]], 4), {"top_p": 0.0}, r"top_p: must be in \(0, 1\], got 0.0"),
    (([[1, 2]], 4), {"top_p": 1.5}, r"top_p: must be in \(0, 1\], got 1.5"),
    (([[1, 256]], 4), {}, r"prompts\[0\]: token 256 is outside the vocabulary \[0, 256\)"),
    (([[1, 2]], 4), {"stop": [-1]}, r"stop: token -1 is outside the vocabulary"),
    (("hello", 4), {}, "prompts: must be a non-empty list"),
    (([[1, 2]], 4), {"temperature": -1.0}, "temperature: must be >= 0"),
])
def test_bad_requests_are_one_line_before_any_compute(lm, args, kwargs, match):
  model, params = lm
  sizes = (_prefill._cache_size(), _decode._cache_size())
  with pytest.raises(GenerationError, match=match) as info:
    generate(model, params, *args, **kwargs)
  assert "\n" not in str(info.value)
  assert (_prefill._cache_size(), _decode._cache_size()) == sizes


def test_batch_choice_router_is_refused_in_its_batch_form():
  c = tiny_config("deepseekmoe")
  c.model.moe.router, c.model.moe.expert_choice_eval = "expert_choice", "batch"
  model = moejax.build_model(c)
  with pytest.raises(GenerationError, match="expert_choice_eval='threshold'"):
    generate(model, None, [[1, 2]], 4)


@pytest.mark.parametrize("rows", [1, 4, 32])
def test_small_batch_path_equals_the_grouped_path(rows):
  """The gathered path (decode_path='gather', both its forms) against the training layout, with
  shared experts and k=2 of 8 routed experts; auto picks it while tokens x k <= 4 x routed
  experts on CPU."""
  base = dict(num_experts=5, top_k=2, expert_hidden=32, segments=2, num_shared_experts=2)
  x = jax.random.normal(jax.random.key(0), (rows, 1, 16))
  outs = {}
  for path in ("gather", "grouped", "auto"):
    block = MoEBlock(MoESpec(**base, decode_path=path))
    params = nn.meta.unbox(block.init(jax.random.key(1), x)["params"])
    outs[path] = np.asarray(block.apply({"params": params}, x))
  np.testing.assert_allclose(outs["gather"], outs["grouped"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(outs["auto"], outs["gather" if rows * 2 <= 32 else "grouped"])
  wi, wo = params["experts"]["wi"], params["experts"]["wo"]
  index = jax.random.randint(jax.random.key(2), (rows, 3), -1, 8)
  gate = jax.random.uniform(jax.random.key(3), (rows, 3))
  forms = [np.asarray(run_gathered_swiglu_experts((wi, wo), x[:, 0], index, gate, form=f))
           for f in ("loop", "batched")]
  np.testing.assert_allclose(forms[0], forms[1], rtol=1e-5, atol=1e-6)
  want = sum(np.where(index[:, j, None] >= 0, gate[:, j, None], 0) * np.stack(
      [np_swiglu(np.asarray(x[t, 0]), wi[max(int(index[t, j]), 0)], wo[max(int(index[t, j]), 0)])
       for t in range(rows)]) for j in range(3))
  np.testing.assert_allclose(forms[0], want, rtol=1e-4, atol=1e-5)


def np_swiglu(u, wi, wo):
  wi, wo = np.asarray(wi, np.float64), np.asarray(wo, np.float64)
  g, up = u @ wi[:, 0], u @ wi[:, 1]
  return (g / (1 + np.exp(-g)) * up) @ wo

"""Soft merging of experts: SMEAR equals one FFN with explicitly averaged parameters, gradients
reach every expert, and Lory's segment form is causal (tested by changing tokens)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from moejax.errors import ConfigError
from moejax.layers.merging import SoftMergeBlock
from moejax.layers.moe import MoESpec

D = 8


def np_ffn(u, wi, wo):
  g, up = u @ wi[:, 0], u @ wi[:, 1]
  return (g / (1 + np.exp(-g)) * up) @ wo


def np_softmax(z):
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _block(merge, shared=0, segment=4):
  spec = MoESpec(num_experts=4 + shared, top_k=1 + shared, expert_hidden=12,
                 num_shared_experts=shared, merge=merge, merge_segment=segment)
  x = jax.random.normal(jax.random.key(0), (2, 12, D))
  block = SoftMergeBlock(spec)
  params = nn.meta.unbox(block.init(jax.random.key(1), x)["params"])
  params["router"]["kernel"] = params["router"]["kernel"] * 30
  return block, params, x


def _np_params(params):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


@pytest.mark.parametrize("shared", [0, 1])
def test_smear_equals_one_ffn_with_averaged_parameters(shared):
  block, params, x = _block("sequence", shared)
  y = np.asarray(block.apply({"params": params}, x))
  p, u = _np_params(params), np.asarray(x, np.float64)
  for b in range(2):
    probs = np_softmax(u[b].mean(0) @ p["router"]["kernel"])
    assert probs.max() < 0.999                      # a real mixture, not one expert
    wi = np.einsum("e,edch->dch", probs, p["experts"]["wi"])
    wo = np.einsum("e,ehd->hd", probs, p["experts"]["wo"])
    want = np_ffn(u[b], wi, wo)
    if shared:
      want += np_ffn(u[b], p["shared"]["wi"], p["shared"]["wo"])
    np.testing.assert_allclose(y[b], want, rtol=1e-5, atol=1e-6)


def test_gradients_reach_every_expert_and_the_router():
  block, params, x = _block("sequence")
  g = jax.grad(lambda p: jnp.sum(block.apply({"params": p}, x) ** 2))(params)
  per_expert = jnp.abs(g["experts"]["wi"]).sum(axis=(1, 2, 3))
  assert (per_expert > 0).all() and float(jnp.abs(g["router"]["kernel"]).sum()) > 0


def test_lory_segments_match_numpy():
  block, params, x = _block("causal_segments", segment=4)
  y = np.asarray(block.apply({"params": params}, x))
  p, u = _np_params(params), np.asarray(x, np.float64)
  for b in range(2):
    for s in range(3):
      rows = slice(4 * s, 4 * s + 4)
      probs = (np.full(4, 0.25) if s == 0 else
               np_softmax(u[b, 4 * (s - 1):4 * s].mean(0) @ p["router"]["kernel"]))
      wi = np.einsum("e,edch->dch", probs, p["experts"]["wi"])
      wo = np.einsum("e,ehd->hd", probs, p["experts"]["wo"])
      np.testing.assert_allclose(y[b, rows], np_ffn(u[b, rows], wi, wo), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [0, 3, 5, 11])
def test_lory_is_causal_changing_a_token_changes_only_it_and_the_next_segment(t):
  block, params, x = _block("causal_segments", segment=4)
  y = np.asarray(block.apply({"params": params}, x))
  x2 = x.at[:, t].set(x[:, t] * -3 + 1)
  y2 = np.asarray(block.apply({"params": params}, x2))
  changed = ~np.all(np.isclose(y, y2, rtol=0, atol=0), axis=(0, 2))
  seg = t // 4
  allowed = np.zeros(12, bool)
  allowed[t] = True
  allowed[4 * (seg + 1):4 * (seg + 2)] = True   # (in one layer: only the next segment's routing)
  assert not (changed & ~allowed).any(), (t, np.nonzero(changed)[0])
  assert not changed[:t].any()                  # nothing before t, in particular
  assert changed[t]
  if seg < 2:
    assert changed[4 * (seg + 1):4 * (seg + 2)].all()   # the next segment really uses it
  # SMEAR is not causal: one token changes every position of its sequence
  block, params, x = _block("sequence")
  y = np.asarray(block.apply({"params": params}, x))
  y2 = np.asarray(block.apply({"params": params}, x.at[:, t].set(x[:, t] * -3 + 1)))
  assert (~np.all(np.isclose(y, y2, rtol=0, atol=0), axis=(0, 2))).all()


def test_model_with_lory_layers_is_causal():
  from conftest import tiny_config
  from moejax import api, config as config_lib
  c = config_lib.apply_overrides(tiny_config("deepseekmoe"), {
      "model.moe.merge": "causal_segments", "model.moe.merge_segment": 4})
  model = api.build_model(c)
  params = api.init_params(model, c)
  tokens = jax.random.randint(jax.random.key(0), (1, 16), 0, 256)
  a = api.forward(model, params, tokens).logits
  b = api.forward(model, params, tokens.at[0, 9].set((tokens[0, 9] + 1) % 256)).logits
  np.testing.assert_array_equal(a[0, :9], b[0, :9])
  assert not np.allclose(a[0, 9:], b[0, 9:])


def _lory_prompt_block():
  spec = MoESpec(num_experts=4, top_k=1, expert_hidden=12, merge="causal_segments",
                 merge_segment=4, merge_inference="prompt")
  x = jax.random.normal(jax.random.key(0), (2, 12, D))
  block = SoftMergeBlock(spec)
  params = nn.meta.unbox(block.init(jax.random.key(1), x)["params"])
  params["router"]["kernel"] = params["router"]["kernel"] * 30
  return block, params, x


@pytest.mark.parametrize("n", [1, 5, 12])
def test_lory_at_inference_routes_once_on_the_prompt(n):
  """merge_inference='prompt' with prompt_length n: every position uses one expert merged with
  softmax(W_r mean of the first n inputs); tokens after the prompt never change the merge."""
  block, params, x = _lory_prompt_block()
  y = np.asarray(block.apply({"params": params}, x, prompt_length=jnp.int32(n)))
  p, u = _np_params(params), np.asarray(x, np.float64)
  for b in range(2):
    probs = np_softmax(u[b, :n].mean(0) @ p["router"]["kernel"])
    wi = np.einsum("e,edch->dch", probs, p["experts"]["wi"])
    wo = np.einsum("e,ehd->hd", probs, p["experts"]["wo"])
    np.testing.assert_allclose(y[b], np_ffn(u[b], wi, wo), rtol=1e-5, atol=1e-6)
  if n < 12:
    y2 = np.asarray(block.apply({"params": params}, x.at[:, n:].set(-x[:, n:]),
                                prompt_length=jnp.int32(n)))
    np.testing.assert_array_equal(y2[:, :n], y[:, :n])
  # without a prompt length (training, eval) it is the segment form
  np.testing.assert_array_equal(
      block.apply({"params": params}, x),
      SoftMergeBlock(dataclasses.replace(block.spec, merge_inference="segments")).apply(
          {"params": params}, x))


def test_generation_passes_the_prompt_length_to_lory():
  from conftest import tiny_config
  from moejax import api, config as config_lib
  from moejax.inference import generate
  c = config_lib.apply_overrides(tiny_config("deepseekmoe"), {
      "model.moe.merge": "causal_segments", "model.moe.merge_segment": 4,
      "model.moe.merge_inference": "prompt"})
  model = api.build_model(c)
  params = api.init_params(model, c)
  prompt = np.array([5, 17, 99], np.int32)
  got = generate(model, params, [prompt], 4).tokens[0]
  tokens = list(prompt)
  for _ in range(4):                          # the reference loop: prompt length 3 throughout
    window = np.zeros((1, 16), np.int32)
    window[0, :len(tokens)] = tokens
    logits = model.apply({"params": params}, window, prompt_length=3)
    tokens.append(int(np.argmax(logits[0, len(tokens) - 1])))
  np.testing.assert_array_equal(got, tokens[3:])
  longer = model.apply({"params": params}, window, prompt_length=6)     # the length matters
  assert not np.allclose(longer[0, :6], logits[0, :6])


@pytest.mark.parametrize("fields,message", [
    (dict(merge="soft"), "merge: got 'soft'"),
    (dict(merge="sequence", merge_inference="prompt"), "merge_inference: ='prompt' is Lory"),
    (dict(merge="causal_segments", merge_inference="once"), "merge_inference: got 'once'"),
    (dict(merge="sequence", router="sigmoid"), "merge: ='sequence' merges the experts"),
    (dict(merge="sequence", expert_bank="ternary_swiglu"), "expert_bank.*got 'ternary_swiglu'"),
])
def test_merge_settings_are_validated(fields, message):
  with pytest.raises(ConfigError, match=message):
    MoESpec(num_experts=4, top_k=1, expert_hidden=8, **fields)

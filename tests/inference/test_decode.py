"""Cached decoding equals the full-sequence forward: for every attention kind and the routers
and merges with inference-time rules, a batch of prompts of different lengths is prefilled,
then teacher-forced one position per row per step; each step's logits must equal the full
forward's logits at that position (float32, tight tolerance)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.api import build_model, init_params
from moejax.inference import init_cache
from moejax.inference.cache import bytes_per_token
from moejax.inference.generate import generation_model
from tests.conftest import tiny_config

PROMPTS = [[5, 17, 99, 3, 44, 1, 9], [7, 8], [200, 4, 4, 61]]
STEPS = 9            # crosses Lory's segment boundaries (segment 4) for every row


def _config(**over):
  c = tiny_config("deepseekmoe")
  c.data.seq_len = 32
  for key, value in over.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


# name -> config overrides; each row one attention kind or one inference-time routing rule
CASES = {
    "gqa_qk_norm_bias": {"model.qk_norm": "head", "model.qkv_bias": True},
    "mha_full_norm_sigmoid_groups": {
        "model.num_kv_heads": 4, "model.qk_norm": "full", "model.moe.router": "sigmoid",
        "model.moe.num_expert_groups": 4, "model.moe.groups_per_token": 2,
        "model.moe.routed_scaling_factor": 2.5},
    "mla_absorbed_expert_race": {
        "model.attention": "latent", "model.mla.q_lora_rank": 16, "model.mla.kv_lora_rank": 8,
        "model.mla.qk_nope_head_dim": 8, "model.mla.qk_rope_head_dim": 4,
        "model.mla.v_head_dim": 8, "model.moe.router": "expert_race"},
    "mla_expanded": {
        "model.attention": "latent", "model.mla.kv_lora_rank": 8, "model.mla.decode": "expanded",
        "model.mla.qk_nope_head_dim": 8, "model.mla.qk_rope_head_dim": 4,
        "model.mla.v_head_dim": 8},
    "moh_selected_hash": {
        "model.attention": "mixture_of_heads", "model.moh.shared_heads": 1,
        "model.moh.head_compute": "selected", "model.moe.router": "hash",
        "model.moe.load_balance_weight": 0.0},
    "lory_segments": {"model.moe.merge": "causal_segments", "model.moe.merge_segment": 4,
                      "model.moe.num_experts": 4, "model.moe.top_k": 1, "model.moe.segments": 1,
                      "model.moe.num_shared_experts": 0},
    "lory_prompt": {"model.moe.merge": "causal_segments", "model.moe.merge_segment": 4,
                    "model.moe.merge_inference": "prompt", "model.moe.num_experts": 4,
                    "model.moe.top_k": 1, "model.moe.segments": 1,
                    "model.moe.num_shared_experts": 0},
    "smear_prompt": {"model.moe.merge": "sequence", "model.moe.num_experts": 4,
                     "model.moe.top_k": 1, "model.moe.segments": 1,
                     "model.moe.num_shared_experts": 0},
    "recurrent_capacity_coe": {"model.moe.router": "recurrent", "model.moe.dispatch": "capacity",
                               "model.moe.moe_every": 2},
    "top_p_grouped_path": {"model.moe.router": "top_p", "model.moe.top_p": 0.5,
                           "model.moe.decode_path": "grouped", "model.moe.iterations": 2},
}
FAST = ("gqa_qk_norm_bias", "mla_absorbed_expert_race", "lory_segments")


def _perturb(params):
  """Router states and norms away from their init, so a rule that ignored them would show."""
  def f(path, x):
    name = jax.tree_util.keystr(path)
    if "selection_bias" in name or "threshold" in name:
      return jnp.abs(jax.random.normal(jax.random.key(len(name)), x.shape)) * 0.05
    return x
  return jax.tree_util.tree_map_with_path(f, params)


def decode_logits(model, params, seqs, prompt_lens, steps):
  """Prefill the prompts, then feed each row's next true token: -> [B, steps, V] logits of the
  positions prompt_len-1 .. prompt_len+steps-2."""
  b = len(seqs)
  length, lp = 32, max(prompt_lens)
  tokens = np.zeros((b, lp), np.int32)
  for i, (s, n) in enumerate(zip(seqs, prompt_lens)):
    tokens[i, :n] = s[:n]
  lengths = jnp.asarray(prompt_lens, jnp.int32)
  cache = init_cache(model, b, length)
  logits, mut = jax.jit(lambda p, c, t: model.apply(
      {"params": p, "cache": c}, t, prompt_length=lengths, cache_mode="prefill",
      mutable=["cache"]))(params, cache, jnp.asarray(tokens))
  out = [np.asarray(logits)[np.arange(b), np.asarray(prompt_lens) - 1]]
  step = jax.jit(lambda p, c, t, pos: model.apply({"params": p, "cache": c}, t, positions=pos,
                                                  cache_mode="decode", mutable=["cache"]))
  cache = mut["cache"]
  for i in range(steps - 1):
    pos = np.asarray(prompt_lens) + i
    tok = np.asarray([s[n] for s, n in zip(seqs, pos)], np.int32)
    logits, mut = step(params, cache, jnp.asarray(tok[:, None]), jnp.asarray(pos[:, None]))
    cache = mut["cache"]
    out.append(np.asarray(logits)[:, 0])
  return np.stack(out, axis=1)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow)
                                  for n in CASES])
def test_cached_decoding_equals_full_forward(name):
  config = _config(**CASES[name])
  model = generation_model(build_model(config))
  params = _perturb(init_params(model, config, seed=1))
  rng = np.random.default_rng(0)
  seqs = [list(p) + list(rng.integers(0, 256, STEPS)) for p in PROMPTS]
  lens = [len(p) for p in PROMPTS]
  got = decode_logits(model, params, seqs, lens, STEPS)
  full_len = 20        # a multiple of Lory's segment; causal, so the zero tail changes nothing
  for b, (s, n) in enumerate(zip(seqs, lens)):
    row = np.zeros((1, full_len), np.int32)
    row[0, :len(s)] = s
    want = np.asarray(model.apply({"params": params}, jnp.asarray(row), prompt_length=n))
    np.testing.assert_allclose(got[b], want[0, n - 1:n - 1 + STEPS], rtol=2e-5, atol=2e-5,
                               err_msg=f"{name}, row {b}")


def test_latent_cache_is_smaller_than_gqa_per_token():
  """MLA caches r_kv + d_R numbers per token and layer; GQA 2 G d_h."""
  gqa = build_model(_config())
  mla = build_model(_config(**CASES["mla_expanded"]))
  from moejax.inference import cache_shapes
  per = lambda m: bytes_per_token(cache_shapes(m, 2, 16), 2, 16)
  layers = 2
  assert per(gqa) == {"attention": layers * 2 * 2 * 8 * 4}
  assert per(mla) == {"latent_attention": layers * (8 + 4) * 4}

"""Up-cycling a trained dense model into an MoE: copies reproduce the dense function exactly,
Drop-Upcycling re-initialises exactly the stated share, the fine-grained split sums back to the
dense FFN, and shapes that cannot fit stop with the setting named."""
import jax
import numpy as np
import pytest

import moejax
from conftest import tiny_config
from moejax import config as config_lib
from moejax.errors import ConfigError
from moejax.layers.moe import MoESpec
from moejax.train import upcycle
from moejax.train.trainer import Trainer

MOE = {"model.moe.num_experts": 4, "model.moe.top_k": 2, "model.moe.expert_hidden": 64,
       "model.moe.segments": 1, "model.moe.num_shared_experts": 0,
       "model.moe.renormalize": True}


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("dense"))
  t = Trainer(tiny_config("dense"), wd)      # ffn_hidden 64
  t.train(steps=4, progress=None)
  t.save()
  t.close()
  return wd, t


def _moe_config(src, **extra):
  return config_lib.apply_overrides(tiny_config("dense"),
                                    {**MOE, "upcycle.source": src, **extra})


def test_copies_with_renormalised_gates_reproduce_the_dense_logits(dense_run):
  src, dense = dense_run
  moe = Trainer(_moe_config(src))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  want = moejax.forward(dense.model, dense.params, tokens).logits
  got = moejax.forward(moe.model, moe.params, tokens).logits
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  experts = moe.params["layer_0"]["moe"]["experts"]
  for e in range(4):
    np.testing.assert_array_equal(experts["wi"][e], dense.params["layer_0"]["ffn"]["wi"])
  dense_flat = {jax.tree_util.keystr(p): x
                for p, x in jax.tree_util.tree_flatten_with_path(dense.params)[0]}
  copied = 0
  for p, x in jax.tree_util.tree_flatten_with_path(moe.params)[0]:
    if "'moe'" not in jax.tree_util.keystr(p):   # embeddings, attention, norms: copied
      np.testing.assert_array_equal(x, dense_flat[jax.tree_util.keystr(p)])
      copied += 1
  assert copied >= 10
  assert moe.step == 0
  moe.train(steps=1, progress=None)           # and it trains


def test_drop_upcycling_reinitialises_the_stated_share():
  rng = np.random.default_rng(0)
  ffn = {"wi": rng.normal(size=(8, 2, 20)), "wo": rng.normal(size=(20, 8))}
  spec = MoESpec(num_experts=3, top_k=1, expert_hidden=20)
  experts, shared = upcycle.expert_weights(ffn, spec, "drop", jax.random.key(1), 0.25)
  assert shared is None
  for e in range(3):
    changed = ~np.all(np.isclose(experts["wo"][e], ffn["wo"]), axis=1)
    assert changed.sum() == 5                                       # 25% of 20 units
    same_in = np.all(np.isclose(experts["wi"][e], ffn["wi"]), axis=(0, 1))
    np.testing.assert_array_equal(~same_in, changed)                # the same units in wi
  assert not np.array_equal(experts["wo"][0], experts["wo"][1])     # experts now differ
  new = experts["wo"][0][~np.all(np.isclose(experts["wo"][0], ffn["wo"]), axis=1)]
  assert abs(new.std() - ffn["wo"].std()) < 0.5                     # dense statistics


def test_fine_grained_split_sums_to_the_dense_ffn():
  rng = np.random.default_rng(2)
  ffn = {"wi": rng.normal(size=(8, 2, 64)), "wo": rng.normal(size=(64, 8))}
  spec = MoESpec(num_experts=4, top_k=2, expert_hidden=64, segments=4, num_shared_experts=1)
  experts, shared = upcycle.expert_weights(ffn, spec, "split", None)
  assert experts["wi"].shape == (15, 8, 2, 16) and shared["wi"].shape == (8, 2, 16)
  x = rng.normal(size=(5, 8))
  ffn_np = lambda wi, wo: (lambda g, u: g / (1 + np.exp(-g)) * u)(x @ wi[:, 0], x @ wi[:, 1]) @ wo
  # shared = segment 0; routed j = segment 1 + j % 3: one copy of segments 1..3 sums the rest
  total = ffn_np(shared["wi"], shared["wo"]) + sum(
      ffn_np(experts["wi"][j], experts["wo"][j]) for j in range(3))
  np.testing.assert_allclose(total, ffn_np(ffn["wi"], ffn["wo"]), rtol=1e-10)


def test_shapes_that_cannot_fit_name_the_setting(dense_run, tmp_path):
  src, _ = dense_run
  with pytest.raises(ConfigError, match="expert hidden size must be the dense model.ffn_hidden"):
    Trainer(_moe_config(src, **{"model.moe.expert_hidden": 32}))
  with pytest.raises(ConfigError, match=r"differs outside its FFNs: model.d_model: 32 there"):
    Trainer(_moe_config(src, **{"model.d_model": 48}))
  with pytest.raises(ConfigError, match="not the workdir of a trained run"):
    Trainer(_moe_config(str(tmp_path)))
  with pytest.raises(ConfigError, match="upcycle.method: got 'clone'"):
    Trainer(_moe_config(src, **{"upcycle.method": "clone"}))
  with pytest.raises(ConfigError, match="upcycle.source: is set but the model is dense"):
    Trainer(config_lib.apply_overrides(tiny_config("dense"), {"upcycle.source": src}))


MOTE = {"model.moe.num_experts": 5, "model.moe.top_k": 2, "model.moe.expert_hidden": 64,
        "model.moe.num_shared_experts": 1, "model.moe.expert_bank": "ternary_swiglu",
        "model.moe.shared_trainable": False, "model.moe.renormalize": False}


def test_mote_form_equals_dense_with_routed_experts_off_and_keeps_shared_frozen(dense_run):
  src, dense = dense_run
  mote = Trainer(config_lib.apply_overrides(tiny_config("dense"),
                                            {**MOTE, "upcycle.source": src}))
  for layer in ("layer_0", "layer_1"):
    np.testing.assert_array_equal(mote.params[layer]["moe"]["shared"]["wi"],
                                  dense.params[layer]["ffn"]["wi"])
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  off = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 0 if "'experts'" in jax.tree_util.keystr(p) else x, mote.params)
  np.testing.assert_allclose(moejax.forward(mote.model, off, tokens).logits,
                             moejax.forward(dense.model, dense.params, tokens).logits,
                             rtol=1e-5, atol=1e-5)
  before = jax.device_get(mote.params)
  mote.train(steps=2, progress=None)
  after = jax.device_get(mote.params)
  for layer in ("layer_0", "layer_1"):
    for name in ("wi", "wo"):
      np.testing.assert_array_equal(after[layer]["moe"]["shared"][name],
                                    before[layer]["moe"]["shared"][name])     # frozen
    assert not np.array_equal(after[layer]["moe"]["experts"]["wi"],
                              before[layer]["moe"]["experts"]["wi"])          # trained


def test_standard_attention_run_continues_as_mixture_of_heads(dense_run):
  """The paper's continue-tuning: parameter-free query-norm router, first head shared, 0/1
  gates with a straight-through estimator; with every head active it is the trained model."""
  src, dense = dense_run
  moh = {"model.attention": "mixture_of_heads", "model.moh.shared_heads": 1,
         "model.moh.gating": "binary_ste", "model.moh.router": "query_norm",
         "upcycle.source": src}
  full = Trainer(config_lib.apply_overrides(tiny_config("dense"),
                                            {**moh, "model.moh.active_heads": 3}))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  want = moejax.forward(dense.model, dense.params, tokens).logits
  np.testing.assert_allclose(moejax.forward(full.model, full.params, tokens).logits, want,
                             rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(full.params) == jax.tree.structure(dense.params)   # no new weights
  half = Trainer(config_lib.apply_overrides(tiny_config("dense"),
                                            {**moh, "model.moh.active_heads": 1}))
  assert not np.allclose(moejax.forward(half.model, half.params, tokens).logits, want)
  r = half.train(steps=2, progress=None)
  assert np.isfinite(r.metrics["loss"])
  grads = jax.grad(lambda p: moejax.loss(half.model, p, jax.random.randint(
      jax.random.key(1), (2, 17), 0, 256))[0])(half.params)
  assert float(jax.numpy.abs(grads["layer_0"]["attn"]["query"]).sum()) > 0

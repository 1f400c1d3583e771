"""Compression methods against hand-built cases and NumPy references (moejax/compress/)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from moejax import config as config_lib
from moejax.api import build_model, init_params
from moejax.compress import apply as apply_lib
from moejax.compress import bank as bank_lib
from moejax.compress import merge as merge_lib
from moejax.compress import methods
from moejax.compress.calibration import LayerStats, collect
from moejax.compress.plan import CompressionPlan, LayerPlan
from moejax.errors import ConfigError
from moejax.layers.folding import fold_routing
from moejax.layers.routers import RoutingResult

DIRECT = {"model.moe.num_experts": 0, "model.moe.segments": 1, "model.moe.routed_experts": 8,
          "model.moe.active_experts": 2, "model.moe.expert_hidden": 16,
          "model.moe.num_shared_experts": 1}


def _experts(rng, n, d=6, h=8):
  return [(rng.standard_normal((d, 2, h)).astype(np.float32),
           rng.standard_normal((h, d)).astype(np.float32)) for _ in range(n)]


def _stats(rng, index, d=6, gate=None, grad=False, num_experts=None):
  t, k = index.shape
  e = num_experts or int(index.max()) + 1
  probs = rng.random((t, e))
  return LayerStats(x=rng.standard_normal((t, d)).astype(np.float32), index=index,
                    gate=np.where(index >= 0, gate if gate is not None else rng.random((t, k)),
                                  0.0).astype(np.float32),
                    probs=(probs / probs.sum(1, keepdims=True)).astype(np.float32),
                    grad=rng.standard_normal((t, d)).astype(np.float32) if grad else None)


def test_frequency_pruning_removes_exactly_the_least_used_experts():
  rng = np.random.default_rng(0)
  counts = [5, 1, 3, 0, 4, 2]               # experts 1, 3, 5 are the least used
  ids = np.repeat(np.arange(6), counts)
  index = np.stack([ids, np.full_like(ids, -1)], 1)
  stats = _stats(rng, index, num_experts=6)
  layer = methods.LayerInput(stats, _experts(rng, 6), None)
  plan = methods.make_plan("frequency", {0: layer}, 0.5)
  assert plan.layers[0].keep == (0, 2, 4)
  np.testing.assert_array_equal(plan.layers[0].scores, counts)
  # gate mass ranks by the summed gates instead
  gates = np.zeros_like(index, np.float32)
  gates[:, 0] = np.where(ids == 1, 10.0, 0.1)
  stats = _stats(rng, index, gate=gates, num_experts=6)
  plan = methods.make_plan("gate_mass", {0: methods.LayerInput(stats, layer.experts, None)}, 0.2)
  assert plan.layers[0].keep == (1,)


def test_mixed_precision_keeps_the_largest_significance_times_error_at_full_precision():
  rng = np.random.default_rng(8)
  experts = _experts(rng, 8)
  ids = np.repeat(np.arange(8), [1, 9, 2, 8, 3, 7, 4, 6])
  stats = _stats(rng, np.stack([ids, ids], 1), gate=np.ones((len(ids), 2)), num_experts=8)
  err = np.asarray([methods.ternary_error(e) for e in experts])
  want_scores = stats.gate_mass() * err
  plan = methods.make_plan("mixed_precision", {0: methods.LayerInput(stats, experts, None)}, 0.5)
  lp = plan.layers[0]
  n_full = int(np.floor(8 * (32 * 0.5 - 2) / 30))              # 3 of 8 at full precision
  assert lp.ternary == 8 - n_full and sorted(lp.keep) == list(range(8))
  assert set(lp.keep[:n_full]) == set(np.argsort(-want_scores)[:n_full])
  np.testing.assert_allclose(lp.scores, want_scores)
  # the relative ternary error against its definition, per matrix scale
  wi, wo = (w.astype(np.float64) for w in experts[0])
  num = den = 0.0
  for m in (wi[:, 0], wi[:, 1], wo):
    q = np.clip(np.round(m / np.abs(m).mean()), -1, 1) * np.abs(m).mean()
    num, den = num + ((m - q) ** 2).sum(), den + (m ** 2).sum()
  np.testing.assert_allclose(err[0], num / den, rtol=1e-9)
  with pytest.raises(ConfigError, match="must be >= 0.0625"):
    methods.make_plan("mixed_precision", {0: methods.LayerInput(stats, experts, None)}, 0.05)


def test_task_score_is_the_candidate_probability_mean():
  probs = np.array([[0.6, 0.3, 0.05, 0.05], [0.1, 0.2, 0.65, 0.05]], np.float32)
  stats = LayerStats(x=np.zeros((2, 3), np.float32), index=np.array([[0], [2]]),
                     gate=np.ones((2, 1), np.float32), probs=probs, grad=None)
  # ratio 0.25: token 0 candidates {0, 1} (>= 0.15), token 1 candidates {1, 2} (>= 0.1625)
  np.testing.assert_allclose(methods.task_score(stats, 0.25),
                             [0.3, (0.3 + 0.2) / 2, 0.325, 0.0], rtol=1e-6)


def test_domain_score_against_a_per_token_loop():
  rng = np.random.default_rng(1)
  experts = _experts(rng, 4)
  index = rng.integers(0, 4, (12, 2))
  index[3, 1] = -1
  stats = _stats(rng, index, num_experts=4)
  want = np.zeros(4)
  for t in range(12):
    x = stats.x[t].astype(np.float64)
    outs = {}
    for s in range(2):
      e = index[t, s]
      if e >= 0:
        wi, wo = (w.astype(np.float64) for w in experts[e])
        g, u = x @ wi[:, 0], x @ wi[:, 1]
        outs[s] = (g / (1 + np.exp(-g)) * u) @ wo
    y = sum(stats.gate[t, s] * o for s, o in outs.items())
    c = 1 - x @ (x + y) / (np.linalg.norm(x) * np.linalg.norm(x + y))
    for s, o in outs.items():
      want[index[t, s]] += c * stats.gate[t, s] * np.linalg.norm(o)
  np.testing.assert_allclose(methods.domain_score(stats, experts), want, rtol=1e-6)


def test_heapr_second_order_score_against_numpy():
  rng = np.random.default_rng(2)
  experts = _experts(rng, 3, d=5, h=4)
  index = rng.integers(0, 3, (10, 2))
  stats = _stats(rng, index, d=5, grad=True, num_experts=3)
  fisher = sum(np.outer(g, g) for g in stats.grad.astype(np.float64))
  for e, (wi, wo) in enumerate(experts):
    want = np.zeros(4)
    for j in range(4):
      for t, s in zip(*np.nonzero(index == e)):
        x = stats.x[t].astype(np.float64)
        g, u = x @ wi[:, 0, j], x @ wi[:, 1, j]
        delta = stats.gate[t, s] * (g / (1 + np.exp(-g)) * u) * wo[j].astype(np.float64)
        want[j] += 0.5 * delta @ fisher @ delta
    np.testing.assert_allclose(methods.neuron_scores(stats, experts)[e], want, rtol=1e-6)


def test_neuron_keep_rounds_each_expert_to_multiples_and_keeps_the_best_units():
  scores = [np.arange(16.0), np.zeros(16), 100 + np.arange(16.0)]
  kept = methods.neuron_keep(scores, 0.5, 4)
  # the top 24 of 48: all of expert 2, units 8-15 of expert 0, none of expert 1 (which keeps
  # its minimum of one multiple, its best units by score order)
  assert [len(k) for k in kept] == [8, 4, 16]
  np.testing.assert_array_equal(kept[0], np.arange(8, 16))
  kept = methods.neuron_keep([np.arange(16.0), 100 + np.arange(16.0)], 0.5 + 3 / 32, 4)
  assert [len(k) for k in kept] == [4, 16]          # 3 units round to one multiple of 4


def test_alignment_recovers_a_permuted_copy_exactly():
  rng = np.random.default_rng(3)
  expert = _experts(rng, 1, h=12)[0]
  perm = rng.permutation(12)
  shuffled = merge_lib.permute(expert, perm)
  back = merge_lib.permute(shuffled, merge_lib.align(expert, shuffled))
  np.testing.assert_array_equal(back[0], expert[0])
  np.testing.assert_array_equal(back[1], expert[1])


def test_grouping_follows_frequency_and_router_similarity():
  freq = np.array([10.0, 1.0, 8.0, 2.0])
  sim = np.array([[1, .9, .1, .2], [.9, 1, .2, .1], [.1, .2, 1, .8], [.2, .1, .8, 1]])
  assert merge_lib.group(freq, sim, 2) == [[0, 1], [2, 3]]
  np.testing.assert_allclose(merge_lib.merge_weights(freq, [0, 1]), [10 / 11, 1 / 11])


def test_fold_routing_matches_a_slot_loop():
  rng = np.random.default_rng(4)
  index = jnp.asarray([[0, 3, 1], [2, 4, -1], [5, 1, 3]], jnp.int32)
  weight = jnp.asarray(rng.random((3, 3)), jnp.float32)
  emap = (0, 1, 2, 0, 2, 1)
  probs = jnp.asarray(rng.random((3, 6)), jnp.float32)
  r = fold_routing(RoutingResult(expert_index=index, weight=weight, probs=probs, logits=probs),
                   emap)
  for t in range(3):
    want = {}
    for s in range(3):
      if index[t, s] >= 0:
        want[emap[int(index[t, s])]] = want.get(emap[int(index[t, s])], 0) + float(weight[t, s])
    got = {int(e): float(w) for e, w in zip(r.expert_index[t], r.weight[t]) if e >= 0}
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[e] for e in want], list(want.values()), rtol=1e-6)
  np.testing.assert_allclose(r.probs[:, 0], probs[:, 0] + probs[:, 3], rtol=1e-6)
  assert r.num_experts == 3


def _model_with_copies(seed=0):
  """A 2-layer direct-form model whose experts 4..7 are hidden-unit permutations of 0..3."""
  c = config_lib.apply_overrides(tiny_config("deepseekmoe"), DIRECT)
  model = build_model(c)
  params = jax.device_get(init_params(model, c, seed=seed))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(np.array, params)
  for layer in ("layer_0", "layer_1"):
    ex = params[layer]["moe"]["experts"]
    for e in range(4):
      perm = rng.permutation(16)
      ex["wi"][4 + e] = ex["wi"][e][..., perm]
      ex["wo"][4 + e] = ex["wo"][e][perm]
  return c, model, params


def test_merging_identical_experts_changes_no_output():
  c, model, params = _model_with_copies()
  groups = ((0, 4), (1, 5), (2, 6), (3, 7))
  lp = LayerPlan(keep=tuple(range(8)), groups=groups,
                 weights=tuple(np.array([0.3, 0.7]) for _ in groups))
  plan = CompressionPlan("merge", 0.5, {0: lp, 1: lp})
  new_params, overrides = jax.tree.map(lambda x: x, params), {}
  for i in (0, 1):
    moe = new_params[f"layer_{i}"]["moe"]
    moe["experts"], moe["router"], overrides[i] = apply_lib.compress_layer(
        bank_lib.from_bank(moe["experts"], model.cfg.moe.routed_sizes), moe["router"], lp, 8, 16)
  new_config = apply_lib.compressed_config(c, model.cfg, plan, overrides)
  assert json.loads(new_config.model.moe.layer_overrides)["1"]["expert_map"] == [0, 1, 2, 3] * 2
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)))
  want = model.apply({"params": params}, tokens)
  got = build_model(new_config).apply({"params": new_params}, tokens)
  assert new_params["layer_0"]["moe"]["experts"]["wi"].shape[0] == 4
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_calibration_gradient_is_the_loss_derivative_at_the_moe_output():
  """Directional finite difference of the mean loss through the block's perturbation, over two
  calibration chunks (the gradient is rescaled to the mean over all windows)."""
  from moejax.compress.calibration import _calibrate
  import optax
  c = tiny_config("deepseekmoe")
  model = build_model(c)
  params = init_params(model, c, seed=1)
  batches = np.random.default_rng(5).integers(0, 256, (2, 17)).astype(np.int32)
  stats = collect(model, params, batches, gradients=True, batch_size=1)
  sown, _ = _calibrate(model, params, jnp.asarray(batches), True)
  zeros = model.apply({"params": params}, batches[:, :-1], mutable=["perturbations"])[1]
  direction = jax.tree.map(lambda z: jnp.asarray(
      np.random.default_rng(6).standard_normal(z.shape), jnp.float32), zeros["perturbations"])

  def loss(eps):
    pert = jax.tree.map(lambda v: eps * v, direction)
    logits = model.apply({"params": params, "perturbations": pert}, batches[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batches[:, 1:]).mean()
  # small steps: a larger one changes some token's top-k choice (the loss is only piecewise
  # smooth in the output)
  numeric = (loss(1e-3) - loss(-1e-3)) / 2e-3
  # the stacked per-chunk gradients are in window order: the same token layout as `direction`
  analytic = sum(float(np.sum(stats[i].grad * np.asarray(direction[f"layer_{i}"]["moe"]["output"])))
                 for i in stats)
  np.testing.assert_allclose(analytic, float(numeric), rtol=1e-2)
  np.testing.assert_allclose(analytic, float(jax.grad(loss)(0.0)), rtol=1e-5)
  assert stats[0].x.shape == (32, 32) and stats[0].index.shape == (32, 2)
  np.testing.assert_allclose(stats[1].x, np.asarray(sown["moe_inputs"]["layer_1"]["moe"]["x"][0]),
                             rtol=1e-5, atol=1e-6)


def test_methods_refuse_what_they_cannot_do():
  rng = np.random.default_rng(7)
  c = config_lib.apply_overrides(tiny_config("deepseekmoe"), DIRECT)
  spec = build_model(c).cfg.moe
  index = rng.integers(0, 8, (16, 2))
  layer = methods.LayerInput(_stats(rng, index, num_experts=8), _experts(rng, 8), spec)
  with pytest.raises(ConfigError, match="fewer experts than each token uses"):
    methods.make_plan("merge", {0: layer}, 0.125)
  hetero = methods.LayerInput(layer.stats, _experts(rng, 4) + _experts(rng, 4, h=4), spec)
  with pytest.raises(ConfigError, match="experts of one size"):
    methods.make_plan("merge", {0: hetero}, 0.5)
  with pytest.raises(ConfigError, match="allowed: frequency"):
    methods.make_plan("prune", {0: layer}, 0.5)
  one = config_lib.apply_overrides(c, {"model.moe.routed_experts": 1,
                                       "model.moe.active_experts": 1})
  with pytest.raises(ConfigError, match="at least two routed experts"):
    apply_lib.check_model(build_model(one).cfg, methods.METHODS["merge"])
  dense = tiny_config("dense")
  with pytest.raises(ConfigError, match="dense"):
    apply_lib.check_model(build_model(dense).cfg, methods.METHODS["frequency"])
  hashed = config_lib.apply_overrides(c, {"model.moe.router": "hash"})
  with pytest.raises(ConfigError, match="router='hash'"):
    apply_lib.check_model(build_model(hashed).cfg, methods.METHODS["frequency"])


def test_ternary_experts_are_validated():
  c = config_lib.apply_overrides(tiny_config("deepseekmoe"), DIRECT)
  for overrides, match in [({"model.moe.ternary_experts": 9}, r"in \[0, 8\]"),
                           ({"model.moe.ternary_experts": 2,
                             "model.moe.expert_bank": "ternary_swiglu"}, "expert_bank='swiglu'"),
                           ({"model.moe.ternary_experts": 2,
                             "model.moe.expert_sizes": (24, 16, 16, 16, 16, 16, 16, 8)},
                            "experts of one size")]:
    with pytest.raises(ConfigError, match=match):
      config_lib.validate(config_lib.apply_overrides(c, overrides))


def test_layer_overrides_are_validated_naming_the_layer():
  c = config_lib.apply_overrides(tiny_config("deepseekmoe"), DIRECT)
  for overrides, match in [
      ('{"5": {"expert_sizes": [8]}}', "names layer '5'"),
      ('{"0": {"top_k": 1}}', "allowed fields"),
      ('{"0": {"expert_sizes": [8, 8]}}', r"layer_overrides\[0\].*one hidden size per routed"),
      ('{"1": {"expert_map": [0, 1, 2]}}', r"layer_overrides\[1\].*every one of the 8"),
      ("[1]", "JSON object"), ("{", "not JSON")]:
    with pytest.raises(ConfigError, match=match):
      config_lib.validate(config_lib.apply_overrides(c, {"model.moe.layer_overrides": overrides}))
  ok = config_lib.apply_overrides(c, {"model.moe.layer_overrides": json.dumps(
      {"1": {"expert_sizes": [32, 16, 16, 16, 16, 8, 8, 8]}})})
  cfg = build_model(config_lib.validate(ok)).cfg
  assert cfg.moe_spec(1).routed_sizes == (32, 16, 16, 16, 16, 8, 8, 8)
  assert cfg.moe_spec(0).routed_sizes == (16,) * 8

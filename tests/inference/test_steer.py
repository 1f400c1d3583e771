"""Steering a whole model (config group ``steer``) and the routing analysis of a trained run."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from conftest import tiny_config
from moejax.analysis.traces import Traces, apply_with_traces, collect
from moejax.config import ConfigError
from moejax.inference import steer as steer_lib
from moejax.train import trainer as trainer_lib


@pytest.fixture(scope="module")
def model_and_params():
  c = tiny_config("deepseekmoe")
  c.model.num_layers = 3
  model = moejax.build_model(c)
  return c, model, moejax.init_params(model, c, seed=0)


def _tokens(seed=0, shape=(4, 16)):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, shape), jnp.int32)


def test_traces_are_the_forward_routing(model_and_params):
  _, model, params = model_and_params
  tokens = _tokens()
  logits, sown = apply_with_traces(model, params, tokens, probs=True)
  np.testing.assert_array_equal(logits, moejax.forward(model, params, tokens).logits)
  tr = collect(model, params, np.asarray(tokens), 3, probs=True)   # 2 calls, last one padded
  assert tr.experts.shape == (3, 64, 2) and list(tr.layers) == [0, 1, 2]
  # deepseekmoe here: top-2 of the softmax over the 8 routed experts, gates = probabilities
  top = np.argsort(-tr.probs, axis=-1, kind="stable")[..., :2]
  np.testing.assert_array_equal(np.sort(tr.experts, -1), np.sort(top, -1))
  np.testing.assert_allclose(tr.gates, np.take_along_axis(tr.probs, tr.experts, -1), rtol=1e-6)


def test_deactivated_never_and_forced_always_selected(model_and_params):
  _, model, params = model_and_params
  steered = moejax.steered(model, {"deactivate": "*:3,1:5", "force": "2:6"})
  tr = collect(steered, params, np.asarray(_tokens(1)), 4)
  assert not (tr.experts == 3).any()
  assert not (tr.experts[1] == 5).any() and (tr.experts[0] == 5).any()   # layer 1 only
  assert (tr.experts[2] == 6).any(axis=1).all()
  out = moejax.forward(model, params, _tokens(1), steer={"deactivate": "*:3"})
  plain = collect(model, params, np.asarray(_tokens(1)), 4)    # layer 0 sees the same input
  assert int(out.routing["layer_0"]["steer_changed_tokens"]) == int(
      (plain.experts[0] == 3).any(axis=1).sum()) > 0


def test_skip_at_threshold_zero_is_no_skip_and_calibration_hits_its_rate(model_and_params):
  _, model, params = model_and_params
  tokens = _tokens(2)
  zero = steer_lib.with_steer(model, ((1, steer_lib.LayerSteer(skip_threshold=0.0)),))
  np.testing.assert_array_equal(moejax.forward(zero, params, tokens).logits,
                                moejax.forward(model, params, tokens).logits)
  skipping = moejax.steered(model, {"skip_rate": 0.25}, params, [np.asarray(tokens)])
  thresholds = [s.skip_threshold for _, s in skipping.cfg.steer]
  assert len(thresholds) == 3 and all(t > 0 for t in thresholds)
  out = moejax.forward(skipping, params, tokens)
  skipped = sum(int(out.routing[f"layer_{i}"]["steer_skipped"]) for i in range(3))
  assert skipped == pytest.approx(0.25 * 3 * tokens.size * 2, rel=0.05)
  with pytest.raises(ConfigError, match="needs params and calibration"):
    moejax.steered(model, {"skip_rate": 0.25})


def test_self_contrast_logits_and_greedy_generation(model_and_params):
  _, model, params = model_and_params
  tokens = _tokens(3)
  b = 0.5
  out = moejax.forward(model, params, tokens, steer={"contrast_weight": b})
  weak = steer_lib.weak_model(model, {"contrast_routing": "rank2"})
  tr = collect(weak, params, np.asarray(tokens), 4, probs=True)
  np.testing.assert_array_equal(tr.experts[..., 0],
                                np.argsort(-tr.probs, -1, kind="stable")[..., 1])   # rank 2
  assert (tr.experts[..., 1] == -1).all()
  want = (1 + b) * moejax.forward(model, params, tokens).logits - b * moejax.forward(
      weak, params, tokens).logits
  np.testing.assert_allclose(out.logits, want, rtol=1e-5, atol=1e-5)
  # generation decodes both models from their caches: greedy tokens = argmax of the formula
  # (causal: one forward over prompt + generated tokens gives every step's logits)
  prompt = np.asarray(tokens[0, :5])
  gen = moejax.generate(model, params, [prompt], 6, steer={"contrast_weight": b})
  seq = jnp.asarray(np.concatenate([prompt, gen.tokens[0]]))[None]
  full = (1 + b) * moejax.forward(model, params, seq).logits - b * moejax.forward(
      weak, params, seq).logits
  np.testing.assert_array_equal(gen.tokens[0], np.argmax(full[0, 4:-1], axis=-1))


@pytest.mark.parametrize("options, message", [
    ({"deactivate": "7:1"}, "layer 7 is not an MoE layer; MoE layers: [0, 1, 2]"),
    ({"force": "1:8"}, "expert 8 is out of range; routed experts are 0..7"),
    ({"deactivate": "1:2", "force": "1:2"}, "both in steer.deactivate and steer.force"),
    ({"force": "1:1,1:2,1:3"}, "forces 3 experts, but a token uses 2"),
    ({"deactivate": "1"}, "is not L:E"),
    ({"reinforce": "1:2:-1"}, "factor -1 must be > 0"),
    ({"overflow": "spill", "capacity_factor": 1.0}, "steer.overflow: got 'spill'"),
    ({"skip_rate": 1.0}, "steer.skip_rate: must be in [0, 1)"),
    ({"contrast_weight": 1.0, "contrast_routing": "worst"}, "expected 'topN' or 'rankN'"),
    ({"deactivated": "1:2"}, "unknown option(s) ['deactivated']"),
])
def test_bad_steering_is_one_clear_line(model_and_params, options, message):
  _, model, _ = model_and_params
  with pytest.raises(ConfigError) as e:
    moejax.steered(model, options)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_merging_models_and_training_refuse_steering(model_and_params):
  c = tiny_config("deepseekmoe")
  c.model.moe.merge, c.model.moe.num_shared_experts, c.model.moe.renormalize = "sequence", 0, True
  with pytest.raises(ConfigError, match="steering needs a routed MoE"):
    moejax.steered(moejax.build_model(c), {"deactivate": "0:1"})
  c = tiny_config("deepseekmoe")
  c.steer.deactivate = "0:1"
  with pytest.raises(ConfigError, match="steering edits a trained model's routing at inference"):
    trainer_lib.train(c, None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("run") / "w")
  c = tiny_config("deepseekmoe")
  c.model.num_layers = 3
  t = trainer_lib.Trainer(c, wd)
  t.train(progress=None)
  t.save()
  t.close()
  return wd


def test_analyze_writes_traces_report_and_plots(trained, tmp_path):
  text = tmp_path / "poems.txt"
  text.write_text("Shall I compare thee to a summer's day? " * 60)
  result = trainer_lib.analyze_only(trained, {"analyze.sources": f"generated,{text}",
                                              "analyze.tokens": 256, "analyze.devices": 2})
  out = os.path.join(trained, "analysis")
  for name in ("traces_generated.npz", "traces_poems.npz", "report.md", "summary.json",
               "load.png", "specialisation.png", "affinity.png", "prediction.png",
               "placement.png", "cache.png"):
    assert os.path.isfile(os.path.join(out, name)), name
  tr = Traces.load(os.path.join(out, "traces_poems.npz"))
  assert tr.experts.shape == (3, 240, 2) and tr.gates.dtype == np.float32   # 10% of 2,400 B
  report = open(os.path.join(out, "report.md")).read()
  for item in ("**Load**", "**Specialisation**", "**Inter-layer affinity**",
               "**Cross-layer gate prediction**", "**Expert placement** on 2 devices",
               "**Offloading cache**", "optimal on the fitted traces"):
    assert item in report
  plans = result.summary["placement"]["plans"]
  assert plans["milp"]["traffic_fit"] <= plans["round_robin"]["traffic_fit"] + 1e-12
  # under steering the traces record the steered routing; eval reports what changed
  steered = moejax.analyze(trained, {"steer.deactivate": "1:0", "analyze.tokens": 128},
                           out_dir=str(tmp_path / "steered"), plots=False)
  assert not (steered.traces["generated"].experts[1] == 0).any()
  assert "Traced under steering: layer 1: deactivate [0]" in steered.report
  ev = trainer_lib.eval_only(trained, {"steer.capacity_factor": 0.5,
                                       "steer.overflow": "reroute"})
  assert ev["steer"]["rerouted_fraction"] > 0
  with pytest.raises(ConfigError, match="analyze.sources: 'nope.txt': not a file"):
    moejax.analyze(trained, {"analyze.sources": "nope.txt"})

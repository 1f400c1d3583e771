"""The public Python API: configs by name, forward/loss against the trainer's objective, routing
metrics, Trainer train/save/restore/sample, and the installed package's configs."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from conftest import ROOT, tiny_config
from moejax.train import steps


def test_public_names():
  for name in moejax.__all__:
    assert hasattr(moejax, name), name
  assert moejax.ops.gmm is moejax.ops.grouped_matmul.gmm
  assert moejax.list_configs() == ["deepseekmoe", "default", "dense", "gshard", "hmoe", "mote",
                                   "switch"]


def test_get_config_by_name_with_overrides_and_clear_errors():
  c = moejax.get_config("gshard", {"model.moe.num_experts": 8, "train.steps": 70})
  assert c.model.moe.num_experts == 8 and c.train.steps == 70
  with pytest.raises(moejax.ConfigError, match="config 'gshrad' does not exist; shipped "
                                               "configs: deepseekmoe, default, dense, gshard"):
    moejax.get_config("gshrad")
  with pytest.raises(moejax.ConfigError, match="config.model.moe.topk: no such setting; "
                                               "nearest: model.moe.top_k"):
    moejax.get_config("gshard", {"model.moe.topk": 1})
  with pytest.raises(moejax.ConfigError, match="config.model.moe.top_k: must be <="):
    moejax.get_config("gshard", {"model.moe.top_k": 99})


def test_forward_and_loss_match_the_training_objective():
  c = tiny_config("deepseekmoe")
  model = moejax.build_model(c)
  params = moejax.init_params(model, c, seed=3)
  batch = jax.random.randint(jax.random.key(0), (2, 17), 0, 256)
  out = moejax.forward(model, params, batch[:, :-1])
  assert out.logits.shape == (2, 16, 256)
  assert sorted(out.routing) == ["layer_0", "layer_1"]
  load = out.routing["layer_1"]["expert_load"]
  assert load.shape == (8,) and float(jnp.sum(load)) == pytest.approx(1.0)
  total, parts = moejax.loss(model, params, batch)
  want, (ce, aux, _) = steps.loss_fn(model, params, batch, jax.random.key(0), True)
  np.testing.assert_allclose([total, parts.ce, parts.aux_loss], [want, ce, aux], rtol=1e-6)
  # differentiable, with the routing as auxiliary output
  grads, parts = jax.grad(moejax.loss, argnums=1, has_aux=True)(model, params, batch)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert float(parts.routing["layer_0"]["drop_fraction"]) == 0.0


def test_experts_stated_directly_in_a_config():
  c = tiny_config("deepseekmoe")
  e = c.model.moe
  e.num_experts, e.segments = 0, 1
  e.routed_experts, e.active_experts, e.num_shared_experts, e.expert_hidden = 8, 2, 2, 16
  spec = moejax.build_model(c).cfg.moe
  ref = moejax.build_model(tiny_config("deepseekmoe")).cfg.moe
  assert (spec.num_routed, spec.routed_k, spec.fine_hidden, spec.shared_hidden) == (
      ref.num_routed, ref.routed_k, ref.fine_hidden, ref.shared_hidden)
  e.num_experts = 5
  with pytest.raises(moejax.ConfigError, match="config.model.moe.routed_experts: states the "
                                               "experts directly; leave model.moe.num_experts=0"):
    moejax.validate(c)


def test_trainer_in_memory_and_with_a_workdir(tmp_path):
  c = tiny_config("gshard")
  c.train.steps = 6
  t = moejax.Trainer(c)                                   # in memory: no files anywhere
  r = t.train(steps=3, progress=None)
  assert r.step == 3 and not r.finished and t.history[-1]["step"] == 3
  r = t.train(progress=None)
  assert r.step == 6 and r.finished
  assert isinstance(t.sample("the ", num_tokens=5, temperature=0.0), str)
  with pytest.raises(ValueError, match="pass a workdir"):
    t.save()

  wd = str(tmp_path / "run")
  t = moejax.Trainer(c, wd)
  t.train(steps=4, progress="bar")
  path = t.save()
  assert path.endswith("/4") and os.path.isdir(path)
  back = moejax.Trainer.from_workdir(wd)
  assert back.step == 4
  assert back.sample("the ", 8, 0.0) == t.sample("the ", 8, 0.0)
  png = moejax.plot_run(wd)
  assert os.path.getsize(png) > 10_000


def test_configs_are_part_of_the_installed_package(tmp_path):
  """A plain (non-editable) build carries configs/ as moejax.configs."""
  build = tmp_path / "build"
  p = subprocess.run([sys.executable, "setup.py", "-q", "build", "--build-base", str(build)],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  lib = build / "lib"
  assert (lib / "moejax" / "configs" / "gshard.py").exists()
  env = dict(os.environ, PYTHONPATH=str(lib), JAX_PLATFORMS="cpu")
  code = ("import moejax; assert moejax.__file__.startswith(%r), moejax.__file__; "
          "print(moejax.get_config('default').model.moe.segments)" % str(lib))
  p = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0 and p.stdout.strip() == "4", p.stderr[-2000:]

"""The packed inference form of ternary experts: a trained MoTE-style run packed by
``python -m moejax.convert --from=moejax --to=packed`` gives the trained model's logits through
the grouped matmuls that decode 2-bit codes, with the routed experts 16x smaller."""
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from moejax import api
from moejax import config as config_lib
from moejax.convert.packed import pack_workdir
from moejax.errors import ConfigError, ConversionError
from moejax.train.trainer import Trainer

MOTE = {"model.moe.expert_bank": "ternary_swiglu", "model.moe.shared_trainable": False,
        "model.moe.dispatch": "dropless", "model.d_model": 128, "model.head_dim": 32,
        "model.moe.expert_hidden": 256, "train.steps": 2, "train.warmup_steps": 1,
        "train.checkpoint_every": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("packed")
  src, dst = str(root / "mote"), str(root / "packed")
  trainer = Trainer(config_lib.apply_overrides(tiny_config("deepseekmoe"), MOTE), src)
  trainer.train(progress=None)
  trainer.close()
  return src, dst, pack_workdir(src, dst)


def test_packed_run_gives_the_trained_models_logits(runs):
  src, dst, out = runs
  tokens = np.random.default_rng(0).integers(0, 256, (2, 16))
  logits = {}
  for wd in (src, dst):
    t = Trainer.from_workdir(wd, mode="eval")
    logits[wd] = np.asarray(api.forward(t.model, t.params, tokens).logits)
    t.close()
  np.testing.assert_allclose(logits[dst], logits[src], rtol=1e-4, atol=1e-4)
  params = Trainer.from_workdir(dst, mode="eval").params
  experts = jax.device_get(params["layer_0"]["moe"]["experts"])
  assert experts["wi_packed"].dtype == np.uint8
  # routed experts: 2 bits per weight + one float32 scale per column; 16x less than f32
  mem, full = out["memory"], out["memory_full_precision"]
  codes = sum(experts[n].nbytes for n in ("wi_packed", "wo_packed")) * 2    # both layers
  assert codes * 16 == full["routed experts"]
  assert mem["routed experts"] < full["routed experts"] / 8
  assert mem["shared experts"] == full["shared experts"]


def test_packed_run_refuses_training_and_non_ternary_sources(runs, tmp_path):
  src, dst, _ = runs
  with pytest.raises(ConfigError, match="ternary_packed' is the inference form"):
    Trainer.from_workdir(dst, mode="eval").train(steps=1, progress=None)
  plain = str(tmp_path / "plain")
  t = Trainer(config_lib.apply_overrides(tiny_config("gshard"), {
      "train.steps": 2, "train.warmup_steps": 1, "train.checkpoint_every": 2}), plain)
  t.train(progress=None)
  t.close()
  with pytest.raises(ConversionError, match="need 'ternary_swiglu'"):
    pack_workdir(plain, str(tmp_path / "out"))


@pytest.mark.slow
def test_pack_and_sample_from_the_command_line(runs, tmp_path):
  src = runs[0]
  dst = str(tmp_path / "packed_cli")
  p = subprocess.run([sys.executable, "-m", "moejax.convert", "--from=moejax", "--to=packed",
                      src, dst], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "routed experts" in p.stdout and "packed the ternary experts" in p.stdout
  p = subprocess.run([sys.executable, "run.py", f"--workdir={dst}", "--mode=sample",
                      "--config.sample.num_tokens=8"], cwd=ROOT, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]

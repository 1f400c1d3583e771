"""``moejax.compress`` end to end: a regular workdir comes out, every method, bad input refused
with nothing written (moejax/compress/pipeline.py)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from moejax import config as config_lib
from moejax.api import build_model, init_params
from moejax.compress import apply as apply_lib
from moejax.compress import compress
from moejax.compress.pipeline import load_params
from moejax.convert.hf import _write_workdir
from moejax.errors import ConfigError
from moejax.train import trainer as trainer_lib

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)))
SMALL = dict(calibration_tokens=256, eval_tokens=256)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A tiny DeepSeekMoE workdir (2 segments, 2 shared + 8 routed experts, top-2) with its
  parameters perturbed off their init, and a second text as calibration/domain source."""
  root = tmp_path_factory.mktemp("compress")
  c = config_lib.apply_overrides(tiny_config("deepseekmoe"), {"data.corpus_bytes": 20_000})
  model = build_model(c)
  params = jax.device_get(init_params(model, c, seed=0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: np.asarray(x + 0.3 * rng.standard_normal(x.shape)
                                             * max(float(np.std(x)), 0.3), np.float32), params)
  _write_workdir(str(root / "src"), c, params)
  text = root / "domain.txt"
  text.write_text("To be, or not to be, that is the question.\n" * 40)
  return root, c, params, str(text)


def _logits(workdir):
  saved, params = load_params(workdir)
  return np.asarray(saved.model.apply({"params": params}, TOKENS))


def test_keeping_everything_is_the_identity(source):
  root, c, params, _ = source
  want = np.asarray(build_model(c).apply({"params": params}, TOKENS))
  for method in ("frequency", "neuron"):
    out = str(root / f"all_{method}")
    report = compress(str(root / "src"), out, method, keep=1.0, **SMALL)
    np.testing.assert_allclose(_logits(out), want, rtol=1e-5, atol=1e-5, err_msg=method)
    saved = json.load(open(os.path.join(out, "config.json")))["model"]["moe"]
    # rewritten in the direct form: 8 routed of 16 units, 2 active, shared hidden stated
    assert (saved["routed_experts"], saved["active_experts"], saved["segments"],
            saved["expert_hidden"], saved["shared_expert_hidden"]) == (8, 2, 1, 16, 32)
    assert report["after"]["sizes"] == report["before"]["sizes"]


# The three kinds of output (fewer experts, per-layer sizes, a folded router) in the fast set;
# the other scores differ only in their plan (tests/compress/test_compress_methods.py).
@pytest.mark.parametrize("method", ["frequency", "neuron", "merge"] + [
    pytest.param(m, marks=pytest.mark.slow)
    for m in ("gate_mass", "task", "domain", "mixed_precision")])
def test_every_method_writes_a_smaller_regular_workdir(source, method):
  root, c, _, text = source
  out = str(root / method)
  report = compress(str(root / "src"), out, method, keep=0.5, calibration=text, **SMALL)
  before, after = report["before"], report["after"]
  assert set(before["loss"]) == set(after["loss"]) == {text, "generated"}
  assert all(np.isfinite(v) for v in after["loss"].values())
  # routed-expert bytes, the ternary experts of mixed precision counted packed
  share = (after["sizes"]["routed_expert_bytes_packed"]
           / before["sizes"]["routed_expert_bytes_packed"])
  assert 0.4 <= share <= 0.6, share
  assert (after["sizes"]["bytes"] < before["sizes"]["bytes"]) == (method != "mixed_precision")
  assert report["seconds"] > 0 and report["peak_rss_bytes"] > 0
  assert json.load(open(os.path.join(out, "compression.json")))["method"] == method
  cfg = build_model(config_lib.validate(
      trainer_lib.workdir_lib.load_config(out))).cfg
  if method == "merge":    # the router keeps its 8 outputs, folded onto 4 merged experts
    assert cfg.moe.num_routed == 4 and all(len(s.expert_map) == 8 for _, s in cfg.moe_layers)
  elif method == "neuron":  # per-layer heterogeneous sizes, largest first
    sizes = [s.routed_sizes for _, s in cfg.moe_layers]
    assert sizes and all(list(s) == sorted(s, reverse=True) for s in sizes)
  elif method == "mixed_precision":    # 8 experts kept: floor(8 x 14 / 30) = 3 full, 5 ternary
    assert cfg.moe.num_routed == 8 and cfg.moe.ternary_experts == 5
  else:
    assert cfg.moe.num_routed == 4 and not cfg.moe_layers
  ev = trainer_lib.eval_only(out, {"data.eval_batches": 1})
  assert np.isfinite(ev["val_loss"])


@pytest.mark.slow
def test_compressed_workdirs_sample_convert_and_fine_tune(source, tmp_path):
  root, c, _, text = source
  for method in ("neuron", "merge"):
    out = str(root / f"use_{method}")
    compress(str(root / "src"), out, method, keep=0.5, calibration=text, **SMALL)
    assert trainer_lib.sample_only(out, {"sample.num_tokens": 4})
    from moejax.convert import export_torch
    export_torch(out, str(tmp_path / f"torch_{method}"), progress=False)
    assert os.path.isfile(tmp_path / f"torch_{method}" / "modeling_moejax.py")
  from moejax.convert import ConversionError, export_hf
  with pytest.raises(ConversionError, match="expert_sizes.*--to=torch"):
    export_hf(str(root / "use_neuron"), str(tmp_path / "hf"), family="qwen2_moe",
              progress=False)
  # mixed precision: packed for storage (2-bit ternary experts), the same logits, fewer bytes
  from moejax.convert.packed import pack_workdir
  mixed = str(root / "use_mixed")
  compress(str(root / "src"), mixed, "mixed_precision", keep=0.5, calibration=text, **SMALL)
  out = pack_workdir(mixed, str(tmp_path / "mixed_packed"))
  np.testing.assert_allclose(_logits(str(tmp_path / "mixed_packed")), _logits(mixed),
                             rtol=1e-4, atol=1e-4)
  assert out["memory"]["routed experts"] < 0.5 * out["memory_full_precision"]["routed experts"]
  assert trainer_lib.sample_only(str(tmp_path / "mixed_packed"), {"sample.num_tokens": 4})
  # fine-tuning: run.py trains the compressed workdir from its own config.json
  out = str(root / "use_merge")
  cmd = [sys.executable, "run.py", "--mode=train", f"--workdir={out}",
         "--config.train.steps=2", "--config.train.warmup_steps=0",
         "--config.sample.num_tokens=2"]
  p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "no --config given" in p.stdout and "final | step 2" in p.stdout + p.stderr
  # a model-defining override is refused as on resume
  p = subprocess.run(cmd[:-3] + ["--config.model.moe.active_experts=1"], cwd=ROOT,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 2 and "model.moe.active_experts" in p.stderr


def test_bad_input_gets_one_line_and_leaves_nothing(source, monkeypatch):
  root, c, _, text = source
  src = str(root / "src")
  cases = [
      (dict(method="frequency", keep=0.0), r"--keep=0.0: must be in \(0, 1\]"),
      (dict(method="frequency", keep=1.5), r"--keep=1.5"),
      (dict(method="prune"), "--method='prune'; allowed: frequency"),
      (dict(method="frequency", out=src), "already exists"),
      (dict(method="domain", calibration=str(root / "short.txt")), "fewer than one window"),
      (dict(method="domain", calibration=str(root / "missing.txt")), "not a file"),
  ]
  (root / "short.txt").write_text("too short")
  for kwargs, match in cases:
    out = kwargs.pop("out", str(root / "bad"))
    with pytest.raises(ConfigError, match=match):
      compress(src, out, **{"keep": 0.5, **kwargs}, **SMALL)
    assert out == src or not os.path.exists(out)

  def fail(*args, **kwargs):
    raise RuntimeError("interrupted")
  monkeypatch.setattr(apply_lib, "compressed_config", fail)
  with pytest.raises(RuntimeError):
    compress(src, str(root / "bad"), "frequency", keep=0.5, **SMALL)
  assert not [n for n in os.listdir(root) if n.startswith("bad") or ".bad." in n]


def test_cli_prints_the_report(source):
  root, _, _, _ = source
  out = str(root / "cli")
  cmd = [sys.executable, "-m", "moejax.compress", f"--workdir={root / 'src'}", f"--out={out}",
         "--method=gate_mass", "--keep=0.25", "--calibration_tokens=256", "--eval_tokens=256"]
  p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "parameters" in p.stdout and "validation loss on generated" in p.stdout
  p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --out=")

"""run.py end to end in a subprocess: train (and resume), eval, sample, config errors."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

TINY = [
    "--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.head_dim=8",
    "--config.model.moe.num_experts=4", "--config.model.moe.expert_hidden=32",
    "--config.data.corpus_bytes=40000", "--config.data.seq_len=32", "--config.data.batch_size=8",
    "--config.data.eval_batches=2", "--config.train.steps=30", "--config.train.warmup_steps=5",
    "--config.train.log_every=10", "--config.train.eval_every=20",
    "--config.train.checkpoint_every=20", "--config.sample.num_tokens=16",
    "--config.mesh.num_devices=1",
]


def run(*args, check=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=600)
  if check and p.returncode != 0:
    raise AssertionError(f"run.py failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-3000:]}")
  return p


@pytest.mark.slow
def test_train_eval_sample_and_resume(tmp_path):
  wd = str(tmp_path / "wd")
  out = run("--config=configs/deepseekmoe.py", f"--workdir={wd}", "--mode=train", *TINY).stdout
  assert "step    30/30" in out and "tok/s" in out and "ETA" in out
  assert "final | step 30 | val loss" in out and "sample (temperature" in out
  records = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  train = [r for r in records if r["split"] == "train"]
  assert train[-1]["ce"] < train[0]["ce"] - 0.5          # it learns
  assert any(k.endswith("/expert_load") for k in train[-1])
  assert os.path.exists(os.path.join(wd, "config.json"))

  out = run("--config=configs/deepseekmoe.py", f"--workdir={wd}", "--mode=eval", *TINY).stdout
  ev = json.loads(out.strip().splitlines()[-1])
  assert ev["val_ppl"] > 1 and abs(ev["val_loss"] - records[-1]["val_loss"]) < 1e-5

  out = run("--config=configs/deepseekmoe.py", f"--workdir={wd}", "--mode=sample",
            "--config.sample.prompt=count:", "--config.sample.temperature=0", *TINY).stdout
  assert out.startswith("count:")

  out = run("--config=configs/deepseekmoe.py", f"--workdir={wd}", "--mode=train", *TINY,
            "--config.train.steps=40").stdout
  assert "resumed from" in out and "at step 30" in out and "step    40/40" in out


def test_config_error_is_one_clear_line(tmp_path):
  p = run("--config=configs/gshard.py", f"--workdir={tmp_path}", "--config.model.moe.top_k=99",
          check=False)
  assert p.returncode != 0
  assert "config.model.moe.top_k: must be <= model.moe.num_experts=16, got 99" in p.stderr
  assert "Traceback" not in p.stderr
  assert not os.path.exists(tmp_path / "checkpoints")

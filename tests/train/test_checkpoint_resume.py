"""Resuming from a checkpoint is exact: 2N straight steps == N steps, stop, resume, N more."""
import os

import jax
import numpy as np

from conftest import tiny_config
from moejax.train import metrics as metrics_lib
from moejax.train import trainer


def _config():
  c = tiny_config("deepseekmoe")
  c.model.moe.jitter_eps = 0.1          # exercise the per-step router RNG as well
  c.model.moe.z_loss_weight = 1e-3
  c.train.steps, c.train.checkpoint_every, c.train.log_every = 8, 100, 1
  c.sample.num_tokens = 2
  return c


def test_resume_is_bit_exact(tmp_path):
  straight = trainer.train(_config(), str(tmp_path / "straight"))

  c = _config()
  c.train.max_steps_per_run = 4
  first = trainer.train(c, str(tmp_path / "resumed"))
  assert int(first["state"]["step"]) == 4 and first["eval"] is None
  assert os.listdir(tmp_path / "resumed" / "checkpoints") == ["4"]
  resumed = trainer.train(c, str(tmp_path / "resumed"))

  assert int(resumed["state"]["step"]) == 8
  for a, b in zip(jax.tree.leaves(straight["state"]), jax.tree.leaves(resumed["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert straight["train"]["loss"] == resumed["train"]["loss"]
  assert straight["eval"] == resumed["eval"]
  # Per-step training losses agree for every step, before and after the stop.
  losses = lambda d: {r["step"]: r["loss"] for r in metrics_lib.read_metrics(d)
                      if r["split"] == "train"}
  assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


def test_finished_run_is_not_retrained(tmp_path, capsys):
  c = _config()
  c.train.steps, c.train.warmup_steps = 2, 1
  trainer.train(c, str(tmp_path))
  again = trainer.train(c, str(tmp_path))
  assert int(again["state"]["step"]) == 2
  assert "resumed from" in capsys.readouterr().out

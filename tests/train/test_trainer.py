"""Trainer: non-finite steps never saved, config.json as the source of truth, metrics files."""
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from moejax.config import ConfigError
from moejax.train import trainer as trainer_lib
from moejax.train import workdir as workdir_lib
from moejax.train.metrics import MetricsWriter, read_metrics
from moejax.train.trainer import NonFiniteLossError, Trainer


def _config(kind="gshard"):
  c = tiny_config(kind)
  c.train.steps, c.train.checkpoint_every, c.train.keep_checkpoints = 12, 4, 2
  c.train.log_every, c.train.eval_every = 100, 100
  return c


def test_a_non_finite_step_is_never_saved_and_good_checkpoints_stay(tmp_path):
  wd = str(tmp_path)
  t = Trainer(_config(), wd)
  real = trainer_lib.make_train_step(t.model, t.tx, t.config, t.shardings, t.mesh)

  def poisoned(state, batch):         # from step 10 on, the update blows up
    bad = int(state["step"]) >= 9
    new, metrics = real(state, batch)
    if bad:
      new = {**new, "params": jax.tree.map(lambda p: p * jnp.nan, new["params"])}
      metrics = {**metrics, "loss": jnp.float32(jnp.nan), "finite": jnp.bool_(False)}
    return new, metrics

  t._train_step = poisoned
  with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 10 .*the last "
                                               r"checkpoint \(step 8\) is kept"):
    t.train(progress=None)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints")), key=int) == ["4", "8"]
  again = Trainer(_config(), wd)
  assert again.step == 8
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(again.params))


def test_train_step_flags_non_finite_loss_and_gradients():
  c = _config()
  c.train.learning_rate = 1e6
  c.train.grad_clip = 0.0
  t = Trainer(c)
  flags = []
  step = trainer_lib.make_train_step(t.model, t.tx, c, t.shardings, t.mesh)
  state = t.state
  for i in range(8):
    state, m = step(state, trainer_lib.train_batch(t.data, i, t.mesh))
    flags.append(bool(m["finite"]))
    assert flags[-1] == bool(np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]))
  assert flags[0] and not flags[-1]


def test_config_json_is_written_only_when_training_starts(tmp_path):
  c = _config()
  t = Trainer(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "config.json")      # built, nothing trained yet
  t.train(steps=2, progress=None)
  saved = workdir_lib.load_config(str(tmp_path))
  assert workdir_lib.changes(saved, c) == []


def test_resume_refuses_model_changes_before_touching_anything(tmp_path):
  c = _config()
  Trainer(c, str(tmp_path)).train(steps=4, progress=None)
  before = (tmp_path / "config.json").read_text()
  changed = _config()
  changed.model.moe.top_k, changed.model.d_model = 1, 48
  with pytest.raises(ConfigError) as e:
    Trainer(changed, str(tmp_path))
  lines = str(e.value).splitlines()
  assert "  model.d_model: 32 -> 48" in lines and "  model.moe.top_k: 2 -> 1" in lines
  assert (tmp_path / "config.json").read_text() == before
  # Settings that do not define the model may change (and the changed run uses them).
  harmless = _config()
  harmless.train.steps, harmless.model.moe.gmm_backend = 20, "reference"
  t = Trainer(harmless, str(tmp_path))
  assert t.step == 4 and t.config.train.steps == 20


def test_from_workdir_rebuilds_the_trained_model(tmp_path):
  c = _config()
  c.model.moe.num_experts = 6         # not the tiny default: from_workdir must read it back
  t = Trainer(c, str(tmp_path))
  t.train(steps=4, progress=None)
  t.save()
  t.close()
  loaded = Trainer.from_workdir(str(tmp_path), {"sample.temperature": 0.0})
  assert loaded.step == 4 and loaded.config.model.moe.num_experts == 6
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(t.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert loaded.evaluate()["val_loss"] == t.evaluate()["val_loss"]
  with pytest.raises(ConfigError, match=r"model.moe.num_experts: 6 -> 4"):
    Trainer.from_workdir(str(tmp_path), {"model.moe.num_experts": 4})
  with pytest.raises(ConfigError, match=r"config.sample.temprature: no such setting; nearest: "
                                        r"sample.temperature"):
    Trainer.from_workdir(str(tmp_path), {"sample.temprature": 0.0})


def test_workdir_without_checkpoint_is_refused_and_left_untouched(tmp_path):
  with pytest.raises(ConfigError, match="holds no checkpoint"):
    Trainer.from_workdir(str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_saved_config_missing_new_settings_gets_their_defaults(tmp_path):
  c = _config()
  d = c.to_dict()
  del d["model"]["moe"]["routed_experts"]       # a workdir written before the key existed
  (tmp_path / "config.json").write_text(json.dumps(d))
  loaded = workdir_lib.load_config(str(tmp_path))
  assert loaded.model.moe.routed_experts == 0 and workdir_lib.changes(loaded, c) == []


def test_metrics_writer_drops_rows_past_the_resume_step_and_replaces_same_rows(tmp_path):
  w = MetricsWriter(str(tmp_path), tensorboard=False)
  for s in (1, 2, 3, 4):
    w.write(s, {"split": "train", "loss": float(s)})
  w.write(4, {"split": "val", "val_loss": 9.0})
  w.close()
  w = MetricsWriter(str(tmp_path), start_step=2, tensorboard=False)
  assert [(r["step"], r["split"]) for r in read_metrics(str(tmp_path))] == [(1, "train"),
                                                                           (2, "train")]
  w.write(2, {"split": "train", "loss": 20.0})
  w.write(3, {"split": "train", "loss": 30.0})
  assert [r["loss"] for r in read_metrics(str(tmp_path))] == [1.0, 20.0, 30.0]


def _tf_records(path):
  """Minimal TFRecord reader (length, crc, data, crc): independent of the writer library."""
  with open(path, "rb") as f:
    data = f.read()
  i = 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    yield data[i + 12:i + 12 + n]
    i += 12 + n + 4


def test_tensorboard_gets_the_training_scalars(tmp_path):
  from tensorboardX.proto import event_pb2
  c = _config()
  c.train.steps, c.train.log_every = 6, 2
  Trainer(c, str(tmp_path)).train(progress=None)
  tb = tmp_path / "tensorboard"
  scalars = {}
  for name in os.listdir(tb):
    for record in _tf_records(tb / name):
      event = event_pb2.Event.FromString(record)
      for v in event.summary.value:
        scalars.setdefault(v.tag, {})[event.step] = v.simple_value
  rows = {r["step"]: r for r in read_metrics(str(tmp_path)) if r["split"] == "train"}
  assert sorted(scalars["train/loss"]) == sorted(rows) == [1, 2, 4, 6]
  for step, row in rows.items():
    assert scalars["train/loss"][step] == pytest.approx(row["loss"], rel=1e-6)
  assert "train/layer_0/drop_fraction" in scalars


def test_bf16_train_step_with_one_group_and_one_tile():
  """One expert (one group) and 64 token rows (one tile) in bf16: crashed on XLA:CPU before."""
  for kind in ("switch", "deepseekmoe"):
    c = tiny_config(kind)
    c.model.dtype = "bfloat16"
    e = c.model.moe
    e.num_experts, e.top_k, e.segments, e.num_shared_experts = 1, 1, 1, 0
    t = Trainer(c)
    step = trainer_lib.make_train_step(t.model, t.tx, c, t.shardings, t.mesh)
    state, m = step(t.state, trainer_lib.train_batch(t.data, 0, t.mesh))
    assert bool(m["finite"]) and np.isfinite(float(m["loss"])), kind

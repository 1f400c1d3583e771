"""The multi-seed runner: resuming gives the uninterrupted result, seeds change init and data
order (and nothing else), configs of one seed see the same batches."""
import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from moejax import config as config_lib
from moejax.errors import ConfigError
from moejax.experiment import Study, runner
from moejax.train.trainer import Trainer

SMALL = {"data.seq_len": 16, "data.batch_size": 4, "data.eval_batches": 1,
         "data.corpus_bytes": 20_000, "train.steps": 6, "train.eval_every": 3,
         "train.log_every": 2, "train.checkpoint_every": 3, "train.warmup_steps": 1}


def configs(**extra):
  return {k: config_lib.apply_overrides(tiny_config(k), {**SMALL, **extra})
          for k in ("dense", "deepseekmoe")}


def test_seed_changes_init_and_data_and_nothing_else(tmp_path):
  study = Study(configs(), [0, 1], str(tmp_path))
  flat = {(n, s): config_lib.flatten(study.config_for(n, s)) for n in study.configs for s in (0, 1)}
  for n in study.configs:
    diff = {k for k in flat[n, 0] if flat[n, 0][k] != flat[n, 1][k]}
    assert diff == {"seed"}
    given = config_lib.flatten(study.configs[n])
    assert {k: v for k, v in flat[n, 0].items() if k != "seed"} == {
        k: v for k, v in given.items() if k != "seed"}
  t = {(n, s): Trainer(study.config_for(n, s)) for n in ("dense", "deepseekmoe") for s in (0, 1)}
  for n in ("dense", "deepseekmoe"):   # another seed: other init, other batches
    p0, p1 = (jax.tree.leaves(t[n, s].params)[0] for s in (0, 1))
    assert not np.allclose(p0, p1)
    assert not np.array_equal(t[n, 0].data.batch(0), t[n, 1].data.batch(0))
  for s in (0, 1):                     # one seed: every config reads the same batches
    for step in (0, 5):
      np.testing.assert_array_equal(t["dense", s].data.batch(step),
                                    t["deepseekmoe", s].data.batch(step))


def test_unpaired_data_is_refused(tmp_path):
  c = configs()
  c["dense"] = config_lib.apply_overrides(c["dense"], {"data.seq_len": 32})
  with pytest.raises(ConfigError, match=r"data\.seq_len: 32 vs 16|data\.seq_len: 16 vs 32"):
    Study(c, [0], str(tmp_path))
  Study(c, [0], str(tmp_path), paired=False)   # allowed when asked for
  with pytest.raises(ConfigError, match="distinct non-negative"):
    Study(configs(), [0, 0], str(tmp_path))
  with pytest.raises(ConfigError, match="names a directory"):
    Study({"a/b": c["dense"]}, [0], str(tmp_path))


@pytest.mark.slow
def test_resumed_study_equals_uninterrupted(tmp_path, monkeypatch):
  full = Study(configs(), [0, 1], str(tmp_path / "full"), progress=None).run(estimate=False)
  assert full.complete
  # Interrupted: every run stops at step 3 (a job time limit), then the same study resumes.
  part = Study(configs(**{"train.max_steps_per_run": 3}), [0, 1], str(tmp_path / "part"),
               progress=None).run(estimate=False)
  assert not part.runs and not part.complete
  resumed_study = Study(configs(), [0, 1], str(tmp_path / "part"), progress=None)
  resumed = resumed_study.run(estimate=False)
  assert resumed.complete
  for metric in ("val_loss", "train_ce"):
    assert resumed.table([metric]) == full.table([metric])
    assert resumed.comparison_table(metric) == full.comparison_table(metric)
  for r in full.runs:
    other = resumed.get(r.config, r.seed)
    assert other.curves["val_loss"] == r.curves["val_loss"]
    # the interrupted run also logged the step it stopped at: same values at every common step
    resumed_ce = dict(other.curves["train_ce"])
    assert [(s, resumed_ce[s]) for s, _ in r.curves["train_ce"]] == r.curves["train_ce"]
  fp = {(r.config, r.seed): r.data_fingerprint for r in full.runs}
  assert fp["dense", 0] == fp["deepseekmoe", 0] != fp["dense", 1] == fp["deepseekmoe", 1]
  assert "load_max_over_mean" in full.get("deepseekmoe", 0).metrics

  # Finished runs are loaded, never trained again ...
  monkeypatch.setattr(runner, "Trainer", lambda *a, **k: pytest.fail("trained a finished run"))
  again = resumed_study.run()
  assert again.table(["val_loss"]) == full.table(["val_loss"])
  # ... unless the settings changed: then the stale result is an error, not silently reused.
  with pytest.raises(ConfigError, match="finished run with other settings.*train.steps"):
    Study(configs(**{"train.steps": 8}), [0, 1], str(tmp_path / "part")).run()
  # A result written before a setting existed counts it at its default.
  path = os.path.join(resumed_study.workdir("dense", 0), runner.RESULT_FILE)
  with open(path) as f:
    stored = json.load(f)
  assert stored["seed"] == 0
  del stored["flat_config"]["model.moe.top_p"]
  with open(path, "w") as f:
    json.dump(stored, f)
  assert resumed_study.load("dense", 0) is not None

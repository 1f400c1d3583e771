import os

from moejax.analysis.plots import plot_run
from moejax.train.metrics import MetricsWriter


def test_plot_run_writes_png(tmp_path):
  w = MetricsWriter(str(tmp_path))
  for step in (1, 2, 3):
    w.write(step, {"split": "train", "ce": 3.0 / step,
                   "layer_0/expert_load": [0.5, 0.25, 0.25], "layer_1/expert_load": [1, 0, 0]})
  w.write(3, {"split": "val", "val_loss": 1.2})
  path = plot_run(str(tmp_path))
  assert path.endswith("run.png") and os.path.getsize(path) > 10_000

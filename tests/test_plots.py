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


def test_plot_history_adds_a_head_load_panel_for_mixture_of_heads():
  from moejax.analysis.plots import plot_history
  records = [{"split": "train", "step": 1, "ce": 3.0, "layer_0/expert_load": [0.5, 0.5],
              "layer_0/attn/head_load": [1.0, 0.5, 0.5], "layer_1/attn/head_load": [0, 1, 1]}]
  fig = plot_history(records)
  titles = [ax.get_title() for ax in fig.axes]
  # the even-split reference comes from each panel's data: 1/E for expert shares, K/H for heads
  assert any(t.startswith("routed head load") and "uniform = 0.667" in t for t in titles), titles
  assert any(t.startswith("expert load") and "uniform = 0.500" in t for t in titles), titles
  head_ax = next(ax for ax in fig.axes if ax.get_title().startswith("routed head"))
  np_grid = head_ax.get_images()[0].get_array()
  assert np_grid.shape == (2, 3) and float(np_grid[1, 0]) == 0.0

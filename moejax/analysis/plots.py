"""Plots of a training run: loss curves and per-layer expert load.

The expert-load panel shows, for each MoE layer, the share of routed slots each expert received
at the last logged step; a flat row is a balanced layer, a bright column a collapsed one.
Mixture-of-heads attention adds the same panel for its routed heads (share of tokens that
selected each head).
Heterogeneous experts add a panel of routed parameters per token over training, per layer
(mean, and the 10-90% band of tokens).
``plot_history`` draws from records (``Trainer.history`` or ``metrics.jsonl``) and returns the
figure (shown inline in a notebook); ``plot_run`` saves a workdir's plot as ``run.png``.
"""
from __future__ import annotations

import os

import numpy as np

from moejax.train.metrics import read_metrics


def plot_history(records: list[dict]):
  """-> matplotlib Figure: train/validation loss, and expert (and head) load per layer."""
  import matplotlib.pyplot as plt

  train = [r for r in records if r.get("split") == "train"]
  val = [r for r in records if r.get("split") == "val"]
  last = train[-1].items() if train else []
  loads = {k.split("/")[0]: v for k, v in last if k.endswith("/expert_load")}
  heads = {k.split("/")[0]: v for k, v in last if k.endswith("/head_load")}
  params = sorted({k.split("/")[0] for r in train for k in r if k.endswith("/routed_params")},
                  key=lambda n: int(n.split("_")[-1]))
  n = 1 + bool(loads) + bool(heads) + bool(params)
  fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
  ax = axes[0, 0]
  ax.plot([r["step"] for r in train], [r["ce"] for r in train], label="train cross-entropy")
  if val:
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
  ax.set(xlabel="step", ylabel="nats / token", title="loss")
  ax.grid(alpha=0.3)
  ax.legend()
  panel = 1
  for found, what, label in ((loads, "expert", "share of routed slots"),
                             (heads, "routed head", "share of tokens selecting the head")):
    if not found:
      continue
    names = sorted(found, key=lambda n: int(n.split("_")[-1]))
    grid = np.array([found[n] for n in names])
    ax = axes[0, panel]
    panel += 1
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    # what an even split of each layer's total would give (1/E for expert shares, K/H for the
    # share of tokens selecting each of H heads when K are active)
    uniform = float(grid.sum(1).mean()) / grid.shape[1]
    ax.set(xlabel=what, yticks=range(len(names)), yticklabels=names,
           title=f"{what} load at step {train[-1]['step']} (uniform = {uniform:.3f})")
    fig.colorbar(im, ax=ax, label=label)
  if params:
    ax = axes[0, -1]
    for name in params:
      rows = [r for r in train if f"{name}/routed_params" in r]
      steps = [r["step"] for r in rows]
      line, = ax.plot(steps, [r[f"{name}/routed_params"] for r in rows], label=name)
      q = np.array([r[f"{name}/routed_params_quantiles"] for r in rows])
      ax.fill_between(steps, q[:, 0], q[:, -1], color=line.get_color(), alpha=0.15)
    ax.set(xlabel="step", ylabel="parameters / token",
           title="routed expert parameters per token (10-90% band)")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  return fig


def plot_run(workdir: str, out_path: str | None = None) -> str:
  """Saves the plot of ``workdir/metrics.jsonl`` (default ``workdir/run.png``); returns its path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig = plot_history(read_metrics(workdir))
  out_path = out_path or os.path.join(workdir, "run.png")
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return out_path

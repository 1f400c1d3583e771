"""Plots of a multi-seed study: curves with a ±1 std band across seeds, and per-seed finals."""
from __future__ import annotations

from typing import Sequence

import numpy as np

_YLABEL = {"train_ce": "train cross-entropy (nats/byte)", "val_loss": "validation loss (nats/byte)",
           "load_max_over_mean": "max / mean expert load", "router_entropy": "router entropy"}


def plot_curves(result, curves: Sequence[str] = ("train_ce", "val_loss"), *, title: str = "",
                configs: Sequence[str] | None = None):
  """-> Figure: one panel per curve, mean across seeds with a ±1 std band."""
  import matplotlib.pyplot as plt

  configs = list(result.configs if configs is None else configs)
  fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
  for ax, name in zip(axes[0], curves):
    for c in configs:
      if not any(r.config == c and name in r.curves for r in result.runs):
        continue
      steps, mean, std = result.curve(c, name)
      n = sum(r.config == c for r in result.runs)
      line, = ax.plot(steps, mean, marker="o" if name == "val_loss" else None, ms=3,
                      label=f"{c} (n={n})")
      ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="step", ylabel=_YLABEL.get(name, name))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if name == "train_ce":   # the first steps (loss ~5.5) would flatten everything else
      lo = min(l.get_ydata().min() for l in ax.get_lines()) if ax.get_lines() else 0
      ax.set_ylim(lo - 0.05, lo + 1.5)
  fig.suptitle(title or "mean ± 1 std across seeds")
  fig.tight_layout()
  return fig


def plot_finals(result, metric: str = "val_loss", *, title: str = "", ax=None):
  """-> Figure: each seed's final value (dots) and mean ± std (bar) per config."""
  import matplotlib.pyplot as plt

  fig = None
  if ax is None:
    fig, ax = plt.subplots(figsize=(1.3 * len(result.configs) + 2, 3.8))
  summary = result.summary(metric)
  for i, c in enumerate(result.configs):
    if c not in summary:
      continue
    s = summary[c]
    ax.errorbar([i], [s.mean], yerr=[0 if np.isnan(s.std) else s.std], fmt="s", color="k",
                capsize=6, zorder=3)
    ax.scatter(np.full(s.n, i) + np.linspace(-0.12, 0.12, s.n), s.values, alpha=0.7, zorder=2)
  ax.set_xticks(range(len(result.configs)), result.configs, rotation=20)
  ax.set(ylabel=_YLABEL.get(metric, metric), title=title or f"{metric}: seeds and mean ± std")
  ax.grid(alpha=0.3, axis="y")
  if fig is not None:
    fig.tight_layout()
  return fig if fig is not None else ax.figure


def save(fig, path: str) -> str:
  fig.savefig(path, dpi=110)
  import matplotlib.pyplot as plt
  plt.close(fig)
  return path

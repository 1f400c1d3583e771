"""Plots of a routing analysis (analysis/analyze.py's summary); each function returns a figure.

load: expert load per layer and source (a heatmap per source; a flat row is a balanced layer).
specialisation: the specialisation score of every expert (layers x experts).
affinity: P(expert j at the next MoE layer | expert i), one panel per consecutive pair.
prediction: held-out accuracy of cross-layer prediction, affinity vs most-used experts.
placement: held-out cross-device traffic of each placement.
cache: hit rate against cache size per policy.
"""
from __future__ import annotations

import os

import numpy as np


def _plt():
  import matplotlib.pyplot as plt   # matplotlib is the optional "plots" extra
  return plt


def plot_load(summary: dict):
  plt = _plt()
  loads = summary["load"]
  fig, axes = plt.subplots(1, len(loads), figsize=(3.2 * len(loads) + 1, 2.6), squeeze=False)
  for ax, (name, load) in zip(axes[0], loads.items()):
    im = ax.imshow(np.asarray(load), aspect="auto", cmap="viridis", vmin=0)
    ax.set_title(f"load: {name}", fontsize=9)
    ax.set_xlabel("expert")
    ax.set_yticks(range(len(summary["layers"])), [f"layer {l}" for l in summary["layers"]])
    fig.colorbar(im, ax=ax, fraction=0.05)
  fig.tight_layout()
  return fig


def plot_specialisation(summary: dict):
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5, 2.6))
  im = ax.imshow(np.asarray(summary["specialisation"]), aspect="auto", cmap="magma", vmin=0,
                 vmax=1)
  ax.set_title("specialisation (0 shared .. 1 one source)", fontsize=9)
  ax.set_xlabel("expert")
  ax.set_yticks(range(len(summary["layers"])), [f"layer {l}" for l in summary["layers"]])
  fig.colorbar(im, ax=ax, fraction=0.05)
  fig.tight_layout()
  return fig


def plot_affinity(summary: dict, max_panels: int = 4):
  plt = _plt()
  aff = np.asarray(summary["affinity"])[:max_panels]
  layers = summary["layers"]
  fig, axes = plt.subplots(1, len(aff), figsize=(3 * len(aff) + 1, 2.8), squeeze=False)
  for m, (ax, a) in enumerate(zip(axes[0], aff)):
    im = ax.imshow(a, cmap="Blues", vmin=0, vmax=max(a.max(), 1e-9))
    ax.set_title(f"P(j @ {layers[m + 1]} | i @ {layers[m]})", fontsize=9)
    ax.set_xlabel("j")
    ax.set_ylabel("i")
    fig.colorbar(im, ax=ax, fraction=0.05)
  fig.tight_layout()
  return fig


def plot_prediction(summary: dict):
  plt = _plt()
  p = summary["prediction"]
  pairs = [f"{a}->{b}" for a, b in zip(summary["layers"], summary["layers"][1:])]
  x = np.arange(len(pairs))
  fig, ax = plt.subplots(figsize=(4, 2.6))
  ax.bar(x - 0.2, p["affinity"], 0.4, label="affinity predictor")
  ax.bar(x + 0.2, p["frequency"], 0.4, label="most-used experts")
  ax.set_xticks(x, pairs)
  ax.set_ylim(0, 1)
  ax.set_ylabel("held-out accuracy")
  ax.set_title("next-layer expert prediction", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def plot_placement(summary: dict):
  plt = _plt()
  plans = summary["placement"]["plans"]
  fig, ax = plt.subplots(figsize=(4, 2.6))
  names = list(plans)
  ax.bar(range(len(names)), [plans[n]["traffic_heldout"] for n in names],
         color=["grey", "tab:orange", "tab:green", "tab:blue"][:len(names)])
  ax.set_xticks(range(len(names)), [n.replace("+", "+\n") for n in names], fontsize=8)
  ax.set_ylabel("cross-device share of moves")
  ax.set_title(f"placement on {summary['placement']['devices']} devices (held-out)", fontsize=9)
  fig.tight_layout()
  return fig


def plot_cache(summary: dict):
  plt = _plt()
  c = summary["cache"]
  fig, ax = plt.subplots(figsize=(4, 2.6))
  for policy, v in c["policies"].items():
    ax.plot(c["sizes"], v["overall"], marker="o", label=policy)
  ax.set_xlabel(f"experts cached per layer (of {summary['num_experts']})")
  ax.set_ylabel("hit rate (held-out)")
  ax.set_ylim(0, 1)
  ax.set_title("offloading cache", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def save_all(summary: dict, out_dir: str) -> list[str]:
  """Saves every plot the summary has data for; -> the paths."""
  plt = _plt()
  plots = {"load": plot_load}
  if "specialisation" in summary:
    plots["specialisation"] = plot_specialisation
  if "affinity" in summary:
    plots.update(affinity=plot_affinity, prediction=plot_prediction, placement=plot_placement,
                 cache=plot_cache)
  paths = []
  for name, fn in plots.items():
    fig = fn(summary)
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)
  return paths

"""Metrics: flatten sown MoE intermediates and append JSON lines to ``workdir/metrics.jsonl``."""
from __future__ import annotations

import json
import os

import jax
import numpy as np


def flatten_intermediates(tree) -> dict:
  """{'layer_1': {'moe': {'expert_load': (x,)}}} -> {'layer_1/expert_load': x}."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [getattr(p, "key", getattr(p, "idx", None)) for p in path]
    keys = [str(k) for k in keys if not isinstance(k, int) and k not in ("moe",)]
    out["/".join(keys)] = leaf
  return out


def summarize_moe(flat: dict) -> dict:
  """Scalar summaries across MoE layers for the progress line."""
  drops = [v for k, v in flat.items() if k.endswith("/drop_fraction")]
  ent = [v for k, v in flat.items() if k.endswith("/router_entropy")]
  out = {}
  if drops:
    out["drop_fraction"] = float(np.mean(drops))
  if ent:
    out["router_entropy"] = float(np.mean(ent))
  return out


def _jsonable(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


class MetricsWriter:
  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]

"""Metrics: flatten sown MoE intermediates; write ``workdir/metrics.jsonl`` and TensorBoard.

``metrics.jsonl`` has one JSON object per (step, split). A resumed run first drops the rows past
its checkpoint (logged by the interrupted run, then recomputed), so every row appears once;
TensorBoard's event files are told the same with ``purge_step``.
"""
from __future__ import annotations

import json
import os
import tempfile

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


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
  out = {}
  for name in ("drop_fraction", "router_entropy", "experts_per_token", "active_heads"):
    values = [v for k, v in flat.items() if k.endswith(f"/{name}")]
    if values:
      out[name] = float(np.mean(values))
  return out


def _jsonable(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


def _rewrite(path: str, records: list[dict]) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".metrics-")
  with os.fdopen(fd, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  os.replace(tmp, path)


class MetricsWriter:
  """Appends records to ``metrics.jsonl`` and their scalars to ``workdir/tensorboard``.

  ``start_step``: the step the run starts from; rows after it are dropped first. Writing a
  (step, split) that is already there replaces that row (a finished run evaluated again).
  """

  def __init__(self, workdir: str, start_step: int = 0, enabled: bool = True,
               tensorboard: bool = True):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.enabled = enabled
    self._records: list[dict] = []
    self._index: dict[tuple, int] = {}     # (step, split) -> position in _records
    self._tb = None
    if not enabled:
      return
    if os.path.exists(self.path):
      old = read_metrics(workdir)
      self._records = [r for r in old if r["step"] <= start_step]
      if len(self._records) != len(old):
        _rewrite(self.path, self._records)
      self._index = {(r["step"], r.get("split")): i for i, r in enumerate(self._records)}
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=start_step + 1 if start_step else None, flush_secs=30)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    key = (record["step"], record.get("split"))
    if key in self._index:
      self._records[self._index[key]] = record
      _rewrite(self.path, self._records)
    else:
      self._index[key] = len(self._records)
      self._records.append(record)
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      split = record.get("split", "train")
      for name, value in record.items():
        if (name not in ("step", "split") and isinstance(value, (int, float))
            and np.isfinite(value)):   # e.g. no throughput yet on the compile step
          self._tb.add_scalar(f"{split}/{name}", value, record["step"])

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]

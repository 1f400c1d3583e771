"""``compress(workdir, out, method, keep)``: calibrate, plan, write a new workdir, measure.

Steps, each refusing bad input before the next costs anything:
  1. checks: keep in (0, 1], a known method that applies to this model, ``out`` new, calibration
     text long enough;
  2. calibration: the source model's routing (and, for neuron pruning, output gradients) on the
     calibration text's training split (``calibration.py``);
  3. plan (``methods.py``), then the compressed parameters, written one MoE layer at a time
     into a staging directory beside ``out`` (``apply.py``; orbax partial saves);
  4. measurements: parameters and bytes (total and active per token) and the validation loss
     of both models on every evaluation source; saved as ``out/compression.json``;
  5. the staging directory becomes ``out`` (one rename): a failed or interrupted run leaves no
     ``out`` behind.

The result is a regular workdir (config.json + checkpoint at step 0, parameters only):
``run.py --mode=eval|sample|analyze``, ``moejax.convert`` and ``run.py --mode=train
--workdir=OUT --config.train.steps=N`` (fine-tuning with a fresh optimizer) take it as it is.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time

import jax
import numpy as np

from moejax.compress import apply as apply_lib
from moejax.compress import calibration as calib
from moejax.compress.methods import METHODS, LayerInput, make_plan
from moejax.train.data import source_split
from moejax.errors import ConfigError
from moejax.logs import progress as say


def peak_rss_bytes() -> int:
  """This process's peak resident memory so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_params(workdir: str):
  """(SavedModel, parameters) of a workdir's latest checkpoint: parameters only (no optimizer
  state), read one array at a time straight into device arrays, so the peak is the model plus
  one array (not a NumPy copy of the model beside the one the forward pass needs)."""
  from moejax.convert.hf import SavedModel
  from moejax.train.checkpoint import tree_set
  saved = SavedModel(workdir)
  params: dict = {}
  for path in saved.paths():
    leaf = saved.leaf(path, keep_dtype=True)
    tree_set(params, tuple(path), jax.device_put(leaf))
    del leaf
  return saved, params


def eval_loss(model, params, windows: np.ndarray, batch_size: int = 8) -> float:
  """Mean next-token cross-entropy over ``windows`` [W, L+1] (the model's own loss function)."""
  from moejax.api import loss
  total, n = 0.0, 0
  for start in range(0, len(windows), batch_size):
    chunk = windows[start:start + batch_size]
    total += float(loss(model, params, chunk)[1].ce) * len(chunk)
    n += len(chunk)
  return total / n


def sizes(model, params) -> dict:
  """Parameters and bytes, total and active per token (a token reads its routed experts only;
  inactive bytes counted at the routed experts' dtype)."""
  from moejax.analysis.params import param_counts
  total, active = param_counts(model, params)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  experts = [v for p, v in flat if "experts" in [getattr(k, "key", "") for k in p]]
  itemsize = experts[0].dtype.itemsize if experts else 4
  nbytes = int(sum(v.size * v.dtype.itemsize for _, v in flat))
  routed_bytes = int(sum(v.size * v.dtype.itemsize for v in experts))
  return {"params": int(total), "active_params": int(active),
          "routed_expert_params": int(sum(v.size for v in experts)), "bytes": nbytes,
          "active_bytes": nbytes - int(total - active) * itemsize,
          "routed_expert_bytes": routed_bytes,
          "routed_expert_bytes_packed": routed_bytes - _ternary_saving(model.cfg, itemsize)}


def _ternary_saving(cfg, itemsize: int) -> int:
  """Bytes the mixed-precision ternary experts would save stored 2 bits per weight with one
  float32 scale per output column (layers/ternary.py ``pack_bank``)."""
  out = 0
  for i in cfg.moe_layer_ids:
    s = cfg.moe_spec(i)
    d, h, n = cfg.d_model, s.fine_hidden, s.ternary_experts
    out += n * (3 * d * h * itemsize - (3 * d * h // 4 + (2 * h + d) * 4))
  return out


def _layer_summary(plan, overrides) -> dict:
  out = {}
  for layer, lp in plan.layers.items():
    entry = {}
    if lp.groups is not None:
      entry["groups"] = [list(map(int, g)) for g in lp.groups]
    else:
      entry["kept_experts"] = list(map(int, lp.keep))
    if lp.neurons is not None:
      entry["kept_units"] = [int(len(n)) for n in lp.neurons]
    entry.update(overrides.get(layer, {}))
    out[str(layer)] = entry
  return out


def compress(workdir: str, out: str, method: str, keep: float = 0.5,
             calibration: str | None = None, *, calibration_tokens: int = 8192,
             eval_sources: list[str] | None = None, eval_tokens: int = 16384,
             options: dict | None = None) -> dict:
  """Compresses ``workdir``'s model into the new workdir ``out``; returns the report (also
  printed, and saved as ``out/compression.json``). ``calibration``: a text file, or None for the
  workdir's own training data; ``eval_sources``: text files or 'generated' (default: the
  calibration source and the workdir's data source). ``options``: ``task_ratio`` (0.1),
  ``neuron_multiple`` (8)."""
  from moejax.api import build_model
  from moejax.train import workdir as workdir_lib
  from moejax.train.checkpoint import write_params_streaming
  start_time = time.time()
  if not (isinstance(keep, (int, float)) and 0 < keep <= 1):
    raise ConfigError(f"--keep={keep}: must be in (0, 1] (the fraction of each layer's "
                      "routed-expert parameters kept)")
  if method not in METHODS:
    raise ConfigError(f"--method={method!r}; allowed: {', '.join(METHODS)}")
  if os.path.exists(out):
    raise ConfigError(f"--out={out}: already exists; compression writes a new workdir")
  workdir_lib.require_trained(workdir, "compress")
  config = workdir_lib.load_config(workdir)
  model = build_model(config)
  apply_lib.check_model(model.cfg, METHODS[method])
  own = config.data.path or "generated"
  cal_source = calibration or own
  seq = config.data.seq_len
  cal_windows = calib.windows(source_split(cal_source, config, "train"), seq,
                              calibration_tokens, f"--calibration={cal_source}")
  sources = list(eval_sources or dict.fromkeys([cal_source, own]))
  eval_windows = {s: calib.windows(source_split(s, config, "val"), seq, eval_tokens,
                                   f"evaluation source {s}") for s in sources}

  say(f"compress {workdir} -> {out}: method {method}, keep {keep:g}, calibration "
      f"{cal_source} ({cal_windows.size - len(cal_windows):,} tokens)")
  saved, params = load_params(workdir)
  stats = calib.collect(model, params, cal_windows, gradients=METHODS[method].gradients)
  layers = {}
  for layer, st in stats.items():
    spec = model.cfg.moe_spec(layer)
    moe = params[f"layer_{layer}"]["moe"]
    layers[layer] = LayerInput(st, apply_lib.layer_experts(moe, spec), spec)
  plan = make_plan(method, layers, keep, options)
  before = {"sizes": sizes(model, params),
            "loss": {s: eval_loss(model, params, w) for s, w in eval_windows.items()}}
  del params, layers, stats

  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.partial-")
  try:
    overrides: dict = {}
    # small arrays (norms, routers) share a save up to a quarter of the largest array
    largest = max(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(saved.shapes))
    write_params_streaming(staging, 0, apply_lib.compressed_leaves(saved, plan, overrides),
                           batch_bytes=largest // 4)
    new_config = apply_lib.compressed_config(config, model.cfg, plan, overrides)
    workdir_lib.save_config(staging, new_config)
    new_model, new_params = build_model(new_config), load_params(staging)[1]
    after = {"sizes": sizes(new_model, new_params),
             "loss": {s: eval_loss(new_model, new_params, w) for s, w in eval_windows.items()}}
    report = {"method": method, "keep": keep, "options": options or {}, "source": workdir,
              "calibration": cal_source, "calibration_tokens": int(cal_windows.size
                                                                   - len(cal_windows)),
              "before": before, "after": after, "layers": _layer_summary(plan, overrides),
              "seconds": round(time.time() - start_time, 2), "peak_rss_bytes": peak_rss_bytes()}
    with open(os.path.join(staging, "compression.json"), "w") as f:
      json.dump(report, f, indent=2)
    os.replace(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  for line in report_lines(report):
    say(line)
  return report


def _packed(after: dict) -> str:
  s = after["sizes"]
  if s["routed_expert_bytes_packed"] == s["routed_expert_bytes"]:
    return ""
  return (f", {s['routed_expert_bytes_packed']:,} routed-expert bytes with the ternary experts "
          f"packed 2 bits per weight ({s['routed_expert_bytes']:,} as stored, trainable)")


def report_lines(report: dict) -> list[str]:
  b, a = report["before"], report["after"]
  frac = lambda k: a["sizes"][k] / max(b["sizes"][k], 1)
  lines = [f"parameters {b['sizes']['params']:,} -> {a['sizes']['params']:,} "
           f"({frac('params'):.1%}); active per token {b['sizes']['active_params']:,} -> "
           f"{a['sizes']['active_params']:,}; routed experts "
           f"{b['sizes']['routed_expert_params']:,} -> {a['sizes']['routed_expert_params']:,} "
           f"({frac('routed_expert_params'):.1%}){_packed(a)}; bytes {b['sizes']['bytes']:,} -> "
           f"{a['sizes']['bytes']:,}, active per token {b['sizes']['active_bytes']:,} -> "
           f"{a['sizes']['active_bytes']:,}"]
  for s in b["loss"]:
    lines.append(f"validation loss on {s}: {b['loss'][s]:.4f} -> {a['loss'][s]:.4f} "
                 f"({a['loss'][s] - b['loss'][s]:+.4f})")
  lines.append(f"took {report['seconds']:.1f} s, peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB")
  return lines

"""``--mode=analyze`` and ``moejax.analyze``: routing traces of a trained model, a short report
and its plots.

    python run.py --workdir=runs/x --mode=analyze \\
        --config.analyze.sources=generated,../shared/data/tinyshakespeare.txt

writes, under ``WORKDIR/analysis/``: ``traces_<source>.npz`` per source (analysis/traces.py),
``report.md`` (one line per quantity, with its plot), ``summary.json`` (the numbers) and the
plots. Each source is traced over its validation split (the last ``data.val_fraction`` of the
text; the embedded corpus for ``generated``), at most ``analyze.tokens`` tokens, in windows of
``data.seq_len``. Predictors, the placement and the cache prefetcher are fitted on the first
``analyze.fit_fraction`` of every source's trace and scored on the rest. Under ``steer.*``
options the traces record the steered routing.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from moejax.analysis import cache_sim, placement, routing
from moejax.analysis.traces import Traces, collect
from moejax.errors import ConfigError
from moejax.logs import progress as say


@dataclasses.dataclass
class Analysis:
  """What ``analyze`` found; ``summary`` holds the numbers of report.md (also summary.json)."""
  traces: dict
  summary: dict
  report: str
  files: list


def source_name(source: str) -> str:
  return "generated" if source == "generated" else os.path.splitext(os.path.basename(source))[0]


def source_windows(source: str, config, tokens: int) -> np.ndarray:
  """[W, L] windows of the source's validation split, at most ``tokens`` tokens."""
  from moejax.train.data import source_split
  try:
    val = source_split(source, config, "val")
  except ConfigError as e:
    raise ConfigError(f"analyze.sources: {e}") from None
  length = config.data.seq_len
  rows = min(len(val), tokens) // length
  if rows < 2:
    raise ConfigError(f"analyze.sources: the validation split of {source!r} has {len(val)} "
                      f"tokens; tracing needs at least 2 windows of data.seq_len={length}")
  return val[:rows * length].reshape(rows, length)


def _devices(requested: int, num_experts: int) -> int:
  if requested:
    placement.check(num_experts, requested)
    return requested
  return next((d for d in (4, 3, 2, 8, 5, 6, 7) if num_experts % d == 0), 1)


def _cache_sizes(text: str, num_experts: int) -> list[int]:
  if text:
    sizes = [int(s) for s in text.split(",") if s.strip()]
    bad = [s for s in sizes if not 1 <= s <= num_experts]
    if bad:
      raise ConfigError(f"analyze.cache_sizes: {bad} outside 1..{num_experts} (the routed "
                        "experts)")
    return sizes
  top = max(num_experts - 1, 1)
  return sorted({max(1, round(x)) for x in np.linspace(1, top, min(8, top))})


def analyze_traces(traces: dict[str, Traces], config) -> dict:
  """The report's numbers from traces {source: Traces} (NumPy only)."""
  an = config.analyze
  names = list(traces)
  first = traces[names[0]]
  e, layers = first.num_experts, first.layers
  freq = {s: routing.activation_frequency(t.experts, e) for s, t in traces.items()}
  loads = {s: routing.expert_load(t.experts, e) for s, t in traces.items()}
  out = {"sources": {s: int(t.num_tokens) for s, t in traces.items()},
         "layers": layers.tolist(), "num_experts": e,
         "load": {s: v.tolist() for s, v in loads.items()},
         "load_max_over_mean": {s: (np.max(v, axis=1) * e).tolist() for s, v in loads.items()}}
  if len(names) > 1:
    spec = routing.specialisation(np.stack([freq[s] for s in names]))
    out["specialisation"] = spec.tolist()
    out["specialisation_mean"] = spec.mean(axis=1).tolist()
    out["most_specific"] = {s: routing.most_specific(
        freq[s], np.mean([freq[o] for o in names if o != s], axis=0), 5, layers)
        for s in names}
  fit = np.concatenate([t.experts[:, :int(t.num_tokens * an.fit_fraction)]
                        for t in traces.values()], axis=1)
  test = np.concatenate([t.experts[:, int(t.num_tokens * an.fit_fraction):]
                         for t in traces.values()], axis=1)
  if len(layers) < 2:
    out["note"] = "one MoE layer: no inter-layer affinity, prediction or placement"
    return out
  trans_fit = routing.transition_counts(fit, e)
  trans_test = routing.transition_counts(test, e)
  out["affinity"] = routing.affinity(routing.transition_counts(
      np.concatenate([t.experts for t in traces.values()], axis=1), e)).tolist()
  out["mutual_information_bits"] = routing.mutual_information(trans_test).tolist()
  out["next_layer_entropy_bits"] = [
      routing.entropy_bits(t.sum(axis=0) / max(t.sum(), 1)) for t in trans_test]
  pred = routing.prediction_accuracy(fit, test, e)
  out["prediction"] = {k: v.tolist() for k, v in pred.items()}
  d = _devices(an.devices, e)
  load = routing.expert_load(fit, e)
  greedy = placement.greedy(trans_fit, e, d)
  refined = placement.refine(greedy, trans_fit, d)
  balanced = an.balance_slack >= 0       # the heuristics ignore load: no incumbent then
  plans = [placement.round_robin(len(layers), e, d), greedy, refined,
           placement.milp(trans_fit, e, d, load, an.balance_slack, an.milp_time_limit,
                          incumbent=None if balanced else refined)]
  test_load = routing.expert_load(test, e)
  out["placement"] = {"devices": d, "plans": {p.method: {
      "traffic_heldout": placement.traffic(p.devices, trans_test),
      "traffic_fit": placement.traffic(p.devices, trans_fit),
      "max_device_load": float(placement.device_load(p.devices, test_load, d).max() * d),
      "optimal": p.optimal, "seconds": p.seconds, "devices": p.devices.tolist()}
      for p in plans}}
  table = routing.affinity(trans_fit)
  sizes = _cache_sizes(an.cache_sizes, e)
  out["cache"] = {"sizes": sizes, "policies": {}}
  for policy in cache_sim.POLICIES:
    runs = [cache_sim.simulate(test, c, policy, table) for c in sizes]
    out["cache"]["policies"][policy] = {
        "overall": [r["overall"] for r in runs],
        "per_layer": [r["hit_rate"].tolist() for r in runs],
        "prefetch_loads_per_request": [r["prefetch_loads"] / max(r["requests"], 1)
                                       for r in runs]}
  return out


def _pct(x: float) -> str:
  return f"{100 * x:.1f}%"


def report_lines(summary: dict, steering: str = "") -> list[str]:
  """report.md's lines (one per quantity) from ``analyze_traces``'s summary."""
  s = summary
  src = ", ".join(f"{name} ({n} tokens)" for name, n in s["sources"].items())
  lines = ["# Routing analysis", "", f"Sources: {src}. MoE layers {s['layers']}, "
           f"{s['num_experts']} routed experts each.", ""]
  if steering:
    lines += [f"Traced under steering: {steering}.", ""]
  worst = {k: max(v) for k, v in s["load_max_over_mean"].items()}
  lines.append("- **Load**: busiest expert / mean, worst layer: " + ", ".join(
      f"{k} {v:.2f}x" for k, v in worst.items()) + " (1.00x = balanced). ![load](load.png)")
  if "specialisation" in s:
    top = {k: v[0] for k, v in s["most_specific"].items()}
    lines.append("- **Specialisation** (1 - H(source | expert) / log S; 0 = shared, 1 = one "
                 "source): mean per layer " + ", ".join(f"{x:.3f}" for x in
                                                       s["specialisation_mean"])
                 + "; most specific (layer, expert) per source: " + ", ".join(
                     f"{k} {tuple(v)}" for k, v in top.items()) + ". "
                 "![specialisation](specialisation.png)")
  if "affinity" not in s:
    lines.append(f"- {s['note']}.")
    return lines
  mi = ", ".join(f"{a:.3f} of {h:.2f}" for a, h in zip(s["mutual_information_bits"],
                                                       s["next_layer_entropy_bits"]))
  lines.append(f"- **Inter-layer affinity**: mutual information between consecutive layers' "
               f"experts (bits, of the next layer's entropy): {mi} (0 = independent). "
               "![affinity](affinity.png)")
  p = s["prediction"]
  lines.append("- **Cross-layer gate prediction** (held-out, share of next-layer experts "
               "predicted): affinity " + ", ".join(map(_pct, p["affinity"])) + " vs most-used "
               + ", ".join(map(_pct, p["frequency"])) + ". ![prediction](prediction.png)")
  pl = s["placement"]
  parts = [f"{m} {_pct(v['traffic_heldout'])}" + (
      " (optimal on the fitted traces)" if v["optimal"] else
      " (no better placement found within analyze.milp_time_limit, not proven optimal)"
      if m == "milp" else "")
      for m, v in pl["plans"].items()]
  lines.append(f"- **Expert placement** on {pl['devices']} devices: held-out token moves "
               "between consecutive layers that cross devices: " + ", ".join(parts) +
               ". ![placement](placement.png)")
  c = s["cache"]
  mid = len(c["sizes"]) // 2
  lines.append(f"- **Offloading cache** (held-out hit rate at {c['sizes'][mid]} of "
               f"{s['num_experts']} experts cached per layer): " + ", ".join(
                   f"{k} {_pct(v['overall'][mid])}" for k, v in c["policies"].items())
               + " (prefetch also loads "
               f"{c['policies']['prefetch']['prefetch_loads_per_request'][mid]:.2f} experts "
               "per request). ![cache](cache.png)")
  return lines


def analyze(trainer, *, sources: str | None = None, out_dir: str | None = None,
            plots: bool = True) -> Analysis:
  """Traces ``trainer``'s model (a ``moejax.Trainer``, e.g. ``Trainer.from_workdir(...)``)
  over ``sources`` (default ``config.analyze.sources``) and writes traces, report and plots to
  ``out_dir`` (default WORKDIR/analysis; None without a workdir: nothing written)."""
  config = trainer.config
  an = config.analyze
  model = trainer.model
  if model.cfg.moe is None or model.cfg.moe.merge != "none":
    raise ConfigError("--mode=analyze: the model has no routed MoE layer to trace (dense, or "
                      "model.moe.merge merges experts instead of routing)")
  names = [s.strip() for s in (sources or an.sources).split(",") if s.strip()]
  if not names:
    raise ConfigError("analyze.sources: empty; give 'generated' and/or text files")
  if len({source_name(s) for s in names}) != len(names):
    raise ConfigError(f"analyze.sources: two sources share a name: {names}")
  windows = {source_name(s): source_windows(s, config, an.tokens) for s in names}
  if out_dir is None and trainer.workdir:
    out_dir = os.path.join(trainer.workdir, "analysis")
  traces, files = {}, []
  for name, w in windows.items():
    say(f"tracing {name}: {w.size} tokens")
    traces[name] = collect(model, trainer.params, w, config.data.batch_size, source=name,
                           probs=an.probs)
  from moejax.inference import steer as steer_lib
  steering = steer_lib.describe(model.cfg.steer).replace("\n", "; ")
  say("analysing: load, specialisation, affinity, prediction, placement (MILP), cache")
  summary = analyze_traces(traces, config)
  text = "\n".join(report_lines(summary, steering)) + "\n"
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    for name, t in traces.items():
      files.append(t.save(os.path.join(out_dir, f"traces_{name}.npz")))
    if plots:
      from moejax.analysis import routing_plots
      files += routing_plots.save_all(summary, out_dir)
    for fname, body in (("report.md", text), ("summary.json", json.dumps(summary, indent=1))):
      path = os.path.join(out_dir, fname)
      with open(path + ".tmp", "w") as f:
        f.write(body)
      os.replace(path + ".tmp", path)
      files.append(path)
  return Analysis(traces=traces, summary=summary, report=text, files=files)

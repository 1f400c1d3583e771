"""Steering and routing analysis of a trained MoE, over several training seeds.

  python experiments/steer.py --data_path=../shared/data/tinyshakespeare.txt \\
      --other_path=../shared/data/wikitext2_valid.txt

Trains the DeepSeekMoE config on --data_path (source A) once per seed, then on each trained
model (moejax/inference/steer.py, moejax/analysis/):
  deactivation: the --deactivate (layer, expert) pairs most specific to A (largest
      f_A(e) - f_B(e), activation frequencies on both sources' validation splits) are switched
      off; the loss change on A and on B (--other_path), against as many random pairs;
  skipping: validation loss on A vs the share of routed slots (= routed-expert FLOPs) skipped;
  capacity: validation loss on A vs the inference capacity factor, overflow dropped vs
      re-routed;
  placement: held-out cross-device traffic of the MILP placement vs round-robin and greedy;
  cache: held-out hit rate of LRU, LFU and the affinity prefetcher vs cache size.
Re-running resumes (trained models are kept under --work_root).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

import moejax  # noqa: E402
from moejax import logs  # noqa: E402
from moejax.analysis import analyze as analyze_lib  # noqa: E402
from moejax.analysis import routing  # noqa: E402
from moejax.analysis.traces import collect  # noqa: E402
from moejax.experiment import Study, report, setups, stats  # noqa: E402
from moejax.experiment.stats import mean_std  # noqa: E402
from moejax.logs import progress as say  # noqa: E402

_DATA = flags.DEFINE_string("data_path", "../shared/data/tinyshakespeare.txt",
                            "Source A: training text ('' = the embedded generated corpus).")
_OTHER = flags.DEFINE_string("other_path", "../shared/data/wikitext2_valid.txt",
                             "Source B: a second text ('generated' = the embedded corpus).")
_STEPS = flags.DEFINE_integer("steps", 600, "Training steps per seed.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Training seeds.")
_SIZE = flags.DEFINE_string("size", "small", "Model size (moejax/experiment/setups.py).")
_TOKENS = flags.DEFINE_integer("tokens", 4096, "Tokens per source for traces and losses.")
_DEACTIVATE = flags.DEFINE_integer("deactivate", 4, "(layer, expert) pairs switched off.")
_SKIP = flags.DEFINE_list("skip_rates", ["0.1", "0.2", "0.3", "0.5"], "Target skip rates.")
_CAPACITY = flags.DEFINE_list("capacity_factors", ["0.5", "0.75", "1.0", "1.5"],
                              "Inference capacity factors.")
_MILP = flags.DEFINE_float("milp_seconds", 20.0, "Time limit of the placement MILP per seed "
                          "(config analyze.milp_time_limit).")
_OUT = flags.DEFINE_string("out_dir", "experiments/results/steer", "Output directory.")
_WORK = flags.DEFINE_string("work_root", "workdir/steer", "Run directories (resumable).")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny model and batches (smoke test of the script).")


def source_loss(model, params, windows: np.ndarray, batch: int) -> float:
  """Mean next-token cross-entropy inside each window [W, L] (positions 1..L-1)."""
  losses = []
  for start in range(0, len(windows), batch):
    tokens = jnp.asarray(windows[start:start + batch], jnp.int32)
    logits = moejax.forward(model, params, tokens).logits[:, :-1]
    losses.append(np.asarray(optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:])).reshape(-1))
  return float(np.mean(np.concatenate(losses)))


def _steered(trainer, options, calibration=None):
  return moejax.steered(trainer.model, options, trainer.params, calibration)


def collect_steering(trainer) -> dict:
  """The steering and analysis measurements of one trained model (Study's ``collect``)."""
  config, params, model = trainer.config, trainer.params, trainer.model
  bsz = config.data.batch_size
  a = analyze_lib.source_windows(config.data.path or "generated", config, _TOKENS.value)
  b = analyze_lib.source_windows(_OTHER.value or "generated", config, _TOKENS.value)
  out = {"loss_a": source_loss(model, params, a, bsz), "loss_b": source_loss(model, params, b, bsz)}
  tr_a, tr_b = collect(model, params, a, bsz), collect(model, params, b, bsz)
  e = tr_a.num_experts
  fa, fb = routing.activation_frequency(tr_a.experts, e), routing.activation_frequency(
      tr_b.experts, e)
  n = _DEACTIVATE.value
  specific = routing.most_specific(fa, fb, n, tr_a.layers)
  rng = np.random.default_rng(int(config.seed))
  pool = [(int(l), x) for l in tr_a.layers for x in range(e) if (int(l), x) not in specific]
  random_pairs = [pool[i] for i in rng.choice(len(pool), n, replace=False)]
  for name, pairs in (("specific", specific), ("random", random_pairs)):
    steered = _steered(trainer, {"deactivate": ",".join(f"{l}:{x}" for l, x in pairs)})
    out[f"deact_{name}_dA"] = source_loss(steered, params, a, bsz) - out["loss_a"]
    out[f"deact_{name}_dB"] = source_loss(steered, params, b, bsz) - out["loss_b"]
  calib = [trainer.data.batch(i)[:, :-1] for i in range(2)]
  for rate in _SKIP.value:
    steered = _steered(trainer, {"skip_rate": float(rate)}, calib)
    res = moejax.forward(steered, params, jnp.asarray(a[:bsz], jnp.int32))
    slots = sum(float(r["steer_slots"]) for r in res.routing.values())
    skipped = sum(float(r["steer_skipped"]) for r in res.routing.values())
    out[f"skip_{rate}_loss"] = source_loss(steered, params, a, bsz)
    out[f"skip_{rate}_saved"] = skipped / max(slots, 1)
  for factor in _CAPACITY.value:
    for overflow in ("drop", "reroute"):
      steered = _steered(trainer, {"capacity_factor": float(factor), "overflow": overflow})
      out[f"cap_{overflow}_{factor}_loss"] = source_loss(steered, params, a, bsz)
  summary = analyze_lib.analyze_traces({"a": tr_a, "b": tr_b}, config)
  for method, plan in summary["placement"]["plans"].items():
    out[f"traffic_{method.split(' ')[0]}"] = plan["traffic_heldout"]
  out["milp_optimal"] = int(summary["placement"]["plans"]["milp"]["optimal"])
  cache = summary["cache"]
  out["cache_sizes"] = cache["sizes"]
  for policy, v in cache["policies"].items():
    out[f"hit_{policy}"] = v["overall"]
  out["mutual_information_bits"] = float(np.mean(summary["mutual_information_bits"]))
  out["prediction_affinity"] = float(np.mean(summary["prediction"]["affinity"]))
  out["prediction_frequency"] = float(np.mean(summary["prediction"]["frequency"]))
  out["placement_devices"] = summary["placement"]["devices"]
  say(f"  seed {config.seed}: deactivating {specific} changes loss A by "
      f"{out['deact_specific_dA']:+.4f}, B by {out['deact_specific_dB']:+.4f}")
  return out


def _text(result, seeds) -> str:
  runs = [result.get("deepseekmoe", s).metrics for s in seeds]
  col = lambda key: [r[key] for r in runs]
  lines = [f"DeepSeekMoE ({_SIZE.value}) trained {_STEPS.value} steps on A = "
           f"{_DATA.value or 'generated'}; B = {_OTHER.value}; seeds {seeds}; mean ± std over "
           "seeds.", "", "**Deactivating experts** (validation loss change):", "",
           "| switched off | loss A change | loss B change |", "|---|---|---|"]
  for name in ("specific", "random"):
    label = f"{_DEACTIVATE.value} most A-specific" if name == "specific" else (
        f"{_DEACTIVATE.value} random")
    lines.append(f"| {label} | {mean_std(col(f'deact_{name}_dA'))} | "
                 f"{mean_std(col(f'deact_{name}_dB'))} |")
  cmp = stats.compare("change on A", "change on B", col("deact_specific_dA"),
                      col("deact_specific_dB"), metric="loss change", higher_is_better=True)
  vs_random = stats.compare("A-specific", "random", col("deact_specific_dA"),
                            col("deact_random_dA"), metric="loss change", higher_is_better=True)
  lines += ["", f"A-specific experts off, change on A minus change on B: {cmp.sentence}",
            f"Change on A, A-specific minus random experts off: {vs_random.sentence}", "",
            f"Validation loss on A without steering: {mean_std(col('loss_a'))}; below, the "
            "change from it (paired by seed).", "",
            "**Dynamic skipping** (loss change on A vs routed-expert FLOPs saved):", "",
            "| target rate | FLOPs saved | loss A change |", "|---|---|---|"]
  delta = lambda key: np.asarray(col(key)) - np.asarray(col("loss_a"))
  for rate in _SKIP.value:
    lines.append(f"| {rate} | {mean_std(col(f'skip_{rate}_saved'))} | "
                 f"{mean_std(delta(f'skip_{rate}_loss'))} |")
  lines += ["", "**Capacity-aware inference** (loss change on A):", "",
            "| capacity factor | drop | reroute | reroute minus drop |", "|---|---|---|---|"]
  for factor in _CAPACITY.value:
    drop, reroute = col(f"cap_drop_{factor}_loss"), col(f"cap_reroute_{factor}_loss")
    lines.append(f"| {factor} | {mean_std(delta(f'cap_drop_{factor}_loss'))} | "
                 f"{mean_std(delta(f'cap_reroute_{factor}_loss'))} | "
                 f"{stats.compare('reroute', 'drop', reroute, drop).sentence} |")
  devices = runs[0]["placement_devices"]
  lines += ["", f"**Placement** on {devices} devices (held-out share of token moves between "
            "consecutive layers that cross devices):", "",
            "| round-robin | greedy | greedy + exact per-layer refinement | MILP |",
            "|---|---|---|---|",
            f"| {mean_std(col('traffic_round_robin'))} | {mean_std(col('traffic_greedy'))} | "
            f"{mean_std(col('traffic_greedy+refine'))} | {mean_std(col('traffic_milp'))} |",
            "", f"MILP proven optimal in {sum(col('milp_optimal'))} of {len(runs)} seeds."]
  cmp = stats.compare("MILP", "round-robin", col("traffic_milp"), col("traffic_round_robin"),
                      metric="traffic")
  lines += ["", f"MILP minus round-robin: {cmp.sentence}", "",
            f"Inter-layer mutual information {mean_std(col('mutual_information_bits'))} bits; "
            f"next-layer prediction: affinity {mean_std(col('prediction_affinity'))} vs "
            f"most-used {mean_std(col('prediction_frequency'))}.", "",
            "**Offloading cache** (held-out hit rate):", "",
            "| experts cached | " + " | ".join(("lru", "lfu", "prefetch")) + " |",
            "|---|---|---|---|"]
  for i, size in enumerate(runs[0]["cache_sizes"]):
    lines.append(f"| {size} | " + " | ".join(
        mean_std([r[f"hit_{p}"][i] for r in runs]) for p in ("lru", "lfu", "prefetch")) + " |")
  return "\n".join(lines)


def _plot(result, seeds, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  runs = [result.get("deepseekmoe", s).metrics for s in seeds]
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))   # error bars: 1 std over seeds
  saved = np.array([[0.0] + [r[f"skip_{x}_saved"] for x in _SKIP.value] for r in runs])
  loss = np.array([[0.0] + [r[f"skip_{x}_loss"] - r["loss_a"] for x in _SKIP.value]
                   for r in runs])
  axes[0].errorbar(saved.mean(0), loss.mean(0), yerr=loss.std(0, ddof=1) if len(runs) > 1 else
                   None, marker="o")
  axes[0].set(xlabel="routed-expert FLOPs saved", ylabel="validation loss change (A)",
              title="dynamic skipping")
  factors = [float(f) for f in _CAPACITY.value]
  for overflow in ("drop", "reroute"):
    v = np.array([[r[f"cap_{overflow}_{f}_loss"] - r["loss_a"] for f in _CAPACITY.value]
                  for r in runs])
    axes[1].errorbar(factors, v.mean(0), yerr=v.std(0, ddof=1) if len(runs) > 1 else None,
                     marker="o", label=overflow)
  axes[1].axhline(0.0, color="grey", ls=":", label="no capacity")
  axes[1].set(xlabel="inference capacity factor", ylabel="validation loss change (A)",
              title="capacity-aware inference")
  axes[1].legend(fontsize=8)
  sizes = runs[0]["cache_sizes"]
  for policy in ("lru", "lfu", "prefetch"):
    v = np.array([r[f"hit_{policy}"] for r in runs])
    axes[2].errorbar(sizes, v.mean(0), yerr=v.std(0, ddof=1) if len(runs) > 1 else None,
                     marker="o", label=policy)
  axes[2].set(xlabel="experts cached per layer", ylabel="held-out hit rate",
              title="offloading cache", ylim=(0, 1))
  axes[2].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def main(argv):
  del argv
  logs.setup_console_logging()
  config = setups.experiment_config("deepseekmoe", size=_SIZE.value, steps=_STEPS.value,
                                    data_path=_DATA.value, quick=_QUICK.value,
                                    overrides={"analyze.milp_time_limit": _MILP.value})
  seeds = [int(s) for s in _SEEDS.value]
  study = Study({"deepseekmoe": config}, seeds, _WORK.value, collect=collect_steering)
  result = study.run(estimate=False)
  text = _text(result, seeds)
  report.write_results(_OUT.value, text, result.to_json())
  _plot(result, seeds, os.path.join(_OUT.value, "steer.png"))
  say(f"wrote {_OUT.value}/results.md, results.json, steer.png")


if __name__ == "__main__":
  app.run(main)

"""Dense vs Switch vs GShard vs DeepSeekMoE at equal active parameters, several seeds.

  python experiments/compare_routing.py --data_path=../shared/data/tinyshakespeare.txt

Every config has the same attention, depth and width; every MoE has 8x the dense FFN in total
and the dense FFN's size active per token. Each (config, seed) run trains on the seed's batches
(equal for every config of that seed), so configs are compared by paired per-seed differences
(moejax/experiment/stats.py). ``--sizes`` repeats the study at other model sizes (the sweep of
how gaps and seed spread change with scale); the validation curves give the same for training
steps. Interrupted? Run the same command again: finished runs are kept, the rest resume.

Writes under --out_dir: results.json (every run, curves included), results.md (tables),
loss_curves_<size>.png (mean ± std bands), finals.png, gaps_vs_steps.png.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from moejax import logs  # noqa: E402
from moejax.experiment import Study, stats  # noqa: E402
from moejax.experiment import plots, setups  # noqa: E402
from moejax.experiment import report as report_lib  # noqa: E402
from moejax.logs import progress as say  # noqa: E402

_DATA = flags.DEFINE_string("data_path", "../shared/data/tinyshakespeare.txt",
                            "Text corpus ('' = the embedded generated corpus).")
_STEPS = flags.DEFINE_integer("steps", 800, "Training steps per run.")
_CONFIGS = flags.DEFINE_list("configs", ["dense", "switch", "gshard", "deepseekmoe"],
                             "Named configs (configs/*.py); the first is the baseline.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: init, router noise, data order.")
_SIZES = flags.DEFINE_list("sizes", ["small"],
                           "Model sizes (moejax/experiment/setups.py), e.g. small,base.")
_OUT = flags.DEFINE_string("out_dir", "experiments/results/compare_routing", "Output directory.")
_WORK = flags.DEFINE_string("work_root", "workdir/compare_routing",
                            "Run directories (kept: re-running resumes).")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny model and batches (smoke test of the script).")
_ESTIMATE = flags.DEFINE_bool("estimate", True, "Time a short probe of every config first.")
_ESTIMATE_ONLY = flags.DEFINE_bool("estimate_only", False, "Print the time estimate and stop.")

def make_config(name: str, size: str):
  return setups.experiment_config(name, size=size, steps=_STEPS.value, data_path=_DATA.value,
                                  quick=_QUICK.value)


def gap_curves(result, config: str, baseline: str):
  """(steps, mean, std) across seeds of the paired val-loss gap config - baseline."""
  diffs = []
  for seed in result.seeds:
    a, b = result.get(config, seed), result.get(baseline, seed)
    if a is not None and b is not None:
      bv = dict(b.curves["val_loss"])
      diffs.append([(s, v - bv[s]) for s, v in a.curves["val_loss"] if s in bv])
  return stats.band(diffs) if diffs else None


def tables(results: dict) -> str:
  lines = []
  for size, result in results.items():
    r0 = result.runs[0]
    lines += [f"### size {size}: d_model {r0.flat_config['model.d_model']}, "
              f"{r0.metrics['tokens'] / 1e6:.2f}M tokens per run, seeds {result.seeds}", "",
              result.table(["val_loss", "train_ce", "total_params", "active_params",
                            "tokens_per_sec", "drop_fraction"]
                           if any("drop_fraction" in r.metrics for r in result.runs)
                           else ["val_loss", "train_ce", "tokens_per_sec"]), "",
              "Paired differences of validation loss (negative: a lower):", "",
              result.comparison_table("val_loss"), ""]
  return "\n".join(lines)


def write_plots(results: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  base = _CONFIGS.value[0]
  for size, result in results.items():
    fig = plots.plot_curves(result, ("train_ce", "val_loss"),
                            title=f"{size}: mean ± 1 std over seeds {result.seeds}")
    plots.save(fig, os.path.join(_OUT.value, f"loss_curves_{size}.png"))
  fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
  for ax, (size, result) in zip(axes[0], results.items()):
    plots.plot_finals(result, "val_loss", title=f"{size}: final validation loss", ax=ax)
  fig.tight_layout()
  plots.save(fig, os.path.join(_OUT.value, "finals.png"))
  fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
  for ax, (size, result) in zip(axes[0], results.items()):
    for c in result.configs[1:]:
      g = gap_curves(result, c, base)
      if g is None:
        continue
      steps, mean, std = g
      line, = ax.plot(steps, mean, marker="o", ms=3, label=f"{c} - {base}")
      ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="step", ylabel="paired val-loss gap (nats/byte)",
           title=f"{size}: gap to {base}, mean ± 1 std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  plots.save(fig, os.path.join(_OUT.value, "gaps_vs_steps.png"))


def main(argv):
  del argv
  logs.setup_console_logging()
  for size in _SIZES.value:
    if size not in setups.SIZES:
      raise app.UsageError(
          f"--sizes: unknown size {size!r}; allowed: {', '.join(setups.SIZES)}")
  studies = {size: Study({n: make_config(n, size) for n in _CONFIGS.value},
                         [int(s) for s in _SEEDS.value], os.path.join(_WORK.value, size))
             for size in _SIZES.value}
  if _ESTIMATE_ONLY.value:
    for size, study in studies.items():
      est = study.estimate()
      say(f"{size}: " + ", ".join(f"{c} {est.per_run[c] / 60:.1f} min/run x {n}"
                                  for c, n in est.pending.items())
          + f"; total {est.total / 60:.1f} min")
    return
  results = {size: study.run(estimate=_ESTIMATE.value) for size, study in studies.items()}
  report_lib.write_results(_OUT.value, tables(results),
                           {size: r.to_json() for size, r in results.items()})
  write_plots(results)
  say(f"wrote {_OUT.value}/results.md, results.json and plots")


if __name__ == "__main__":
  app.run(main)

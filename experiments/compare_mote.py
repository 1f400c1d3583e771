"""Ternary experts (MoTE, arXiv 2506.14435) vs full-precision MoEs up-cycled from the same
trained dense model, several seeds.

  python experiments/compare_mote.py --data_path=../shared/data/tinyshakespeare.txt

Stage 1 trains the dense model (configs/dense.py at --size) once per seed. Stage 2 up-cycles
each seed's dense run (``upcycle.source``, method copy) into:
  mote              configs/mote.py: the dense FFN as a frozen full-precision shared expert +
                    8 ternary routed experts (copies of it, quantised, trained straight-through,
                    8-bit activations), top-1 routed;
  fp_equal_count    the same with full-precision routed experts (8, top-1);
  fp_equal_memory   full-precision routed experts holding MoTE's routed-expert memory: 8 ternary
                    experts at 2 bits = 1 expert at 16 bits (bf16), so 1 routed expert.
Every stage-2 run trains --steps more steps on the same batches. Measured: validation loss and
the model memory per component (shared experts at float32, routed experts in their stored form:
MoTE's packed 2-bit codes + scales, ``python -m moejax.convert --to=packed``, vs float32).
The paper: at 3B, MoTE matches a full-precision MoE with far less expert memory and beats it by
4.3% average accuracy at an equal expert-memory budget; worse at 0.5B. Writes results.md/json,
curves.png and memory.png under --out_dir; re-running resumes.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402

from moejax import logs  # noqa: E402
from moejax.analysis.params import memory_by_component  # noqa: E402
from moejax.experiment import Study, cli, report, setups  # noqa: E402
from moejax.experiment.runner import StudyResult  # noqa: E402
from moejax.layers.ternary import pack_bank  # noqa: E402

FLAGS = cli.study_flags("compare_mote", steps_help="Training steps of the dense run and of "
                        "each up-cycled run.", configs_help="Subset of the up-cycled configs "
                        "(default: all).", step_times=False)

P = "model.moe."
UPCYCLED = {
    "mote": {},
    "fp_equal_count": {P + "expert_bank": "swiglu"},
    "fp_equal_memory": {P + "expert_bank": "swiglu", P + "num_experts": 2},
}
METRICS = ["val_loss", "routed_mib", "shared_mib", "tokens_per_sec"]


def memory(trainer) -> dict:
  """MiB of the routed and shared experts as stored: MoTE's routed experts packed."""
  params = jax.device_get(trainer.params)
  if trainer.model.cfg.moe.expert_bank == "ternary_swiglu":
    params = {k: ({**v, "moe": {**v["moe"], "experts": pack_bank(v["moe"]["experts"]["wi"],
                                                                 v["moe"]["experts"]["wo"])}}
                  if isinstance(v, dict) and "moe" in v else v) for k, v in params.items()}
  mem = memory_by_component(params)
  return {"routed_mib": mem.get("routed experts", 0) / 2**20,
          "shared_mib": mem.get("shared experts", 0) / 2**20}


def _config(name: str, overrides: dict):
  return setups.experiment_config(name, **cli.setup_args(FLAGS), overrides=overrides)


def plot_memory(result, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = [n for n in result.configs if n != "dense"]
  mean = lambda n, m: float(np.mean([r.metrics[m] for r in result.runs if r.config == n]))
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  x = np.arange(len(names))
  a.bar(x, [mean(n, "shared_mib") for n in names], label="shared experts (float32)")
  a.bar(x, [mean(n, "routed_mib") for n in names], bottom=[mean(n, "shared_mib") for n in names],
        label="routed experts (as stored)")
  a.set_xticks(x, names)
  a.set(ylabel="MiB", title="expert memory")
  a.legend()
  for n in result.configs:
    losses = [r.metrics["val_loss"] for r in result.runs if r.config == n]
    b.errorbar([n], [np.mean(losses)], yerr=[np.std(losses)], fmt="o", capsize=4)
  b.set(ylabel="validation loss", title="mean ± 1 std over seeds")
  b.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  logs.setup_console_logging()
  seeds = cli.seeds(FLAGS)
  names = cli.chosen_configs(FLAGS, UPCYCLED)
  if "mote" not in names:
    raise app.UsageError(f"--configs: include 'mote' (got {names})")
  dense = Study({"dense": _config("dense", {})}, seeds, FLAGS.work.value)
  runs = dense.run(estimate=FLAGS.estimate.value).runs
  for seed in seeds:
    source = dense.workdir("dense", seed)
    configs = {n: _config("mote", {**o, "upcycle.source": source, "upcycle.method": "copy"})
               for n, o in UPCYCLED.items() if n in names}
    study = Study(configs, [seed], FLAGS.work.value, collect=memory)
    runs += study.run(estimate=FLAGS.estimate.value and seed == seeds[0]).runs
  result = StudyResult(["dense"] + names, seeds, runs)
  text = "\n".join([
      f"configs/mote.py up-cycled from configs/dense.py, size {FLAGS.size.value}, {FLAGS.steps.value} "
      f"dense + {FLAGS.steps.value} up-cycled steps, seeds {seeds} (dense: the starting point)", "",
      result.table(METRICS), "", "Paired differences of val_loss:", "",
      result.comparison_table("val_loss", [("mote", n) for n in names if n != "mote"])])
  report.write_study(result, FLAGS.out.value, text, title="MoTE vs full precision: mean ± 1 std",
                     curves=("val_loss",))
  plot_memory(result, os.path.join(FLAGS.out.value, "memory.png"))


if __name__ == "__main__":
  app.run(main)

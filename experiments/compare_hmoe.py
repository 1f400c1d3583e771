"""Heterogeneous experts (HMoE, arXiv 2408.10681) vs a homogeneous MoE at equal total parameters,
with top-k and top-p routing, several seeds.

  python experiments/compare_hmoe.py --data_path=../shared/data/tinyshakespeare.txt

Every run is configs/hmoe.py at model size --size: 8 routed experts whose hidden sizes sum to
8 x F, dropless. CONFIGS below: the homogeneous MoE (8 x F, Switch balance loss 0.01) and HMoE
(the paper's arithmetic ladder {9, ..., 23} scaled to 8 x F, parameter penalty 0.1 in place of
the balance loss), each with top-2 and with top-p (p = 0.6, at most 4 experts, renormalised,
router-entropy loss 0.03: the paper's coefficients). The paper's claim: HMoE with top-p reaches
a lower loss with fewer activated parameters than the homogeneous MoE with top-k.
Measured per run: validation loss, routed expert parameters per token (mean over tokens and
layers, last quarter of training), experts per token, tokens/s, and for HMoE the share of routed
slots each expert size receives. Writes results.md/json, curves.png and sizes.png under
--out_dir; re-running resumes.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app  # noqa: E402

from moejax import logs  # noqa: E402
from moejax.experiment import Study, cli, report, setups  # noqa: E402
from moejax.train import metrics as metrics_lib  # noqa: E402

FLAGS = cli.study_flags("compare_hmoe", step_times=False)

P = "model.moe."
HOMOGENEOUS = {P + "expert_size_ladder": "none", P + "parameter_penalty_weight": 0.0,
               P + "load_balance_weight": 0.01}
TOP_P = {P + "router": "top_p", P + "top_p": 0.6, P + "top_k": 4, P + "renormalize": True,
         P + "entropy_loss_weight": 0.03}
CONFIGS = {"moe_topk": HOMOGENEOUS, "moe_topp": {**HOMOGENEOUS, **TOP_P},
           "hmoe_topk": {}, "hmoe_topp": TOP_P}
METRICS = ["val_loss", "routed_params", "experts_per_token", "tokens_per_sec"]


def routed_usage(trainer) -> dict:
  """Routed parameters per token and (HMoE) the share of slots per expert size, from the run's
  logged metrics: mean over MoE layers and the last quarter of the training records."""
  rows = [r for r in metrics_lib.read_metrics(trainer.workdir) if r.get("split") == "train"]
  rows = rows[-max(len(rows) // 4, 1):]
  s, d = trainer.model.cfg.moe, trainer.model.cfg.d_model
  per_layer = []
  for r in rows:
    if any(k.endswith("/routed_params") for k in r):
      per_layer += [v for k, v in r.items() if k.endswith("/routed_params")]
    else:   # homogeneous: experts per token x one expert's 3 D F
      per_layer += [v * 3 * d * s.fine_hidden for k, v in r.items()
                    if k.endswith("/experts_per_token")]
  out = {"routed_params": float(np.mean(per_layer))}
  loads = [np.asarray(v) for r in rows for k, v in r.items() if k.endswith("/size_load")]
  if loads:
    out["size_load"] = np.mean(loads, axis=0).tolist()
    out["sizes"] = sorted(set(s.routed_sizes))
  return out


def plot_sizes(result, path: str) -> None:
  """Validation loss against routed parameters per token (every run), and for each HMoE config
  the share of routed slots per expert size (mean over seeds)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  for name in result.configs:
    runs = [r for r in result.runs if r.config == name]
    a.scatter([r.metrics["routed_params"] for r in runs], [r.metrics["val_loss"] for r in runs],
              label=name)
  a.set(xlabel="routed expert parameters / token", ylabel="validation loss",
        title="loss vs activated parameters (one point per seed)")
  a.grid(alpha=0.3)
  a.legend()
  hm = [n for n in result.configs if any("size_load" in r.metrics for r in result.runs
                                         if r.config == n)]
  width = 0.8 / max(len(hm), 1)
  for i, name in enumerate(hm):
    runs = [r for r in result.runs if r.config == name]
    share = np.mean([r.metrics["size_load"] for r in runs], axis=0)
    share = share / share.sum()          # of the computed slots (older runs logged all slots)
    sizes = runs[0].metrics["sizes"]
    b.bar(np.arange(len(sizes)) + i * width, share, width, label=name)
    b.set_xticks(np.arange(len(sizes)) + width * (len(hm) - 1) / 2, [str(h) for h in sizes])
  b.set(xlabel="expert hidden size", ylabel="share of computed routed slots",
        title="which expert sizes tokens choose")
  b.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  logs.setup_console_logging()
  names = cli.chosen_configs(FLAGS, CONFIGS)
  if "hmoe_topk" not in names and "hmoe_topp" not in names:
    raise app.UsageError(f"--configs: no HMoE config in {names}")
  configs = {n: setups.experiment_config("hmoe", **cli.setup_args(FLAGS), overrides=CONFIGS[n])
             for n in names}
  study = Study(configs, cli.seeds(FLAGS), FLAGS.work.value, collect=routed_usage)
  result = study.run(estimate=FLAGS.estimate.value)
  pairs = [(n, names[0]) for n in names[1:]]
  if {"hmoe_topp", "moe_topp"} <= set(names[1:]):
    pairs.append(("hmoe_topp", "moe_topp"))
  sizes = configs["hmoe_topk" if "hmoe_topk" in names else "hmoe_topp"].model.moe
  from moejax.layers.moe import MoESpec
  ladder = MoESpec.from_config(sizes).routed_sizes
  text = "\n".join([
      f"configs/hmoe.py, size {FLAGS.size.value}, {FLAGS.steps.value} steps, seeds {result.seeds}; HMoE "
      f"sizes {list(ladder)}, homogeneous 8 x {sum(ladder) // 8}", "",
      result.table(METRICS), "", "Paired differences (routed_params: last quarter of training; "
      "experts_per_token: mean over training):", "",
      result.comparison_table("val_loss", pairs), "",
      result.comparison_table("routed_params", pairs)])
  report.write_study(result, FLAGS.out.value, text, title="HMoE vs MoE: mean ± 1 std over seeds")
  plot_sizes(result, os.path.join(FLAGS.out.value, "sizes.png"))


if __name__ == "__main__":
  app.run(main)

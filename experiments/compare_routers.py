"""The router zoo on one benchmark: every router at equal expert layout, several seeds.

  python experiments/compare_routers.py --data_path=../shared/data/tinyshakespeare.txt

Every run is the GShard layout of configs/gshard.py (16 experts of hidden 256, 2 active per
token on average, so the active FFN equals the dense model's), dropless, at model size
``--size``; only the router and its own settings change (ROUTERS below, each with the settings
of its paper where the paper gives them). Variable-k routers (top-p, null experts, expert
choice, Expert Race) report their mean experts per token: equal *average* active parameters is
the design, the realised value is in the table. Expert choice and Expert Race train with
non-causal batch routing and are evaluated with their causal threshold form. Paired seeds,
resumable (moejax/experiment). Writes results.md/json and curves.png under --out_dir.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from moejax import logs  # noqa: E402
from moejax.experiment import Study, report, setups  # noqa: E402

_DATA = flags.DEFINE_string("data_path", "../shared/data/tinyshakespeare.txt",
                            "Text corpus ('' = the embedded generated corpus).")
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps per run (400: 10 routers x 3 "
                              "seeds in about 40 minutes of 2 CPU cores).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: init, router noise, data order.")
_SIZE = flags.DEFINE_string("size", "tiny", "Model size (moejax/experiment/setups.py).")
_ROUTERS = flags.DEFINE_list("routers", None, "Subset of ROUTERS (default: all).")
_OUT = flags.DEFINE_string("out_dir", "experiments/results/compare_routers", "Output directory.")
_WORK = flags.DEFINE_string("work_root", "workdir/compare_routers", "Run directories (resumable).")
_ESTIMATE = flags.DEFINE_bool("estimate", True, "Time a short probe of every config first.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny model and batches (smoke test of the script).")

P = "model.moe."
ROUTERS = {
    # GShard / Mixtral top-2 softmax, renormalised, Switch balance loss 0.01
    "topk_softmax": {},
    # DeepSeek-V3: sigmoid, bias-only balancing (gamma 1e-3), sequence loss 1e-4, 4 groups keep 2
    "sigmoid_v3": {P + "router": "sigmoid", P + "bias_update_rate": 1e-3,
                   P + "sequence_balance_weight": 1e-4, P + "load_balance_weight": 0.0,
                   P + "num_expert_groups": 4, P + "groups_per_token": 2},
    # Mixture of Grouped Experts: 2 groups, exactly one expert from each
    "moge": {P + "router": "sigmoid", P + "num_expert_groups": 2, P + "group_routing": "balanced"},
    # Top-p (p = 0.4, at most 4 experts), entropy loss 1e-4
    "top_p": {P + "router": "top_p", P + "top_p": 0.4, P + "top_k": 4,
              P + "entropy_loss_weight": 1e-4, P + "renormalize": False},
    # AdaMoE: k raised to 3 with 8 null experts
    "null_experts": {P + "null_experts": 8, P + "top_k": 3},
    # Expert choice: capacity T k / E per expert (capacity factor 1: k = 2 experts per token)
    "expert_choice": {P + "router": "expert_choice", P + "load_balance_weight": 0.0,
                      P + "capacity_factor": 1.0},
    "expert_race": {P + "router": "expert_race", P + "similarity_loss_weight": 1e-2,
                    P + "load_balance_weight": 0.0},
    "hash": {P + "router": "hash", P + "load_balance_weight": 0.0},
    # THOR: random experts, consistency loss alpha = 1 (two forward passes per step)
    "stochastic": {P + "router": "stochastic", P + "consistency_loss_weight": 1.0,
                   P + "load_balance_weight": 0.0},
    # RMoE: one GRU (width d_model) threads router state through the layers; top-2 softmax
    "recurrent": {P + "router": "recurrent"},
}
METRICS = ["val_loss", "tokens_per_sec", "experts_per_token", "drop_fraction",
           "load_max_over_mean", "router_entropy"]


def main(argv):
  del argv
  logs.setup_console_logging()
  names = _ROUTERS.value or list(ROUTERS)
  unknown = [n for n in names if n not in ROUTERS]
  if unknown:
    raise app.UsageError(f"--routers: unknown {unknown}; allowed: {', '.join(ROUTERS)}")
  configs = {n: setups.experiment_config(
      "gshard", size=_SIZE.value, steps=_STEPS.value, data_path=_DATA.value, quick=_QUICK.value,
      overrides={P + "dispatch": "dropless", **ROUTERS[n]}) for n in names}
  study = Study(configs, [int(s) for s in _SEEDS.value], _WORK.value)
  result = study.run(estimate=_ESTIMATE.value)
  pairs = [(n, names[0]) for n in names[1:]]
  text = "\n".join([
      f"gshard layout, size {_SIZE.value}, {_STEPS.value} steps, seeds {result.seeds}", "",
      result.table(METRICS), "", f"Paired differences of val_loss against {names[0]}:", "",
      result.comparison_table("val_loss", pairs)])
  report.write_study(result, _OUT.value, text, title="routers: mean ± 1 std over seeds")

if __name__ == "__main__":
  app.run(main)

"""Micro-batch vs global-batch load balancing (Qiu et al. 2025, "Demons in the Detail",
arXiv 2501.11873), several seeds.

  python experiments/compare_balance.py --data_path=../shared/data/tinyshakespeare.txt

The same DeepSeekMoE model, balance loss L = E sum_i f_i P_i with weight --weight, computed
  micro_batch:  per micro-batch of one sequence (balance_micro_batches = batch size: what a
                data-parallel rank with one sequence per micro-batch computes), so every
                sequence is pushed towards uniform expert use;
  global_batch: with the expert frequencies f_i of the whole batch (only the counts are
                all-reduced), so a sequence may concentrate on the experts its text needs.
The paper reports lower perplexity and more domain-specialised experts with the global batch.
Measured per run: validation loss, the batch's expert load (max/mean over experts, averaged
over layers and training) and the within-sequence load max/mean on validation sequences (how
much a single sequence concentrates on few experts). Re-running resumes.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import moejax  # noqa: E402
from moejax import logs  # noqa: E402
from moejax.experiment import Study, report, setups  # noqa: E402

_DATA = flags.DEFINE_string("data_path", "../shared/data/tinyshakespeare.txt",
                            "Text corpus ('' = the embedded generated corpus).")
_STEPS = flags.DEFINE_integer("steps", 800, "Training steps per run.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: init, router noise, data order.")
_SIZE = flags.DEFINE_string("size", "small", "Model size (moejax/experiment/setups.py).")
_WEIGHT = flags.DEFINE_float("weight", 0.01, "Balance loss weight (model.moe.load_balance_weight).")
_OUT = flags.DEFINE_string("out_dir", "experiments/results/compare_balance", "Output directory.")
_WORK = flags.DEFINE_string("work_root", "workdir/compare_balance", "Run directories (resumable).")
_ESTIMATE = flags.DEFINE_bool("estimate", True, "Time a short probe of every config first.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny model and batches (smoke test of the script).")

SEQUENCES = 16   # validation sequences for the within-sequence load


def sequence_imbalance(trainer) -> dict:
  """Mean over validation sequences and MoE layers of max/mean expert load within a sequence."""
  batch = trainer.data.val_batch(0)[:, :-1]
  ratios = []
  for row in batch[:SEQUENCES]:
    out = moejax.forward(trainer.model, trainer.params, row[None])
    for layer in out.routing.values():
      load = np.asarray(layer["expert_load"])
      ratios.append(load.max() / load.mean())
  return {"seq_load_max_over_mean": float(np.mean(ratios))}


def main(argv):
  del argv
  logs.setup_console_logging()
  bsz = (setups.QUICK if _QUICK.value else {}).get("data.batch_size", 16)
  scopes = {"micro_batch": {"model.moe.load_balance_scope": "micro_batch",
                            "model.moe.balance_micro_batches": bsz},
            "global_batch": {"model.moe.load_balance_scope": "global_batch",
                             "model.moe.balance_micro_batches": bsz}}
  configs = {name: setups.experiment_config(
      "deepseekmoe", size=_SIZE.value, steps=_STEPS.value, data_path=_DATA.value,
      quick=_QUICK.value, overrides={**o, "model.moe.load_balance_weight": _WEIGHT.value})
      for name, o in scopes.items()}
  study = Study(configs, [int(s) for s in _SEEDS.value], _WORK.value, collect=sequence_imbalance)
  result = study.run(estimate=_ESTIMATE.value)
  metrics = ["val_loss", "load_max_over_mean", "seq_load_max_over_mean", "router_entropy"]
  text = "\n".join([
      f"deepseekmoe, size {_SIZE.value}, balance weight {_WEIGHT.value}, {_STEPS.value} steps, "
      f"seeds {result.seeds}", "", result.table(metrics), "",
      *[f"Paired differences of {m}:\n\n{result.comparison_table(m)}\n" for m in metrics]])
  report.write_study(result, _OUT.value, text,
                     title="micro-batch vs global-batch balance: mean ± 1 std over seeds")

if __name__ == "__main__":
  app.run(main)

"""Soft merging of experts (Lory's causal form of SMEAR) against top-1 routing and dense models
of equal parameters and of equal compute, several seeds.

  python experiments/compare_merging.py --data_path=../shared/data/tinyshakespeare.txt

Every run is configs/switch.py's shape (8 experts of hidden F in every FFN layer) at model size
--size, or a dense model. CONFIGS:
  dense_compute  dense SwiGLU of hidden F: the per-token FFN compute of top-1 and of Lory
  dense_params   dense SwiGLU of hidden 8 F: the parameters of the 8 experts (8x the compute)
  top1           top-1 routing (Switch: raw router probability as the gate, balance loss
                 0.01), dropless so no token is lost
  lory           model.moe.merge=causal_segments: segment s of --segment tokens runs one expert
                 merged from the 8 with the router's probabilities on the mean of segment s-1
                 (segment 0: the uniform average)
SMEAR's per-sequence merge (merge=sequence) routes on the whole sequence, so in a language
model every token would see the future through its merged expert: its validation loss would not
be a language-modelling loss, and it is left out here (tested as a layer in
tests/layers/test_merging.py). The question: does merging beat top-1 routing at equal compute
per token, and how much of dense-at-equal-parameters does either recover? Measured per run:
validation loss, tokens/s, and a step time measured after the runs with every config
timed in turn in one process. Writes results.md/json and curves.png under --out_dir;
re-running resumes.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from moejax import logs  # noqa: E402
from moejax.experiment import Study, cli, report, setups  # noqa: E402

FLAGS = cli.study_flags("compare_merging")
_SEGMENT = flags.DEFINE_integer("segment", 32, "Lory's segment length (divides data.seq_len).")

P = "model.moe."
CONFIGS = {
    "top1": {P + "dispatch": "dropless"},
    "lory": {P + "merge": "causal_segments", P + "load_balance_weight": 0.0},
    "dense_compute": {P + "num_experts": 0},
    "dense_params": {P + "num_experts": 0},
}
METRICS = ["val_loss", "tokens_per_sec", "total_params", "active_params"]


def main(argv):
  del argv
  logs.setup_console_logging()
  names = cli.chosen_configs(FLAGS, CONFIGS)
  f = setups.experiment_config("switch", **cli.setup_args(FLAGS)).model.moe.expert_hidden
  widths = {"dense_compute": f, "dense_params": 8 * f}
  segment = min(_SEGMENT.value, setups.QUICK["data.seq_len"] // 4) if FLAGS.quick.value else \
      _SEGMENT.value
  configs = {n: setups.experiment_config(
      "switch", **cli.setup_args(FLAGS),
      overrides={**CONFIGS[n], P + "merge_segment": segment,
                 **({"model.ffn_hidden": widths[n]} if n in widths else {})}) for n in names}
  study = Study(configs, cli.seeds(FLAGS), FLAGS.work.value)
  result = study.run(estimate=FLAGS.estimate.value)
  pairs = [(n, names[0]) for n in names[1:]]
  if {"lory", "dense_compute"} <= set(names[1:]):
    pairs.append(("lory", "dense_compute"))
  text = "\n".join([
      f"configs/switch.py shapes, size {FLAGS.size.value}: 8 experts of F={f}, dense F and 8F; "
      f"Lory segment {segment} of {configs[names[0]].data.seq_len} tokens; "
      f"{FLAGS.steps.value} steps, seeds {result.seeds}", "", result.table(METRICS), "",
      "Paired differences:", "", result.comparison_table("val_loss", pairs)]
      + cli.step_time_section(FLAGS, study, names[0]))
  report.write_study(result, FLAGS.out.value, text,
                     title="Lory vs top-1 vs dense: mean ± 1 std over seeds",
                     curves=("train_ce", "val_loss"))


if __name__ == "__main__":
  app.run(main)

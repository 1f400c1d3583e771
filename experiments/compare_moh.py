"""Mixture-of-Head attention (MoH, arXiv 2410.11842) against standard attention at equal
parameters, with 50% and 75% of the heads active per token, several seeds.

  python experiments/compare_moh.py --data_path=../shared/data/tinyshakespeare.txt

Every run is configs/dense.py (dense SwiGLU FFNs, so attention is the only difference) at model
size --size with 8 heads of d_model / 8 (multi-head attention, as in the paper). CONFIGS:
  attention   standard attention, all 8 heads
  moh_75      MoH: 2 shared heads + the top 4 of 6 routed heads per token (6/8 active)
  moh_50      MoH: 2 shared heads + the top 2 of 6 (4/8 active)
MoH uses the released code's gating (the default), the head balance loss 0.01 and
``--head_compute`` (default "all": on CPU at this size every-head masking is the faster form,
see experiments/bench_moh.py). The routers add 8 x d_model parameters per layer: otherwise the
parameters are equal. The paper's claim: MoH with 50-75% of the heads matches or beats standard
attention. Measured per run: validation loss, attention FLOPs per token (forward, analytic:
the dense q/k/v projections plus, per active head, 4 L dh for scores and values and 2 dh D for
the output projection), tokens/s and active heads, and a step time measured
after the runs with every config timed in turn in one process. Writes results.md/json and curves.png
under --out_dir; re-running resumes.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from moejax import logs  # noqa: E402
from moejax.experiment import Study, cli, report, setups  # noqa: E402

FLAGS = cli.study_flags("compare_moh", size="small")
_COMPUTE = flags.DEFINE_enum("head_compute", "all", ["all", "selected"],
                             "model.moh.head_compute of the MoH runs.")

HEADS = 8
MOH = {"model.attention": "mixture_of_heads", "model.moh.shared_heads": 2}
CONFIGS = {"attention": {}, "moh_75": {**MOH, "model.moh.active_heads": 4},
           "moh_50": {**MOH, "model.moh.active_heads": 2}}
METRICS = ["val_loss", "attention_flops", "active_heads", "tokens_per_sec"]


def attention_flops(trainer) -> dict:
  """Forward attention FLOPs per token, summed over layers (see the module docstring)."""
  m, l = trainer.config.model, trainer.config.data.seq_len
  active = (m.moh.shared_heads + m.moh.active_heads if m.attention == "mixture_of_heads"
            else m.num_heads)
  per_layer = (2 * m.d_model * m.head_dim * (m.num_heads + 2 * m.num_kv_heads)
               + active * (4 * l * m.head_dim + 2 * m.head_dim * m.d_model))
  return {"attention_flops": float(per_layer * m.num_layers), "active_heads": float(active)}


def main(argv):
  del argv
  logs.setup_console_logging()
  names = cli.chosen_configs(FLAGS, CONFIGS)
  d_model = setups.experiment_config("dense", **cli.setup_args(FLAGS)).model.d_model
  heads = {"model.num_heads": HEADS, "model.num_kv_heads": HEADS,
           "model.head_dim": max(d_model // HEADS, 1)}
  configs = {}
  for n in names:
    extra = {"model.moh.head_compute": _COMPUTE.value} if n != "attention" else {}
    configs[n] = setups.experiment_config("dense", **cli.setup_args(FLAGS),
                                          overrides={**heads, **CONFIGS[n], **extra})
  study = Study(configs, cli.seeds(FLAGS), FLAGS.work.value, collect=attention_flops)
  result = study.run(estimate=FLAGS.estimate.value)
  pairs = [(n, names[0]) for n in names[1:]]
  m = configs[names[0]].model
  text = "\n".join([
      f"configs/dense.py, size {FLAGS.size.value} (d_model {m.d_model}, {HEADS} heads of "
      f"{m.head_dim}), {FLAGS.steps.value} steps, seeds {result.seeds}; MoH head_compute="
      f"{_COMPUTE.value}", "", result.table(METRICS), "", "Paired differences:", "",
      result.comparison_table("val_loss", pairs)] + cli.step_time_section(FLAGS, study, names[0]))
  report.write_study(result, FLAGS.out.value, text,
                     title="MoH vs standard attention: mean ± 1 std over seeds",
                     curves=("train_ce", "val_loss"))


if __name__ == "__main__":
  app.run(main)

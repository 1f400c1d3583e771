"""The command line every comparison script in experiments/ shares (absl flags), so that each
script states only its configs and what it reports.

  FLAGS = cli.study_flags("compare_moh", size="small")
  names = cli.chosen_configs(FLAGS, CONFIGS)
  config = setups.experiment_config("dense", **cli.setup_args(FLAGS), overrides=...)
"""
from __future__ import annotations

import types

from absl import app, flags


def study_flags(name: str, *, size: str = "tiny", steps: int = 400,
                steps_help: str = "Training steps per run.",
                configs_help: str = "Subset of CONFIGS (default: all; the first is the baseline "
                                    "of the comparisons).",
                step_times: bool = True) -> types.SimpleNamespace:
  """Defines --data_path --steps --seeds --size --out_dir --work_root --estimate --quick
  --configs (and --step_time_steps) with the defaults of experiment ``name``."""
  f = types.SimpleNamespace(
      data=flags.DEFINE_string("data_path", "../shared/data/tinyshakespeare.txt",
                               "Text corpus ('' = the embedded generated corpus)."),
      steps=flags.DEFINE_integer("steps", steps, steps_help),
      seeds=flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: init, router noise, data order."),
      size=flags.DEFINE_string("size", size, "Model size (moejax/experiment/setups.py)."),
      out=flags.DEFINE_string("out_dir", f"experiments/results/{name}", "Output directory."),
      work=flags.DEFINE_string("work_root", f"workdir/{name}", "Run directories (resumable)."),
      estimate=flags.DEFINE_bool("estimate", True, "Time a short probe of every config first."),
      quick=flags.DEFINE_bool("quick", False, "Tiny model and batches (smoke test of the "
                              "script)."),
      configs=flags.DEFINE_list("configs", None, configs_help),
      timed=None)
  if step_times:
    f.timed = flags.DEFINE_integer("step_time_steps", 10, "Steps per config per round of the "
                                   "interleaved step-time measurement after the runs (0: skip).")
  return f


def chosen_configs(f, configs) -> list[str]:
  """--configs (default: every key of ``configs``), unknown names refused."""
  names = f.configs.value or list(configs)
  unknown = [n for n in names if n not in configs]
  if unknown:
    raise app.UsageError(f"--configs: unknown {unknown}; allowed: {', '.join(configs)}")
  return names


def setup_args(f) -> dict:
  """Keyword arguments of ``setups.experiment_config`` from the flags."""
  return dict(size=f.size.value, steps=f.steps.value, data_path=f.data.value,
              quick=f.quick.value)


def seeds(f) -> list[int]:
  return [int(s) for s in f.seeds.value]


def step_time_section(f, study, baseline: str) -> list[str]:
  """Report lines: the interleaved step time of every config (``Study.step_times``)."""
  if f.timed is None or not f.timed.value:
    return []
  from moejax.experiment import report
  return ["", "Step time, measured after the runs in one process (seed 0, every config "
          f"{f.timed.value} steps per round, 3 rounds interleaved, median):", "",
          report.step_time_table(study.step_times(f.timed.value), baseline)]

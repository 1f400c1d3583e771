"""Compression methods compared: validation loss vs the share of expert parameters kept.

  python experiments/compare_compression.py --data_path=../shared/data/tinyshakespeare.txt \\
      --other_path=../shared/data/wikitext2_valid.txt

Trains the default model (DeepSeekMoE, base size) on --data_path (source A) once per seed, then
compresses each trained model with every method at every --keeps fraction (moejax/compress/):
the global methods calibrate on A's training split, ``domain`` on B's (--other_path; EASY-EP's
few in-domain examples), and every compressed model is measured on A's and B's validation
splits, before and after a short fine-tune on A (--finetune_steps). The paper directions tested,
each as a paired difference over seeds with its 95% interval:
  M-SMoE: merging beats frequency pruning at equal size (loss on A);
  EASY-EP: domain-calibrated pruning beats global (frequency) pruning on its domain (loss on B);
  HEAPr: neuron-level pruning beats expert-level (frequency) pruning at equal parameters (A).
Re-running resumes (trained models and their measurements are kept under --work_root).
"""
from __future__ import annotations

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import moejax  # noqa: E402
from moejax import logs  # noqa: E402
from moejax.compress import METHODS  # noqa: E402
from moejax.compress import pipeline  # noqa: E402
from moejax.compress.calibration import windows  # noqa: E402
from moejax.train.data import source_split  # noqa: E402
from moejax.experiment import Study, report, setups, stats  # noqa: E402
from moejax.experiment.stats import mean_std  # noqa: E402
from moejax.logs import progress as say  # noqa: E402

_DATA = flags.DEFINE_string("data_path", "../shared/data/tinyshakespeare.txt",
                            "Source A: training text ('' = the embedded generated corpus).")
_OTHER = flags.DEFINE_string("other_path", "../shared/data/wikitext2_valid.txt",
                             "Source B: the domain of --method=domain ('generated' = embedded).")
_STEPS = flags.DEFINE_integer("steps", 500, "Training steps per seed.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
_SIZE = flags.DEFINE_string("size", "base", "Model size (moejax/experiment/setups.py).")
_METHODS = flags.DEFINE_list("methods", list(METHODS), "Compression methods.")
_KEEPS = flags.DEFINE_list("keeps", ["0.75", "0.5", "0.25"], "Shares of expert parameters kept.")
_CAL_TOKENS = flags.DEFINE_integer("calibration_tokens", 4096, "Calibration tokens.")
_TOKENS = flags.DEFINE_integer("eval_tokens", 8192, "Validation tokens per source.")
_FINETUNE = flags.DEFINE_integer("finetune_steps", 40, "Fine-tuning steps after compression "
                                 "(on A; 0 = none).")
_FINETUNE_LR = flags.DEFINE_float("finetune_lr", 0.0, "Peak learning rate of the fine-tune "
                                  "(0 = the training run's own).")
_OUT = flags.DEFINE_string("out_dir", "experiments/results/compression", "Output directory.")
_WORK = flags.DEFINE_string("work_root", "workdir/compression", "Run directories (resumable).")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny model and batches (smoke test of the script).")


def _source(path: str) -> str:
  return path or "generated"


def _finetuned_losses(out: str, eval_windows: dict) -> dict:
  """Fine-tunes the compressed workdir ``out`` on A, then its losses per source."""
  config = moejax.config.apply_overrides(
      moejax.train.workdir.load_config(out),
      {"train.steps": _FINETUNE.value, "train.warmup_steps": max(_FINETUNE.value // 10, 1),
       **({"train.learning_rate": _FINETUNE_LR.value} if _FINETUNE_LR.value else {}),
       "train.eval_every": _FINETUNE.value, "train.checkpoint_every": _FINETUNE.value,
       "train.log_every": max(_FINETUNE.value // 4, 1)})
  trainer = moejax.Trainer(config, out)
  try:
    trainer.train(progress=None)
    return {s: pipeline.eval_loss(trainer.model, trainer.params, w)
            for s, w in eval_windows.items()}
  finally:
    trainer.close()


def collect_compression(trainer, done=()) -> dict:
  """Every (method, keep) of one trained model not in ``done`` (Study's ``collect``)."""
  trainer.save()
  config, src = trainer.config, trainer.workdir
  a, b = _source(_DATA.value), _source(_OTHER.value)
  seq = config.data.seq_len
  eval_windows = {s: windows(source_split(s, config, "val"), seq, _TOKENS.value, s)
                  for s in (a, b)}
  out = {f"base_loss_{k}": pipeline.eval_loss(trainer.model, trainer.params, w)
         for k, w in zip("ab", eval_windows.values())}
  for method in _METHODS.value:
    for keep in _KEEPS.value:
      if f"{method}_{keep}_loss_a" in done:
        continue
      dst = os.path.join(src, "compressed", f"{method}_{keep}")
      shutil.rmtree(dst, ignore_errors=True)
      rep = moejax.compress(src, dst, method, float(keep), b if method == "domain" else a,
                            calibration_tokens=_CAL_TOKENS.value, eval_sources=[a, b],
                            eval_tokens=_TOKENS.value)
      key = f"{method}_{keep}"
      out[f"{key}_loss_a"], out[f"{key}_loss_b"] = rep["after"]["loss"][a], rep["after"]["loss"][b]
      after, before = rep["after"]["sizes"], rep["before"]["sizes"]
      # routed-expert bytes kept (mixed precision: its ternary experts counted packed)
      out[f"{key}_kept"] = (after["routed_expert_bytes_packed"]
                            / before["routed_expert_bytes_packed"])
      out[f"{key}_seconds"] = rep["seconds"]
      if _FINETUNE.value:
        tuned = _finetuned_losses(dst, eval_windows)
        out[f"{key}_ft_loss_a"], out[f"{key}_ft_loss_b"] = tuned[a], tuned[b]
      shutil.rmtree(dst, ignore_errors=True)
      say(f"  seed {config.seed} {method} keep {keep}: loss A {out[f'{key}_loss_a']:.4f} "
          f"(base {out['base_loss_a']:.4f}), B {out[f'{key}_loss_b']:.4f}")
  return out


DIRECTIONS = (("M-SMoE: merge vs frequency pruning at equal size", "merge", "frequency", "a"),
              ("MC#: mixed precision vs frequency pruning at equal routed-expert bytes",
               "mixed_precision", "frequency", "a"),
              ("EASY-EP: domain-calibrated (B) vs global pruning, on B", "domain", "frequency",
               "b"),
              ("HEAPr: neuron-level vs expert-level pruning at equal parameters", "neuron",
               "frequency", "a"))


def _text(result, seeds) -> str:
  runs = [result.get("deepseekmoe", s).metrics for s in seeds]
  col = lambda key: [r[key] for r in runs]
  tuned = _FINETUNE.value > 0
  a, b = _source(_DATA.value), _source(_OTHER.value)
  lines = [f"DeepSeekMoE ({_SIZE.value}) trained {_STEPS.value} steps on A = {a}; B = {b}; "
           f"seeds {seeds}; validation loss, mean ± std over seeds. Uncompressed: A "
           f"{mean_std(col('base_loss_a'))}, B {mean_std(col('base_loss_b'))}. "
           f"Fine-tuned: {_FINETUNE.value} steps on A after compression (peak learning rate "
           f"{_FINETUNE_LR.value or 'of the training run'}). Kept: the share of routed-expert "
           "bytes (mixed precision: its ternary experts packed 2 bits per weight).", "",
           "| method | routed-expert bytes kept | loss A | loss B |"
           + (" loss A fine-tuned | loss B fine-tuned |" if tuned else ""),
           "|---|---|---|---|" + ("---|---|" if tuned else "")]
  for method in _METHODS.value:
    for keep in _KEEPS.value:
      key = f"{method}_{keep}"
      row = (f"| {method} | {np.mean(col(f'{key}_kept')):.1%} | {mean_std(col(f'{key}_loss_a'))}"
             f" | {mean_std(col(f'{key}_loss_b'))} |")
      if tuned:
        row += f" {mean_std(col(f'{key}_ft_loss_a'))} | {mean_std(col(f'{key}_ft_loss_b'))} |"
      lines.append(row)
  lines += ["", "**Paper directions** (loss difference, negative = the paper's method is "
            "better):", ""]
  for title, mine, other, src in DIRECTIONS:
    if mine not in _METHODS.value or other not in _METHODS.value:
      continue
    for keep in _KEEPS.value:
      for suffix, label in (("", "as compressed"), ("_ft", "fine-tuned")) if tuned else (
          ("", "as compressed"),):
        c = stats.compare(mine, other, col(f"{mine}_{keep}{suffix}_loss_{src}"),
                          col(f"{other}_{keep}{suffix}_loss_{src}"), metric="loss")
        lines.append(f"- {title}, keep {keep}, {label}: {c.sentence}")
  return "\n".join(lines)


def _plot(result, seeds, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  runs = [result.get("deepseekmoe", s).metrics for s in seeds]
  panels = [("a", ""), ("b", "")] + ([("a", "_ft")] if _FINETUNE.value else [])
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
  names = {"a": _source(_DATA.value), "b": _source(_OTHER.value)}
  for ax, (src, suffix) in zip(axes[0], panels):
    for method in _METHODS.value:
      kept = [np.mean([r[f"{method}_{k}_kept"] for r in runs]) for k in _KEEPS.value]
      v = np.array([[r[f"{method}_{k}{suffix}_loss_{src}"] for k in _KEEPS.value] for r in runs])
      ax.errorbar(kept, v.mean(0), yerr=v.std(0, ddof=1) if len(runs) > 1 else None,
                  marker="o", label=method, capsize=2)
    base = np.mean([r[f"base_loss_{src}"] for r in runs])
    ax.axhline(base, color="grey", ls=":", label="uncompressed")
    ax.set(xlabel="share of routed-expert bytes kept", ylabel="validation loss",
           title=f"{os.path.basename(names[src])}{', fine-tuned' if suffix else ''}")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def main(argv):
  del argv
  logs.setup_console_logging()
  config = setups.experiment_config("deepseekmoe", size=_SIZE.value, steps=_STEPS.value,
                                    data_path=_DATA.value, quick=_QUICK.value)
  for method in _METHODS.value:
    if method not in METHODS:
      raise app.UsageError(f"--methods: {method!r}; allowed: {', '.join(METHODS)}")
  seeds = [int(s) for s in _SEEDS.value]
  study = Study({"deepseekmoe": config}, seeds, _WORK.value, collect=collect_compression)
  result = study.run(estimate=False)
  for seed in seeds:     # methods or fractions added after the models were trained
    done = result.get("deepseekmoe", seed).metrics
    if all(f"{m}_{k}_loss_a" in done for m in _METHODS.value for k in _KEEPS.value):
      continue
    say(f"seed {seed}: measuring the methods and fractions its result does not hold yet")
    trainer = moejax.Trainer.from_workdir(study.workdir("deepseekmoe", seed))
    try:
      study.add_metrics("deepseekmoe", seed, collect_compression(trainer, done))
    finally:
      trainer.close()
  result = study.result()
  text = _text(result, seeds)
  report.write_results(_OUT.value, text, result.to_json())
  _plot(result, seeds, os.path.join(_OUT.value, "compression.png"))
  say(f"wrote {_OUT.value}/results.md, results.json, compression.png")


if __name__ == "__main__":
  app.run(main)

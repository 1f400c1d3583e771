"""Dense vs Switch vs GShard vs DeepSeekMoE at equal activated parameters and token budget.

  python experiments/compare_routing.py --data_path=../shared/data/tinyshakespeare.txt

Every config has the same attention, depth and width; every MoE has the same total FFN size
(4096 hidden units per layer) and the same active FFN size as the dense model (512). Each run
sees the same batches (same seed, same data, same steps). Writes, under --out_dir:
results.json, results.md (the table) and loss_curves.png.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from moejax import config as config_lib  # noqa: E402
from moejax.train import metrics as metrics_lib  # noqa: E402
from moejax.train import trainer  # noqa: E402

_DATA = flags.DEFINE_string("data_path", "../shared/data/tinyshakespeare.txt", "Text corpus.")
_STEPS = flags.DEFINE_integer("steps", 800, "Training steps per config.")
_CONFIGS = flags.DEFINE_list("configs", ["dense", "switch", "gshard", "deepseekmoe"], "Configs.")
_OUT = flags.DEFINE_string("out_dir", "experiments/results/compare_routing", "Output directory.")
_WORK = flags.DEFINE_string("work_root", "/tmp/moejax_compare_routing", "Scratch workdirs.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny model and batches (smoke test of the script).")

QUICK = {"model.d_model": 32, "model.num_layers": 2, "model.head_dim": 8, "data.seq_len": 32,
         "data.batch_size": 8, "data.eval_batches": 2, "sample.num_tokens": 16}


def param_counts(config, params) -> tuple[int, int]:
  """(total, active per token) parameters; active counts only the routed experts a token uses."""
  total = sum(x.size for x in jax.tree.leaves(params))
  model_cfg = trainer.build_model(config).cfg
  inactive = 0
  if model_cfg.moe is not None:
    s = model_cfg.moe
    per_expert = 3 * model_cfg.d_model * s.fine_hidden
    n_moe = sum(model_cfg.is_moe_layer(i) for i in range(model_cfg.num_layers))
    inactive = n_moe * (s.num_routed - s.routed_k) * per_expert
  return total, total - inactive


def run_one(name: str) -> dict:
  config = importlib.import_module(f"moejax.configs.{name}").get_config()
  config.data.path = _DATA.value
  config.train.steps = _STEPS.value
  config.train.warmup_steps = min(config.train.warmup_steps, _STEPS.value // 10)
  config.train.eval_every = max(_STEPS.value // 8, 1)
  config.train.checkpoint_every = _STEPS.value
  config.train.log_every = max(_STEPS.value // 40, 1)
  config.sample.num_tokens = 120
  if _QUICK.value:
    config = config_lib.apply_overrides(config, QUICK)
  workdir = os.path.join(_WORK.value, name)
  if os.path.isdir(workdir):
    import shutil
    shutil.rmtree(workdir)
  print(f"=== {name} ===", flush=True)
  out = trainer.train(config, workdir)
  total, active = param_counts(config, out["state"]["params"])
  history = metrics_lib.read_metrics(workdir)
  return {"config": name, "total_params": total, "active_params": active,
          "val_loss": out["eval"]["val_loss"], "val_ppl": out["eval"]["val_ppl"],
          "tokens_per_sec": out["train"]["tokens_per_sec"],
          "drop_fraction": out["train"].get("drop_fraction", 0.0),
          "tokens": _STEPS.value * config.data.batch_size * config.data.seq_len,
          "train_curve": [(r["step"], r["ce"]) for r in history if r["split"] == "train"],
          "val_curve": [(r["step"], r["val_loss"]) for r in history if r["split"] == "val"],
          "sample": out["sample"]}


def write_outputs(results: list[dict]) -> None:
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  lines = ["| config | total params | active params | tokens | val loss | val ppl | "
           "train tok/s | drop |", "|---|---|---|---|---|---|---|---|"]
  for r in results:
    lines.append(f"| {r['config']} | {r['total_params'] / 1e6:.2f}M | "
                 f"{r['active_params'] / 1e6:.2f}M | {r['tokens'] / 1e6:.2f}M | "
                 f"{r['val_loss']:.4f} | {r['val_ppl']:.3f} | {r['tokens_per_sec']:,.0f} | "
                 f"{r['drop_fraction']:.2%} |")
  table = "\n".join(lines)
  with open(os.path.join(_OUT.value, "results.md"), "w") as f:
    f.write(table + "\n")
  print(table)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for r in results:
    s, l = zip(*r["train_curve"])
    axes[0].plot(s, l, label=r["config"])
    s, l = zip(*r["val_curve"])
    axes[1].plot(s, l, marker="o", label=r["config"])
  for ax, title in zip(axes, ("train cross-entropy", "validation loss")):
    ax.set_xlabel("step")
    ax.set_ylabel("nats / byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
  axes[0].set_ylim(top=min(3.0, axes[0].get_ylim()[1]))
  fig.suptitle(f"Equal active parameters, {results[0]['tokens'] / 1e6:.1f}M tokens, "
               f"{os.path.basename(_DATA.value)}")
  fig.tight_layout()
  fig.savefig(os.path.join(_OUT.value, "loss_curves.png"), dpi=110)


def main(argv):
  del argv
  write_outputs([run_one(name) for name in _CONFIGS.value])


if __name__ == "__main__":
  app.run(main)

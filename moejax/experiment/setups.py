"""Experiment configs: a named config at a model size, with a training budget.

Sizes scale the width: ``d_model`` and every FFN width (dense hidden, expert hidden) by the same
factor, so a family of configs (dense vs MoE at equal active parameters) keeps its ratios.
"""
from __future__ import annotations

from moejax import api
from moejax import config as config_lib

SIZES = {"tiny": {"model.d_model": 32, "model.head_dim": 8},
         "small": {"model.d_model": 64, "model.head_dim": 16}, "base": {}}
FFN_KEYS = ("model.ffn_hidden", "model.moe.expert_hidden")
# A tiny model and batches: smoke tests of the experiment scripts.
QUICK = {"model.d_model": 32, "model.num_layers": 2, "model.head_dim": 8, "data.seq_len": 32,
         "data.batch_size": 8, "data.eval_batches": 2}


def experiment_config(name: str, *, size: str = "base", steps: int = 800, data_path: str = "",
                      quick: bool = False, overrides: dict | None = None):
  """``moejax.get_config(name)`` at ``size`` (see SIZES), trained ``steps`` steps on
  ``data_path`` with 8 evaluations, then ``overrides`` on top."""
  if size not in SIZES:
    raise config_lib.ConfigError(f"size {size!r}: allowed {', '.join(SIZES)}")
  config = api.get_config(name)
  out = dict(SIZES[size])
  if "model.d_model" in out:
    scale = out["model.d_model"] / config.model.d_model
    flat = config_lib.flatten(config)
    out.update({k: max(int(flat[k] * scale), 1) for k in FFN_KEYS})
  out.update({
      "data.path": data_path, "train.steps": steps,
      "train.warmup_steps": min(config.train.warmup_steps, steps // 10),
      "train.eval_every": max(steps // 8, 1), "train.checkpoint_every": 200,
      "train.log_every": max(steps // 40, 1)})
  if quick:
    out.update(QUICK)
  out.update(overrides or {})
  return config_lib.apply_overrides(config, out)

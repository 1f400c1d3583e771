"""moejax: Mixture-of-Experts language models in JAX/Flax (Linen), every method an option.

The public API (anything not listed here may change between versions):

  configs   get_config(name, overrides), list_configs(), base_config(), validate(config),
            ConfigError (every bad setting raises it, naming the key)
  model     build_model(config) -> Flax module; init_params(model, config, seed);
            forward(model, params, tokens) -> ModelOutput(logits, aux_loss, routing);
            loss(model, params, batch) -> (total, LossOutput(ce, aux_loss, routing))
  analysis  analyze(workdir, overrides) -> Analysis (routing traces, report.md, plots);
            steered(model, steer) and forward/generate(..., steer={...}): inference-time
            deactivation, forcing, reinforcing, self-contrast, capacity, skipping
  compress  compress(workdir, out, method, keep, calibration) -> report: pruned or merged
            experts written as a new workdir (moejax/compress/; python -m moejax.compress)
  layers    MoESpec (validated; MoESpec.from_counts states routed/active experts directly),
            MoEBlock, RoutingResult
  training  Trainer(config, workdir): train(steps), evaluate(), sample(prompt), generate(prompts),
            save(), restore(), Trainer.from_workdir(workdir); NonFiniteLossError
  generation generate(model, params, prompts, max_new_tokens, *, temperature, top_k, top_p, seed,
            stop) -> GenerateResult(tokens, cache_bytes, timings); GenerationError
  plots     plot_history(trainer.history) -> figure; plot_run(workdir) -> run.png (loss curves
            and per-layer expert load; need matplotlib)
  kernels   moejax.ops.gmm(lhs, rhs, group_sizes, backend=...), moejax.ops.tgmm

See README.md ("Use from Python"), docs/python.md and experiments/notebooks/quickstart.ipynb.
"""
from moejax import ops, parallel  # noqa: F401  (parallel: registers expert parallelism)
from moejax.api import (LossOutput, ModelOutput, analyze, build_model, forward, get_config,
                        init_params, list_configs, loss, steered)
from moejax.compress.pipeline import compress
from moejax.config import ConfigError, base_config, validate
from moejax.inference import GenerateResult, GenerationError, generate
from moejax.layers.moe import MoEBlock, MoESpec
from moejax.layers.routers import RoutingResult
from moejax.train.trainer import NonFiniteLossError, Trainer, TrainResult

__version__ = "0.1.0"


def plot_history(records):
  """Loss curves and per-layer expert load from ``Trainer.history`` -> matplotlib Figure."""
  from moejax.analysis.plots import plot_history as _plot_history
  return _plot_history(records)


def plot_run(workdir: str, out_path: str | None = None) -> str:
  """The same plot for a workdir's metrics.jsonl, saved as a PNG -> its path."""
  from moejax.analysis.plots import plot_run as _plot_run
  return _plot_run(workdir, out_path)


__all__ = [
    "ConfigError", "GenerateResult", "analyze", "compress", "steered", "GenerationError", "LossOutput", "ModelOutput", "MoEBlock",
    "MoESpec", "NonFiniteLossError", "RoutingResult", "TrainResult", "Trainer", "base_config",
    "build_model", "forward", "generate", "get_config", "init_params", "list_configs", "loss",
    "ops", "plot_history", "plot_run", "validate",
]

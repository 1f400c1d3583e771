"""The functional half of the public API: configs, model, forward pass, loss, routing metrics.

    config = moejax.get_config("deepseekmoe", {"model.num_layers": 2})
    model = moejax.build_model(config)
    params = moejax.init_params(model, config, seed=0)
    out = moejax.forward(model, params, tokens)       # ModelOutput: logits, aux_loss, routing
    total, parts = moejax.loss(model, params, batch)  # batch [B, L+1]: next-token targets

Training, checkpoints and sampling are ``moejax.Trainer``.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct

from moejax import config as config_lib
from moejax.inference import steer as steer_lib
from moejax.models.transformer import Transformer
from moejax.train import steps

Array = jax.Array


def list_configs() -> list[str]:
  """Names of the shipped configs (``configs/*.py``, installed as ``moejax.configs``)."""
  import moejax.configs
  return sorted(m.name for m in pkgutil.iter_modules(moejax.configs.__path__))


def get_config(name: str = "default",
               overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """A shipped config by name, with dotted-key ``overrides``, validated.

  ``get_config("gshard", {"model.moe.num_experts": 8})``; an unknown name or key raises
  ``ConfigError`` listing what exists.
  """
  if name not in list_configs():
    raise config_lib.ConfigError(f"config {name!r} does not exist; shipped configs: "
                                 f"{', '.join(list_configs())}")
  config = importlib.import_module(f"moejax.configs.{name}").get_config()
  return config_lib.validate(config_lib.apply_overrides(config, overrides or {}))


def build_model(config: ml_collections.ConfigDict) -> Transformer:
  """The decoder LM (a Flax Linen module) that ``config.model`` describes (validated first)."""
  return steps.build_model(config_lib.validate(config))


def init_params(model: Transformer, config: ml_collections.ConfigDict | None = None,
                seed: int = 0):
  """Unboxed float32 parameters on the default device (for a sharded state see ``Trainer``)."""
  seq_len = config.data.seq_len if config is not None else 8
  return _init_jit(model, jax.random.key(seed), seq_len)


# Jitted once per model: op-by-op dispatch of a whole MoE model costs seconds of small compiles.
@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_jit(model, rng, seq_len):
  return steps.init_params(model, rng, seq_len)[0]


@struct.dataclass
class ModelOutput:
  """What one forward pass gives (a pytree: fine as ``has_aux`` output of ``jax.grad``).

  logits:   [B, L, V] float32.
  aux_loss: [] weighted sum of every MoE auxiliary loss (balance, z-loss, ...).
  routing:  per MoE layer, e.g. ``routing["layer_1"]["expert_load"]`` [E] (share of routed
            slots per expert), ``drop_fraction``, ``num_dropped``, ``router_entropy`` and the
            unweighted value of each auxiliary loss.
  """
  logits: Array
  aux_loss: Array
  routing: dict


@struct.dataclass
class LossOutput:
  """``loss``'s auxiliary output: cross-entropy, auxiliary loss and per-layer routing."""
  ce: Array
  aux_loss: Array
  routing: dict


def routing_by_layer(intermediates) -> dict:
  """Sown intermediates {'layer_1': {'moe': {'expert_load': (x,)}}} -> {'layer_1': {...: x}}."""
  return {layer: {name: value[0] for name, value in tree["moe"].items()}
          for layer, tree in intermediates.items() if "moe" in tree}


def forward(model: Transformer, params, tokens: Array, *, rng: jax.Array | None = None,
            deterministic: bool = True, steer: Mapping[str, Any] | None = None,
            calibration=None) -> ModelOutput:
  """tokens [B, L] int32 -> ``ModelOutput``. ``rng`` feeds router noise when not deterministic.

  ``steer``: the ``steer`` config group's options as a dict (moejax/inference/steer.py), e.g.
  ``{"deactivate": "1:3,1:5"}``; what they changed is in ``routing[layer]["steer_*"]``;
  ``skip_rate`` calibrates on ``calibration`` (token arrays [B, L]); ``contrast_weight`` b
  returns self-contrast logits (1 + b) x logits - b x the ``contrast_routing`` model's.
  Jitted (``model`` and ``deterministic`` static); fine to call inside jit/grad/vmap too.
  """
  if steer:
    model = steered(model, steer, params, calibration)
    b = steer_lib.options(steer)["contrast_weight"]
    if b > 0:
      out = _forward_jit(model, params, tokens, rng, deterministic)
      weak = _forward_jit(steer_lib.weak_model(model, steer), params, tokens, rng, deterministic)
      return out.replace(logits=steer_lib.contrast_logits(out.logits, weak.logits, b))
  return _forward_jit(model, params, tokens, rng, deterministic)


def steered(model: Transformer, steer: Mapping[str, Any], params=None, calibration=None
            ) -> Transformer:
  """``model`` with inference-time steering (the ``steer`` config group's options as a dict;
  ``skip_rate`` calibrates on ``calibration`` token arrays with ``params``)."""
  return steer_lib.steered(model, steer, params, calibration)


def analyze(workdir_or_trainer, overrides: Mapping[str, Any] | None = None, *,
            sources: str | None = None, out_dir: str | None = None, plots: bool = True):
  """Routing traces, report and plots of a trained model (``--mode=analyze``): a workdir (with
  ``overrides`` such as ``{"steer.deactivate": "1:3"}``) or a ``Trainer``. ``sources``:
  comma-separated 'generated' and/or text files (default ``config.analyze.sources``).
  -> ``Analysis`` (traces, summary, report text, files written)."""
  from moejax.analysis.analyze import analyze as _analyze
  from moejax.train.trainer import Trainer
  trainer = workdir_or_trainer
  if isinstance(trainer, str):
    trainer = Trainer.from_workdir(trainer, dict(overrides or {}), mode="analyze")
    trainer.close()
  elif overrides:
    raise config_lib.ConfigError("analyze: overrides apply to a workdir; pass the Trainer's "
                                 "config changes when building it")
  return _analyze(trainer, sources=sources, out_dir=out_dir, plots=plots)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _forward_jit(model, params, tokens, rng, deterministic):
  logits, mutated = steps.apply_model(model, params, tokens, rng, deterministic)
  return ModelOutput(logits=logits, aux_loss=steps.aux_loss(mutated),
                     routing=routing_by_layer(mutated.get("intermediates", {})))


def loss(model: Transformer, params, batch: Array, *, rng: jax.Array | None = None,
         deterministic: bool = True) -> tuple[Array, LossOutput]:
  """Training objective on ``batch`` [B, L+1]: mean next-token cross-entropy + aux losses.

  -> (total, LossOutput); differentiable: ``jax.grad(moejax.loss, argnums=1, has_aux=True)``.
  The same function the train step differentiates (``train.steps.loss_fn``), jitted.
  """
  return _loss_jit(model, params, batch, rng, deterministic)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _loss_jit(model, params, batch, rng, deterministic):
  total, (ce, aux, inter) = steps.loss_fn(model, params, batch, rng, deterministic)
  return total, LossOutput(ce=ce, aux_loss=aux, routing=routing_by_layer(inter))

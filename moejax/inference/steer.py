"""The ``steer`` config group: inference-time interventions on a trained MoE's routing.

    python run.py --workdir=runs/x --mode=eval --config.steer.deactivate=1:3,3:0
    moejax.steered(model, {"deactivate": "1:3"})          # the same, in Python

Settings (layer = model layer index, expert = routed expert index; ``*`` as the layer means
every MoE layer):
  deactivate = "L:E,L:E"        never route to these experts (router mask)
  force = "L:E"                 always route to these experts
  reinforce = "L:E:factor"      gates of these experts x factor
  contrast_weight = b > 0       self-contrast decoding (SCMoE): next-token logits
                                (1 + b) * strong - b * weak, where weak is the same model routed
                                by ``contrast_routing`` ("topN" | "rankN"; SCMoE uses rank-2)
  capacity_factor = c > 0       an expert capacity at inference, overflow "drop" | "reroute"
  skip_rate = r in (0, 1)       skip routed slots whose gate is below a per-layer threshold
                                calibrated on ``calibration_batches`` batches of the run's data
                                to skip this share of them

What each edit does is layers/steering.py. Every bad setting is one ``ConfigError`` before any
compute. The model with steering is a clone of the model (``ModelConfig.steer``); its parameters
are the trained ones.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from moejax.errors import ConfigError
from moejax.layers.steering import OVERFLOW, LayerSteer, parse_route

DEFAULTS = dict(deactivate="", force="", reinforce="", contrast_weight=0.0,
                contrast_routing="rank2", capacity_factor=0.0, overflow="drop", skip_rate=0.0,
                calibration_batches=2)


def options(steer: Mapping[str, Any]) -> dict:
  """The options (a dict or the ``config.steer`` ConfigDict) with defaults filled in."""
  s = {**DEFAULTS, **dict(steer)}
  unknown = set(s) - set(DEFAULTS)
  if unknown:
    raise ConfigError(f"steer: unknown option(s) {sorted(unknown)}; allowed: {sorted(DEFAULTS)}")
  return s


def is_active(steer: Mapping[str, Any]) -> bool:
  """Whether any option changes the model (calibration_batches alone does not)."""
  s = options(steer)
  return any(s[k] != DEFAULTS[k] for k in ("deactivate", "force", "reinforce",
                                           "contrast_weight", "capacity_factor", "skip_rate"))


def _pairs(text: str, key: str, cfg, fields: int) -> list[tuple]:
  """"1:3,*:0" -> [(1, 3), (l, 0) for every MoE layer l]; reinforce has a third field."""
  layers, routed = cfg.moe_layer_ids, cfg.moe.num_routed
  form = "L:E:factor" if fields == 3 else "L:E"
  out = []
  for item in filter(None, (p.strip() for p in text.split(","))):
    parts = item.split(":")
    if len(parts) != fields:
      raise ConfigError(f"steer.{key}: {item!r} is not {form} (e.g. "
                        f"{'1:3:2.0' if fields == 3 else '1:3'}; '*' as L = every MoE layer)")
    try:
      expert = int(parts[1])
      factor = float(parts[2]) if fields == 3 else None
      targets = layers if parts[0] == "*" else [int(parts[0])]
    except ValueError:
      raise ConfigError(f"steer.{key}: {item!r} is not {form} with integer L and E") from None
    for layer in targets:
      if layer not in layers:
        raise ConfigError(f"steer.{key}: layer {layer} is not an MoE layer; MoE layers: "
                          f"{layers}")
    if not 0 <= expert < routed:
      raise ConfigError(f"steer.{key}: expert {expert} is out of range; routed experts are "
                        f"0..{routed - 1}")
    if factor is not None and not factor > 0:
      raise ConfigError(f"steer.{key}: factor {parts[2]} must be > 0")
    out += [(layer, expert) + ((factor,) if factor is not None else ()) for layer in targets]
  return out


def layer_steers(steer: Mapping[str, Any], cfg, skip_thresholds: Mapping[int, float] | None = None
                 ) -> tuple:
  """``config.steer`` -> ((layer, LayerSteer), ...) for ``ModelConfig.steer``, validated
  against the model. ``skip_thresholds`` {layer: threshold} come from ``calibrate_skip``."""
  s = options(steer)
  if not is_active(s):
    return ()
  if cfg.moe is None:
    raise ConfigError("steer: the model has no MoE layers to steer")
  if cfg.moe.merge != "none":
    raise ConfigError(f"steer: model.moe.merge={cfg.moe.merge!r} merges experts instead of "
                      "routing to them; steering needs a routed MoE (merge='none')")
  if s["overflow"] not in OVERFLOW:
    raise ConfigError(f"steer.overflow: got {s['overflow']!r}; allowed: "
                      f"{', '.join(map(repr, OVERFLOW))}")
  for key in ("capacity_factor", "contrast_weight"):
    if not s[key] >= 0:
      raise ConfigError(f"steer.{key}: must be >= 0 (0 = off), got {s[key]}")
  if not 0 <= s["skip_rate"] < 1:
    raise ConfigError(f"steer.skip_rate: must be in [0, 1) (0 = off), got {s['skip_rate']}")
  if s["contrast_weight"]:
    try:
      kind, n = parse_route(s["contrast_routing"])
    except ValueError as e:
      raise ConfigError(f"steer.contrast_routing: {e}") from None
    if n > cfg.moe.num_routed:
      raise ConfigError(f"steer.contrast_routing: {s['contrast_routing']!r} needs {n} experts, "
                        f"the model routes over {cfg.moe.num_routed}")
  deactivate = _pairs(s["deactivate"], "deactivate", cfg, 2)
  force = _pairs(s["force"], "force", cfg, 2)
  reinforce = _pairs(s["reinforce"], "reinforce", cfg, 3)
  both = sorted(set(deactivate) & set(force))
  if both:
    raise ConfigError(f"steer: layer {both[0][0]} expert {both[0][1]} is both in "
                      "steer.deactivate and steer.force; choose one")
  k, routed = cfg.moe.routed_k, cfg.moe.num_routed
  out = []
  for layer in cfg.moe_layer_ids:
    off = tuple(sorted({e for l, e in deactivate if l == layer}))
    on = tuple(sorted({e for l, e in force if l == layer}))
    if len(on) > k:
      raise ConfigError(f"steer.force: layer {layer} forces {len(on)} experts, but a token "
                        f"uses {k} routed experts")
    if routed - len(off) < k:
      raise ConfigError(f"steer.deactivate: layer {layer} keeps {routed - len(off)} of "
                        f"{routed} experts, fewer than the {k} a token uses")
    gains = {e: f for l, e, f in reinforce if l == layer}
    one = LayerSteer(deactivate=off, force=on, reinforce=tuple(sorted(gains.items())),
                     capacity_factor=float(s["capacity_factor"]), overflow=s["overflow"],
                     skip_threshold=float((skip_thresholds or {}).get(layer, 0.0)))
    if one != LayerSteer():
      out.append((layer, one))
  return tuple(out)


def with_steer(model, steers: tuple):
  """A clone of ``model`` (a Transformer) with these layer steers (() = the plain model)."""
  return model.clone(cfg=dataclasses.replace(model.cfg, steer=tuple(steers)))


def steered(model, steer: Mapping[str, Any], params=None, calibration=None):
  """``model`` with the ``steer`` options (a dict like the config group). ``skip_rate``
  calibrates its thresholds on ``calibration`` (an iterable of token arrays [B, L]) with
  ``params``; the self-contrast options are used by generation and evaluation, not here."""
  s = options(steer)
  base = with_steer(model, ())
  steers = layer_steers(s, base.cfg)
  thresholds = None
  if s["skip_rate"] > 0:
    if params is None or calibration is None:
      raise ConfigError("steer.skip_rate: calibrating the skip thresholds needs params and "
                        "calibration token batches")
    thresholds = calibrate_skip(with_steer(base, steers), params, calibration, s["skip_rate"])
    steers = layer_steers(s, base.cfg, thresholds)
  return with_steer(base, steers)


def weak_model(model, steer: Mapping[str, Any]):
  """The weak model of self-contrast decoding: every MoE layer routed by
  ``steer.contrast_routing``, on top of the strong model's other steering."""
  route = options(steer)["contrast_routing"]
  steers = dict(model.cfg.steer)
  out = tuple((l, dataclasses.replace(steers.get(l, LayerSteer()), route=route))
              for l in model.cfg.moe_layer_ids)
  return with_steer(model, out)


def contrast_logits(strong: jax.Array, weak: jax.Array, weight: float) -> jax.Array:
  """SCMoE (Shi et al. 2024, "Unchosen Experts Can Contribute Too"): (1 + b) * strong - b * weak
  on the next-token logits. (The paper also restricts sampling to tokens the strong model finds
  plausible; that constraint is not applied here.)"""
  return (1.0 + weight) * strong - weight * weak


def calibrate_skip(model, params, batches, rate: float) -> dict[int, float]:
  """Per MoE layer, the gate threshold below which ``rate`` of the used routed slots fall on
  ``batches`` (token arrays [B, L]), from the model's own routing (traces collection)."""
  from moejax.analysis.traces import apply_with_traces, per_layer
  gates: dict[int, list] = {}
  for tokens in batches:
    _, sown = apply_with_traces(model, params, jnp.asarray(tokens, jnp.int32))
    for layer, values in per_layer(sown["traces"]):
      for index, gate in zip(values["expert_index"], values["gate"]):
        gates.setdefault(layer, []).append(np.asarray(gate)[np.asarray(index) >= 0])
  return {layer: float(np.quantile(np.concatenate(g), rate)) for layer, g in gates.items()}


def steer_counts(intermediates) -> dict:
  """The ``steer_*`` counts of one forward's intermediates -> {layer name: {name: value}}
  (host values; nothing else is copied from the device)."""
  out: dict = {}
  for layer, tree in intermediates.items():
    for name, value in traverse_util.flatten_dict(tree).items():
      if name[-1].startswith("steer_"):
        out.setdefault(layer, {})[name[-1]] = float(np.sum([np.asarray(v) for v in value]))
  return out


def summarize(intermediates_list: list) -> dict:
  """Sums over calls (``steer_counts`` of each) per MoE layer, and the shares the eval report
  prints: changed tokens (per token), dropped/re-routed/skipped slots (per used slot), and the
  share of routed-expert FLOPs saved by skipping (the skipped share of slots: exact for
  experts of one size, the share of slots, not of FLOPs, for heterogeneous experts)."""
  sums: dict[str, dict[str, float]] = {}
  for inter in intermediates_list:
    for layer, values in inter.items():
      for name, value in values.items():
        if name.startswith("steer_"):
          row = sums.setdefault(layer, {})
          row[name] = row.get(name, 0.0) + float(np.sum(value))
  if not sums:
    return {}
  total = {k: sum(row.get(k, 0.0) for row in sums.values())
           for k in ("steer_slots", "steer_changed_tokens", "steer_dropped", "steer_rerouted",
                     "steer_skipped")}
  slots = max(total["steer_slots"], 1.0)
  return {"layers": sums, "dropped_fraction": total["steer_dropped"] / slots,
          "rerouted_fraction": total["steer_rerouted"] / slots,
          "skipped_fraction": total["steer_skipped"] / slots,
          "expert_flops_saved": total["steer_skipped"] / slots,
          "changed_tokens": total["steer_changed_tokens"]}


def describe(steers: tuple) -> str:
  """One line per steered layer, e.g. 'layer 1: deactivate [3], skip gates < 0.120'."""
  lines = []
  for layer, s in steers:
    parts = []
    if s.deactivate:
      parts.append(f"deactivate {list(s.deactivate)}")
    if s.force:
      parts.append(f"force {list(s.force)}")
    if s.reinforce:
      parts.append("reinforce " + ", ".join(f"{e} x{f:g}" for e, f in s.reinforce))
    if s.capacity_factor:
      parts.append(f"capacity factor {s.capacity_factor:g} ({s.overflow})")
    if s.skip_threshold:
      parts.append(f"skip gates < {s.skip_threshold:.4f}")
    lines.append(f"layer {layer}: {', '.join(parts)}")
  return "\n".join(lines)


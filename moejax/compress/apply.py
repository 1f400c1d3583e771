"""A ``CompressionPlan`` applied: the compressed model's config and its parameters.

The config is rewritten in the direct form (``routed_experts``/``active_experts``, segments 1,
the shared experts' hidden size stated), so that it means the same model whatever the source
used; per-layer differences (expert sizes after neuron pruning or pruning heterogeneous experts,
the router folding of merged experts) go to ``model.moe.layer_overrides``. Parameters are
produced one MoE layer at a time (``compressed_leaves``): the rest of the model is copied leaf
by leaf, so the writer never holds more than one layer.
"""
from __future__ import annotations

import json

import ml_collections
import numpy as np

from moejax import config as config_lib
from moejax.compress import bank as bank_lib
from moejax.compress import merge as merge_lib
from moejax.compress.plan import CompressionPlan, LayerPlan
from moejax.errors import ConfigError


def compress_layer(experts, router: dict, plan: LayerPlan, num_outputs: int, hidden: int):
  """-> (bank parameters, router parameters, layer overrides {field: value}); ``hidden``: the
  model-wide expert size (a layer whose experts all have it needs no ``expert_sizes``)."""
  overrides = {}
  if plan.groups is not None:
    experts = [merge_lib.merge_group(experts, list(g), w) for g, w in zip(plan.groups,
                                                                            plan.weights)]
    emap = np.zeros(num_outputs, np.int64)
    for m, members in enumerate(plan.groups):
      emap[list(members)] = m
    overrides["expert_map"] = [int(i) for i in emap]
    return bank_lib.to_bank(experts, blocks=False), dict(router), overrides
  order = list(plan.keep)
  experts = [experts[i] for i in order]
  if plan.neurons is not None:
    experts = [(wi[..., idx], wo[idx]) for (wi, wo), idx in zip(experts, plan.neurons)]
    by_size = bank_lib.size_order(experts)
    experts, order = [experts[i] for i in by_size], [order[i] for i in by_size]
  sizes = bank_lib.sizes_of(experts)
  if set(sizes) != {hidden}:
    overrides["expert_sizes"] = list(sizes)
  return (bank_lib.to_bank(experts, blocks="expert_sizes" in overrides),
          bank_lib.select_router(router, order, num_outputs), overrides)


def compressed_config(config: ml_collections.ConfigDict, cfg, plan: CompressionPlan,
                      overrides: dict) -> ml_collections.ConfigDict:
  """The compressed model's config (validated): ``overrides`` {layer: {field: value}}."""
  spec = cfg.moe
  first = plan.layers[min(plan.layers)]
  routed = len(first.groups) if first.groups is not None else len(first.keep)
  ternary = {"ternary_experts": first.ternary} if first.ternary else {}
  active = spec.routed_k if first.groups is not None else min(spec.routed_k, routed)
  e = config.model.moe
  new = {"num_experts": 0, "top_k": e.top_k, "segments": 1, "routed_experts": routed,
         "active_experts": active, "expert_hidden": spec.fine_hidden,
         "shared_expert_hidden": spec.shared_hidden if spec.num_shared_experts else 0,
         "expert_sizes": (), "expert_size_ladder": "none", "expert_total_hidden": 0,
         "ladder_repeats": 1,
         "layer_overrides": json.dumps({str(i): v for i, v in sorted(overrides.items()) if v}),
         **ternary}
  out = config_lib.apply_overrides(config, {f"model.moe.{k}": v for k, v in new.items()})
  try:
    return config_lib.validate(out)
  except ConfigError as err:
    raise ConfigError(f"--method={plan.method} --keep={plan.keep}: the compressed model is not "
                      f"valid: {err}") from None


def check_model(cfg, method) -> None:
  """Refuses, before any compute, a model the method cannot compress."""
  s = cfg.moe
  if s is None:
    raise ConfigError("compression needs an MoE model (this workdir's model is dense)")
  problems = [
      (s.merge == "none", f"model.moe.merge={s.merge!r} mixes every expert into one (nothing "
                          "is routed to prune)"),
      (s.iterations == 1, f"model.moe.iterations={s.iterations} (Chain-of-Experts) shares "
                          "experts across iterations"),
      (s.router in bank_lib.PRUNABLE_ROUTERS,
       f"model.moe.router={s.router!r}; compression supports "
       f"{', '.join(bank_lib.PRUNABLE_ROUTERS)}"),
      (s.expert_bank in ("swiglu", "ternary_swiglu"),
       f"model.moe.expert_bank={s.expert_bank!r} (packed weights: compress the ternary_swiglu "
       "run, then pack)"),
      (not any(sp.expert_map for _, sp in cfg.moe_layers),
       "the model's experts are already merged (model.moe.layer_overrides has expert_map)"),
      (not s.null_experts or not method.merges, "merging cannot fold null experts "
                                                "(model.moe.null_experts > 0)"),
      (s.expert_bank == "swiglu" or not (method.merges or method.prunes_neurons
                                         or method.quantizes),
       "merging, neuron pruning and mixed precision edit full-precision SwiGLU experts "
       f"(model.moe.expert_bank={s.expert_bank!r})"),
      (not s.ternary_experts, f"the model already has ternary experts (model.moe."
                              f"ternary_experts={s.ternary_experts})"),
      (not (method.quantizes and (s.heterogeneous or any(sp.heterogeneous
                                                         for _, sp in cfg.moe_layers))),
       "mixed precision needs experts of one size"),
  ]
  for ok, why in problems:
    if not ok:
      raise ConfigError(f"cannot compress this model: {why}")
  if method.merges and s.num_routed < 2:
    raise ConfigError("--method=merge needs at least two routed experts per layer "
                      f"(this model has {s.num_routed})")


def layer_experts(moe_params: dict, spec) -> list:
  return bank_lib.from_bank(moe_params["experts"], spec.routed_sizes)


def compressed_leaves(saved, plan: CompressionPlan, overrides_out: dict):
  """Yields (path, array) of the compressed parameters, reading ``saved`` (convert.hf.SavedModel)
  one leaf at a time and each MoE layer's experts and router together; fills
  ``overrides_out`` {layer: {field: value}} as layers are done."""
  cfg = saved.cfg
  done = set()
  for path in saved.paths():
    layer = int(path[0].split("_")[1]) if path[0].startswith("layer_") else None
    in_moe = layer in plan.layers and len(path) > 2 and path[1] == "moe" and \
        path[2] in ("experts", "router")
    if not in_moe:
      yield path, saved.leaf(path, keep_dtype=True)    # written in its stored dtype
      continue
    if layer in done:
      continue
    done.add(layer)
    spec = cfg.moe_spec(layer)
    prefix = path[:2]
    moe = {part: {p[3]: saved.leaf(p, keep_dtype=True) for p in saved.paths()
                  if p[:3] == prefix + (part,)} for part in ("experts", "router")}
    dtypes = {part: next(iter(leaves.values())).dtype for part, leaves in moe.items()}
    bank, router, overrides = compress_layer(layer_experts(moe, spec), moe["router"],
                                             plan.layers[layer], spec.router_experts,
                                             cfg.moe.fine_hidden)
    overrides_out[layer] = overrides
    for name, value in router.items():
      yield prefix + ("router", name), np.asarray(value).astype(dtypes["router"])
    for name, value in bank.items():     # the source's dtype (e.g. an import kept in bfloat16)
      yield prefix + ("experts", name), np.asarray(value).astype(dtypes["experts"])
    del moe, bank

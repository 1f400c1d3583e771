"""Up-cycling: a trained dense model's weights as the starting point of an MoE.

Every parameter outside the feed-forward layers (embeddings, attention, norms) is copied; each
MoE layer's experts are built from that layer's dense SwiGLU FFN (wi [D, 2, H], wo [H, D]);
routers keep their fresh initialisation. ``upcycle.method``:

  copy   Sparse Upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): every routed expert is a
         copy of the dense FFN (needs expert hidden = H). With top-k gates renormalised to sum
         to 1 and no shared expert, every token that keeps all its slots gets exactly the dense
         function at step 0: with ``dispatch="capacity"`` a token over an expert's capacity
         loses that slot (counted in the log's drop share), so only dropless dispatch makes
         step 0 exact for every token.
  drop   Drop-Upcycling (Nakamura et al. 2025, arXiv 2502.19261): copies, then in every expert
         a random ``drop_fraction`` of the H intermediate units is re-initialised (their
         columns of the gate/up weights and rows of the down weight) from a normal with the
         mean and std of the dense matrix, so experts start partly diverse.
  split  fine-grained: H is cut into m = H / h segments of the expert hidden h; shared experts
         take the first K_s segments, routed expert j segment K_s + (j mod (m - K_s)). With all
         segments active at gate 1 the sum equals the dense FFN.

A shared expert under copy/drop is a copy of the dense FFN too. Shapes that cannot fit stop
with a ``ConfigError`` naming the setting before any state is built.
"""
from __future__ import annotations

import jax
import numpy as np

from moejax.errors import ConfigError

METHODS = ("copy", "drop", "split")


def check_fit(dense_cfg, moe_cfg, method: str) -> None:
  """Raises ConfigError when the dense model's FFN cannot become this MoE's experts (nothing
  to check when only the attention changes)."""
  if method not in METHODS:
    raise ConfigError(f"config.upcycle.method: got {method!r}; allowed: "
                      f"{', '.join(map(repr, METHODS))}")
  if moe_cfg.moe is None or moe_cfg.moe == dense_cfg.moe:
    return        # converting attention only (mixture-of-heads): the FFNs are copied as they are
  if dense_cfg.moe is not None:
    raise ConfigError("config.upcycle.source: holds an MoE model with other experts; up-cycling "
                      "starts from a dense one (model.moe.num_experts=0)")
  s, big = moe_cfg.moe, dense_cfg.ffn_hidden
  if s.heterogeneous:
    raise ConfigError("config.upcycle.source: up-cycling copies or splits the dense FFN into "
                      "experts of one size; model.moe.expert_sizes/expert_size_ladder "
                      "(heterogeneous experts) cannot start from it")
  if method in ("copy", "drop") and s.fine_hidden != big:
    raise ConfigError(
        f"config.upcycle.method={method!r}: every expert is a copy of the dense FFN, so the "
        f"expert hidden size must be the dense model.ffn_hidden={big}, got {s.fine_hidden}; "
        f"use method 'split' for fine-grained experts")
  if method == "split":
    if big % s.fine_hidden or big // s.fine_hidden <= s.num_shared_experts:
      raise ConfigError(
          f"config.upcycle.method='split': the dense model.ffn_hidden={big} must be a multiple "
          f"of the expert hidden {s.fine_hidden} with more segments than the "
          f"{s.num_shared_experts} shared experts")


def _drop(rng, wi, wo, fraction):
  """Re-initialises ``fraction`` of the H units of one expert copy (Drop-Upcycling)."""
  h = wo.shape[0]
  n = int(round(fraction * h))
  if n == 0:
    return wi, wo
  k_idx, k_i, k_o = jax.random.split(rng, 3)
  idx = np.asarray(jax.random.choice(k_idx, h, (n,), replace=False))
  wi, wo = wi.copy(), wo.copy()
  wi[:, :, idx] = wi.mean() + wi.std() * np.asarray(jax.random.normal(k_i, wi[:, :, idx].shape))
  wo[idx] = wo.mean() + wo.std() * np.asarray(jax.random.normal(k_o, wo[idx].shape))
  return wi, wo


def expert_weights(ffn: dict, spec, method: str, rng, drop_fraction: float = 0.5):
  """Dense {'wi': [D, 2, H], 'wo': [H, D]} -> (experts {'wi': [E, D, 2, h], 'wo': [E, h, D]},
  shared {'wi', 'wo'} or None)."""
  wi, wo = np.asarray(ffn["wi"]), np.asarray(ffn["wo"])
  e = spec.num_routed
  if method == "split":
    h = spec.fine_hidden
    segs = [(wi[:, :, j * h:(j + 1) * h], wo[j * h:(j + 1) * h]) for j in range(wo.shape[0] // h)]
    ks = spec.num_shared_experts
    routed = [segs[ks + j % (len(segs) - ks)] for j in range(e)]
    shared = None
    if ks:
      shared = {"wi": np.concatenate([s[0] for s in segs[:ks]], axis=2),
                "wo": np.concatenate([s[1] for s in segs[:ks]], axis=0)}
  else:
    keys = jax.random.split(rng, e)
    routed = [(wi, wo) if method == "copy" else _drop(keys[j], wi, wo, drop_fraction)
              for j in range(e)]
    shared = None
    if spec.num_shared_experts:
      shared = {"wi": np.concatenate([wi] * spec.num_shared_experts, axis=2),
                "wo": np.concatenate([wo] * spec.num_shared_experts, axis=0)}
  experts = {"wi": np.stack([r[0] for r in routed]), "wo": np.stack([r[1] for r in routed])}
  return experts, shared


def upcycle_params(dense_params, moe_params, moe_cfg, method: str, rng,
                   drop_fraction: float = 0.5):
  """The MoE's parameter tree filled from the dense one (see the module docstring)."""
  dense_params, moe_params = jax.device_get(dense_params), jax.device_get(moe_params)

  def fill(dense, fresh, path):
    if isinstance(fresh, dict):
      if "moe" in fresh and "ffn" in dense:             # an MoE layer over a dense FFN layer
        layer = int(path[-1].rsplit("_", 1)[-1])
        experts, shared = expert_weights(dense["ffn"], moe_cfg.moe, method,
                                         jax.random.fold_in(rng, layer), drop_fraction)
        moe = dict(fresh["moe"], experts=experts)
        if shared is not None:
          moe["shared"] = shared
        rest = {k: fill(dense[k], v, path + (k,)) for k, v in fresh.items() if k != "moe"}
        return {**rest, "moe": _checked(moe, fresh["moe"], path + ("moe",))}
      missing = [k for k in fresh if k not in dense]
      if missing:
        raise ConfigError(f"config.upcycle.source: the dense model has no "
                          f"{'/'.join(path + (missing[0],))}; its settings differ from this one")
      return {k: fill(dense[k], v, path + (k,)) for k, v in fresh.items()}
    if np.shape(dense) != np.shape(fresh):
      raise ConfigError(f"config.upcycle.source: parameter {'/'.join(path)} is "
                        f"{np.shape(dense)} in the dense model but {np.shape(fresh)} here")
    return np.asarray(dense, np.asarray(fresh).dtype)

  return fill(dense_params, moe_params, ())


def _checked(new, fresh, path):
  if jax.tree.structure(new) != jax.tree.structure(fresh):
    raise ConfigError(f"config.upcycle: {'/'.join(path)} built with parameters "
                      f"{sorted(new)}, the model has {sorted(fresh)}")
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(new)[0], jax.tree.leaves(fresh)):
    if np.shape(a) != np.shape(b):
      raise ConfigError(f"config.upcycle: {'/'.join(path)}{jax.tree_util.keystr(p)} built as "
                        f"{np.shape(a)}, the model expects {np.shape(b)}")
  return new


def check_source(dense_config, config) -> None:
  """The dense model must equal this one outside the FFNs (same attention, width, depth)."""
  from moejax.config import flatten
  a, b = flatten(dense_config.model), flatten(config.model)
  diff = sorted(k for k in b if k not in ("ffn_hidden", "attention")
                and not k.startswith(("moe.", "moh.")) and a.get(k) != b[k])
  if diff:
    raise ConfigError(
        f"config.upcycle.source={config.upcycle.source}: the dense model differs outside its "
        f"FFNs: " + ", ".join(f"model.{k}: {a.get(k)!r} there vs {b[k]!r} here" for k in diff))

"""``python -m moejax.convert --from=moejax --to=packed SRC DST``: a trained ternary-expert run
(``model.moe.expert_bank=ternary_swiglu``) -> a workdir whose routed experts are stored in
their inference form, 2-bit codes + scales (``layers/ternary.py:pack_bank``), with
``expert_bank=ternary_packed``: ``run.py --mode=eval|sample`` runs it through the grouped
matmuls that decode the codes tile by tile, and gives the trained model's outputs.

Also reports the model's memory per component (``analysis/params.py``) beside the same model
with full-precision routed experts.
"""
from __future__ import annotations

import jax
import numpy as np

from moejax.errors import ConversionError

EXPERTS = ("moe", "experts")


def pack_workdir(src: str, dst: str) -> dict:
  """-> {'workdir', 'memory': {component: bytes}, 'memory_full_precision': {...}}."""
  from moejax import config as config_lib
  from moejax.analysis.params import memory_by_component
  from moejax.convert.hf import SavedModel, _write_workdir
  from moejax.layers.ternary import pack_bank
  saved = SavedModel(src)
  s = saved.cfg.moe
  mixed = s is not None and s.expert_bank == "swiglu" and s.ternary_experts > 0
  if s is None or not (s.expert_bank == "ternary_swiglu" or mixed):
    raise ConversionError(f"{src}: --to=packed packs ternary experts; this model has "
                          f"model.moe.expert_bank={getattr(s, 'expert_bank', None)!r} "
                          f"(need 'ternary_swiglu', or 'swiglu' with model.moe.ternary_experts "
                          f"> 0: mixed precision)")
  params, full = {}, {}
  for path in saved.paths():
    leaf = np.asarray(saved.leaf(path))
    _set(full, path, leaf)
    if path[-3:-1] == EXPERTS and path[-1] == "wo":
      continue                                    # packed with its layer's wi below
    if path[-3:-1] == EXPERTS and path[-1] == "wi":
      wo = np.asarray(saved.leaf(path[:-1] + ("wo",)))
      first = leaf.shape[0] - s.ternary_experts if mixed else 0   # mixed: ternary last
      packed = pack_bank(leaf[first:], wo[first:])
      if mixed:
        packed = {"wi": leaf[:first], "wo": wo[:first], **packed}
      for name, value in packed.items():
        _set(params, path[:-1] + (name,), value)
      continue
    _set(params, path, leaf)
  config = config_lib.apply_overrides(saved.config, {"model.moe.expert_bank": "ternary_packed"})
  _write_workdir(dst, config, params)
  return {"workdir": dst, "memory": memory_by_component(params),
          "memory_full_precision": memory_by_component(full)}


def _set(tree: dict, path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def describe(out: dict) -> str:
  """A per-component memory table of the packed model and its full-precision twin."""
  rows = ["component            packed (MiB)   full precision f32 (MiB)"]
  for name, packed in out["memory"].items():
    fp = out["memory_full_precision"].get(name, 0)
    rows.append(f"{name:20s} {packed / 2**20:12.3f}   {fp / 2**20:12.3f}")
  return "\n".join(rows)


del jax

"""Export a moejax workdir to a self-contained PyTorch model: ``modeling_moejax.py`` (a copy of
``torch_model.py``: torch + safetensors only), ``moejax_config.json`` and safetensors weights
under moejax's parameter names. For the variants Hugging Face has no class for (mixture-of-heads,
ternary experts stored 2 bits per weight, soft merging, null experts, Chain-of-Experts) as well
as the HF-expressible ones.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np

from moejax.convert import torch_model
from moejax.convert.hf import _progress
from moejax.convert.safetensors_io import ShardedWriter
from moejax.errors import ConversionError

ROUTERS = ("topk_softmax", "sigmoid")   # the others (top-p, expert choice, hash, recurrent,
                                        # stochastic) route in ways torch_model.py does not have


def torch_config(cfg) -> dict:
  """The ``ModelConfig`` fields torch_model.py reads."""
  out = {f: getattr(cfg, f) for f in ("vocab_size", "d_model", "num_layers", "num_heads",
                                      "num_kv_heads", "head_dim", "rope_theta", "norm_eps",
                                      "qkv_bias", "qk_norm", "moe_every", "first_dense_layers")}
  out.update(mla=list(cfg.mla) if cfg.mla else None, moh=list(cfg.moh) if cfg.moh else None,
             moe=None)
  s = cfg.moe
  if s is not None:
    if s.router not in ROUTERS:
      raise ConversionError(f"model.moe.router={s.router!r} has no PyTorch export yet; "
                            f"supported: {', '.join(ROUTERS)}")
    out["moe"] = {**{f.name: getattr(s, f.name) for f in dataclasses.fields(s)},
                  "routed_k": s.routed_k, "fine_hidden": s.fine_hidden}
  return out


def _tensors(params, cfg):
  """(name, array) per exported tensor; ternary banks as 2-bit codes + scales."""
  ternary = cfg.moe is not None and cfg.moe.expert_bank == "ternary_swiglu"
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  for name, leaf in flat.items():
    if ternary and name.endswith("/moe/experts/wi"):
      from moejax.layers.ternary import pack_bank
      layer = name[:-len("/wi")]
      bank = pack_bank(np.asarray(leaf, np.float32), np.asarray(flat[layer + "/wo"], np.float32))
      for w in ("wi", "wo"):
        yield f"{layer}/{w}/packed", bank[w]["packed"]
        yield f"{layer}/{w}/scale", np.asarray(bank[w]["scale"], np.float32)
    elif ternary and name.endswith("/moe/experts/wo"):
      continue
    else:
      yield name, np.asarray(leaf, np.float32)


def export_torch(workdir: str, dst: str, *, max_shard_bytes: int = 2 << 30,
                 progress: bool = True) -> dict:
  from moejax.train.trainer import Trainer
  trainer = Trainer.from_workdir(workdir, mode="export")
  trainer.close()
  cfg = trainer.model.cfg
  config = torch_config(cfg)
  writer = ShardedWriter(dst, max_shard_bytes)
  try:
    for name, t in _progress(list(_tensors(jax.device_get(trainer.params), cfg)),
                             "export torch", progress):
      writer.add(name, t)
    writer.write_file("moejax_config.json", json.dumps(config, indent=2))
    writer.write_file("modeling_moejax.py", open(torch_model.__file__).read())
    writer.close()
  except BaseException:
    writer.abort()
    raise
  return {"dir": dst, "bytes": writer.total_bytes}

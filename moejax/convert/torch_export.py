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


def _plan(saved, cfg):
  """[(name, shape, dtype, read)] per exported tensor, ``read()`` producing it on demand;
  ternary banks as 2-bit codes + one scale per expert matrix (from the latent weights)."""
  from moejax.layers.ternary import WI_AXES, WO_AXES, pack_ternary, ternary_values
  ternary = cfg.moe is not None and cfg.moe.expert_bank == "ternary_swiglu"
  paths = [tuple(str(getattr(k, "key", k)) for k in p)
           for p, _ in jax.tree_util.tree_flatten_with_path(saved.shapes)[0]]
  out = []
  for path in paths:
    name, shape = "/".join(path), saved.shape(path)
    if ternary and path[-3:-1] == ("moe", "experts"):
      axes = WI_AXES if path[-1] == "wi" else WO_AXES
      codes = lambda path=path, axes=axes: ternary_values(saved.leaf(path), axes)
      packed_shape = shape[:-1] + (-(-shape[-1] // 4),)
      scale_shape = tuple(1 if i in axes else d for i, d in enumerate(shape))
      out += [(name + "/packed", packed_shape, np.uint8,
               lambda codes=codes: pack_ternary(np.asarray(codes()[0]))),
              (name + "/scale", scale_shape, np.float32,
               lambda codes=codes: np.asarray(codes()[1], np.float32))]
    else:
      out.append((name, shape, np.float32, lambda path=path: saved.leaf(path)))
  return out


def export_torch(workdir: str, dst: str, *, max_shard_bytes: int = 2 << 30,
                 progress: bool = True) -> dict:
  """Streams one parameter at a time (see ``hf.SavedModel``)."""
  from moejax.convert.hf import SavedModel, return_freed_memory
  return_freed_memory()
  saved = SavedModel(workdir)
  config = torch_config(saved.cfg)
  plan = _plan(saved, saved.cfg)
  writer = ShardedWriter(dst, [(n, s, d) for n, s, d, _ in plan], max_shard_bytes)
  try:
    for name, _, _, read in _progress(plan, "export torch", progress):
      writer.add(name, read())
    writer.write_file("moejax_config.json", json.dumps(config, indent=2))
    writer.write_file("modeling_moejax.py", open(torch_model.__file__).read())
    writer.close()
  except BaseException:
    writer.abort()
    raise
  return {"dir": dst, "bytes": writer.total_bytes}

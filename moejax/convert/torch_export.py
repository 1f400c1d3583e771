"""Export a moejax workdir to a self-contained PyTorch model: ``modeling_moejax.py`` (a copy of
``torch_model.py``: torch + safetensors only), ``moejax_config.json`` and safetensors weights
under moejax's parameter names. For the variants Hugging Face has no class for (mixture-of-heads,
ternary experts stored 2 bits per weight, soft merging, null experts, Chain-of-Experts) as well
as the HF-expressible ones.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from moejax.convert import torch_model
from moejax.convert.hf import _progress
from moejax.convert.safetensors_io import ShardedWriter
from moejax.errors import ConversionError

ROUTERS = ("topk_softmax", "top_p", "sigmoid")   # the others (expert choice, hash, recurrent,
                                                 # stochastic) route in ways torch_model.py
                                                 # does not have


def torch_config(cfg) -> dict:
  """The ``ModelConfig`` fields torch_model.py reads."""
  out = {f: getattr(cfg, f) for f in ("vocab_size", "d_model", "num_layers", "num_heads",
                                      "num_kv_heads", "head_dim", "rope_theta", "norm_eps",
                                      "qkv_bias", "qk_norm", "moe_every", "first_dense_layers")}
  out.update(mla=list(cfg.mla) if cfg.mla else None, moh=list(cfg.moh) if cfg.moh else None,
             moe=None)
  s = cfg.moe
  if s is not None:
    if s.expert_bank == "ternary_packed" and s.ternary_experts:
      raise ConversionError("a packed mixed-precision workdir has no PyTorch export: export the "
                            "workdir it was packed from (its ternary experts are quantised on "
                            "export)")
    if s.router not in ROUTERS:
      raise ConversionError(f"model.moe.router={s.router!r} has no PyTorch export yet; "
                            f"supported: {', '.join(ROUTERS)}")
    out["moe"] = {**{f.name: getattr(s, f.name) for f in dataclasses.fields(s)},
                  "routed_k": s.routed_k, "fine_hidden": s.fine_hidden,
                  "routed_sizes": list(s.routed_sizes)}
    # per-layer settings of compressed models (model.moe.layer_overrides)
    out["moe_layers"] = {str(i): {"routed_sizes": list(sp.routed_sizes),
                                  "expert_map": list(sp.expert_map)}
                         for i, sp in cfg.moe_layers}
  return out


def _plan(saved, cfg):
  """[(specs, read)] per parameter: specs [(name, shape, dtype)] of the tensors it exports and
  ``read()`` -> those arrays, reading the parameter once. Ternary banks export 2-bit codes +
  one scale per expert matrix (quantised from the latent weights)."""
  from moejax.layers.ternary import pack_wi, pack_wo
  from pallas_kernels.ternary import plane_rows
  ternary = cfg.moe is not None and cfg.moe.expert_bank == "ternary_swiglu"
  out = []
  for path in saved.paths():
    name, shape = "/".join(path), saved.shape(path)
    if ternary and path[-3:-1] == ("moe", "experts"):
      # the kernels' K-planar 2-bit layout (layers/ternary.py pack_wi/pack_wo), as packed
      # workdirs store it: codes [E, P(K), N] and one scale per output column [E, N]
      pack = pack_wi if path[-1] == "wi" else pack_wo
      e, k, n = shape[0], shape[1], int(np.prod(shape[2:]))

      def read(path=path, pack=pack):
        return list(pack(np.asarray(saved.leaf(path), np.float32)))
      out.append(([(name + "/packed", (e, plane_rows(k), n), np.uint8),
                   (name + "/scale", (e, n), np.float32)], read))
    else:
      out.append(([(name, shape, np.float32)], lambda path=path: [saved.leaf(path)]))
  return out


def export_torch(workdir: str, dst: str, *, max_shard_bytes: int = 2 << 30,
                 progress: bool = True) -> dict:
  """Streams one parameter at a time (see ``hf.SavedModel``)."""
  from moejax.convert.hf import SavedModel, return_freed_memory
  return_freed_memory()
  saved = SavedModel(workdir)
  config = torch_config(saved.cfg)
  plan = _plan(saved, saved.cfg)
  writer = ShardedWriter(dst, [spec for specs, _ in plan for spec in specs], max_shard_bytes)
  try:
    for specs, read in _progress(plan, "export torch", progress):
      for (name, _, _), array in zip(specs, read()):
        writer.add(name, array)
      array = None              # freed before the next read: one parameter in memory at a time
    writer.write_file("moejax_config.json", json.dumps(config, indent=2))
    writer.write_file("modeling_moejax.py", open(torch_model.__file__).read())
    writer.close()
  except BaseException:
    writer.abort()
    raise
  return {"dir": dst, "bytes": writer.total_bytes}

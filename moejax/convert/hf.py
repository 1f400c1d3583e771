"""Hugging Face safetensors checkpoints <-> moejax workdirs, walking a family's table.

  import_hf(src_dir, workdir)   HF directory (config.json + safetensors) -> a moejax workdir
                                (config.json + orbax checkpoint at step 0) that
                                ``run.py --mode=eval|sample|train`` accepts as it is
  export_hf(workdir, dst_dir)   a moejax workdir -> an HF directory ``from_pretrained`` loads

HF tensors are read one at a time (memory-mapped) and each moejax parameter is assembled and
checked as soon as its tensors are read; the export writes shards as it goes. Every tensor name
and shape is checked against the table before it is used: a mismatch names the tensor, both
shapes and the table entry. Outputs appear only complete (temporary directory + rename).

The moejax side holds the parameter tree in memory while orbax writes it (orbax saves a whole
tree), so the peak is about the model plus the largest tensor, not the largest tensor alone.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from moejax.convert import families
from moejax.convert.safetensors_io import ShardedWriter, TensorSource
from moejax.errors import ConversionError

DTYPES = ("keep", "float32", "bfloat16", "float16")


def _progress(items, desc, enabled):
  if not enabled:
    return items
  from tqdm import tqdm
  return tqdm(items, desc=desc, unit="tensor")


def _tree_set(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _tree_get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _abstract_params(config):
  from moejax.api import build_model
  from moejax.train.steps import _init_tokens
  from flax import linen as nn
  model = build_model(config)
  shapes = jax.eval_shape(lambda r: nn.meta.unbox(model.init({"params": r},
                                                             _init_tokens(config))["params"]),
                          jax.random.key(0))
  return model, shapes


def hf_config_to_moejax(hf: dict, base=None):
  """-> (family, validated moejax ConfigDict) for an HF config.json dict."""
  from moejax import config as config_lib
  fam, overrides = families.config_from_hf(hf)
  cfg = config_lib.apply_overrides(config_lib.base_config() if base is None else base, overrides)
  return fam, config_lib.validate(cfg)


def _to_numpy(x) -> np.ndarray:
  """safetensors' numpy reader returns bf16 as ml_dtypes arrays already; make f32 explicit."""
  return np.asarray(x)


def load_hf_params(src: str, config, fam, progress: bool = False,
                   rope_interleave: bool = False) -> dict:
  """The moejax parameter tree (float32 NumPy) of the HF checkpoint in ``src``."""
  model, shapes = _abstract_params(config)
  source = TensorSource(src)
  entries = families.table(fam, model.cfg, rope_interleave=bool(rope_interleave))
  tied = "lm_head.weight" not in source.weight_map
  params, used = {}, set()
  for entry in _progress(entries, f"import {fam.name}", progress):
    hf_names = entry.hf
    if entry.path == ("unembed",) and tied:
      hf_names = ("model.embed_tokens.weight",)       # tie_word_embeddings: lm_head = embed
    shape = tuple(_tree_get(shapes, entry.path).shape)
    want = families.hf_shapes(entry, shape)
    tensors = []
    for name, expected in zip(hf_names, want):
      if name not in source.weight_map:
        raise ConversionError(f"{src}: missing tensor {name} (table entry {'/'.join(entry.path)}"
                              f" <- {entry.kind}({', '.join(hf_names[:2])}"
                              f"{', ...' if len(hf_names) > 2 else ''}))")
      got = source.shape(name)
      if got != tuple(expected):
        raise ConversionError(f"{src}: tensor {name} has shape {got}, the {fam.name} table "
                              f"expects {tuple(expected)} (entry {'/'.join(entry.path)} "
                              f"{shape} <- {entry.kind})")
      tensors.append(_to_numpy(source.get(name)).astype(np.float32))
      used.add(name)
    value = families.TRANSFORMS[entry.kind][0](tensors, shape, entry)
    _tree_set(params, entry.path, np.ascontiguousarray(value, np.float32))
  unused = sorted(set(source.weight_map) - used)
  if unused:
    raise ConversionError(f"{src}: {len(unused)} tensors have no place in the {fam.name} table "
                          f"(an option moejax does not model?): {unused[:5]}")
  return params


def _write_workdir(workdir: str, config, params) -> str:
  """config.json + step 0 {step, params, fresh optimizer state} in the layout the Trainer
  restores (tested: eval/sample/train on the result), without building a Trainer (whose random
  initialisation would only be thrown away)."""
  from moejax.api import build_model
  from moejax.train import workdir as workdir_lib
  from moejax.train.checkpoint import Checkpointer
  from moejax.train.optimizer import frozen_mask, make_optimizer
  if workdir_lib.latest_checkpoint(workdir) is not None:
    raise ConversionError(f"{workdir}: already holds a checkpoint; convert into a new directory")
  tmp = os.path.abspath(workdir).rstrip("/") + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    tx = make_optimizer(config.train, frozen_mask(build_model(config).cfg))
    state = {"step": np.zeros((), np.int32), "params": params,
             "opt_state": jax.device_get(tx.init(params))}
    os.makedirs(tmp)
    workdir_lib.save_config(tmp, config)
    ckpt = Checkpointer(tmp, keep=config.train.keep_checkpoints)
    ckpt.save(0, state)
    ckpt.close()
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.isdir(workdir) and not os.listdir(workdir):
    os.rmdir(workdir)
  os.replace(tmp, workdir)
  return workdir


def import_hf(src: str, workdir: str, *, overrides: dict | None = None,
              progress: bool = True) -> dict:
  """HF checkpoint directory -> moejax workdir. ``overrides``: non-model settings for the
  workdir (data path, batch size, ...). Returns {'family', 'config', 'workdir'}."""
  path = os.path.join(src, "config.json")
  if not os.path.isfile(path):
    raise ConversionError(f"{src}: no config.json (not a Hugging Face checkpoint directory)")
  hf = json.load(open(path))
  fam, config = hf_config_to_moejax(hf)
  if overrides:
    from moejax import config as config_lib
    config = config_lib.apply_overrides(config, overrides)
  params = load_hf_params(src, config, fam, progress,
                          rope_interleave=hf.get("rope_interleave", False))
  _write_workdir(workdir, config, params)
  return {"family": fam.name, "config": config, "workdir": workdir}


def params_to_hf(params, cfg, fam, dtype: str = "float32", progress: bool = False):
  """Yields (HF name, NumPy array) for every tensor of the family's table. MLA weights are
  written in DeepSeek's interleaved-RoPE layout (``rope_interleave: true``, as released)."""
  table = families.table(fam, cfg, rope_interleave=fam.attention == "latent")
  for entry in _progress(table, f"export {fam.name}", progress):
    value = np.asarray(jax.device_get(_tree_get(params, entry.path)), np.float32)
    for name, t in zip(entry.hf, families.TRANSFORMS[entry.kind][1](value, entry)):
      yield name, np.ascontiguousarray(t).astype(jnp.dtype(dtype))


def export_hf(workdir: str, dst: str, *, family: str | None = None, dtype: str = "float32",
              max_shard_bytes: int = 2 << 30, progress: bool = True) -> dict:
  """moejax workdir -> HF checkpoint directory (config.json + safetensors shards)."""
  from moejax.train.trainer import Trainer
  if dtype not in DTYPES[1:]:
    raise ConversionError(f"--dtype={dtype!r}: allowed {DTYPES[1:]}")
  trainer = Trainer.from_workdir(workdir, mode="export")
  trainer.close()
  cfg = trainer.model.cfg
  fam = families.FAMILIES[family] if family else families.infer_family(cfg)
  families.check_exportable(fam, cfg)
  hf_config = families.config_to_hf(fam, cfg)
  hf_config.update(torch_dtype=dtype, dtype=dtype)
  writer = ShardedWriter(dst, max_shard_bytes)
  try:
    for name, t in params_to_hf(trainer.params, cfg, fam, dtype, progress):
      writer.add(name, t)
    writer.write_file("config.json", json.dumps(hf_config, indent=2))
    writer.close()
  except BaseException:
    writer.abort()
    raise
  return {"family": fam.name, "dir": dst, "bytes": writer.total_bytes}

"""Hugging Face safetensors checkpoints <-> moejax workdirs, walking a family's table.

  import_hf(src_dir, workdir)   HF directory (config.json + safetensors) -> a moejax workdir
                                (config.json + orbax checkpoint at step 0) that
                                ``run.py --mode=eval|sample|train`` accepts as it is
  export_hf(workdir, dst_dir)   a moejax workdir -> an HF directory ``from_pretrained`` loads

Both directions stream. Export: each parameter is read alone from the orbax checkpoint,
transformed and written to its shard straight away (shard headers are planned from the table up
front). Import: HF tensors are read one at a time (plain reads, no memory map), each parameter
is assembled as soon as its tensors are read and saved into the checkpoint before the next is
produced (orbax's partial save, ``train.checkpoint.write_params_streaming``). The peak is a
small multiple of the largest tensor, not the model (measured: export 2.4x, import 3.3-4.1x;
orbax's reader keeps a second copy of the array it restores, its writer two). The import keeps
the source dtype (``dtype="keep"``) unless told otherwise and writes no optimizer state (the
Trainer starts a fresh one). Every tensor name and shape is checked against the table before
use: a mismatch names the tensor, both shapes and the table entry. Outputs appear only complete
(temporary directory + rename).
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from moejax.convert import families, hf_config
from moejax.convert.safetensors_io import ShardedWriter, TensorSource
from moejax.train.checkpoint import tree_set
from moejax.errors import ConversionError

DTYPES = ("keep", "float32", "bfloat16", "float16")


def return_freed_memory() -> None:
  """Streaming frees a tensor-sized buffer per step; glibc's dynamic mmap threshold would
  move such sizes onto the heap after the first free and keep them there (measured: export
  peak 7x the largest tensor instead of ~2x). A fixed threshold returns them to the OS."""
  try:
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 20)     # M_MMAP_THRESHOLD: buffers >= 1 MiB are mmapped
    libc.mallopt(-1, 1 << 20)     # M_TRIM_THRESHOLD
  except (OSError, AttributeError):   # not glibc: nothing to tune
    pass


def _progress(items, desc, enabled):
  if not enabled:
    return items
  from tqdm import tqdm
  return tqdm(items, desc=desc, unit="tensor", disable=None)   # a bar on a terminal only


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
  fam, overrides = hf_config.config_from_hf(hf)
  cfg = config_lib.apply_overrides(config_lib.base_config() if base is None else base, overrides)
  return fam, config_lib.validate(cfg)


def iter_hf_params(src: str, config, fam, progress: bool = False,
                   rope_interleave: bool = False, dtype: str = "keep", stats: dict | None = None):
  """Yields (path, array) for every moejax parameter of ``src`` (a jax.Array in the
  checkpoint's dtype or ``dtype``), each assembled as soon as its HF tensors are read; a tensor
  the table has no place for raises at the end. ``stats`` (a dict) counts tensors and bytes."""
  model, shapes = _abstract_params(config)
  source = TensorSource(src)
  entries = families.table(fam, model.cfg, rope_interleave=bool(rope_interleave))
  tied = "lm_head.weight" not in source.weight_map
  used = set()
  stats = stats if stats is not None else {}
  stats.update(tensors=0, bytes=0)
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
      tensors.append(np.asarray(source.get(name)))
      used.add(name)
      stats["tensors"] += 1
      stats["bytes"] += tensors[-1].nbytes
    value = families.TRANSFORMS[entry.kind][0](tensors, shape, entry)
    del tensors
    # a jax.Array: orbax saves one with one write buffer, a NumPy array with a device copy
    # and a buffer (measured +1x against +2x); rebinding drops the NumPy copy before the yield
    value = jnp.asarray(value, value.dtype if dtype == "keep" else jnp.dtype(dtype))
    yield entry.path, value
    del value                         # not held while the next parameter's tensors are read
  unused = sorted(set(source.weight_map) - used)
  if unused:
    raise ConversionError(f"{src}: {len(unused)} tensors have no place in the {fam.name} table "
                          f"(an option moejax does not model?): {unused[:5]}")


def load_hf_params(src: str, config, fam, progress: bool = False,
                   rope_interleave: bool = False, dtype: str = "keep") -> dict:
  """The moejax parameter tree (NumPy, in the checkpoint's dtype or ``dtype``) of ``src``."""
  params = {}
  for path, value in iter_hf_params(src, config, fam, progress, rope_interleave, dtype):
    tree_set(params, path, np.asarray(value))
  return params


def _path_leaves(tree) -> list[tuple[tuple[str, ...], object]]:
  """(path, leaf) of every leaf of a nested dict, in tree order."""
  return [(tuple(str(getattr(k, "key", k)) for k in p), v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _write_workdir(workdir: str, config, params) -> str:
  """config.json + step 0 holding {step, params} (no optimizer state: the Trainer starts a
  fresh one), restored by the Trainer like any checkpoint (tested: sampling and training).
  ``params``: a tree, or (path, array) pairs written as they come (one array in memory)."""
  from moejax.train import workdir as workdir_lib
  from moejax.train.checkpoint import write_params_streaming
  if workdir_lib.latest_checkpoint(workdir) is not None:
    raise ConversionError(f"{workdir}: already holds a checkpoint; convert into a new directory")
  tmp = os.path.abspath(workdir).rstrip("/") + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    os.makedirs(tmp)
    workdir_lib.save_config(tmp, config)
    # small parameters (norms, routers) share a save up to a quarter of the largest (at 4
    # bytes per number), so no save holds more than half the largest, or one large array
    _, shapes = _abstract_params(config)
    largest = max(int(np.prod(s.shape)) * 4 for s in jax.tree.leaves(shapes))
    write_params_streaming(tmp, 0, _path_leaves(params) if isinstance(params, dict) else params,
                           batch_bytes=largest // 4)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.isdir(workdir) and not os.listdir(workdir):
    os.rmdir(workdir)
  os.replace(tmp, workdir)
  return workdir


def import_hf(src: str, workdir: str, *, overrides: dict | None = None, dtype: str = "keep",
              progress: bool = True) -> dict:
  """HF checkpoint directory -> moejax workdir. ``overrides``: non-model settings for the
  workdir (data path, batch size, ...); ``dtype``: stored parameter dtype ("keep" = the
  checkpoint's; training restores them as float32). Returns {'family', 'config', 'workdir',
  'tensors', 'bytes'} (the HF tensors read)."""
  if dtype not in DTYPES:
    raise ConversionError(f"--dtype={dtype!r}: allowed {DTYPES}")
  path = os.path.join(src, "config.json")
  if not os.path.isfile(path):
    raise ConversionError(f"{src}: no config.json (not a Hugging Face checkpoint directory)")
  return_freed_memory()
  hf = json.load(open(path))
  fam, config = hf_config_to_moejax(hf)
  if overrides:
    from moejax import config as config_lib
    config = config_lib.apply_overrides(config, overrides)
  stats = {}
  _write_workdir(workdir, config, iter_hf_params(
      src, config, fam, progress, rope_interleave=hf_config.rope_interleave(fam, hf), dtype=dtype,
      stats=stats))
  return {"family": fam.name, "config": config, "workdir": workdir, **stats}


class SavedModel:
  """A workdir's model read lazily: config, abstract parameter shapes, and one parameter at a
  time from the latest checkpoint (nothing else is loaded)."""

  def __init__(self, workdir: str):
    from moejax.train import workdir as workdir_lib
    from moejax.train.checkpoint import Checkpointer
    workdir_lib.require_trained(workdir, "export")
    self.config = workdir_lib.load_config(workdir)
    self.model, self.shapes = _abstract_params(self.config)
    self.cfg = self.model.cfg
    self._ckpt = Checkpointer(workdir)
    self.step = self._ckpt.latest_step()
    self._ckpt.close()
    self._saved = self._ckpt.saved_tree(self.step)["params"]     # metadata only, read once

  def paths(self) -> list[tuple[str, ...]]:
    """Every parameter's path, in tree order."""
    return [p for p, _ in _path_leaves(self.shapes)]

  def shape(self, path) -> tuple[int, ...]:
    return tuple(_tree_get(self.shapes, path).shape)

  def leaf(self, path, *, keep_dtype: bool = False) -> np.ndarray:
    """One parameter as float32 (or as stored, with ``keep_dtype``: packed uint8 codes)."""
    like = _tree_get(self._saved, path)
    like = jax.ShapeDtypeStruct(like.shape, like.dtype)
    leaf = np.asarray(self._ckpt.read_leaf(self.step, ("params",) + tuple(path), like))
    return leaf if keep_dtype else leaf.astype(np.float32, copy=False)


def export_hf(workdir: str, dst: str, *, family: str | None = None, dtype: str = "float32",
              max_shard_bytes: int = 2 << 30, progress: bool = True) -> dict:
  """moejax workdir -> HF checkpoint directory (config.json + safetensors shards), streaming
  one parameter at a time."""
  if dtype not in DTYPES[1:]:
    raise ConversionError(f"--dtype={dtype!r}: allowed {DTYPES[1:]}")
  return_freed_memory()
  saved = SavedModel(workdir)
  cfg = saved.cfg
  fam = families.FAMILIES[family] if family else families.infer_family(cfg)
  families.check_exportable(fam, cfg)
  fields = json.loads(saved.config.convert.hf_fields or "{}")
  # tied only while lm_head still is the embedding (fine-tuning may have untied them)
  tied = bool(fields.get("tie_word_embeddings")) and np.array_equal(
      saved.leaf(("unembed",)), saved.leaf(("embed", "embedding")).T)
  config_json = hf_config.config_to_hf(fam, cfg, fields, tied=tied)
  config_json.update(torch_dtype=dtype, dtype=dtype)
  table = [e for e in families.table(fam, cfg, rope_interleave=fam.attention == "latent")
           if not (tied and e.path == ("unembed",))]
  plan = [(name, shp, jnp.dtype(dtype)) for e in table
          for name, shp in zip(e.hf, families.hf_shapes(e, saved.shape(e.path)))]
  writer = ShardedWriter(dst, plan, max_shard_bytes)
  try:
    for entry in _progress(table, f"export {fam.name}", progress):
      value = saved.leaf(entry.path)
      if entry.experts is not None:     # merged experts: one HF expert per router output
        value = value[np.asarray(entry.experts)]
      for name, t in zip(entry.hf, families.TRANSFORMS[entry.kind][1](value, entry)):
        writer.add(name, np.ascontiguousarray(t).astype(jnp.dtype(dtype), copy=False))
      value = t = None          # freed before the next read: one parameter in memory at a time
    writer.write_file("config.json", json.dumps(config_json, indent=2))
    writer.close()
  except BaseException:
    writer.abort()
    raise
  return {"family": fam.name, "dir": dst, "bytes": writer.total_bytes, "tensors": len(plan)}

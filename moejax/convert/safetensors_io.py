"""Streaming safetensors I/O: one tensor in memory at a time, single files or sharded checkpoints.

Reading: ``TensorSource(directory)`` opens ``model.safetensors`` or the shards listed by
``model.safetensors.index.json``; ``get(name)`` reads one tensor (memory-mapped by safetensors,
copied into a NumPy array). Header problems (a truncated or corrupt file, an index naming a
missing shard or tensor) raise ``ConversionError`` naming the file, before any tensor is used.

Writing: ``ShardedWriter(directory, max_shard_bytes)`` takes tensors one by one, flushes a shard
file when the next tensor would overflow it, and writes the index at ``close()``. The writer
works in a temporary sibling directory that is renamed into place only when every shard is
complete, so a failed conversion never leaves a partial checkpoint behind.
"""
from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from moejax.errors import ConversionError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _check_header(path: str) -> None:
  """Validates the safetensors header and that the file holds every byte it declares."""
  size = os.path.getsize(path)
  with open(path, "rb") as fh:
    raw = fh.read(8)
    if len(raw) < 8:
      raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    n = struct.unpack("<Q", raw)[0]
    if n > size - 8:
      raise ConversionError(f"{path}: truncated or corrupt safetensors file (header claims {n} "
                            f"bytes, the file has {size})")
    try:
      header = json.loads(fh.read(n))
    except ValueError as err:
      raise ConversionError(f"{path}: corrupt safetensors header ({err})") from None
  end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
  if 8 + n + end > size:
    raise ConversionError(f"{path}: truncated safetensors file: its tensors need {8 + n + end} "
                          f"bytes, the file has {size}")


class TensorSource:
  """The tensors of a safetensors checkpoint directory, read one at a time."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
      try:
        weight_map = json.load(open(index))["weight_map"]
      except (ValueError, KeyError) as err:
        raise ConversionError(f"{index}: not a safetensors index ({err})") from None
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(directory, SINGLE)):
      files, weight_map = [SINGLE], None
    else:
      raise ConversionError(f"{directory}: no {SINGLE} or {INDEX}")
    self._handles = {}
    for f in files:
      path = os.path.join(directory, f)
      if not os.path.isfile(path):
        raise ConversionError(f"{index}: lists shard {f}, which is missing")
      _check_header(path)
      self._handles[f] = safe_open(path, framework="numpy")
    if weight_map is None:
      weight_map = {k: SINGLE for k in self._handles[SINGLE].keys()}
    for name, f in weight_map.items():
      if name not in self._handles[f].keys():
        raise ConversionError(f"{index}: maps {name} to {f}, which does not hold it")
    self.weight_map = weight_map

  def names(self) -> list[str]:
    return sorted(self.weight_map)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self.weight_map[name]].get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    if name not in self.weight_map:
      raise ConversionError(f"{self.directory}: no tensor {name}")
    return self._handles[self.weight_map[name]].get_tensor(name)


class ShardedWriter:
  """Writes tensors into shards of at most ``max_shard_bytes`` (one shard: model.safetensors)."""

  def __init__(self, directory: str, max_shard_bytes: int = 2 << 30, metadata=None):
    self.directory = os.path.abspath(directory)
    self.tmp = self.directory + ".partial"
    shutil.rmtree(self.tmp, ignore_errors=True)
    os.makedirs(self.tmp)
    self.max_bytes, self.metadata = max_shard_bytes, metadata or {"format": "pt"}
    self._pending, self._pending_bytes, self._shards, self.total_bytes = {}, 0, [], 0

  def add(self, name: str, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    if self._pending and self._pending_bytes + array.nbytes > self.max_bytes:
      self._flush()
    self._pending[name] = array
    self._pending_bytes += array.nbytes
    self.total_bytes += array.nbytes

  def _flush(self) -> None:
    name = f"shard-{len(self._shards):05d}.safetensors"
    save_file(self._pending, os.path.join(self.tmp, name), metadata=self.metadata)
    self._shards.append((name, list(self._pending)))
    self._pending, self._pending_bytes = {}, 0

  def write_file(self, name: str, text: str) -> None:
    with open(os.path.join(self.tmp, name), "w") as fh:
      fh.write(text)

  def close(self) -> None:
    """Flushes the last shard, names the shards, writes the index, renames into place."""
    if self._pending or not self._shards:
      self._flush()
    n = len(self._shards)
    if n == 1:
      os.replace(os.path.join(self.tmp, self._shards[0][0]), os.path.join(self.tmp, SINGLE))
    else:
      weight_map = {}
      for i, (tmp_name, names) in enumerate(self._shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(self.tmp, tmp_name), os.path.join(self.tmp, final))
        weight_map.update({k: final for k in names})
      with open(os.path.join(self.tmp, INDEX), "w") as fh:
        json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, fh,
                  indent=2)
    if os.path.exists(self.directory):
      shutil.rmtree(self.directory)
    os.replace(self.tmp, self.directory)

  def abort(self) -> None:
    shutil.rmtree(self.tmp, ignore_errors=True)

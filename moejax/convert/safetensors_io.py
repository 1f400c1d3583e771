"""Streaming safetensors I/O: one tensor in memory at a time, single files or sharded checkpoints.

Reading: ``TensorSource(directory)`` opens ``model.safetensors`` or the shards listed by
``model.safetensors.index.json``; ``get(name)`` reads one tensor's bytes straight into a new
NumPy array (a plain read at the offset the header gives, not a memory map: every page of a
mapped file that was touched counts in the process's RSS until it is unmapped, which made a
409 MB import peak at the whole file). Header problems (a truncated or corrupt file, an index
naming a missing shard or tensor) raise ``ConversionError`` naming the file, before any tensor
is used.

Writing: ``ShardedWriter(directory, plan, max_shard_bytes)`` is given every tensor's name, shape
and dtype up front, so each shard's header can be written before its data; tensors are then
added one by one, in plan order, and go straight to disk (nothing is buffered: the peak is the
tensor being written). The writer works in a temporary sibling directory renamed into place
only when every shard is complete, so a failed conversion never leaves a partial checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np

from moejax.errors import ConversionError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _check_header(path: str) -> tuple[dict, int]:
  """Validates the safetensors header and that the file holds every byte it declares;
  -> (header, offset of the data)."""
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
  return header, 8 + n


def _np_dtype(code: str, path: str, name: str) -> np.dtype:
  if code == "BF16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  if code not in _CODES:
    raise ConversionError(f"{path}: tensor {name} has dtype {code}, not one of {sorted(_CODES)}")
  return np.dtype(_CODES[code])


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
    self._entries = {}                 # file -> (header, data offset)
    for f in files:
      path = os.path.join(directory, f)
      if not os.path.isfile(path):
        raise ConversionError(f"{index}: lists shard {f}, which is missing")
      self._entries[f] = _check_header(path)
    if weight_map is None:
      weight_map = {k: SINGLE for k in self._entries[SINGLE][0] if k != "__metadata__"}
    for name, f in weight_map.items():
      if name not in self._entries[f][0] or name == "__metadata__":
        raise ConversionError(f"{index}: maps {name} to {f}, which does not hold it")
    self.weight_map = weight_map

  def names(self) -> list[str]:
    return sorted(self.weight_map)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[self.weight_map[name]][0][name]["shape"])

  def get(self, name: str) -> np.ndarray:
    if name not in self.weight_map:
      raise ConversionError(f"{self.directory}: no tensor {name}")
    f = self.weight_map[name]
    header, data = self._entries[f]
    info, path = header[name], os.path.join(self.directory, f)
    start, end = info["data_offsets"]
    out = np.empty(info["shape"], _np_dtype(info["dtype"], path, name))
    if out.nbytes != end - start:
      raise ConversionError(f"{path}: tensor {name} declares shape {info['shape']} "
                            f"({info['dtype']}, {out.nbytes} bytes) but {end - start} bytes")
    with open(path, "rb") as fh:
      fh.seek(data + start)
      if fh.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
        raise ConversionError(f"{path}: truncated while reading {name}")
    return out


_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
           "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
           "bool": "BOOL"}
_CODES = {v: k for k, v in _DTYPES.items() if k != "bfloat16"}


class ShardedWriter:
  """Streams tensors into safetensors shards of at most ``max_shard_bytes`` (one shard is
  named model.safetensors, several get an index)."""

  def __init__(self, directory: str, plan, max_shard_bytes: int = 2 << 30, metadata=None):
    """``plan``: [(name, shape, dtype)] in the order ``add`` will be called."""
    self.directory = os.path.abspath(directory)
    self.tmp = self.directory + ".partial"
    shutil.rmtree(self.tmp, ignore_errors=True)
    os.makedirs(self.tmp)
    self.metadata = metadata or {"format": "pt"}
    self.shards, size = [[]], 0
    for name, shape, dtype in plan:
      nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
      if self.shards[-1] and size + nbytes > max_shard_bytes:
        self.shards.append([])
        size = 0
      self.shards[-1].append((name, tuple(int(d) for d in shape), np.dtype(dtype)))
      size += nbytes
    n = len(self.shards)
    self.files = ([SINGLE] if n == 1 else
                  [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    self.total_bytes = 0
    self._shard, self._pos, self._fh = -1, 0, None

  def _open_next(self) -> None:
    if self._fh:
      self._fh.close()
    self._shard += 1
    self._pos = 0
    header, offset = {"__metadata__": self.metadata}, 0
    for name, shape, dtype in self.shards[self._shard]:
      end = offset + int(np.prod(shape)) * dtype.itemsize
      header[name] = {"dtype": _DTYPES[dtype.name], "shape": list(shape),
                      "data_offsets": [offset, end]}
      offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    self._fh = open(os.path.join(self.tmp, self.files[self._shard]), "wb")
    self._fh.write(struct.pack("<Q", len(raw)) + raw)

  def add(self, name: str, array: np.ndarray) -> None:
    if self._shard < 0 or self._pos == len(self.shards[self._shard]):
      self._open_next()
    want, shape, dtype = self.shards[self._shard][self._pos]
    if name != want or tuple(array.shape) != shape or array.dtype != dtype:
      raise ConversionError(f"ShardedWriter: got {name} {array.dtype}{list(array.shape)}, the "
                            f"plan says {want} {dtype}{list(shape)} next")
    self._fh.write(np.ascontiguousarray(array).tobytes())
    self._pos += 1
    self.total_bytes += array.nbytes

  def write_file(self, name: str, text: str) -> None:
    with open(os.path.join(self.tmp, name), "w") as fh:
      fh.write(text)

  def close(self) -> None:
    """Checks every planned tensor arrived, writes the index, renames into place."""
    if self._fh:
      self._fh.close()
    missing = (len(self.shards) - 1 - self._shard) + (
        len(self.shards[self._shard]) - self._pos if self._shard >= 0 else 0)
    if self._shard < 0 or missing:
      raise ConversionError(f"ShardedWriter: {missing} planned tensors were never written")
    if len(self.shards) > 1:
      weight_map = {name: f for f, shard in zip(self.files, self.shards) for name, _, _ in shard}
      with open(os.path.join(self.tmp, INDEX), "w") as fh:
        json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, fh,
                  indent=2)
    if os.path.exists(self.directory):
      shutil.rmtree(self.directory)
    os.replace(self.tmp, self.directory)

  def abort(self) -> None:
    if self._fh:
      self._fh.close()
    shutil.rmtree(self.tmp, ignore_errors=True)

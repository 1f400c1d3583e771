"""Byte-level tokenizer and a deterministic grain pipeline over a text file.

The training stream is random-access: ``batch(step)`` depends only on (seed, step), so resuming
from a checkpoint at step s continues with exactly the batches an uninterrupted run would see,
without saving iterator state, and every process of a multi-host run reads its own rows of the
same global batch. Windows are non-overlapping [seq_len + 1] slices, reshuffled
every epoch; validation windows come from the held-out tail of the text, in order.
"""
from __future__ import annotations

import dataclasses
import os

import grain
import numpy as np

from moejax.errors import ConfigError
from moejax.train.corpus import generate_corpus

VOCAB_SIZE = 256


def encode(text: str) -> np.ndarray:
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(tokens) -> str:
  return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


class _Windows:
  """Random-access source: window i = tokens[i*L : i*L + L + 1]."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self.tokens, self.seq_len = tokens, seq_len

  def __len__(self):
    return (len(self.tokens) - 1) // self.seq_len

  def __getitem__(self, i):
    s = int(i) * self.seq_len
    return self.tokens[s:s + self.seq_len + 1]


@dataclasses.dataclass
class TextData:
  """Global batches by index: ``batch(step)`` is the same [B, L+1] array however many processes
  or devices read it; a device reads only its ``rows`` (so multi-host runs reproduce one host)."""
  train_windows: grain.MapDataset   # infinite, shuffled per epoch
  val_windows: grain.MapDataset     # finite, in order
  batch_size: int
  seq_len: int
  num_train_tokens: int
  num_val_tokens: int
  source: str

  def batch(self, step: int, rows=None) -> np.ndarray:
    return self._read(self.train_windows, step, rows)

  def val_batch(self, i: int, rows=None) -> np.ndarray:
    return self._read(self.val_windows, i, rows)

  @property
  def num_val_batches(self) -> int:
    return len(self.val_windows) // self.batch_size

  def _read(self, windows, i, rows):
    rows = range(self.batch_size) if rows is None else rows
    return np.stack([windows[i * self.batch_size + r] for r in rows]).astype(np.int32)


def load_tokens(data_cfg, seed: int) -> tuple[np.ndarray, str]:
  """Token ids of the corpus and a description of where they come from.

  A file is read as raw bytes: the model is byte-level, so any encoding (or binary data) maps
  one byte to one token; decoding to text first would turn each invalid byte into the 3-byte
  replacement character.
  """
  if data_cfg.path:
    try:
      with open(data_cfg.path, "rb") as f:
        raw = f.read()
    except OSError as e:
      raise ConfigError(f"config.data.path: cannot read {data_cfg.path!r}: {e.strerror}") from None
    if not raw:
      raise ConfigError(f"config.data.path: {data_cfg.path!r} is empty")
    return np.frombuffer(raw, np.uint8).astype(np.int32), f"{data_cfg.path} ({len(raw):,} bytes)"
  text = generate_corpus(data_cfg.corpus_bytes, seed)
  return encode(text), f"generated corpus (seed {seed}, {data_cfg.corpus_bytes:,} bytes)"


def source_split(source: str, config, split: str) -> np.ndarray:
  """Token ids of the training or validation split (``split``: "train" | "val") of ``source``:
  a text file, or 'generated' (the embedded corpus), split as ``config.data`` splits its own."""
  data = config.data.copy_and_resolve_references()
  data.path = "" if source == "generated" else source
  if source != "generated" and not os.path.isfile(source):
    raise ConfigError(f"{source!r}: not a file (give a text file, or 'generated' for the "
                      "embedded corpus)")
  ids, _ = load_tokens(data, config.seed)
  cut = len(ids) - int(len(ids) * data.val_fraction)
  return ids[:cut] if split == "train" else ids[cut:]


def make_data(data_cfg, seed: int) -> TextData:
  tokens, source = load_tokens(data_cfg, seed)
  n_val = int(len(tokens) * data_cfg.val_fraction)
  train_tok, val_tok = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
  need = (data_cfg.seq_len + 1) * data_cfg.batch_size
  for name, part in (("training", train_tok), ("validation", val_tok)):
    if len(part) < need:
      raise ConfigError(
          f"config.data: the {name} split of {source} has {len(part)} tokens, fewer than one "
          f"batch (batch_size*(seq_len+1) = {need}); use a longer text, smaller "
          f"data.batch_size/data.seq_len, or another data.val_fraction")
  train = grain.MapDataset.source(_Windows(train_tok, data_cfg.seq_len)).shuffle(seed=seed).repeat()
  val = grain.MapDataset.source(_Windows(val_tok, data_cfg.seq_len))
  return TextData(train_windows=train, val_windows=val, batch_size=data_cfg.batch_size,
                  seq_len=data_cfg.seq_len,
                  num_train_tokens=len(train_tok), num_val_tokens=len(val_tok), source=source)

"""Byte-level tokenizer and a deterministic grain pipeline over a text file.

The training stream is random-access: ``batch(step)`` depends only on (seed, step), so resuming
from a checkpoint at step s continues with exactly the batches an uninterrupted run would see,
without saving iterator state. Windows are non-overlapping [seq_len + 1] slices, reshuffled
every epoch; validation windows come from the held-out tail of the text, in order.
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np

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
  train: grain.MapDataset        # infinite; train[step] -> [B, L+1] int32
  val: grain.MapDataset          # finite;   val[i]     -> [B, L+1] int32
  num_train_tokens: int
  num_val_tokens: int
  source: str

  def batch(self, step: int) -> np.ndarray:
    return self.train[step]


def load_text(data_cfg, seed: int) -> tuple[str, str]:
  if data_cfg.path:
    with open(data_cfg.path, encoding="utf-8", errors="replace") as f:
      return f.read(), data_cfg.path
  return generate_corpus(data_cfg.corpus_bytes, seed), f"generated corpus ({data_cfg.corpus_bytes} bytes)"


def make_data(data_cfg, seed: int, shard_index: int = 0, shard_count: int = 1) -> TextData:
  """Builds train/val pipelines. ``shard_*`` split windows across processes (multi-host)."""
  text, source = load_text(data_cfg, seed)
  tokens = encode(text)
  n_val = int(len(tokens) * data_cfg.val_fraction)
  train_tok, val_tok = tokens[:-n_val], tokens[-n_val:]
  need = (data_cfg.seq_len + 1) * data_cfg.batch_size
  for name, part in (("training", train_tok), ("validation", val_tok)):
    if len(part) < need:
      raise ValueError(
          f"config.data: the {name} split of {source} has {len(part)} tokens, fewer than one "
          f"batch (batch_size*(seq_len+1) = {need}); use a longer text, smaller "
          f"data.batch_size/data.seq_len, or another data.val_fraction")
  per_shard = data_cfg.batch_size // shard_count
  train = (grain.MapDataset.source(_Windows(train_tok, data_cfg.seq_len))[shard_index::shard_count]
           .shuffle(seed=seed).repeat().batch(per_shard, drop_remainder=True))
  val = (grain.MapDataset.source(_Windows(val_tok, data_cfg.seq_len))[shard_index::shard_count]
         .batch(per_shard, drop_remainder=True))
  return TextData(train=train, val=val, num_train_tokens=len(train_tok),
                  num_val_tokens=len(val_tok), source=source)

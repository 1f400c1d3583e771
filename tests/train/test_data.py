"""Tokenizer, generated corpus and the grain pipeline."""
import numpy as np
import pytest

from conftest import tiny_config
from moejax.config import ConfigError
from moejax.train import data as data_lib
from moejax.train.corpus import generate_corpus


def test_byte_tokenizer_roundtrip():
  text = "héllo, wörld — MoE!\n"
  tokens = data_lib.encode(text)
  assert tokens.dtype == np.int32 and tokens.max() < 256
  assert data_lib.decode(tokens) == text


def test_corpus_deterministic_and_structured():
  a, b, c = generate_corpus(5000, 0), generate_corpus(5000, 0), generate_corpus(5000, 1)
  assert a == b and a != c and len(a) >= 5000
  for line in a.splitlines():
    if " + " in line:
      lhs, rhs = line.split(" = ")
      x, y = map(int, lhs.split(" + "))
      assert x + y == int(rhs)                 # the arithmetic is right, hence learnable


def test_pipeline_deterministic_random_access_and_shapes():
  cfg = tiny_config().data
  d1, d2 = data_lib.make_data(cfg, seed=0), data_lib.make_data(cfg, seed=0)
  b = d1.batch(5)
  assert b.shape == (cfg.batch_size, cfg.seq_len + 1) and b.dtype == np.int32
  np.testing.assert_array_equal(b, d2.batch(5))
  assert not np.array_equal(d1.batch(0), data_lib.make_data(cfg, seed=1).batch(0))
  assert d1.num_val_batches >= cfg.eval_batches


def test_one_epoch_covers_every_window_once(tmp_path):
  path = tmp_path / "u.txt"
  path.write_text("".join(f"{i:07d}\n" for i in range(2000)))   # every window distinct
  cfg = tiny_config().data
  cfg.path = str(path)
  d = data_lib.make_data(cfg, seed=0)
  tokens = data_lib.encode(path.read_text())[:d.num_train_tokens]
  n = (len(tokens) - 1) // cfg.seq_len
  want = sorted(tuple(tokens[i * cfg.seq_len:(i + 1) * cfg.seq_len + 1]) for i in range(n))
  rows = np.concatenate([d.batch(i) for i in range(n // cfg.batch_size)])
  got = sorted(map(tuple, rows))
  assert len(set(got)) == len(got) and set(got) <= set(want)
  assert len(got) == n - n % cfg.batch_size
  assert not np.array_equal(rows[:cfg.batch_size], np.stack(want[:cfg.batch_size]))  # shuffled


def test_windows_are_contiguous_text_and_val_is_held_out(tmp_path):
  path = tmp_path / "t.txt"
  text = "".join(f"line {i:05d}\n" for i in range(3000))
  path.write_text(text)
  cfg = tiny_config().data
  cfg.path = str(path)
  d = data_lib.make_data(cfg, seed=0)
  train_text = data_lib.decode(d.batch(3)[0])
  assert train_text in text
  val_text = data_lib.decode(d.val_batch(0)[0])
  cut = int(len(text) * (1 - cfg.val_fraction))
  assert text.index(val_text) >= cut - 1


def test_rows_of_a_batch_are_slices_of_the_global_batch():
  cfg = tiny_config().data
  d = data_lib.make_data(cfg, 0)
  full = d.batch(7)
  np.testing.assert_array_equal(d.batch(7, rows=range(1, 3)), full[1:3])
  np.testing.assert_array_equal(d.val_batch(1, rows=[3]), d.val_batch(1)[3:])


def test_too_short_file_is_a_clear_error(tmp_path):
  path = tmp_path / "short.txt"
  path.write_text("too short")
  cfg = tiny_config().data
  cfg.path = str(path)
  with pytest.raises(ConfigError, match="fewer than one batch"):
    data_lib.make_data(cfg, 0)
  path.write_bytes(b"")
  with pytest.raises(ConfigError, match=r"config.data.path: '.*short.txt' is empty"):
    data_lib.make_data(cfg, 0)


def test_files_are_read_as_raw_bytes(tmp_path):
  """A byte-level model sees each byte once: Latin-1 text and invalid UTF-8 are not turned into
  3-byte replacement characters (300 KB of Latin-1 once became 544 K tokens)."""
  raw = ("café naïve Ünïcödé " * 1000).encode("latin-1") + bytes(range(256)) * 20
  path = tmp_path / "latin1.txt"
  path.write_bytes(raw)
  cfg = tiny_config().data
  cfg.path = str(path)
  d = data_lib.make_data(cfg, 0)
  assert d.num_train_tokens + d.num_val_tokens == len(raw)
  rows = np.concatenate([d.batch(i) for i in range(3)])
  for row in rows:               # every window is a contiguous slice of the file's bytes
    assert bytes(row.astype(np.uint8).tolist()) in raw

"""python -m moejax.convert --from=hf --to=moejax SRC DST   (or --from=moejax --to=hf|torch|packed).

Prints one line of what it did (tensors, bytes, seconds) and errors; ``--verbose`` adds every
library's log lines (orbax, absl, moejax's own).
"""
from __future__ import annotations

import logging
import sys
import time

from absl import app, flags

_FROM = flags.DEFINE_enum("from", None, ["hf", "moejax"], "Source format.")
_TO = flags.DEFINE_enum("to", None, ["hf", "moejax", "torch", "packed"],
                        "Destination format (torch: a self-contained PyTorch module + weights; "
                        "packed: a moejax workdir with 2-bit ternary experts).")
_FAMILY = flags.DEFINE_string("family", None, "HF family for --to=hf (default: inferred).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "Tensor dtype written by --to=hf.")
_SHARD = flags.DEFINE_integer("max_shard_mb", 2048, "Largest safetensors shard (--to=hf).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show every library's INFO log lines.")
flags.mark_flags_as_required(["from", "to"])


def _quiet() -> None:
  """Only warnings and errors reach the console (the converter prints its own summary)."""
  from absl import logging as absl_logging
  from moejax import logs
  logs.setup_console_logging()
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("moejax").setLevel(logging.WARNING)


def main(argv):
  from moejax.errors import ConfigError, ConversionError
  if len(argv) != 3:
    raise app.UsageError("usage: python -m moejax.convert --from=hf --to=moejax SRC DST")
  src, dst = argv[1:]
  if not _VERBOSE.value:
    _quiet()
  start = time.perf_counter()
  took = lambda: f"{time.perf_counter() - start:.1f} s"
  try:
    if (_FROM.value, _TO.value) == ("hf", "moejax"):
      from moejax.convert.hf import import_hf
      out = import_hf(src, dst)
      print(f"imported {out['family']} from {src} into the moejax workdir {dst}: "
            f"{out['tensors']} tensors, {out['bytes'] / 2**20:.1f} MiB, {took()}")
    elif (_FROM.value, _TO.value) == ("moejax", "hf"):
      from moejax.convert.hf import export_hf
      out = export_hf(src, dst, family=_FAMILY.value, dtype=_DTYPE.value,
                      max_shard_bytes=_SHARD.value << 20)
      print(f"exported {src} as {out['family']} into {dst}: {out['tensors']} tensors, "
            f"{out['bytes'] / 2**20:.1f} MiB, {took()}")
    elif (_FROM.value, _TO.value) == ("moejax", "torch"):
      from moejax.convert.torch_export import export_torch
      out = export_torch(src, dst, max_shard_bytes=_SHARD.value << 20)
      print(f"exported {src} as a PyTorch module into {dst}: {out['bytes'] / 2**20:.1f} MiB, "
            f"{took()}")
    elif (_FROM.value, _TO.value) == ("moejax", "packed"):
      from moejax.convert.packed import describe, pack_workdir
      out = pack_workdir(src, dst)
      print(f"packed the ternary experts of {src} into {dst}\n{describe(out)}")
    else:
      raise app.UsageError(f"--from={_FROM.value} --to={_TO.value}: convert hf<->moejax")
  except (ConversionError, ConfigError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  app.run(main)

"""python -m moejax.compress --workdir=runs/x --out=runs/x-pruned --method=frequency --keep=0.5

Writes a new workdir with a smaller model and prints parameters and bytes before/after (total
and active per token), the validation loss of both models on each evaluation source, and the
time taken; the same numbers go to OUT/compression.json. Exit status 2 for bad settings (one
line, nothing written).
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags

from moejax.compress.methods import METHODS

_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run to compress.")
_OUT = flags.DEFINE_string("out", None, "The new workdir (must not exist).")
_METHOD = flags.DEFINE_enum("method", None, list(METHODS),
                            "frequency | gate_mass | task | domain | neuron | merge | "
                            "mixed_precision (moejax/compress/methods.py).")
_KEEP = flags.DEFINE_float("keep", 0.5, "Fraction of each layer's routed-expert parameters "
                           "kept, in (0, 1].")
_CALIBRATION = flags.DEFINE_string(
    "calibration", None, "Calibration text file (the task or domain for --method=task|domain), "
    "or 'generated' (the embedded corpus); default: the workdir's own training data.")
_CAL_TOKENS = flags.DEFINE_integer("calibration_tokens", 8192, "Calibration tokens read.")
_EVAL = flags.DEFINE_list("eval_sources", None, "Text files (or 'generated') whose validation "
                          "split measures both models; default: calibration + the run's data.")
_EVAL_TOKENS = flags.DEFINE_integer("eval_tokens", 16384, "Tokens per evaluation source.")
_TASK_RATIO = flags.DEFINE_float("task_ratio", 0.1, "--method=task: an expert is a candidate "
                                 "for a token within this factor of its best probability.")
_MULTIPLE = flags.DEFINE_integer("neuron_multiple", 8, "--method=neuron: each expert keeps a "
                                 "multiple of this many hidden units.")
flags.mark_flags_as_required(["workdir", "out", "method"])


def main(argv):
  from absl import logging as absl_logging

  from moejax import logs
  from moejax.compress.pipeline import compress
  from moejax.errors import ConfigError
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.setup_console_logging()
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("moejax").setLevel(logging.WARNING)
  try:
    compress(_WORKDIR.value, _OUT.value, _METHOD.value, _KEEP.value, _CALIBRATION.value,
             calibration_tokens=_CAL_TOKENS.value, eval_sources=_EVAL.value,
             eval_tokens=_EVAL_TOKENS.value,
             options={"task_ratio": _TASK_RATIO.value, "neuron_multiple": _MULTIPLE.value})
  except ConfigError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  app.run(main)

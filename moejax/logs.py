"""Where log lines go: the console shows moejax's own lines and every library's warnings; the
workdir's ``logs/`` file keeps everything, orbax's and absl's INFO chatter included.

Library users get Python's defaults (nothing below WARNING is shown) until they call
``setup_console_logging``; ``run.py`` calls it, then ``log_to_file`` once the workdir is known.
"""
from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("moejax")
_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"
_seen: set = set()


def log_once(key, message: str, *args) -> None:
  """Logs ``message`` at INFO the first time ``key`` is seen in this process.

  Used at trace time (e.g. which MoE path a layer compiled to), so a jit retrace for new shapes
  does not repeat it, while a different choice (a new key) is logged again.
  """
  if key not in _seen:
    _seen.add(key)
    logger.info(message, *args)


def progress(message: str) -> None:
  """A progress line: printed (so library users see it without configuring logging) and kept
  in the log file, if one is set up."""
  print(message, flush=True)
  _progress.info(message)


_progress = logging.getLogger("moejax.progress")


class _ConsoleFilter(logging.Filter):
  """moejax INFO and above (progress lines are already printed); WARNING+ from everyone else."""

  def filter(self, record):
    if record.name == _progress.name:
      return False
    return record.levelno >= logging.WARNING or record.name.split(".")[0] == "moejax"


def _absl_handler():
  try:
    from absl import logging as absl_logging
    return absl_logging.get_absl_handler()
  except ImportError:
    return None


def setup_console_logging() -> None:
  """Console: moejax INFO lines (plain text) and warnings; INFO of other libraries is held for
  the log file. Replaces absl's stderr handler (which prints every library's INFO)."""
  root = logging.getLogger()
  absl = _absl_handler()
  if absl is not None and absl in root.handlers:
    root.removeHandler(absl)
  for h in list(root.handlers):
    if getattr(h, "_moejax_console", False):
      root.removeHandler(h)
  console = logging.StreamHandler(sys.stdout)
  console._moejax_console = True
  console.setFormatter(logging.Formatter("%(message)s"))
  console.addFilter(_ConsoleFilter())
  root.addHandler(console)
  root.setLevel(logging.INFO)
  try:   # absl-style loggers (orbax) check absl's verbosity before Python's level
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.INFO)
  except ImportError:
    pass


def log_to_file(workdir: str, process_index: int = 0) -> str:
  """Adds ``workdir/logs/run.log`` (``run.process<i>.log`` on other processes), all levels."""
  root = logging.getLogger()
  for h in list(root.handlers):
    if getattr(h, "_moejax_file", False):
      root.removeHandler(h)
      h.close()
  name = "run.log" if process_index == 0 else f"run.process{process_index}.log"
  path = os.path.join(workdir, "logs", name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handler = logging.FileHandler(path)
  handler._moejax_file = True
  handler.setFormatter(logging.Formatter(_FORMAT))
  root.addHandler(handler)
  return path

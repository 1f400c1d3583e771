"""Timing for benchmark scripts: interleaved rounds (drift on a noisy machine hits every case
alike, so ratios measured in one run stay meaningful) and XLA's compiled memory estimate."""
from __future__ import annotations

import time
from typing import Callable, Mapping

import numpy as np


def interleaved_medians(runs: Mapping[str, Callable[[], object]], repeats: int) -> dict:
  """Median seconds of each blocking callable: one warm-up (compile) call each, then
  ``repeats`` rounds that run every case once."""
  times = {name: [] for name in runs}
  for fn in runs.values():
    fn()
  for _ in range(repeats):
    for name, fn in runs.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(v)) for name, v in times.items()}


def compiled_memory(jitted, *args) -> tuple[int | None, int | None]:
  """(peak, temporaries) bytes of ``jitted`` at ``args``: arguments + outputs + temporaries -
  aliased, and temporaries alone (None where the backend reports nothing)."""
  m = jitted.lower(*args).compile().memory_analysis()
  if m is None:
    return None, None
  return (int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
              - m.alias_size_in_bytes), int(m.temp_size_in_bytes))

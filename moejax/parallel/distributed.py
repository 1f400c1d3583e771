"""Multi-host start-up: ``jax.distributed.initialize`` from flags or environment.

On Cloud TPU and SLURM, ``jax.distributed.initialize()`` discovers everything by itself; pass
``--coordinator_address/--num_processes/--process_id`` (or MOEJAX_COORDINATOR_ADDRESS,
MOEJAX_NUM_PROCESSES, MOEJAX_PROCESS_ID) elsewhere, e.g. several processes on one machine.
"""
from __future__ import annotations

import os

import jax

from moejax.errors import ConfigError


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> bool:
  """Initialises jax.distributed when asked to; returns whether it did."""
  env = os.environ.get
  coordinator_address = coordinator_address or env("MOEJAX_COORDINATOR_ADDRESS")
  num_processes = num_processes if num_processes is not None else env("MOEJAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else env("MOEJAX_PROCESS_ID")
  if coordinator_address is None:
    if num_processes is not None or process_id is not None:
      raise ConfigError("--num_processes/--process_id need --coordinator_address (host:port)")
    return False
  if num_processes is None or process_id is None:
    raise ConfigError("--coordinator_address needs --num_processes and --process_id")
  num_processes, process_id = int(num_processes), int(process_id)
  if not 0 <= process_id < num_processes:
    raise ConfigError(f"--process_id must be in [0, {num_processes}), got {process_id}")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True

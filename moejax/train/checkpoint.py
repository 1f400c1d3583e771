"""Orbax checkpoints of the training state, saved atomically.

Orbax writes each step into a temporary directory and renames it only once every array is on
disk, so an interrupted save never leaves a checkpoint that ``latest_step`` would pick up.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, workdir: str, keep: int = 2):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  @property
  def directory(self) -> str:
    return str(self.manager.directory)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state) -> None:
    """Starts an asynchronous save of ``state`` as ``step`` (a step already saved is kept)."""
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.StandardSave(state))

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self.manager.wait_until_finished()

  def restore(self, state_like, step: int | None = None):
    """Restores into the structure, dtypes and shardings of ``state_like``."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.manager.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

"""Orbax checkpoints of the training state, saved atomically.

Orbax writes each step into a temporary directory and renames it only once every array is on
disk, so an interrupted save never leaves a checkpoint that ``latest_step`` would pick up.

A checkpoint may hold only {step, params} (an imported model: ``moejax.convert``); restoring it
returns ``opt_state=None`` and the Trainer starts a fresh optimizer state. ``read_leaf`` reads
one parameter without the rest (the streaming export); ``write_params_streaming`` writes such a
checkpoint from parameters produced one at a time (the streaming import).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def _handler():
  """Orbax's handler for one saved item, used directly for partial reads: the Checkpointer
  wrappers look for step-level metadata in the item directory and log a warning to stderr
  (which `run.py --mode=sample` would print before the sample)."""
  return ocp.PyTreeCheckpointHandler()


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
    if "opt_state" in self.saved_keys(step):
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    # Outside the manager: it keeps the handler of its first use per item (a later save with
    # StandardSave would be refused after a PyTreeRestore through it).
    part = {"step": abstract["step"], "params": abstract["params"]}
    restore_args = ocp.checkpoint_utils.construct_restore_args(part)
    out = _handler().restore(epath.Path(self.item_dir(step)), args=ocp.args.PyTreeRestore(
        item=part, restore_args=restore_args, partial_restore=True))
    return {**out, "opt_state": None}

  def item_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step), "default")

  def saved_tree(self, step: int) -> dict:
    """The saved state's metadata tree (shapes and dtypes, nothing read)."""
    return dict(_handler().metadata(epath.Path(self.item_dir(step))).tree)

  def saved_keys(self, step: int) -> set:
    return set(self.saved_tree(step))

  def read_leaf(self, step: int, path: tuple[str, ...], like) -> np.ndarray:
    """One array of the saved state (``path`` into it; ``like``: its shape/dtype), as NumPy,
    reading nothing else."""
    item = tree_set({}, tuple(path), like)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    out = _handler().restore(epath.Path(self.item_dir(step)), args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True))
    for k in path:
      out = out[k]
    return out

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def tree_set(tree: dict, path: tuple[str, ...], value) -> dict:
  """Puts ``value`` at ``path`` in a nested dict (creating the levels); returns ``tree``."""
  node = tree
  for k in path[:-1]:
    node = node.setdefault(k, {})
  node[path[-1]] = value
  return tree


def write_params_streaming(workdir: str, step: int, leaves: Iterable[tuple[tuple, np.ndarray]],
                           batch_bytes: int = 1) -> str:
  """Checkpoint ``step`` of ``workdir`` holding {step, params} from ``(path, array)`` pairs
  produced one at a time, so that one batch of arrays is in memory, not the model: a batch is
  saved as soon as it holds ``batch_bytes`` (the default saves each array alone; small arrays
  batched save orbax's per-save cost), before the next array is produced.

  Orbax saves a whole tree per call; its partial save (``experimental.v1.partial``) adds
  disjoint subtrees to one checkpoint and commits them together. The committed item is then
  given a CheckpointManager step's layout (item ``default``), which ``Checkpointer`` restores
  like any other (tested: evaluation, sampling and training of imported models). Nothing
  appears under ``checkpoints/<step>`` until every array is on disk.
  """
  from orbax.checkpoint.experimental.v1 import partial
  root = os.path.abspath(os.path.join(workdir, "checkpoints"))
  final = os.path.join(root, str(step))
  if os.path.exists(final):
    raise FileExistsError(f"{final} exists: write into a new workdir")
  os.makedirs(root, exist_ok=True)
  staging = os.path.join(root, f"{step}.streaming")
  for stale in os.listdir(root):               # an interrupted save's leftovers
    if stale.startswith(f"{step}.streaming"):
      shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
  partial.save(staging, {"step": np.asarray(step, np.int32)})
  batch, size = {}, 0
  for path, value in leaves:
    value = value if isinstance(value, jax.Array) else np.asarray(value)
    tree_set(batch, ("params",) + tuple(path), value)
    size += value.nbytes
    del value
    if size >= batch_bytes:           # saved before the next array is produced
      partial.save(staging, batch)
      batch, size = {}, 0
  if batch:
    partial.save(staging, batch)
  partial.finalize(staging)
  os.replace(os.path.join(staging, "state"), os.path.join(staging, "default"))
  meta_path = os.path.join(staging, "_CHECKPOINT_METADATA")
  meta = json.load(open(meta_path))
  meta["item_handlers"] = {"default": "orbax.checkpoint._src.handlers.standard_checkpoint_handler."
                                      "StandardCheckpointHandler"}
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  os.replace(staging, final)
  return final

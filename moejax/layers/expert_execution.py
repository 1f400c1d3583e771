"""Where a block's routed experts run: on this device, or split over devices by a registered
execution. The block asks; it does not know about meshes.

An execution has three parts, each declared by the piece that owns it:
  * the expert bank declares its weights and their partitioning (``weights()``,
    ``weight_specs()``, ``run(weights, rows, group_sizes)``; layers/experts.py);
  * the dispatch planner declares which (token, slot) rows go to which expert and which are
    dropped (layers/dispatch.py);
  * an execution moves the planned rows to the devices that own their experts and back.
    ``LOCAL`` runs everything here. Distributed executions (expert parallelism over the
    ``expert`` mesh axis, in the parallel package) ``register`` themselves when
    their package is imported (``import moejax`` does it).

``execution_for(spec)`` -> (execution, ways): the first registered execution that splits this
block's experts over more than one device at trace time, else ``LOCAL`` with 1.
"""
from __future__ import annotations

from typing import Protocol

import jax

from moejax.layers.dispatch import PLANNERS, combine, dispatch

Array = jax.Array


class ExpertExecution(Protocol):
  name: str

  def ways(self, spec) -> int:
    """Devices this block's experts are split over at trace time (1: not applicable)."""

  def run(self, tokens: Array, routing, bank, spec) -> tuple[Array, Array]:
    """Routed experts' output [T, D] (gate-weighted) and the count of dropped slots."""

  def describe(self, spec, ways: int) -> str:
    """One line for the log: which program the layer traced to."""


class LocalExecution:
  """Every expert on this device: plan -> dispatch -> bank -> combine."""
  name = "local"

  def ways(self, spec) -> int:
    return 1

  def run(self, tokens: Array, routing, bank, spec):
    plan = PLANNERS[spec.dispatch](routing.dispatch_index, spec.num_routed,
                                   capacity_factor=spec.capacity_factor, align=spec.row_align)
    return combine(bank(dispatch(tokens, plan), plan.group_sizes), plan,
                   routing.weight), plan.num_dropped

  def describe(self, spec, ways: int) -> str:
    return "single-device dispatch"


LOCAL = LocalExecution()
_REGISTERED: list = []


def register(execution) -> None:
  """Adds a distributed execution (once per name; a re-import replaces it)."""
  _REGISTERED[:] = [e for e in _REGISTERED if e.name != execution.name] + [execution]


def execution_for(spec) -> tuple:
  """(execution, ways) for this block at trace time; ``spec.expert_parallel="none"`` keeps the
  experts local whatever the mesh."""
  if spec.expert_parallel != "none":
    for execution in _REGISTERED:
      ways = execution.ways(spec)
      if ways > 1:
        return execution, ways
  return LOCAL, 1

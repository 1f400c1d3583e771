"""The typed result of a compression method: what each MoE layer keeps, slices or merges."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """One MoE layer's edit. Expert ids are the layer's current routed experts (router outputs).

  keep:    experts kept, in the compressed bank's order (expert pruning; every expert otherwise)
  neurons: per kept expert, the hidden units it keeps (neuron pruning), else None
  groups:  per merged expert, its members with the dominant expert first (merging), else None
  weights: per merged expert, the members' merge weights (summing to 1), else None
  scores:  the importance the decision ranked by (per expert, or per hidden unit [E, h])
  ternary: the last ``ternary`` experts of ``keep`` become ternary (mixed precision)
  """
  keep: tuple[int, ...]
  neurons: tuple[np.ndarray, ...] | None = None
  groups: tuple[tuple[int, ...], ...] | None = None
  weights: tuple[np.ndarray, ...] | None = None
  scores: np.ndarray | None = None
  ternary: int = 0


@dataclasses.dataclass(frozen=True)
class CompressionPlan:
  method: str
  keep: float
  layers: dict          # {model layer index: LayerPlan}

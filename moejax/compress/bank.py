"""A layer's routed experts as a list of SwiGLU experts, and back: the common form every
compression method edits (select, slice hidden units, merge), whatever bank stored them.

Each expert is ``(wi [D, 2, h], wo [h, D])`` as NumPy arrays (gate and up fused as in the banks).
``to_bank`` stores them as the homogeneous bank (``wi``, ``wo``) or as the heterogeneous bank's
column blocks (layers/heterogeneous.py), whichever the layer's spec builds.
"""
from __future__ import annotations

import numpy as np

from moejax.errors import ConfigError
from moejax.layers.heterogeneous import column_blocks, expert_weights

Expert = tuple[np.ndarray, np.ndarray]

# Routers whose parameters hold one column (kernel [D, E]) or entry (bias [E]) per routed expert
# and nothing else that depends on which experts exist: these can lose experts.
PRUNABLE_ROUTERS = ("topk_softmax", "sigmoid", "top_p")


def from_bank(bank: dict, sizes) -> list[Expert]:
  """The experts of a bank's parameters (``sizes``: the spec's ``routed_sizes``)."""
  if "wi" in bank:
    wi, wo = np.asarray(bank["wi"], np.float32), np.asarray(bank["wo"], np.float32)
    return [(wi[e], wo[e]) for e in range(wi.shape[0])]
  j = range(len(column_blocks(sizes)))
  weights = (tuple(bank[f"wi_{b}"] for b in j), tuple(bank[f"wo_{b}"] for b in j))
  return [tuple(np.asarray(w, np.float32) for w in expert_weights(weights, sizes, i))
          for i in range(len(sizes))]


def sizes_of(experts: list[Expert]) -> tuple[int, ...]:
  return tuple(int(wo.shape[0]) for _, wo in experts)


def size_order(experts: list[Expert]) -> list[int]:
  """Expert order for the heterogeneous bank: largest first (stable), so every column block's
  members are consecutive and each block is one grouped matmul."""
  return sorted(range(len(experts)), key=lambda i: -experts[i][1].shape[0])


def to_bank(experts: list[Expert], blocks: bool) -> dict:
  """Bank parameters for ``experts`` (already in bank order): the heterogeneous bank's column
  blocks with ``blocks`` (the layer's spec lists expert sizes), else the homogeneous bank's."""
  sizes = sizes_of(experts)
  if not blocks:
    return {"wi": np.stack([wi for wi, _ in experts]), "wo": np.stack([wo for _, wo in experts])}
  out = {}
  for j, b in enumerate(column_blocks(sizes)):
    cols = slice(b.start, b.start + b.width)
    out[f"wi_{j}"] = np.stack([experts[i][0][..., cols] for i in b.members])
    out[f"wo_{j}"] = np.stack([experts[i][1][cols] for i in b.members])
  return out


def select_router(router: dict, keep, num_outputs: int) -> dict:
  """The router's parameters with only the outputs ``keep`` (in that order)."""
  keep = np.asarray(keep)
  out = {}
  for name, value in router.items():
    value = np.asarray(value)
    if value.shape and value.shape[-1] == num_outputs and name in ("kernel", "selection_bias"):
      value = value[..., keep]
    elif value.shape and num_outputs in value.shape:
      raise ConfigError(f"router parameter {name!r} {value.shape} holds per-expert values this "
                        "compression cannot select")
    out[name] = value
  return out


def swiglu_np(x: np.ndarray, expert: Expert) -> tuple[np.ndarray, np.ndarray]:
  """(hidden activations a [T, h], output [T, D]) of one expert, in float64 (references)."""
  wi, wo = expert
  up = np.einsum("td,dch->tch", x.astype(np.float64), wi.astype(np.float64))
  g = up[:, 0]
  a = g / (1.0 + np.exp(-g)) * up[:, 1]
  return a, a @ wo.astype(np.float64)

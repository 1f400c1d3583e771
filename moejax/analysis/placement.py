"""Expert placement over D devices from routing traces: a MILP against round-robin and greedy.

With expert parallelism, a token that leaves expert i of MoE layer m for expert j of layer m+1
crosses devices when the two experts live on different devices.
MoETuner (an ILP over the routing dependency between layers) places experts that way; this
is that program for the traffic term, with its load term as an optional constraint:

  minimise    sum_m sum_{i,j} W_m[i, j] y_{m,i,j}               expected cross-device moves
  subject to  sum_d x_{m,e,d} = 1                                each expert on one device
              sum_e x_{m,e,d} = E / D                            equal experts per device
              y_{m,i,j} >= x_{m,i,d} - x_{m+1,j,d}   for all d  (y = 1 iff i, j apart)
              sum_e L_{m,e} x_{m,e,d} <= (1 + slack) sum_e L_{m,e} / D   (if slack >= 0)
              x binary, y in [0, 1]; x_{0,0,0} = 1 (device names are interchangeable)

W_m[i, j] are the transition counts of fitted traces (analysis/routing.py), L the load. Solved
with ``scipy.optimize.milp`` (HiGHS) under a time limit; the result says whether it is proven
optimal. Beside it: round-robin, a greedy placement and its refinement by exact per-layer
assignments (``refine``), which the MILP is asked to beat. ``traffic`` scores any placement on
other (held-out) traces.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from moejax.errors import ConfigError


@dataclasses.dataclass
class Placement:
  """devices [M, E]: the device of every expert of every MoE layer; how it was found."""
  devices: np.ndarray
  method: str
  optimal: bool = False
  seconds: float = 0.0
  objective: float = float("nan")


def check(num_experts: int, num_devices: int) -> None:
  if num_devices < 1 or num_experts % num_devices:
    raise ConfigError(f"analyze.devices: must divide the routed experts ({num_experts}), got "
                     f"{num_devices}")


def traffic(devices: np.ndarray, transitions: np.ndarray) -> float:
  """Share of the token moves between consecutive MoE layers (counted by ``transitions``
  [M-1, E, E]) that cross devices."""
  total = transitions.sum()
  return cross_moves(devices, transitions) / float(total) if total else 0.0


def device_load(devices: np.ndarray, load: np.ndarray, num_devices: int) -> np.ndarray:
  """[M, D]: each device's share of each layer's load."""
  out = np.zeros((devices.shape[0], num_devices))
  for m in range(devices.shape[0]):
    np.add.at(out[m], devices[m], load[m])
  return out / np.maximum(out.sum(axis=1, keepdims=True), 1e-12)


def round_robin(num_layers: int, num_experts: int, num_devices: int) -> Placement:
  """Expert e on device e mod D at every layer (contiguous blocks would do as well: neither
  looks at the traces)."""
  check(num_experts, num_devices)
  return Placement(np.tile(np.arange(num_experts) % num_devices, (num_layers, 1)), "round_robin")


def greedy(transitions: np.ndarray, num_experts: int, num_devices: int) -> Placement:
  """Layer 0 round-robin; then layer by layer, the (expert, device) pair with the most moves
  from the previous layer's experts on that device is placed first, while devices have room."""
  check(num_experts, num_devices)
  start = time.perf_counter()
  per = num_experts // num_devices
  devices = [np.arange(num_experts) % num_devices]
  for t in transitions:
    prev = devices[-1]
    score = np.stack([t[prev == d].sum(axis=0) for d in range(num_devices)], axis=1)  # [E, D]
    place, room = -np.ones(num_experts, int), np.full(num_devices, per)
    for flat in np.argsort(-score, axis=None, kind="stable"):
      e, d = divmod(int(flat), num_devices)
      if place[e] < 0 and room[d] > 0:
        place[e], room[d] = d, room[d] - 1
    devices.append(place)
  return Placement(np.stack(devices), "greedy", seconds=time.perf_counter() - start)


def refine(start: Placement, transitions: np.ndarray, num_devices: int,
           max_sweeps: int = 20) -> Placement:
  """Coordinate descent from ``start``: with its neighbour layers fixed, one layer's cross-device
  moves are linear in its placement, so the best balanced placement of that layer is an exact
  assignment (``scipy.optimize.linear_sum_assignment`` over E experts x E device slots). Layers
  are re-placed in turn until a sweep changes nothing; the traffic never increases. For when
  the MILP cannot finish: a local optimum, not a proven one."""
  from scipy.optimize import linear_sum_assignment

  begin = time.perf_counter()
  devices = start.devices.copy()
  m_layers, e = devices.shape
  per = e // num_devices
  slot_device = np.repeat(np.arange(num_devices), per)
  for _ in range(max_sweeps):
    changed = False
    for m in range(m_layers):
      cost = np.zeros((e, num_devices))        # moves that cross devices if expert j is on d
      for d in range(num_devices):
        if m > 0:
          cost[:, d] += transitions[m - 1][devices[m - 1] != d].sum(axis=0)
        if m < m_layers - 1:
          cost[:, d] += transitions[m][:, devices[m + 1] != d].sum(axis=1)
      rows, cols = linear_sum_assignment(cost[:, slot_device])
      new = slot_device[cols[np.argsort(rows)]]
      if cost[np.arange(e), new].sum() < cost[np.arange(e), devices[m]].sum() - 1e-9:
        devices[m], changed = new, True
    if not changed:
      break
  return Placement(devices, f"{start.method}+refine", seconds=start.seconds +
                   time.perf_counter() - begin)


def cross_moves(devices: np.ndarray, transitions: np.ndarray) -> float:
  """The MILP's objective: token moves between consecutive layers that cross devices."""
  return sum(float(np.sum(t * (devices[m][:, None] != devices[m + 1][None, :])))
             for m, t in enumerate(transitions))


def milp(transitions: np.ndarray, num_experts: int, num_devices: int,
         load: np.ndarray | None = None, slack: float = -1.0,
         time_limit: float = 30.0, incumbent: Placement | None = None) -> Placement:
  """The MILP of the module docstring (``slack`` < 0: no load constraint).

  A run that hits ``time_limit`` returns its best placement found (``optimal`` False). With an
  ``incumbent`` (e.g. ``refine(greedy(...))``) the program asks for a strictly better placement
  (objective <= the incumbent's moves - 1; moves are integers): if it proves there is none, the
  incumbent is returned as optimal; if the limit passes first, the incumbent is returned as is.
  (HiGHS finds good solutions slowly here: the LP relaxation's bound is 0, so at 63 experts x 4
  layers it had not matched the greedy placement after 120 s.)"""
  from scipy.optimize import Bounds, LinearConstraint, milp as solve
  from scipy.sparse import coo_matrix

  check(num_experts, num_devices)
  start = time.perf_counter()
  m_layers, e, d = transitions.shape[0] + 1, num_experts, num_devices
  n_x = m_layers * e * d
  x = lambda m, i, k: (m * e + i) * d + k
  pairs = [(m, i, j) for m in range(m_layers - 1) for i in range(e) for j in range(e)
           if transitions[m, i, j] > 0]
  n = n_x + len(pairs)
  cost = np.zeros(n)
  cost[n_x:] = [transitions[m, i, j] for m, i, j in pairs]
  rows, cols, vals, lo, hi = [], [], [], [], []
  r = 0

  def row(entries, lower, upper):
    nonlocal r
    for c, v in entries:
      rows.append(r), cols.append(c), vals.append(v)
    lo.append(lower), hi.append(upper)
    r += 1

  for m in range(m_layers):
    for i in range(e):
      row([(x(m, i, k), 1.0) for k in range(d)], 1, 1)
    for k in range(d):
      row([(x(m, i, k), 1.0) for i in range(e)], e // d, e // d)
    if load is not None and slack >= 0:
      cap = (1 + slack) * load[m].sum() / d
      for k in range(d):
        row([(x(m, i, k), float(load[m, i])) for i in range(e)], -np.inf, cap)
  for p, (m, i, j) in enumerate(pairs):
    for k in range(d):
      row([(x(m, i, k), 1.0), (x(m + 1, j, k), -1.0), (n_x + p, -1.0)], -np.inf, 0)
  if incumbent is not None:
    if load is not None and slack >= 0:
      raise ValueError("milp: an incumbent placement is only used without the load constraint")
    row([(n_x + p, float(cost[n_x + p])) for p in range(len(pairs))], -np.inf,
        cross_moves(incumbent.devices, transitions) - 1)
  a = coo_matrix((vals, (rows, cols)), shape=(r, n))
  lower, upper = np.zeros(n), np.ones(n)
  lower[x(0, 0, 0)] = 1
  integrality = np.r_[np.ones(n_x), np.zeros(len(pairs))]
  res = solve(cost, constraints=LinearConstraint(a, lo, hi), integrality=integrality,
              bounds=Bounds(lower, upper), options={"time_limit": time_limit})
  seconds = time.perf_counter() - start
  if res.x is None and incumbent is not None:   # status 2: nothing better exists
    return Placement(incumbent.devices, "milp", optimal=res.status == 2, seconds=seconds,
                     objective=cross_moves(incumbent.devices, transitions))
  if res.x is None:
    fallback = greedy(transitions, num_experts, num_devices)
    return dataclasses.replace(fallback, method="milp (no solution in the time limit: greedy)",
                               seconds=seconds)
  devices = np.argmax(res.x[:n_x].reshape(m_layers, e, d), axis=-1)
  return Placement(devices, "milp", optimal=res.status == 0, seconds=seconds,
                   objective=float(res.fun))

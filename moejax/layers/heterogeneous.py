"""Heterogeneous experts (HMoE, Wang et al. 2024, arXiv 2408.10681): SwiGLU experts whose hidden
sizes h_i differ, stored at their true sizes and computed without paying for the widest.

  FFN_i(x) = (silu(x W_g^i) * (x W_u^i)) W_o^i,   W_g^i, W_u^i: [D, h_i],  W_o^i: [h_i, D]

Layout: size classes as cumulative column blocks. With the distinct sizes c_1 < ... < c_J and
c_0 = 0, column block j holds hidden units [c_{j-1}, c_j) of every expert with h_i >= c_j. A
SwiGLU is a sum over its hidden units, so

  FFN_i(x) = sum_{j : c_j <= h_i} swiglu(x Wi_{i,j}) Wo_{i,j}

and block j is one grouped matmul per projection over its member experts' rows only (gmm's
``group_offset`` skips every other expert's rows: no tile of theirs is visited, on the CPU path
and in both Pallas kernels). The hidden dimension is computed exactly as routed (no [E, D, H_max]
padding, no rounding), with J grouped matmuls per projection (J = 8 on the paper's geometric and
arithmetic ladders, 3 on its hybrid one). Members of a block are consecutive experts when the
sizes are listed largest first (the ladders are): one gmm per block; any other order still
works, at one gmm per run of consecutive members.

On the CPU path the column blocks are not run block by block: each run of same-size experts is
reassembled (a weight copy) and computed by one fused SwiGLU tile loop (ops/grouped_swiglu.py),
all runs writing one output, so nothing scales with rows x sizes (measured 0.9-1.1x the
homogeneous layer, which runs the same loop with one size, on the paper's ladders and a
HEAPr-pruned layer, against 0.3-0.7x block by block: experiments/bench_moe.py, docs/experts.md
"Heterogeneous experts"). The Pallas kernels
(GPU, TPU) run the blocks. Not chosen, by reasoning rather
than measurement: one gmm per size class with each class's own intermediate (activation memory
grows with the number of classes: M x the sum of the class widths), and a gmm over fixed-width
column tiles (many narrow matmuls for the widest expert, and rounding of the small ones). Also
measured and reverted: row buckets for wide blocks and merging the narrowest blocks (docs/experts.md).

The ladders (``expert_size_ladder``) are the paper's shapes scaled to a stated total hidden size
(section 4.1): geometric {1, 2, 4, ..., 128}, arithmetic {9, 11, ..., 23}, hybrid
{1, 1, 1, 1, 2, 2, 4, 4}, for 8 experts; for n experts, geometric keeps the 1:128 span
(ratio 128^(1/(n-1))), arithmetic the 9:23 span, hybrid halves/quarters (our generalisation).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from moejax.errors import ConfigError
from moejax.layers.dense import kernel_init, swiglu
from moejax.ops.grouped_matmul import gmm
from moejax.ops.grouped_swiglu import grouped_swiglu, use_fused

Array = jax.Array

LADDERS = ("geometric", "arithmetic", "hybrid")


def ladder_ratios(kind: str, n: int) -> np.ndarray:
  """Relative sizes of ``n`` experts on the paper's ladder ``kind`` (ascending)."""
  i = np.arange(n, dtype=np.float64)
  span = max(n - 1, 1)
  if kind == "geometric":
    return 128.0 ** (i / span)
  if kind == "arithmetic":
    return 9.0 + 14.0 * i / span
  if kind == "hybrid":
    return np.where(i < n // 2, 1.0, np.where(i < n // 2 + n // 4, 2.0, 4.0))
  raise ConfigError(f"model.moe.expert_size_ladder={kind!r}; allowed: 'none', "
                    + ", ".join(map(repr, LADDERS)))


def expert_size_ladder(kind: str, num_experts: int, total_hidden: int, *, multiple: int = 8,
                       repeats: int = 1) -> tuple[int, ...]:
  """The ladder's sizes for ``num_experts`` routed experts summing to ``total_hidden``, largest
  first, each a multiple of ``multiple`` (at least one multiple; the largest absorbs the
  rounding). ``repeats`` > 1 repeats a ladder of num_experts/repeats sizes, so every block of
  consecutive experts (one expert-parallel device's) has the same sizes."""
  if num_experts % repeats:
    raise ConfigError(f"model.moe.ladder_repeats={repeats} must divide the routed experts "
                      f"({num_experts})")
  n, total = num_experts // repeats, total_hidden // repeats
  if total_hidden % (repeats * multiple) or total < n * multiple:
    raise ConfigError(
        f"model.moe.expert_total_hidden={total_hidden}: the {kind} ladder needs a multiple of "
        f"ladder_repeats x {multiple} = {repeats * multiple} that gives each of the "
        f"{num_experts} experts at least {multiple} hidden units")
  r = ladder_ratios(kind, n)
  sizes = np.maximum(np.round(r / r.sum() * total / multiple), 1).astype(np.int64) * multiple
  sizes[-1] += total - sizes.sum()
  if sizes[-1] < multiple or np.any(np.diff(sizes) < 0):
    raise ConfigError(f"model.moe.expert_total_hidden={total_hidden} is too small for a {kind} "
                      f"ladder of {n} experts in multiples of {multiple}")
  return tuple(int(s) for s in sizes[::-1]) * repeats


@dataclasses.dataclass(frozen=True)
class ColumnBlock:
  """Hidden units [start, start + width) of the experts ``members`` (ascending ids)."""
  start: int
  width: int
  members: tuple[int, ...]

  def runs(self) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive member ids: (first expert, count, index in members)."""
    out, pos = [], 0
    for i, e in enumerate(self.members):
      if i and e != self.members[i - 1] + 1:
        out.append((self.members[pos], i - pos, pos))
        pos = i
    if self.members:
      out.append((self.members[pos], len(self.members) - pos, pos))
    return out


def column_blocks(sizes) -> tuple[ColumnBlock, ...]:
  """The cumulative column blocks of experts with hidden sizes ``sizes`` (see module doc)."""
  sizes = np.asarray(sizes)
  bounds = np.concatenate([[0], np.unique(sizes)])
  return tuple(ColumnBlock(int(lo), int(hi - lo), tuple(int(e) for e in np.nonzero(sizes >= hi)[0]))
               for lo, hi in zip(bounds[:-1], bounds[1:]))


def local_sizes(sizes, num_local: int) -> tuple[int, ...]:
  """The sizes of one expert-parallel shard's ``num_local`` experts: every shard's block of
  consecutive experts must hold the same sizes (its weights are one slice of each block)."""
  sizes = tuple(sizes)
  if num_local == len(sizes):
    return sizes
  local = sizes[:num_local]
  if len(sizes) % num_local or local * (len(sizes) // num_local) != sizes:
    raise ConfigError(
        f"model.moe.expert_sizes={list(sizes)}: expert parallelism over "
        f"{len(sizes) // max(num_local, 1)} devices gives each device {num_local} consecutive "
        f"experts, and every device's experts must have the same sizes; repeat one list of "
        f"{num_local} sizes (a ladder: set model.moe.ladder_repeats to the expert axis size)")
  return local


def size_runs(sizes) -> list[tuple[int, int]]:
  """Maximal runs of consecutive experts of one size: (first expert, count)."""
  out = []
  for i, h in enumerate(sizes):
    if out and sizes[out[-1][0]] == h and out[-1][0] + out[-1][1] == i:
      out[-1] = (out[-1][0], out[-1][1] + 1)
    else:
      out.append((i, 1))
  return out


def run_weights(weights, sizes, first: int, count: int) -> tuple[Array, Array]:
  """The full weights (wi [count, D, 2, h], wo [count, h, D]) of experts first .. first+count-1,
  all of size h, from the column blocks (their positions in each block are consecutive)."""
  wis, wos = weights
  parts = [(wi[b.members.index(first):b.members.index(first) + count],
            wo[b.members.index(first):b.members.index(first) + count])
           for b, wi, wo in zip(column_blocks(sizes), wis, wos) if first in b.members]
  return (jnp.concatenate([a for a, _ in parts], axis=-1),
          jnp.concatenate([b for _, b in parts], axis=1))


def run_heterogeneous_experts(weights, xs: Array, group_sizes: Array, sizes, *,
                              backend: str = "auto", dtype=jnp.float32,
                              path: str = "auto") -> Array:
  """rows [M, D] grouped by expert -> [M, D]; weights = (wi blocks, wo blocks), block j:
  wi [E_j, D, 2, w_j], wo [E_j, w_j, D] for the E_j members of ``column_blocks(sizes)[j]``.

  ``path``: "blocks" runs each column block as one grouped matmul per projection (every
  backend; the Pallas kernels' path); "fused" (CPU "xla" backend only) runs each run of
  same-size experts as one fused tile loop (ops/grouped_swiglu.py) writing its rows into one
  shared output, so no [M, .] pass exists per size; "auto" picks "fused" on the CPU path."""
  wis, wos = weights
  sizes = local_sizes(sizes, group_sizes.shape[0])
  xs = xs.astype(dtype)
  if use_fused(path, backend, "blocks"):
    runs = size_runs(sizes)
    classes = [tuple(w.astype(dtype) for w in run_weights(weights, sizes, first, count))
               for first, count in runs]
    return grouped_swiglu(xs, classes, group_sizes, offsets=[first for first, _ in runs])
  y = None
  for blk, wi, wo in zip(column_blocks(sizes), wis, wos):
    d, w = wi.shape[1], blk.width
    for first, count, pos in blk.runs():
      up = gmm(xs, wi[pos:pos + count].astype(dtype).reshape(count, d, 2 * w), group_sizes,
               group_offset=first, backend=backend)
      out = gmm(swiglu(up.reshape(-1, 2, w)), wo[pos:pos + count].astype(dtype), group_sizes,
                group_offset=first, backend=backend)
      y = out if y is None else y + out
  return y


def expert_weights(weights, sizes, i: int) -> tuple[Array, Array]:
  """Expert i's full SwiGLU weights (wi [D, 2, h_i], wo [h_i, D]) from the blocks (for
  references, conversion and analysis)."""
  wi, wo = run_weights(weights, sizes, i, 1)
  return wi[0], wo[0]


def hidden_flops(sizes, rows_per_expert, d_model: int) -> tuple[float, float]:
  """(FLOPs the routing asks for, FLOPs the column blocks compute) of one forward pass of the
  bank's matmuls, 2 * 3 * D per hidden unit per row; equal by construction of the layout
  (row tiles of the grouped matmul add their padding on top, as in a homogeneous bank)."""
  rows = np.asarray(rows_per_expert, np.float64)
  asked = float(np.sum(rows * np.asarray(sizes)) * 6 * d_model)
  done = sum(float(rows[list(b.members)].sum()) * b.width * 6 * d_model
             for b in column_blocks(sizes))
  return asked, done


def _scaled_init(base, scale: np.ndarray):
  def init(key, shape, dtype=jnp.float32):
    return base(key, shape, dtype) * jnp.asarray(scale, dtype).reshape(-1, 1, 1)
  return init


class HeterogeneousSwiGLUExperts(nn.Module):
  """Routed SwiGLU experts of hidden sizes ``sizes`` (one per routed expert), in column blocks.

  Parameters ``wi_j`` [E_j, D, 2, w_j] and ``wo_j`` [E_j, w_j, D] per block j; W_o is
  initialised with variance 1 / h_i, the expert's own fan-in (as a homogeneous bank's)."""
  sizes: tuple[int, ...]
  d_model: int
  dtype: jnp.dtype = jnp.float32
  gmm_backend: str = "auto"

  def setup(self):
    d, wis, wos = self.d_model, [], []
    for j, blk in enumerate(column_blocks(self.sizes)):
      e, w = len(blk.members), blk.width
      fan = np.sqrt(w / np.asarray([self.sizes[i] for i in blk.members], np.float64))
      wis.append(self.param(f"wi_{j}", nn.with_logical_partitioning(
          kernel_init(1, (2, 3), 0), ("expert", "embed", None, "mlp")), (e, d, 2, w), jnp.float32))
      wos.append(self.param(f"wo_{j}", nn.with_logical_partitioning(
          _scaled_init(kernel_init(1, 2, 0), fan), ("expert", "mlp", "embed")), (e, w, d),
          jnp.float32))
    self.wis, self.wos = tuple(wis), tuple(wos)

  def weights(self):
    return self.wis, self.wos

  def weight_specs(self):
    """Every block's expert dimension over 'expert' (device d holds slice d of each block:
    its own experts, when every device's experts have the same sizes, see ``local_sizes``)."""
    return tuple(P("expert") for _ in self.wis), tuple(P("expert") for _ in self.wos)

  def run(self, weights, xs, group_sizes):
    return run_heterogeneous_experts(weights, xs, group_sizes, self.sizes,
                                     backend=self.gmm_backend, dtype=self.dtype)

  def __call__(self, xs: Array, group_sizes: Array) -> Array:
    return self.run(self.weights(), xs, group_sizes)

"""Group metadata: turn ``group_sizes`` into the tile schedule every grouped-matmul kernel reads.

Rows of ``lhs [M, K]`` are sorted by group; group g owns rows [start_g, end_g). Rows are cut
into tiles of ``tm``. A group touches tiles floor(start/tm) .. floor((end-1)/tm), and a tile on
a group boundary is visited once per group it holds, with a row mask. The schedule is the list
of (tile, group) pairs in row order: all pairs of one tile are consecutive (so a kernel can keep
the output tile resident and accumulate), and all pairs of one group are consecutive (so the
transposed kernel can keep the weight-gradient block resident).

Expert parallelism (megablox's ``group_offset``): ``rhs`` may hold only ``num_local`` groups
starting at global group ``group_offset``; ``group_sizes`` still lists every group and rows of
other groups are skipped (the kernels leave them zero).

The number of pairs is data-dependent, the grid is not: the schedule has the static bound
``num_tiles + num_local - 1`` (each group boundary inside a tile adds one pair) and ``valid``
marks the real ones. Padding pairs repeat the last real pair's tile and group, so a kernel
that skips them never moves to another output block.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupMetadata:
  """Tile schedule for one grouped matmul (all arrays int32 / bool, device-resident).

  tile:   [P] row-tile index of each (tile, group) pair.
  group:  [P] local group index (0 .. num_local-1) of each pair.
  valid:  [P] bool, False for padding pairs past the real ones.
  starts: [num_local] first row of each local group.
  ends:   [num_local] one past the last row of each local group.
  num_valid: [] number of real pairs.
  """
  tile: Array
  group: Array
  valid: Array
  starts: Array
  ends: Array
  num_valid: Array

  @property
  def num_pairs(self) -> int:
    return self.tile.shape[0]


def num_pairs_bound(num_rows: int, tm: int, num_local: int) -> int:
  return -(-num_rows // tm) + num_local - 1


def make_group_metadata(group_sizes: Array, num_rows: int, tm: int, *, group_offset=0,
                        num_local: int | None = None) -> GroupMetadata:
  """Schedule of (row tile, local group) pairs for rows grouped by ``group_sizes``.

  Args:
    group_sizes: [G] rows per group (sum <= num_rows).
    num_rows: M, rows of lhs (static).
    tm: row tile size (static).
    group_offset: first global group held by this shard (int or traced int32 scalar).
    num_local: groups held by this shard (static); default all G.
  """
  group_sizes = group_sizes.astype(jnp.int32)
  num_groups = group_sizes.shape[0]
  num_local = num_groups if num_local is None else num_local
  ends_all = jnp.cumsum(group_sizes)
  starts_all = ends_all - group_sizes
  local = jnp.asarray(group_offset, jnp.int32) + jnp.arange(num_local, dtype=jnp.int32)
  starts, ends = starts_all[local], ends_all[local]
  sizes = ends - starts
  first = starts // tm
  tiles_per_group = jnp.where(sizes > 0, (ends - 1) // tm - first + 1, 0)
  num_pairs = num_pairs_bound(num_rows, tm, num_local)
  pair_group = jnp.repeat(jnp.arange(num_local, dtype=jnp.int32), tiles_per_group,
                          total_repeat_length=num_pairs)
  first_pair = jnp.cumsum(tiles_per_group) - tiles_per_group
  pair = jnp.arange(num_pairs, dtype=jnp.int32)
  tile = first[pair_group] + pair - first_pair[pair_group]
  num_valid = jnp.sum(tiles_per_group).astype(jnp.int32)
  valid = pair < num_valid
  # Padding pairs repeat the last real pair (or (tile 0, group 0) when there is none).
  last = jnp.maximum(num_valid - 1, 0)
  tile = jnp.where(valid, tile, jnp.where(num_valid > 0, tile[last], 0)).astype(jnp.int32)
  pair_group = jnp.where(valid, pair_group, jnp.where(num_valid > 0, pair_group[last], 0))
  return GroupMetadata(tile=tile, group=pair_group.astype(jnp.int32), valid=valid,
                       starts=starts, ends=ends, num_valid=num_valid)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupTiles:
  """Group-anchored tile schedule (the CPU loop's): each group's rows are cut into tiles of
  ``tm`` starting at the group's own first row, so a group of n rows costs ceil(n / tm) tiles
  and no tile is shared between groups (the aligned schedule above costs one extra tile per
  group boundary inside a tile). Tile starts are arbitrary rows, which suits a loop of dynamic
  slices but not TPU block indexing. Tiles are in row order (group by group), so a group's
  tiles are consecutive and a tile's rows past its group's end belong to later tiles.

  row:   [P] first row of each tile (a group's last tile may run past the group's end).
  group: [P] local group of each tile.
  ends:  [num_local] one past the last row of each local group.
  num_valid: [] number of real tiles (later entries are padding).
  """
  row: Array
  group: Array
  ends: Array
  num_valid: Array


def make_group_tiles(group_sizes: Array, num_rows: int, tm: int, *, group_offset=0,
                     num_local: int | None = None) -> GroupTiles:
  """Group-anchored tiles for rows grouped by ``group_sizes`` (arguments as
  ``make_group_metadata``); static bound num_rows // tm + num_local tiles."""
  group_sizes = group_sizes.astype(jnp.int32)
  num_local = group_sizes.shape[0] if num_local is None else num_local
  ends_all = jnp.cumsum(group_sizes)
  local = jnp.asarray(group_offset, jnp.int32) + jnp.arange(num_local, dtype=jnp.int32)
  ends, sizes = ends_all[local], group_sizes[local]
  tiles = (sizes + tm - 1) // tm
  bound = num_rows // tm + num_local
  group = jnp.repeat(jnp.arange(num_local, dtype=jnp.int32), tiles, total_repeat_length=bound)
  first = jnp.cumsum(tiles) - tiles
  row = ends[group] - sizes[group] + (jnp.arange(bound, dtype=jnp.int32) - first[group]) * tm
  return GroupTiles(row=row.astype(jnp.int32), group=group, ends=ends,
                    num_valid=jnp.sum(tiles).astype(jnp.int32))


def local_rows(group_sizes, num_rows: int, group_offset, num_local: int) -> Array:
  """[M] bool: rows that belong to groups group_offset .. group_offset + num_local - 1."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  off = jnp.asarray(group_offset, jnp.int32)
  lo = jnp.where(off > 0, ends[jnp.maximum(off - 1, 0)], 0)
  hi = ends[off + num_local - 1]
  rows = jnp.arange(num_rows)
  return (rows >= lo) & (rows < hi)

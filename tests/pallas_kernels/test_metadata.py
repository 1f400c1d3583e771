"""The tile schedule against a brute-force enumeration of (tile, group) overlaps."""
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from pallas_kernels.metadata import make_group_metadata, make_group_tiles, num_pairs_bound


def brute_force_pairs(sizes, tm, offset, num_local):
  ends = np.cumsum(sizes)
  starts = ends - sizes
  pairs = []
  for g in range(offset, offset + num_local):
    for row in range(starts[g], ends[g]):
      if (row // tm, g - offset) not in pairs:
        pairs.append((row // tm, g - offset))
  return pairs


def test_example_schedule():
  s = make_group_metadata(jnp.array([5, 0, 20, 3]), num_rows=32, tm=8)
  # rows: g0 [0,5) tile 0; g2 [5,25) tiles 0..3; g3 [25,28) tile 3
  pairs = [(int(t), int(g)) for t, g, v in zip(s.tile, s.group, s.valid) if v]
  assert pairs == [(0, 0), (0, 2), (1, 2), (2, 2), (3, 2), (3, 3)]
  assert int(s.num_valid) == 6 and s.num_pairs == num_pairs_bound(32, 8, 4) == 7
  # The padding pair repeats the last real pair, so kernels never switch output block for it.
  assert (int(s.tile[6]), int(s.group[6]), bool(s.valid[6])) == (3, 3, False)


@st.composite
def schedules(draw):
  """(sizes, num_rows, tm, group_offset, num_local): groups with empty ones and spare rows
  after them, and the local groups of an expert-parallel shard."""
  sizes = np.array(draw(st.lists(st.integers(0, 20), min_size=1, max_size=7)), np.int32)
  m = max(int(sizes.sum()) + draw(st.integers(0, 9)), 1)
  offset = draw(st.integers(0, len(sizes) - 1))
  num_local = draw(st.integers(1, len(sizes) - offset))
  return sizes, m, draw(st.sampled_from([1, 4, 8, 16])), offset, num_local


@settings(max_examples=25, deadline=None)
@given(schedules())
def test_schedule_matches_brute_force(problem):
  sizes, m, tm, offset, num_local = problem
  s = make_group_metadata(jnp.asarray(sizes), m, tm, group_offset=offset, num_local=num_local)
  want = brute_force_pairs(sizes, tm, offset, num_local)
  got = [(int(t), int(g)) for t, g, v in zip(s.tile, s.group, s.valid) if v]
  assert got == want                        # row order: tiles and groups both consecutive
  assert int(s.num_valid) == len(want) <= s.num_pairs
  ends = np.cumsum(sizes)
  np.testing.assert_array_equal(s.ends, ends[offset:offset + num_local])


@settings(max_examples=25, deadline=None)
@given(schedules())
def test_group_anchored_tiles_cover_each_local_row_once(problem):
  """Each local group's rows are cut into ceil(n / tm) tiles from its own first row, in row
  order; together they own every local row once and no other row."""
  sizes, m, tm, offset, num_local = problem
  s = make_group_tiles(jnp.asarray(sizes), m, tm, group_offset=offset, num_local=num_local)
  ends = np.cumsum(sizes)
  starts = ends - sizes
  local_groups = range(offset, offset + num_local)
  want = [(g - offset, r) for g in local_groups for r in range(starts[g], ends[g], tm)]
  got = [(int(g), int(r)) for g, r in zip(s.group[:int(s.num_valid)], s.row[:int(s.num_valid)])]
  assert got == want and len(s.row) >= len(want)
  owned = [r for g, r0 in got for r in range(r0, min(r0 + tm, int(s.ends[g])))]
  assert owned == [r for g in local_groups for r in range(starts[g], ends[g])]

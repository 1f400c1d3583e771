"""Routing statistics, placement and cache simulation on hand-made traces (NumPy references)."""
import itertools

import numpy as np
import pytest

from moejax.analysis import cache_sim, placement, routing
from moejax.analysis.traces import Traces

# 2 layers, 5 tokens, k = 2, E = 4 (-1: an unused slot)
HAND = np.array([
    [[0, 1], [0, 2], [1, -1], [3, 0], [2, 3]],
    [[2, 3], [2, 0], [3, -1], [1, 2], [0, 1]],
])


def test_load_and_frequency_by_hand():
  # layer 0 uses 0 x3, 1 x2, 2 x2, 3 x2 of 9 slots; layer 1: 0 x2, 1 x2, 2 x3, 3 x2
  np.testing.assert_allclose(routing.expert_load(HAND, 4), [[3, 2, 2, 2], [2, 2, 3, 2]] / np.array(9))
  np.testing.assert_allclose(routing.activation_frequency(HAND, 4),
                             [[3, 2, 2, 2], [2, 2, 3, 2]] / np.array(5))


def test_specialisation_formula():
  freqs = np.array([[[0.5, 0.2, 0.0]], [[0.0, 0.2, 0.0]]])    # S=2 sources, 1 layer, 3 experts
  spec = routing.specialisation(freqs)
  # expert 0 only source 0 -> 1; expert 1 equal -> 0; expert 2 unused -> 0
  np.testing.assert_allclose(spec, [[1.0, 0.0, 0.0]], atol=1e-12)
  q = np.array([0.3, 0.1]) / 0.4
  freqs = np.array([[[0.3]], [[0.1]]])
  np.testing.assert_allclose(routing.specialisation(freqs),
                             [[1 + np.sum(q * np.log(q)) / np.log(2)]])
  assert routing.most_specific(np.array([[0.5, 0.2, 0.0]]), np.array([[0.0, 0.2, 0.0]]), 1) == \
      [(0, 0)]


def test_transitions_affinity_and_mutual_information_against_loops():
  c = routing.transition_counts(HAND, 4)
  ref = np.zeros((4, 4))
  for t in range(HAND.shape[1]):
    for i in HAND[0, t][HAND[0, t] >= 0]:
      for j in HAND[1, t][HAND[1, t] >= 0]:
        ref[i, j] += 1
  np.testing.assert_array_equal(c[0], ref)
  aff = routing.affinity(c)[0]
  np.testing.assert_allclose(aff, ref / ref.sum(1, keepdims=True))
  p = ref / ref.sum()
  mi = sum(p[i, j] * np.log2(p[i, j] / (p[i].sum() * p[:, j].sum()))
           for i in range(4) for j in range(4) if p[i, j] > 0)
  np.testing.assert_allclose(routing.mutual_information(c), [mi])
  # independent layers: MI 0
  assert routing.mutual_information(np.ones((1, 3, 3)))[0] == pytest.approx(0.0, abs=1e-12)


def test_prediction_accuracy_by_hand():
  # layer 1 copies layer 0 shifted by one expert: a perfect affinity predictor
  rng = np.random.default_rng(0)
  first = np.stack([rng.permutation(4)[:2] for _ in range(60)])
  traces = np.stack([first, (first + 1) % 4])
  acc = routing.prediction_accuracy(traces[:, :30], traces[:, 30:], 4)
  np.testing.assert_allclose(acc["affinity"], [1.0])
  # the frequency baseline predicts the two most used experts of layer 1 (fit part)
  counts = np.bincount(traces[1, :30].ravel(), minlength=4)
  top = set(np.argsort(-counts, kind="stable")[:2])
  want = np.mean([len(top & set(row)) / 2 for row in traces[1, 30:]])
  np.testing.assert_allclose(acc["frequency"], [want])


def _structured(rng, n=400, e=4, layers=3):
  """Each token keeps to a 'lane' of experts {0,1} or {2,3} across layers, mostly."""
  lane = rng.integers(0, 2, n)
  out = []
  for _ in range(layers):
    jump = rng.random(n) < 0.1
    ln = np.where(jump, 1 - lane, lane)
    out.append(np.stack([2 * ln + rng.integers(0, 2, n), -np.ones(n, int)], axis=1))
  return np.stack(out)


def test_milp_is_feasible_optimal_and_beats_round_robin():
  rng = np.random.default_rng(1)
  traces = _structured(rng)
  trans = routing.transition_counts(traces, 4)
  best = placement.milp(trans, 4, 2, time_limit=10)
  assert best.optimal
  for row in best.devices:                          # feasible: 2 experts per device per layer
    np.testing.assert_array_equal(np.bincount(row, minlength=2), [2, 2])
  # optimal: no balanced placement of 3 layers x 4 experts on 2 devices moves fewer tokens
  rows = [np.array(r) for r in itertools.product(range(2), repeat=4) if sum(r) == 2]
  brute = min(placement.traffic(np.stack(p), trans) for p in itertools.product(rows, repeat=3))
  assert placement.traffic(best.devices, trans) == pytest.approx(brute)
  rr = placement.round_robin(3, 4, 2)
  greedy = placement.greedy(trans, 4, 2)
  test = routing.transition_counts(_structured(np.random.default_rng(2)), 4)
  assert placement.traffic(best.devices, test) < placement.traffic(rr.devices, test)
  assert placement.traffic(best.devices, trans) <= placement.traffic(greedy.devices, trans)


def test_refinement_never_increases_traffic_and_milp_proves_an_optimal_incumbent():
  rng = np.random.default_rng(4)
  traces = np.stack([rng.integers(0, 8, (300, 2)) for _ in range(3)])   # 8 experts, 3 layers
  trans = routing.transition_counts(traces, 8)
  rr = placement.round_robin(3, 8, 2)
  refined = placement.refine(rr, trans, 2)
  assert placement.traffic(refined.devices, trans) <= placement.traffic(rr.devices, trans)
  for row in refined.devices:
    np.testing.assert_array_equal(np.bincount(row, minlength=2), [4, 4])
  # each layer of the refined placement is the best one given its neighbours (enumerated)
  rows = [np.array(r) for r in itertools.product(range(2), repeat=8) if sum(r) == 4]
  for m in range(3):
    def with_row(r):
      d = refined.devices.copy()
      d[m] = r
      return placement.cross_moves(d, trans)
    assert placement.cross_moves(refined.devices, trans) == min(map(with_row, rows))
  # an incumbent that is already optimal: the MILP proves nothing better exists
  small = routing.transition_counts(_structured(np.random.default_rng(5)), 4)
  best = placement.milp(small, 4, 2, time_limit=10)
  proof = placement.milp(small, 4, 2, time_limit=10, incumbent=best)
  assert proof.optimal and placement.cross_moves(proof.devices, small) == best.objective


def test_milp_load_constraint_is_respected():
  rng = np.random.default_rng(3)
  traces = _structured(rng)
  trans = routing.transition_counts(traces, 4)
  load = np.array([[0.4, 0.3, 0.2, 0.1]] * 3)
  plan = placement.milp(trans, 4, 2, load, slack=0.0, time_limit=10)
  per_device = placement.device_load(plan.devices, load, 2)
  assert per_device.max() <= 0.5 + 1e-9
  with pytest.raises(ValueError, match="analyze.devices: must divide"):
    placement.round_robin(3, 4, 3)


def test_cache_policies_on_a_hand_traced_sequence():
  # one layer, k=1: requests 0 1 0 2 1 0 with 2 slots
  seq = np.array([[[0], [1], [0], [2], [1], [0]]])
  # LRU: 0m 1m 0h 2m(evict 1) 1m(evict 0) 0m(evict 2) -> 1 hit of 6
  assert cache_sim.simulate(seq, 2, "lru")["overall"] == pytest.approx(1 / 6)
  # LFU: 0m 1m 0h(0:2) 2m(evict 1: freq 1) 1m(evict 2: freq 1 vs 0: 2) 0h -> 2 hits
  assert cache_sim.simulate(seq, 2, "lfu")["overall"] == pytest.approx(2 / 6)
  # prefetch on a 2-layer trace where layer 1 = layer 0: predictor learns identity
  two = np.concatenate([seq, seq])
  aff = routing.affinity(routing.transition_counts(two, 3))
  res = cache_sim.simulate(two, 1, "prefetch", aff)
  # layer 0 (LRU, size 1): no repeats back to back -> 0 hits; layer 1: each prefetch is right
  np.testing.assert_allclose(res["hit_rate"], [0.0, 1.0])
  # every token's expert differs from the one cached before it: each prediction is a load
  assert res["prefetch_loads"] == 6
  with pytest.raises(ValueError, match="policy"):
    cache_sim.simulate(seq, 2, "fifo")


def test_traces_round_trip(tmp_path):
  t = Traces("x", np.arange(5), np.array([1, 3]), HAND.astype(np.int32),
             np.where(HAND >= 0, 0.5, 0.0).astype(np.float32), 4)
  path = t.save(str(tmp_path / "traces_x.npz"))
  with np.load(path) as f:                        # NumPy alone reads it
    assert set(f.files) == {"tokens", "layers", "experts", "gates", "num_experts"}
    assert f["experts"].dtype == np.int32 and f["experts"].shape == (2, 5, 2)
  back = Traces.load(path)
  np.testing.assert_array_equal(back.experts, HAND)
  assert back.source == "x" and back.num_experts == 4
  assert back.take(1, 3).experts.shape == (2, 2, 2)

"""Inference-time steering (layers/steering.py) against per-token NumPy loops and formulas."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from moejax.layers.routers.topk import topk_softmax
from moejax.layers.steering import LayerSteer, steer_routing

T, E, K = 40, 6, 2


def _routing(seed=0, t=T, e=E, k=K, renormalize=True):
  logits = jnp.asarray(np.random.default_rng(seed).normal(size=(t, e)) * 2, jnp.float32)
  return logits, topk_softmax(logits, k, renormalize)


def _steer(routing, **kw):
  out, stats = jax.jit(steer_routing, static_argnums=1)(routing, LayerSteer(**kw))
  return np.asarray(out.expert_index), np.asarray(out.weight), {k: int(v) for k, v in stats.items()}


def test_no_option_is_the_identity():
  _, r = _routing()
  idx, w, stats = _steer(r)
  np.testing.assert_array_equal(idx, r.expert_index)
  np.testing.assert_array_equal(w, r.weight)
  assert stats["steer_slots"] == T * K and stats["steer_changed_tokens"] == 0


def test_deactivation_equals_masking_the_logits_of_a_renormalising_router():
  logits, r = _routing(1)
  idx, w, stats = _steer(r, deactivate=(0, 3))
  ref = topk_softmax(logits.at[:, jnp.asarray([0, 3])].set(-jnp.inf), K, True)
  assert not np.isin(idx, [0, 3]).any()
  order = np.argsort(idx, axis=1)
  ref_order = np.argsort(np.asarray(ref.expert_index), axis=1)
  np.testing.assert_array_equal(np.take_along_axis(idx, order, 1),
                                np.take_along_axis(np.asarray(ref.expert_index), ref_order, 1))
  np.testing.assert_allclose(np.take_along_axis(w, order, 1),
                             np.take_along_axis(np.asarray(ref.weight), ref_order, 1), atol=1e-6)
  touched = np.isin(np.asarray(r.expert_index), [0, 3]).any(axis=1)
  assert stats["steer_changed_tokens"] == touched.sum() > 0


def test_forced_expert_is_always_selected_and_untouched_tokens_keep_their_gates():
  _, r = _routing(2, renormalize=False)
  idx, w, _ = _steer(r, force=(5,))
  assert (idx == 5).any(axis=1).all()
  had = (np.asarray(r.expert_index) == 5).any(axis=1)
  old_idx, old_w = np.asarray(r.expert_index), np.asarray(r.weight)
  for t in np.flatnonzero(had):          # same set of experts: the very same gates
    old = dict(zip(old_idx[t], old_w[t]))
    assert set(idx[t]) == set(old) and all(w[t, j] == old[e] for j, e in enumerate(idx[t]))
  # a changed token keeps its gate mass, split by router probability (NumPy reference)
  p = np.asarray(r.probs)
  for t in np.flatnonzero(~had):
    mass = np.asarray(r.weight)[t].sum()
    np.testing.assert_allclose(w[t], mass * p[t, idx[t]] / p[t, idx[t]].sum(), rtol=1e-5)


def test_reinforce_scales_the_gates_of_the_listed_experts():
  _, r = _routing(3)
  idx, w, _ = _steer(r, reinforce=((1, 2.5), (4, 0.5)))
  factor = np.ones(E)
  factor[1], factor[4] = 2.5, 0.5
  np.testing.assert_array_equal(idx, r.expert_index)
  np.testing.assert_allclose(w, np.asarray(r.weight) * factor[np.asarray(r.expert_index)],
                             rtol=1e-6)


@pytest.mark.parametrize("route", ["top1", "top3", "rank2"])
def test_weak_routes_against_numpy(route):
  _, r = _routing(4)
  idx, w, _ = _steer(r, route=route)
  p = np.asarray(r.probs)
  order = np.argsort(-p, axis=1, kind="stable")
  n = int(route[-1])
  want = order[:, :n] if route.startswith("top") else order[:, n - 1:n]
  got = idx[:, :want.shape[1]]
  np.testing.assert_array_equal(got, want)
  assert (idx[:, want.shape[1]:] == -1).all()
  mass = np.asarray(r.weight).sum(axis=1)
  sel = np.take_along_axis(p, want, 1)
  np.testing.assert_allclose(w[:, :want.shape[1]], mass[:, None] * sel / sel.sum(1, keepdims=True),
                             rtol=1e-5)


def _capacity_reference(index, weight, probs, factor, overflow, banned=()):
  """Per-token loop: keep slots in token order while the expert has room; then, token by token,
  move each overflowing slot to the most probable expert with room the token does not use."""
  t, k = index.shape
  e = probs.shape[1]
  used = index >= 0
  cap = max(int(np.ceil(factor * used.sum() / e)), 1)
  count = np.zeros(e, int)
  over = np.zeros_like(used)
  for i in range(t):
    for j in range(k):
      if used[i, j]:
        if count[index[i, j]] < cap:
          count[index[i, j]] += 1
        else:
          over[i, j] = True
  idx, w = index.copy(), weight.copy()
  dropped = rerouted = 0
  for i in range(t):
    held = set(index[i][index[i] >= 0])
    for j in range(k):
      if not over[i, j]:
        continue
      cands = [x for x in np.argsort(-probs[i], kind="stable")
               if count[x] < cap and x not in held and x not in banned]
      if overflow == "reroute" and cands:
        best = cands[0]
        w[i, j] = probs[i, best] * weight[i, j] / probs[i, index[i, j]]
        idx[i, j] = best
        count[best] += 1
        held.add(best)
        rerouted += 1
      else:
        idx[i, j], w[i, j] = -1, 0.0
        dropped += 1
  return idx, w, dropped, rerouted


@pytest.mark.parametrize("overflow", ["drop", "reroute"])
def test_capacity_against_a_per_token_loop(overflow):
  logits = jnp.asarray(np.random.default_rng(5).normal(size=(T, E)) * 2, jnp.float32)
  logits = logits.at[:, 0].add(2.0)               # expert 0 overflows
  r = topk_softmax(logits, K, True)
  idx, w, stats = _steer(r, capacity_factor=1.0, overflow=overflow)
  ref_idx, ref_w, dropped, rerouted = _capacity_reference(
      np.asarray(r.expert_index), np.asarray(r.weight), np.asarray(r.probs), 1.0, overflow)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-7)
  assert (stats["steer_dropped"], stats["steer_rerouted"]) == (dropped, rerouted)
  assert dropped + rerouted > 0
  assert np.bincount(idx[idx >= 0], minlength=E).max() <= int(np.ceil(T * K / E))


def test_skip_threshold_against_numpy_and_zero_is_identity():
  _, r = _routing(6, renormalize=False)
  idx, w, stats = _steer(r, skip_threshold=0.25)
  gates = np.asarray(r.weight)
  skip = gates < 0.25
  np.testing.assert_array_equal(idx, np.where(skip, -1, np.asarray(r.expert_index)))
  np.testing.assert_array_equal(w, np.where(skip, 0.0, gates))
  assert stats["steer_skipped"] == skip.sum() > 0
  idx0, w0, stats0 = _steer(r, skip_threshold=0.0)
  np.testing.assert_array_equal(idx0, r.expert_index)
  assert stats0["steer_skipped"] == 0


def test_variable_k_routing_keeps_each_tokens_slot_count():
  _, r = _routing(7, k=3)
  index = np.asarray(r.expert_index).copy()
  index[::2, 2] = -1                                   # top-p style: some tokens use 2 of 3
  weight = np.where(index >= 0, np.asarray(r.weight), 0.0)
  r = r.replace(expert_index=jnp.asarray(index), weight=jnp.asarray(weight, jnp.float32))
  idx, _, _ = _steer(r, deactivate=(int(index[0, 0]),))
  np.testing.assert_array_equal((idx >= 0).sum(1), (index >= 0).sum(1))

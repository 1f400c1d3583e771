"""Dispatch + experts + combine against a per-expert Python loop, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import dispatch as dl
from moejax.layers.experts import SwiGLUExperts

T, D, H, E, K = 24, 8, 6, 4, 2


def loop_reference(x, idx, w, wi, wo, capacity=None):
  """y_t = sum_s kept(t,s) w[t,s] FFN_{idx[t,s]}(x_t), FFN_e(u) = (silu(u Wg_e) * u Wu_e) Wo_e.

  Capacity: experts accept (token, slot) pairs in slot-major, token order until full.
  """
  idx = np.asarray(idx)
  used, kept = [0] * E, np.zeros(idx.shape, bool)
  for s in range(idx.shape[1]):
    for t in range(idx.shape[0]):
      e = idx[t, s]
      if e >= 0 and (capacity is None or used[e] < capacity):
        used[e] += 1
        kept[t, s] = True
  y = jnp.zeros_like(x)
  for e in range(E):
    for t, s in zip(*np.nonzero((idx == e) & kept)):
      u = x[t]
      ffn = (jax.nn.silu(u @ wi[e, :, 0]) * (u @ wi[e, :, 1])) @ wo[e]
      y = y.at[t].add(w[t, s] * ffn)
  return y, int((idx >= 0).sum() - kept.sum()), kept


def run_layer(x, idx, w, params, mode, cf=1.0, backend="xla", align=1):
  plan = (dl.plan_dropless(idx, E, align) if mode == "dropless"
          else dl.plan_capacity(idx, E, cf, align))
  experts = SwiGLUExperts(E, D, H, gmm_backend=backend)
  ys = experts.apply(params, dl.dispatch(x, plan), plan.group_sizes)
  return dl.combine(ys, plan, w), plan


def _setup(idx):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (T, D))
  w = jax.random.uniform(k2, idx.shape)
  params = SwiGLUExperts(E, D, H).init(k3, jnp.zeros((4, D)), jnp.array([1, 1, 1, 1]))
  params = jax.tree.map(lambda p: p.unbox() if hasattr(p, "unbox") else p, params,
                        is_leaf=lambda p: hasattr(p, "unbox"))
  return x, w, params


ROUTINGS = {
    "random": np.random.default_rng(0).integers(0, E, (T, K)),
    "empty_experts": np.random.default_rng(1).integers(0, 2, (T, K)) * 3,   # only 0 and 3
    "all_to_one": np.full((T, K), 2),
    "unused_slots": np.where(np.random.default_rng(2).random((T, K)) < 0.3, -1,
                             np.random.default_rng(3).integers(0, E, (T, K))),
}


@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("mode,cf", [("dropless", None), ("capacity", 0.5), ("capacity", 1.0),
                                     ("capacity", 4.0)])
def test_matches_loop_values_grads_and_drop_count(routing, mode, cf, align):
  idx = jnp.asarray(ROUTINGS[routing], jnp.int32)
  x, w, params = _setup(idx)
  cap = None if mode == "dropless" else dl.expert_capacity(T, K, E, cf)

  y, plan = run_layer(x, idx, w, params, mode, cf, align=align)
  wi, wo = params["params"]["wi"], params["params"]["wo"]
  y_ref, dropped, kept = loop_reference(x, idx, w, wi, wo, cap)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  assert int(plan.num_dropped) == dropped
  np.testing.assert_array_equal(plan.kept, kept)
  if routing == "all_to_one" and mode == "capacity":
    assert dropped == T * K - cap                 # overflow counted exactly

  ct = jax.random.normal(jax.random.key(9), y.shape)
  got = jax.grad(lambda x, w, p: jnp.sum(run_layer(x, idx, w, p, mode, cf, align=align)[0] * ct),
                 argnums=(0, 1, 2))(x, w, params)
  want = jax.grad(lambda x, w, p: jnp.sum(
      loop_reference(x, idx, w, p["params"]["wi"], p["params"]["wo"], cap)[0] * ct),
                  argnums=(0, 1, 2))(x, w, params)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_dropless_group_sizes_and_row_order():
  idx = jnp.array([[2, 0], [0, 1], [2, 2]], jnp.int32)
  plan = dl.plan_dropless(idx, 4)
  np.testing.assert_array_equal(plan.group_sizes, [2, 1, 3, 0])
  rows = np.asarray(plan.row_token)
  # every (token, slot) lands in a row of its expert, holding that token
  starts = np.concatenate([[0], np.cumsum(plan.group_sizes)])
  for t in range(3):
    for s in range(2):
      r = int(plan.slot_row[t, s])
      e = int(idx[t, s])
      assert starts[e] <= r < starts[e + 1] and rows[r] == t


def test_capacity_prefers_first_choices():
  # Expert 0 has capacity 1 (cf=0.5, T=2, k=2, E=2 -> C=1); token 1's first choice beats
  # token 0's second choice.
  idx = jnp.array([[1, 0], [0, 1]], jnp.int32)
  plan = dl.plan_capacity(idx, 2, 0.5)
  np.testing.assert_array_equal(plan.kept, [[True, False], [True, False]])
  assert int(plan.num_dropped) == 2


def test_under_jit():
  idx = jnp.asarray(ROUTINGS["random"], jnp.int32)
  x, w, params = _setup(idx)
  f = jax.jit(lambda x, i: run_layer(x, i, w, params, "capacity", 1.0)[0])
  np.testing.assert_allclose(f(x, idx), run_layer(x, idx, w, params, "capacity", 1.0)[0],
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["dropless", "capacity"])
def test_aligned_groups_start_on_multiples_and_pad_with_empty_rows(mode):
  idx = jnp.asarray(ROUTINGS["random"], jnp.int32)
  align = 8
  plan = (dl.plan_dropless(idx, E, align) if mode == "dropless"
          else dl.plan_capacity(idx, E, 1.0, align))
  sizes = np.asarray(plan.group_sizes)
  assert np.all(sizes % align == 0)
  starts = np.concatenate([[0], np.cumsum(sizes)])
  rows = np.asarray(plan.row_token)
  idx_np = np.asarray(idx)
  for e in range(E):
    tokens = rows[starts[e]:starts[e + 1]]
    real = tokens[tokens < T]
    # real rows first, then padding (T = empty row, reads zeros); each real row routes to e
    assert np.all(tokens[:len(real)] < T) and np.all(tokens[len(real):] == T)
    assert all(e in idx_np[t] for t in real)
  assert np.all(rows[starts[-1]:] == T) and plan.num_rows % align == 0


@pytest.mark.parametrize("path", ["fused", "gmm"])
def test_both_cpu_paths_of_the_bank_match_the_loop(path):
  """The bank's CPU paths (one fused tile loop, or two grouped matmuls) against the loop,
  values and gradients, with unused slots and capacity drops."""
  from moejax.layers.experts import run_swiglu_experts
  idx = jnp.asarray(ROUTINGS["unused_slots"], jnp.int32)
  x, w, params = _setup(idx)
  plan = dl.plan_capacity(idx, E, 1.0)
  cap = dl.expert_capacity(T, K, E, 1.0)

  def layer(x, w, p):
    ys = run_swiglu_experts((p["params"]["wi"], p["params"]["wo"]), dl.dispatch(x, plan),
                            plan.group_sizes, backend="xla", path=path)
    return dl.combine(ys, plan, w)

  ref = lambda x, w, p: loop_reference(x, idx, w, p["params"]["wi"], p["params"]["wo"], cap)[0]
  np.testing.assert_allclose(layer(x, w, params), ref(x, w, params), rtol=1e-5, atol=1e-5)
  ct = jax.random.normal(jax.random.key(9), (T, D))
  got = jax.grad(lambda *a: jnp.sum(layer(*a) * ct), argnums=(0, 1, 2))(x, w, params)
  want = jax.grad(lambda *a: jnp.sum(ref(*a) * ct), argnums=(0, 1, 2))(x, w, params)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)

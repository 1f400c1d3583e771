"""Every gmm backend against the per-group loop reference, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from moejax.ops import grouped_matmul as gm

TOL = {jnp.float32: dict(rtol=1e-4, atol=1e-4), jnp.bfloat16: dict(rtol=3e-2, atol=3e-2)}
BACKENDS = ["xla", "ragged_dot", "pallas"]   # pallas: interpreter on CPU


def numpy_gmm(lhs, rhs, sizes):
  """Independent oracle: explicit per-row loop in float64."""
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  row = 0
  for g, n in enumerate(sizes):
    out[row:row + n] = lhs[row:row + n] @ rhs[g]
    row += n
  return out


@st.composite
def problems(draw):
  g = draw(st.integers(1, 6))
  m = draw(st.integers(1, 70))
  # Split at most m rows into g groups; zeros (empty groups) are likely.
  cuts = sorted(draw(st.lists(st.integers(0, m), min_size=g - 1, max_size=g - 1)))
  total = draw(st.integers(0, m))
  cuts = [min(c, total) for c in cuts]
  sizes = np.diff([0, *cuts, total]).astype(np.int32)
  return m, sizes, draw(st.sampled_from([8, 16, 32]))


def _inputs(m, g, k=12, n=10, dtype=jnp.float32, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(k1, (m, k), jnp.float32).astype(dtype),
          jax.random.normal(k2, (g, k, n), jnp.float32).astype(dtype))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_backends_match_reference(problem, dtype):
  m, sizes, tile_m = problem
  lhs, rhs = _inputs(m, len(sizes), dtype=dtype)
  want = numpy_gmm(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)
  for backend in ["reference", *BACKENDS]:
    got = gm.gmm(lhs, rhs, jnp.asarray(sizes), backend=backend, tile_m=tile_m)
    assert got.dtype == dtype and got.shape == (m, rhs.shape[2])
    np.testing.assert_allclose(np.asarray(got, np.float32), want, **TOL[dtype], err_msg=backend)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_gradients_match_reference(problem):
  m, sizes, tile_m = problem
  lhs, rhs = _inputs(m, len(sizes), seed=1)
  ct = jax.random.normal(jax.random.key(2), (m, rhs.shape[2]))
  sizes = jnp.asarray(sizes)

  def grads(backend):
    f = lambda a, b: jnp.sum(gm.gmm(a, b, sizes, backend=backend, tile_m=tile_m) * ct)
    return jax.grad(f, argnums=(0, 1))(lhs, rhs)

  # Oracle gradients: d lhs[i] = ct[i] rhs[g]^T, d rhs[g] = sum_i lhs[i]^T ct[i].
  ends = np.cumsum(np.asarray(sizes))
  want_l, want_r = np.zeros(lhs.shape), np.zeros(rhs.shape)
  for g, (s, e) in enumerate(zip(ends - np.asarray(sizes), ends)):
    want_l[s:e] = np.asarray(ct)[s:e] @ np.asarray(rhs[g]).T
    want_r[g] = np.asarray(lhs)[s:e].T @ np.asarray(ct)[s:e]
  for backend in ["reference", *BACKENDS]:
    dl, dr = grads(backend)
    np.testing.assert_allclose(dl, want_l, rtol=1e-4, atol=1e-4, err_msg=backend)
    np.testing.assert_allclose(dr, want_r, rtol=1e-4, atol=1e-4, err_msg=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes", [[0, 0, 0], [40, 0, 0], [0, 0, 40], [13, 14, 13], [1, 0, 30]])
def test_edge_cases_under_jit(backend, sizes):
  lhs, rhs = _inputs(40, 3)
  f = jax.jit(lambda a, b, s: gm.gmm(a, b, s, backend=backend, tile_m=16))
  np.testing.assert_allclose(f(lhs, rhs, jnp.asarray(sizes, jnp.int32)),
                             numpy_gmm(lhs, rhs, sizes), rtol=1e-4, atol=1e-4)


def test_tgmm_matches_reference():
  lhs, _ = _inputs(30, 3)
  grad = jax.random.normal(jax.random.key(5), (30, 7))
  sizes = np.array([9, 0, 17])
  got = gm.tgmm(lhs, grad, jnp.asarray(sizes), 3, tile_m=8)
  start = 0
  for g, n in enumerate(sizes):
    np.testing.assert_allclose(got[g], np.asarray(lhs)[start:start + n].T @ np.asarray(grad)[start:start + n],
                               rtol=1e-4, atol=1e-4)
    start += n


def test_bad_inputs_raise_clear_errors():
  lhs, rhs = _inputs(8, 2)
  with pytest.raises(ValueError, match="backend='nope' is unknown; allowed"):
    gm.gmm(lhs, rhs, jnp.array([4, 4]), backend="nope")
  with pytest.raises(ValueError, match="contraction mismatch"):
    gm.gmm(lhs[:, :5], rhs, jnp.array([4, 4]))
  with pytest.raises(ValueError, match="group_sizes shape"):
    gm.gmm(lhs, rhs, jnp.array([8]))


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("m,tile_m", [(128, 128), (8, 128), (80, 128)])
def test_bf16_one_group_one_tile_under_jit_and_grad(backend, m, tile_m):
  """One group, one row tile: the shapes of decoding and small tests. In bf16 the CPU path once
  failed here under jit + grad (XLA:CPU has no bf16 x bf16 -> f32 dot thunk)."""
  lhs, rhs = _inputs(m, 1, k=8, n=16, seed=3)
  ct = jax.random.normal(jax.random.key(4), (m, 16))

  def f(a, b):   # f32 parameters computed in bf16, as the MoE layer does
    out = gm.gmm(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                 jnp.full((1,), a.shape[0], jnp.int32), backend=backend, tile_m=tile_m)
    return jnp.sum(out.astype(jnp.float32) * ct)

  dl, dr = jax.jit(jax.grad(f, argnums=(0, 1)))(lhs, rhs)
  bf = lambda x: np.asarray(x.astype(jnp.bfloat16), np.float64)
  want_l = np.asarray(ct, np.float64) @ bf(rhs)[0].T
  want_r = bf(lhs).T @ np.asarray(ct, np.float64)
  np.testing.assert_allclose(dl, want_l, rtol=3e-2, atol=5e-2 * np.abs(want_l).max())
  np.testing.assert_allclose(dr[0], want_r, rtol=3e-2, atol=5e-2 * np.abs(want_r).max())

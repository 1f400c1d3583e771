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
    got = jax.jit(lambda a, b, g, backend=backend: gm.gmm(a, b, g, backend=backend,
                                                          tile_m=tile_m))(
        lhs, rhs, jnp.asarray(sizes))
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
    return jax.jit(jax.grad(f, argnums=(0, 1)))(lhs, rhs)   # one program, not op by op

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


def test_xla_backend_takes_zero_rows():
  """An empty batch (M = 0) gives empty outputs and zero weight gradients, not a slicing error."""
  lhs, rhs = _inputs(0, 3)
  sizes = jnp.zeros(3, jnp.int32)
  out, pull = jax.vjp(lambda a, b: gm.gmm(a, b, sizes, backend="xla"), lhs, rhs)
  assert out.shape == (0, rhs.shape[2])
  dl, dr = pull(out)
  assert dl.shape == (0, lhs.shape[1]) and not np.any(np.asarray(dr))


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


def _oracle_options(lhs, rhs_kn, sizes, offset, existing):
  """float64 loop over the local groups; other rows keep ``existing`` (or 0)."""
  l64, r64 = np.asarray(lhs, np.float64), np.asarray(rhs_kn, np.float64)
  out = np.zeros((l64.shape[0], r64.shape[2])) if existing is None else np.asarray(existing, np.float64).copy()
  ends = np.cumsum(sizes)
  for j in range(r64.shape[0]):
    s, e = ends[offset + j] - sizes[offset + j], ends[offset + j]
    out[s:e] = l64[s:e] @ r64[j]
  return out


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("offset,transpose,existing", [(0, True, False), (2, False, True),
                                                       (1, True, True)])
def test_kernel_options_on_every_backend(backend, offset, transpose, existing):
  """group_offset, transpose_rhs, preferred_element_type (bf16 in, f32 out) and existing_out on
  every backend: values and the gradients of lhs, rhs and existing_out against float64 loops."""
  sizes = np.array([7, 0, 13, 9, 4], np.int32)       # 33 of 40 rows used
  m, k, n, num_local = 40, 12, 10, 2
  lhs, rhs_all = _inputs(m, 5, k=k, n=n, dtype=jnp.bfloat16, seed=7)
  rhs_kn = rhs_all[offset:offset + num_local]
  rhs = jnp.swapaxes(rhs_kn, 1, 2) if transpose else rhs_kn
  buf = jax.random.normal(jax.random.key(8), (m, n)) if existing else None
  ct = jax.random.normal(jax.random.key(9), (m, n))
  f32 = lambda x: x.astype(jnp.float32)

  def f(a, b, e):
    out = gm.gmm(a, b, jnp.asarray(sizes), backend=backend, tile_m=8, group_offset=offset,
                 transpose_rhs=transpose, preferred_element_type=jnp.float32, existing_out=e)
    return out, jnp.sum(out * ct)

  out = f(lhs, rhs, buf)[0]
  assert out.dtype == jnp.float32 and out.shape == (m, n)
  want = _oracle_options(f32(lhs), f32(rhs_kn), sizes, offset, buf)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-3, err_msg=backend)
  # Gradients: local rows get ct @ w^T, local weights lhs^T ct, existing_out ct on kept rows.
  grads = jax.grad(lambda a, b, e: f(a, b, e)[1], argnums=(0, 1, 2))(lhs, rhs, buf)
  ends = np.cumsum(sizes)
  lo, hi = ends[offset] - sizes[offset], ends[offset + num_local - 1]
  c64, l64, r64 = np.asarray(ct, np.float64), np.asarray(f32(lhs), np.float64), np.asarray(f32(rhs_kn), np.float64)
  want_l, want_r = np.zeros((m, k)), np.zeros(r64.shape)
  for j in range(num_local):
    s, e = ends[offset + j] - sizes[offset + j], ends[offset + j]
    want_l[s:e] = c64[s:e] @ r64[j].T
    want_r[j] = l64[s:e].T @ c64[s:e]
  if transpose:
    want_r = want_r.transpose(0, 2, 1)
  bf_tol = dict(rtol=3e-2, atol=0.3)          # the backward runs in bf16 (cotangent cast)
  assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
  np.testing.assert_allclose(f32(grads[0]), want_l, **bf_tol, err_msg=backend)
  np.testing.assert_allclose(f32(grads[1]), want_r, **bf_tol, err_msg=backend)
  if existing:
    keep = np.ones(m, bool)
    keep[lo:hi] = False
    np.testing.assert_allclose(grads[2], np.where(keep[:, None], c64, 0.0), atol=1e-6)


def test_tgmm_offset_and_existing_out():
  lhs, _ = _inputs(30, 3)
  grad = jax.random.normal(jax.random.key(5), (30, 7))
  sizes = np.array([9, 0, 17, 3])
  prior = jax.random.normal(jax.random.key(6), (2, 12, 7))
  got = gm.tgmm(lhs, grad, jnp.asarray(sizes), 2, tile_m=8, group_offset=2, existing_out=prior)
  l64, g64 = np.asarray(lhs, np.float64), np.asarray(grad, np.float64)
  np.testing.assert_allclose(got[0], prior[0] + l64[9:26].T @ g64[9:26], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got[1], prior[1] + l64[26:29].T @ g64[26:29], rtol=1e-4, atol=1e-4)


def test_option_errors_name_the_setting():
  lhs, rhs = _inputs(8, 2)
  with pytest.raises(ValueError, match="group_offset=2 with 2 local groups must lie in"):
    gm.gmm(lhs, rhs, jnp.array([4, 4, 0]), group_offset=2)
  with pytest.raises(ValueError, match="existing_out must have the output shape"):
    gm.gmm(lhs, rhs, jnp.array([4, 4]), existing_out=jnp.zeros((8, 3)))
  with pytest.raises(ValueError, match="contraction mismatch.*transpose_rhs"):
    gm.gmm(lhs, rhs, jnp.array([4, 4]), transpose_rhs=True)


@pytest.mark.parametrize("rows,groups,want", [(1024, 16, 64), (3072, 64, 32), (24576, 64, 128),
                                              (8192, 16, 128), (100, 16, 32), (7, 3, 32)])
def test_default_tile_follows_the_mean_group(rows, groups, want):
  """The largest power of two <= rows/groups, clamped to [32, 128] (the measured rule)."""
  assert gm.default_tile_m(rows, groups) == want

"""The grouped matmul over 2-bit packed ternary weights against a float64 per-group loop of the
unpacked weights, on every backend and both Pallas kernels (interpreter), values and d_lhs;
the K-planar packing against NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from moejax.ops import gmm_ternary
from pallas_kernels.ternary import PLANE_ALIGN, plane_rows


@pytest.mark.parametrize("k", [1, 4, 5, 13, 130, 515])
@pytest.mark.parametrize("fill", ["random", "zeros", "ones", "minus_ones"])
def test_planar_packing_round_trips(k, fill):
  rng = np.random.default_rng(k)
  shape = (2, k, 3)
  codes = {"random": rng.integers(-1, 2, size=shape), "zeros": np.zeros(shape, int),
           "ones": np.ones(shape, int), "minus_ones": -np.ones(shape, int)}[fill]
  packed = pk.pack_planes(codes)
  p = plane_rows(k)
  assert packed.dtype == np.uint8 and packed.shape == (2, p, 3) and p % PLANE_ALIGN == 0
  assert 4 * p >= k and p - PLANE_ALIGN < -(-k // 4)
  # byte (l, r, n) = sum_q (code[l, q p + r, n] + 1) << 2q, rows past k hold code 0
  full = np.zeros((2, 4 * p, 3), int)
  full[:, :k] = codes
  want = sum((full[:, q * p:(q + 1) * p] + 1) << (2 * q) for q in range(4))
  np.testing.assert_array_equal(packed, want)
  np.testing.assert_array_equal(pk.unpack_planes(jnp.asarray(packed), k), codes)


def test_packing_rejects_non_ternary_values():
  with pytest.raises(ValueError, match=r"values must be in \{-1, 0, 1\}"):
    pk.pack_planes(np.full((1, 4, 4), 2))


def _problem(k=40, n=24, sizes=(7, 0, 12, 5), rows=28, seed=0):
  rng = np.random.default_rng(seed)
  codes = rng.integers(-1, 2, size=(len(sizes), k, n))
  scale = (rng.random((len(sizes), n)) + 0.5).astype(np.float32)
  x = rng.normal(size=(rows, k)).astype(np.float32)
  return codes, scale, x, np.asarray(sizes, np.int32)


def _reference(x, codes, scale, sizes, offset=0, dout=None):
  """Float64 loop: rows of group offset + j use codes[j] * scale[j]; d_lhs for ``dout``."""
  x = x.astype(np.float64)
  ends = np.cumsum(sizes)
  out = np.zeros((x.shape[0], codes.shape[2]))
  dx = np.zeros_like(x)
  for j in range(codes.shape[0]):
    g = offset + j
    lo, hi = ends[g] - sizes[g], ends[g]
    w = codes[j] * scale[j].astype(np.float64)
    out[lo:hi] = x[lo:hi] @ w
    if dout is not None:
      dx[lo:hi] = dout[lo:hi] @ w.T
  return out, dx


@pytest.mark.parametrize("backend", ["reference", "ragged_dot", "xla", "pallas"])
def test_every_backend_matches_the_unpacked_loop(backend):
  codes, scale, x, sizes = _problem()
  packed = jnp.asarray(pk.pack_planes(codes))
  dout = np.random.default_rng(1).normal(size=(x.shape[0], codes.shape[2]))
  want, want_dx = _reference(x, codes, scale, sizes, dout=dout)
  f = lambda x: gmm_ternary(x, packed, scale, jnp.asarray(sizes), backend=backend)
  np.testing.assert_allclose(f(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)
  dx = jax.grad(lambda x: jnp.sum(f(x) * dout))(jnp.asarray(x))
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)


def test_gpu_kernel_in_the_interpreter_and_group_offset():
  codes, scale, x, sizes = _problem(k=70, n=40, sizes=(3, 6, 9, 2, 5), rows=30, seed=2)
  local = slice(1, 4)                    # an expert-parallel shard holding groups 1..3
  packed = jnp.asarray(pk.pack_planes(codes[local]))
  want, _ = _reference(x, codes[local], scale[local], sizes, offset=1)
  for target in ("gpu", "tpu"):
    got = pk.gmm_ternary(jnp.asarray(x), packed, jnp.asarray(scale[local]), jnp.asarray(sizes),
                         group_offset=1, target=target, interpret=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=target)
  for backend in ("xla", "ragged_dot"):
    got = gmm_ternary(jnp.asarray(x), packed, scale[local], jnp.asarray(sizes), group_offset=1,
                      backend=backend)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=backend)


def test_clear_errors():
  codes, scale, x, sizes = _problem()
  packed = jnp.asarray(pk.pack_planes(codes))
  with pytest.raises(ValueError, match="needs packed uint8 planes of 16 rows"):
    gmm_ternary(jnp.asarray(x), packed.astype(jnp.int32), scale, jnp.asarray(sizes))
  with pytest.raises(ValueError, match="scale needs L \\* N = 96"):
    pk.gmm_ternary(jnp.asarray(x), packed, jnp.ones((4, 5)), jnp.asarray(sizes), target="gpu",
                   interpret=True)

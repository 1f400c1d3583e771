"""Pallas grouped-matmul kernels (TPU and GPU variants) in the interpreter against NumPy.

The TPU kernel runs under the TPU-semantics interpreter with uninitialised memory filled with
NaN, so a block the kernel forgets to initialise, or reads before writing, fails the test.
On a GPU/TPU machine (``JAX_PLATFORMS=cuda pytest tests/pallas_kernels``; conftest defaults to
CPU) every test also runs the native kernel.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels as pk

INTERPRET = {"tpu": pltpu.InterpretParams(uninitialized_memory="nan"), "gpu": True}
# Small explicit tiles so tiny problems span several tiles; K=24, N=40 are deliberately not
# multiples of the GPU tiles (padded) and use full-dimension blocks on TPU.
TILES = {"tpu": [(8, 24, 40), (16, 24, 40)], "gpu": [(16, 16, 16), (32, 16, 32)]}
TARGETS = ["tpu", "gpu"]
# On a machine with a GPU or TPU the same tests also run the kernels natively (not interpreted),
# with the target's own tile constraints (TPU: 128-lane blocks, so use the default tiling).
if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu"):
  _native = pk.default_target()
  INTERPRET["native"] = False
  TILES["native"] = [None, None] if _native == "tpu" else TILES["gpu"]
  TARGETS.append("native")


def _target(name):
  return pk.default_target() if name == "native" else name
TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-4), jnp.bfloat16: dict(rtol=2e-2, atol=1e-1)}
K, N = 24, 40
SLOW = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
  """Group sizes with empty groups, one full group, ragged tails; M not a tile multiple."""
  g = draw(st.integers(1, 5))
  kind = draw(st.sampled_from(["random", "one_group", "all_empty"]))
  if kind == "one_group":
    sizes = np.zeros(g, np.int32)
    sizes[draw(st.integers(0, g - 1))] = draw(st.integers(1, 45))
  elif kind == "all_empty":
    sizes = np.zeros(g, np.int32)
  else:
    sizes = np.array(draw(st.lists(st.integers(0, 20), min_size=g, max_size=g)), np.int32)
  m = max(1, int(sizes.sum()) + draw(st.integers(0, 11)))
  return sizes, m


def oracle(lhs, rhs, sizes, offset=0, num_local=None):
  """float64 loops: out rows of local groups; d_rhs per local group."""
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  num_local = rhs.shape[0] if num_local is None else num_local
  ends = np.cumsum(sizes)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  for j in range(num_local):
    s, e = ends[offset + j] - sizes[offset + j], ends[offset + j]
    out[s:e] = lhs[s:e] @ rhs[j]
  return out


def inputs(m, g, dtype, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k1, (m, K)).astype(dtype), jax.random.normal(k2, (g, K, N)).astype(dtype),
          jax.random.normal(k3, (m, N)).astype(dtype))


@pytest.mark.parametrize("target", TARGETS)
@SLOW
@given(problems(), st.sampled_from([jnp.float32, jnp.bfloat16]), st.integers(0, 1))
def test_gmm_forward(target, problem, dtype, tile_choice):
  sizes, m = problem
  lhs, rhs, _ = inputs(m, len(sizes), dtype)
  got = pk.gmm(lhs, rhs, jnp.asarray(sizes), target=_target(target), interpret=INTERPRET[target],
               tiling=TILES[target][tile_choice])
  assert got.shape == (m, N) and got.dtype == dtype
  want = oracle(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, **TOL[dtype])


@pytest.mark.parametrize("target", TARGETS)
@SLOW
@given(problems(), st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_gmm_gradients(target, problem, dtype):
  """d lhs[i] = ct[i] rhs[g]^T (transposed-rhs gmm) and d rhs[g] = sum_i lhs[i]^T ct[i] (tgmm)."""
  sizes, m = problem
  lhs, rhs, ct = inputs(m, len(sizes), dtype, seed=1)
  f = lambda a, b: jnp.sum(pk.gmm(a, b, jnp.asarray(sizes), target=_target(target),
                                  interpret=INTERPRET[target], tiling=TILES[target][0])
                           .astype(jnp.float32) * ct.astype(jnp.float32))
  dl, dr = jax.grad(f, argnums=(0, 1))(lhs, rhs)
  assert dl.dtype == dtype and dr.dtype == dtype
  l64, r64, c64 = (np.asarray(x, np.float64) for x in (lhs.astype(jnp.float32),
                                                        rhs.astype(jnp.float32),
                                                        ct.astype(jnp.float32)))
  ends = np.cumsum(sizes)
  want_l, want_r = np.zeros(l64.shape), np.zeros(r64.shape)
  for g, (s, e) in enumerate(zip(ends - sizes, ends)):
    want_l[s:e] = c64[s:e] @ r64[g].T
    want_r[g] = l64[s:e].T @ c64[s:e]
  tol = TOL[dtype] if dtype == jnp.float32 else dict(rtol=3e-2, atol=0.5)  # bf16 sums of ~45
  np.testing.assert_allclose(np.asarray(dl, np.float32), want_l, **tol)
  np.testing.assert_allclose(np.asarray(dr, np.float32), want_r, **tol)


@pytest.mark.parametrize("target", TARGETS)
def test_group_offset_computes_local_groups_only(target):
  """Expert-parallel shard: rhs holds groups 2..3 of 5; other rows must be exactly zero."""
  sizes = np.array([7, 0, 13, 9, 4], np.int32)
  lhs, rhs, ct = inputs(40, 5, jnp.float32, seed=3)
  local = rhs[2:4]
  kw = dict(group_offset=2, target=_target(target), interpret=INTERPRET[target],
            tiling=TILES[target][0])
  got = pk.gmm(lhs, local, jnp.asarray(sizes), **kw)
  np.testing.assert_allclose(got, oracle(lhs, local, sizes, offset=2), **TOL[jnp.float32])
  assert not np.any(np.asarray(got)[:7]) and not np.any(np.asarray(got)[29:])
  dw = pk.tgmm(lhs, ct, jnp.asarray(sizes), num_local=2, **kw)
  l64, c64 = np.asarray(lhs, np.float64), np.asarray(ct, np.float64)
  np.testing.assert_allclose(dw[0], l64[7:20].T @ c64[7:20], **TOL[jnp.float32])
  np.testing.assert_allclose(dw[1], l64[20:29].T @ c64[20:29], **TOL[jnp.float32])


@pytest.mark.parametrize("target", TARGETS)
def test_default_tiling_multi_tile_problem(target):
  """Defaults (no tiling argument) on a problem larger than one tile in every dimension."""
  sizes = np.array([100, 0, 37, 120, 1], np.int32)
  lhs = jax.random.normal(jax.random.key(4), (300, 160))
  rhs = jax.random.normal(jax.random.key(5), (5, 160, 136))
  got = pk.gmm(lhs, rhs, jnp.asarray(sizes), target=_target(target), interpret=INTERPRET[target])
  np.testing.assert_allclose(got, oracle(lhs, rhs, sizes), rtol=1e-4, atol=1e-3)


def test_bad_arguments_raise_clear_errors():
  lhs, rhs, _ = inputs(8, 2, jnp.float32)
  with pytest.raises(ValueError, match="target='cuda' is unknown; allowed"):
    pk.gmm(lhs, rhs, jnp.array([4, 4]), target="cuda", interpret=True)
  with pytest.raises(ValueError, match="contraction mismatch"):
    pk.gmm(lhs[:, :5], rhs, jnp.array([4, 4]), target="tpu", interpret=True)
  with pytest.raises(ValueError, match="interpret=True needs an explicit target"):
    pk.gmm(lhs, rhs, jnp.array([4, 4]), interpret=True)
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="run on TPU or GPU"):
      pk.gmm(lhs, rhs, jnp.array([4, 4]))
  with pytest.raises(ValueError, match="group_sizes must be a 1-D integer array"):
    pk.gmm(lhs, rhs, jnp.array([4.0, 4.0]), target="tpu", interpret=True)


@pytest.mark.parametrize("target", TARGETS)
def test_megablox_options(target):
  """transpose_rhs + group_offset + bf16 inputs with f32 output + existing_out, and tgmm with
  existing_out (accumulates) and an f32 output, against float64 loops; gradients of all three
  differentiable inputs. Uninitialised memory is NaN in the TPU interpreter, so a kept row that
  was not copied from existing_out would fail."""
  sizes = np.array([7, 0, 13, 9, 4], np.int32)
  lhs, rhs, ct = inputs(40, 5, jnp.bfloat16, seed=11)
  local_t = jnp.swapaxes(rhs[1:4], 1, 2)                  # groups 1..3, stored [L, N, K]
  buf = jax.random.normal(jax.random.key(12), (40, N))
  kw = dict(target=_target(target), interpret=INTERPRET[target], tiling=TILES[target][0])
  f32 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)

  def f(a, b, e):
    return pk.gmm(a, b, jnp.asarray(sizes), transpose_rhs=True, group_offset=1,
                  preferred_element_type=jnp.float32, existing_out=e, **kw)

  got = f(lhs, local_t, buf)
  assert got.dtype == jnp.float32
  want = np.asarray(buf, np.float64).copy()
  want[7:29] = 0                                          # rows of groups 1..3
  want += oracle(f32(lhs), f32(rhs[1:4]), sizes, offset=1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)

  loss = lambda a, b, e: jnp.sum(f(a, b, e) * ct.astype(jnp.float32))
  dl, dr, de = jax.grad(loss, argnums=(0, 1, 2))(lhs, local_t, buf)
  c64, l64, r64 = f32(ct), f32(lhs), f32(rhs)
  want_l, want_r = np.zeros(l64.shape), np.zeros((3, N, K))
  ends = np.cumsum(sizes)
  for j in range(3):
    s, e = ends[1 + j] - sizes[1 + j], ends[1 + j]
    want_l[s:e] = c64[s:e] @ r64[1 + j].T
    want_r[j] = c64[s:e].T @ l64[s:e]
  bf_tol = dict(rtol=3e-2, atol=0.5)
  np.testing.assert_allclose(f32(dl), want_l, **bf_tol)
  np.testing.assert_allclose(f32(dr), want_r, **bf_tol)
  want_e = c64.copy()
  want_e[7:29] = 0
  np.testing.assert_allclose(de, want_e, atol=1e-6)

  prior = jax.random.normal(jax.random.key(13), (3, K, N))
  dw = pk.tgmm(lhs, ct, jnp.asarray(sizes), num_local=3, group_offset=1, existing_out=prior,
               preferred_element_type=jnp.float32, **kw)
  assert dw.dtype == jnp.float32
  for j in range(3):
    s, e = ends[1 + j] - sizes[1 + j], ends[1 + j]
    np.testing.assert_allclose(dw[j], np.asarray(prior[j]) + l64[s:e].T @ c64[s:e], **bf_tol)


def test_option_errors():
  lhs, rhs, _ = inputs(8, 2, jnp.float32)
  kw = dict(target="tpu", interpret=True)
  with pytest.raises(ValueError, match="group_offset=1 with 2 local groups must lie in"):
    pk.gmm(lhs, rhs, jnp.array([4, 4]), group_offset=1, **kw)
  with pytest.raises(ValueError, match="existing_out must have the output shape"):
    pk.gmm(lhs, rhs, jnp.array([4, 4]), existing_out=jnp.zeros((8, 3)), **kw)
  with pytest.raises(ValueError, match="tgmm: existing_out must have the output shape"):
    pk.tgmm(lhs, lhs, jnp.array([4, 4]), existing_out=jnp.zeros((2, 3, 3)), **kw)

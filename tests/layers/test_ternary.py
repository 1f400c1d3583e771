"""Ternary experts: quantisers and straight-through gradients against NumPy (2-bit packing:
tests/ops/test_ternary_matmul.py); the ternary bank against a per-expert loop of quantised
SwiGLU FFNs."""
import jax
import jax.numpy as jnp
import numpy as np

from moejax.layers import ternary


def np_ternary(w, axes):
  scale = np.maximum(np.abs(w).mean(axis=axes, keepdims=True), 1e-8)
  return np.clip(np.round(w / scale), -1, 1), scale


def dequant(w, axes):
  codes, scale = np_ternary(w.astype(np.float64), axes)
  return codes * scale


def np_act(x):
  s = 127 / np.maximum(np.abs(x).max(-1, keepdims=True), 1e-8)
  return np.clip(np.round(x * s), -128, 127) / s


def test_weight_and_activation_quantisers_match_numpy():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3, 6, 2, 5)).astype(np.float32)
  codes, scale = ternary.ternary_values(jnp.asarray(w), ternary.WI_AXES)
  want_codes, want_scale = np_ternary(w.astype(np.float64), ternary.WI_AXES)
  np.testing.assert_array_equal(codes, want_codes)
  np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
  assert scale.shape == (3, 1, 2, 1)          # one scale per expert's gate and up matrix
  np.testing.assert_allclose(ternary.quantize_weights(jnp.asarray(w), ternary.WI_AXES),
                             want_codes * want_scale, rtol=1e-6)
  x = rng.normal(size=(7, 9)).astype(np.float32)
  np.testing.assert_allclose(ternary.quantize_activations(jnp.asarray(x)),
                             np_act(x.astype(np.float64)), rtol=1e-5, atol=1e-7)


def test_straight_through_gradients_are_the_identity():
  w = jax.random.normal(jax.random.key(0), (2, 4, 3))
  g = jax.grad(lambda w: jnp.sum(ternary.quantize_weights(w, (1, 2)) * jnp.arange(3.0)))(w)
  np.testing.assert_allclose(g, jnp.broadcast_to(jnp.arange(3.0), w.shape))
  x = jax.random.normal(jax.random.key(1), (5, 4))
  g = jax.grad(lambda x: jnp.sum(ternary.quantize_activations(x) ** 2))(x)
  np.testing.assert_allclose(g, 2 * ternary.quantize_activations(x), rtol=1e-6)


def test_ternary_bank_equals_a_loop_of_quantised_ffns_and_its_packed_form():
  rng = np.random.default_rng(2)
  e, d, h = 3, 8, 12
  wi = rng.normal(size=(e, d, 2, h)).astype(np.float32)
  wo = rng.normal(size=(e, h, d)).astype(np.float32)
  sizes = np.array([4, 0, 5], np.int32)                         # an expert with no rows
  xs = rng.normal(size=(9, d)).astype(np.float32)
  got = ternary.run_ternary_experts((jnp.asarray(wi), jnp.asarray(wo)), jnp.asarray(xs),
                                    jnp.asarray(sizes), backend="reference")
  want = np.zeros((9, d))
  start = 0
  for i, n in enumerate(sizes):
    qi = dequant(wi[i:i + 1], ternary.WI_AXES)[0]
    qo = dequant(wo[i:i + 1], ternary.WO_AXES)[0]
    u = np_act(xs[start:start + n].astype(np.float64))
    g, up = u @ qi[:, 0], u @ qi[:, 1]
    a = np_act(g / (1 + np.exp(-g)) * up)
    want[start:start + n] = a @ qo
    start += n
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # the packed inference form, through the grouped matmuls that decode 2-bit codes, gives the
  # same output on every backend (the Pallas kernels in the interpreter)
  packed = ternary.pack_bank(wi, wo)
  weights = tuple(jnp.asarray(packed[n]) for n in ternary.PACKED_NAMES)
  for backend in ("reference", "xla", "pallas"):
    out = ternary.run_packed_ternary_experts(weights, jnp.asarray(xs), jnp.asarray(sizes),
                                             backend=backend)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4, err_msg=backend)
  np.testing.assert_allclose(packed["wi_scale"].reshape(e, 2, h)[:, :, 0],
                             np.abs(wi).mean(axis=(1, 3)), rtol=1e-6)


def test_packed_weights_are_sixteen_times_smaller_than_float32():
  e, d, h = 2, 512, 256
  wi = np.random.default_rng(3).normal(size=(e, d, 2, h)).astype(np.float32)
  wo = np.random.default_rng(4).normal(size=(e, h, d)).astype(np.float32)
  packed = ternary.pack_bank(wi, wo)
  assert packed["wi_packed"].nbytes * 16 == wi.nbytes
  assert packed["wo_packed"].nbytes * 16 == wo.nbytes


def test_mixed_precision_bank_runs_full_and_ternary_experts_by_index():
  """The last n experts as the quantised loop above, the others as plain SwiGLU FFNs; the
  gradient reaches every expert's latent weights (straight-through for the ternary ones)."""
  rng = np.random.default_rng(3)
  e, d, h, n = 4, 8, 6, 2
  wi = rng.normal(size=(e, d, 2, h)).astype(np.float32)
  wo = rng.normal(size=(e, h, d)).astype(np.float32)
  sizes = np.array([3, 2, 0, 4], np.int32)
  xs = rng.normal(size=(10, d)).astype(np.float32)
  run = lambda wi, wo: ternary.run_mixed_experts((wi, wo), jnp.asarray(xs), jnp.asarray(sizes),
                                                 n, backend="xla")
  got = run(jnp.asarray(wi), jnp.asarray(wo))
  want, start = np.zeros((10, d)), 0
  for i, rows in enumerate(sizes):
    x = xs[start:start + rows].astype(np.float64)
    if i >= e - n:
      qi, qo, x = (dequant(wi[i:i + 1], ternary.WI_AXES)[0],
                   dequant(wo[i:i + 1], ternary.WO_AXES)[0], np_act(x))
    else:
      qi, qo = wi[i].astype(np.float64), wo[i].astype(np.float64)
    g, up = x @ qi[:, 0], x @ qi[:, 1]
    a = g / (1 + np.exp(-g)) * up
    want[start:start + rows] = (np_act(a) if i >= e - n else a) @ qo
    start += rows
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  gi, go = jax.grad(lambda a, b: jnp.sum(run(a, b)), argnums=(0, 1))(jnp.asarray(wi),
                                                                    jnp.asarray(wo))
  assert all(float(jnp.abs(gi[i]).sum()) > 0 for i in (0, 1, 3))   # expert 2 has no rows
  assert float(jnp.abs(gi[2]).sum()) == 0
  # its inference form (full experts as they are, ternary ones as 2-bit codes) computes the same
  packed = ternary.pack_bank(wi[e - n:], wo[e - n:])
  weights = (jnp.asarray(wi[:e - n]), jnp.asarray(wo[:e - n]),
             *(jnp.asarray(packed[k]) for k in ternary.PACKED_NAMES))
  for backend in ("xla", "reference"):
    out = ternary.run_packed_mixed_experts(weights, jnp.asarray(xs), jnp.asarray(sizes),
                                           backend=backend)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4, err_msg=backend)

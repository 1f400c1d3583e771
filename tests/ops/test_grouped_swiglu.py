"""The fused grouped SwiGLU tile loops (moejax/ops/grouped_swiglu.py) against a per-row NumPy
loop: values and gradients, classes of different sizes, empty groups, rows of no class, tiles
larger than a group and past the last row."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.ops.grouped_swiglu import grouped_swiglu


def numpy_swiglu(xs, classes, sizes, offsets):
  xs = np.asarray(xs, np.float64)
  out = np.zeros_like(xs)
  ends = np.cumsum(sizes)
  for i in range(min(xs.shape[0], ends[-1])):
    g = int(np.searchsorted(ends, i, side="right"))
    for (wi, wo), off in zip(classes, offsets):
      if off <= g < off + len(wi):
        wi_g, wo_g = np.asarray(wi[g - off], np.float64), np.asarray(wo[g - off], np.float64)
        gate, up = xs[i] @ wi_g[:, 0], xs[i] @ wi_g[:, 1]
        out[i] = (gate / (1 + np.exp(-gate)) * up) @ wo_g
  return out


CASES = [  # (group sizes, [(offset, groups, hidden)], tile)
    ([7, 0, 13, 20, 6], [(1, 2, 5), (3, 1, 3)], 4),   # group 0 and 4 in no class
    ([5, 9, 3], [(0, 3, 4)], 8),                      # one class: a homogeneous bank
    ([0, 0, 11], [(2, 1, 6), (0, 2, 2)], 32),         # tile clipped to M; empty class
]


@pytest.mark.parametrize("sizes,layout,tile", CASES)
def test_values_and_gradients_match_a_row_loop(sizes, layout, tile):
  rng = np.random.default_rng(len(sizes) + tile)
  m, d = sum(sizes) + 3, 6
  xs, ct = (jnp.asarray(rng.standard_normal((m, d)), jnp.float32) for _ in range(2))
  classes = tuple((jnp.asarray(rng.standard_normal((n, d, 2, h)), jnp.float32),
                   jnp.asarray(rng.standard_normal((n, h, d)), jnp.float32))
                  for _, n, h in layout)
  offsets = [off for off, _, _ in layout]
  gs = jnp.asarray(sizes, jnp.int32)
  f = jax.jit(lambda xs, cl: grouped_swiglu(xs, cl, gs, offsets=offsets, tile_m=tile))
  np.testing.assert_allclose(f(xs, classes), numpy_swiglu(xs, classes, sizes, offsets),
                             rtol=1e-5, atol=1e-5)
  gx, gc = jax.grad(lambda *a: jnp.sum(f(*a) * ct), argnums=(0, 1))(xs, classes)
  flat, tree = jax.tree.flatten((xs, classes))
  grads = jax.tree.leaves((gx, gc))
  eps, ct = 1e-3, np.asarray(ct, np.float64)
  for arg, g in enumerate(grads):     # central differences along a random direction, float64
    v = rng.standard_normal(flat[arg].shape)
    shifted = []
    for sign in (1, -1):
      args = [np.asarray(a, np.float64) for a in flat]
      args[arg] = args[arg] + sign * eps * v
      x, cl = jax.tree.unflatten(tree, args)
      shifted.append(np.sum(numpy_swiglu(x, cl, sizes, offsets) * ct))
    numeric = (shifted[0] - shifted[1]) / (2 * eps)
    np.testing.assert_allclose(np.sum(np.asarray(g, np.float64) * v), numeric, rtol=1e-4,
                               atol=1e-4, err_msg=f"leaf {arg}")


def test_banks_choose_the_fused_loop_on_the_cpu_path_only():
  from moejax.ops.grouped_swiglu import use_fused
  assert use_fused("auto", "xla", "gmm") and use_fused("fused", "xla", "blocks")
  assert not use_fused("auto", "ragged_dot", "gmm") and not use_fused("gmm", "xla", "gmm")
  with pytest.raises(ValueError, match="path='fused' is the CPU tile loop; gmm backend "
                                       "'ragged_dot' runs 'gmm'"):
    use_fused("fused", "ragged_dot", "gmm")
  with pytest.raises(ValueError, match="path='blocks'; allowed: 'auto', 'fused', 'gmm'"):
    use_fused("blocks", "xla", "gmm")

"""Routers against the gating equations written in NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers.routers import ROUTERS, RoutingResult, TopKSoftmaxRouter, topk_softmax


def np_topk_softmax(logits, k, renormalize):
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  idx = np.argsort(-p, axis=-1, kind="stable")[:, :k]
  w = np.take_along_axis(p, idx, -1)
  if renormalize:
    w = w / w.sum(-1, keepdims=True)
  return idx, w, p


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_softmax_matches_equation(k, renormalize):
  logits = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
  r = topk_softmax(jnp.asarray(logits), k, renormalize)
  idx, w, p = np_topk_softmax(logits.astype(np.float64), k, renormalize)
  np.testing.assert_array_equal(r.expert_index, idx)
  np.testing.assert_allclose(r.weight, w, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(r.probs, p, rtol=1e-6, atol=1e-6)
  assert r.expert_index.dtype == jnp.int32 and r.weight.dtype == jnp.float32
  if renormalize:
    np.testing.assert_allclose(np.asarray(r.weight).sum(-1), 1.0, rtol=1e-6)


def test_router_module_is_linear_then_topk_in_float32():
  x = jax.random.normal(jax.random.key(0), (20, 8), jnp.bfloat16)
  router = TopKSoftmaxRouter(num_experts=5, k=2, renormalize=False)
  params = router.init(jax.random.key(1), x)
  r = router.apply(params, x)
  kernel = np.asarray(params["params"]["kernel"].unbox(), np.float64)
  idx, w, _ = np_topk_softmax(np.asarray(x, np.float64) @ kernel, 2, False)
  assert r.logits.dtype == jnp.float32
  np.testing.assert_array_equal(r.expert_index, idx)
  np.testing.assert_allclose(r.weight, w, rtol=1e-5, atol=1e-6)


def test_noise_only_in_training_and_from_router_stream():
  x = jax.random.normal(jax.random.key(0), (64, 8))
  router = TopKSoftmaxRouter(num_experts=4, k=1, jitter_eps=0.2, noise_std=1.0)
  params = router.init(jax.random.key(1), x)
  clean = router.apply(params, x)
  np.testing.assert_array_equal(router.apply(params, x, deterministic=True).logits, clean.logits)
  noisy = router.apply(params, x, deterministic=False, rngs={"router": jax.random.key(3)})
  again = router.apply(params, x, deterministic=False, rngs={"router": jax.random.key(3)})
  assert not np.allclose(noisy.logits, clean.logits)
  np.testing.assert_array_equal(noisy.logits, again.logits)   # reproducible from the stream
  with pytest.raises(Exception, match="router"):
    router.apply(params, x, deterministic=False)


def test_routing_result_is_a_pytree():
  r = topk_softmax(jnp.zeros((3, 4)), 2, True)
  leaves = jax.tree.leaves(r)
  assert len(leaves) == 4
  doubled = jax.tree.map(lambda a: a * 2, r)
  assert isinstance(doubled, RoutingResult) and r.k == 2 and r.num_experts == 4
  assert set(ROUTERS) >= {"topk_softmax"}

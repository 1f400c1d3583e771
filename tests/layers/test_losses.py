"""Auxiliary losses and metrics against their equations in NumPy."""
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers import losses
from moejax.layers.routers import RoutingResult, topk_softmax


def _routing(t=64, e=8, k=2, seed=0, skew=0.0):
  logits = np.random.default_rng(seed).normal(size=(t, e))
  logits[:, 0] += skew
  return topk_softmax(jnp.asarray(logits, jnp.float32), k, True), logits


def _counts(idx, e):
  return np.array([(idx == i).sum() for i in range(e)], np.float64)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_load_balance_switch_and_deepseek_expert_level(k):
  r, _ = _routing(k=k, skew=1.5)
  idx, p = np.asarray(r.expert_index), np.asarray(r.probs, np.float64)
  t, e = p.shape
  # Switch: N * sum_i f_i P_i with f_i = count_i / (T k).
  switch = e * np.sum(_counts(idx, e) / (t * k) * p.mean(0))
  # DeepSeekMoE eq. 12-14: sum_i f'_i P_i, f'_i = N'/(K'T) count_i.
  deepseek = np.sum(e / (k * t) * _counts(idx, e) * p.mean(0))
  np.testing.assert_allclose(losses.load_balance_loss(r), switch, rtol=1e-5)
  np.testing.assert_allclose(switch, deepseek, rtol=1e-12)


def test_load_balance_is_one_when_uniform_and_larger_when_skewed():
  t, e = 8, 4
  idx = jnp.arange(t)[:, None] % e
  r = RoutingResult(expert_index=idx.astype(jnp.int32), weight=jnp.ones((t, 1)),
                    probs=jnp.full((t, e), 1 / e), logits=jnp.zeros((t, e)))
  np.testing.assert_allclose(losses.load_balance_loss(r), 1.0, rtol=1e-6)
  skewed, _ = _routing(skew=4.0)
  assert float(losses.load_balance_loss(skewed)) > 1.5


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_device_balance_matches_deepseek_eq_15_17(groups):
  r, _ = _routing(e=8, k=2, skew=2.0, seed=3)
  idx, p = np.asarray(r.expert_index), np.asarray(r.probs, np.float64)
  t, e = p.shape
  f = e / (2 * t) * _counts(idx, e)
  members = np.split(np.arange(e), groups)
  want = sum(f[m].mean() * p.mean(0)[m].sum() for m in members)
  np.testing.assert_allclose(losses.device_balance_loss(r, groups), want, rtol=1e-5)


def test_device_balance_rejects_groups_that_do_not_divide():
  r, _ = _routing(e=8)
  with pytest.raises(ValueError, match="num_device_groups=3"):
    losses.device_balance_loss(r, 3)


def test_z_loss_and_entropy():
  r, logits = _routing(seed=5)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(losses.router_z_loss(r), np.mean(lse ** 2), rtol=1e-5)
  p = np.asarray(r.probs, np.float64)
  np.testing.assert_allclose(losses.router_entropy(r), np.mean(-(p * np.log(p)).sum(-1)),
                             rtol=1e-5)


def test_counts_ignore_unused_slots():
  idx = jnp.array([[0, -1], [2, 2], [-1, -1]], jnp.int32)
  np.testing.assert_array_equal(losses.expert_counts(idx, 3), [1, 0, 2])


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_micro_batch_and_global_batch_balance(groups):
  """Per-micro-batch: mean_j E sum_i f_i^j P_i^j; global (Demons in the Detail): f from the
  whole batch, P per micro-batch, averaged over micro-batches."""
  r, _ = _routing(t=64, e=8, k=2, skew=1.0, seed=7)
  idx, p = np.asarray(r.expert_index), np.asarray(r.probs, np.float64)
  e, k = 8, 2
  idx_g, p_g = np.split(idx, groups), np.split(p, groups)
  micro = np.mean([e * np.sum(_counts(i, e) / (len(i) * k) * q.mean(0))
                   for i, q in zip(idx_g, p_g)])
  fbar = _counts(idx, e) / (len(idx) * k)
  glob = np.mean([e * np.sum(fbar * q.mean(0)) for q in p_g])
  np.testing.assert_allclose(losses.load_balance_loss(r, groups, "micro_batch"), micro, rtol=1e-5)
  np.testing.assert_allclose(losses.load_balance_loss(r, groups, "global_batch"), glob, rtol=1e-5)
  if groups == 1:
    np.testing.assert_allclose(micro, glob, rtol=1e-12)
  else:
    assert abs(micro - glob) > 1e-4            # the option changes the objective


def test_global_batch_gradient_differs_only_through_f():
  """P carries the gradient in both scopes; with equal f the gradients coincide."""
  import jax
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4)), jnp.float32)
  grad = lambda scope: jax.grad(lambda l: losses.load_balance_loss(
      topk_softmax(l, 1, False), 1, scope))(logits)
  np.testing.assert_allclose(grad("micro_batch"), grad("global_batch"), rtol=1e-6)

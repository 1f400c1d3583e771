"""The MoE block equals the DeepSeekMoE equation written as an explicit sum of FFNs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from moejax.layers.moe import MoEBlock, MoESpec

D = 16


def np_swiglu(u, wi, wo):
  g, up = u @ wi[:, 0], u @ wi[:, 1]
  return (g / (1 + np.exp(-g)) * up) @ wo


def deepseekmoe_reference(u, p, spec):
  """h = sum_{i<=K_s} FFN_i(u) + sum_i g_i FFN_i(u), g_i = s_i if s_i in TopK(s, mK-K_s) else 0,
  s = softmax(u^T e) over the mN-K_s routed experts (arXiv 2401.06066 eq. 9-11; u_t added outside).
  """
  u = np.asarray(u, np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  logits = u @ p["router"]["kernel"]
  s = np.exp(logits - logits.max(-1, keepdims=True))
  s /= s.sum(-1, keepdims=True)
  out = np.zeros_like(u)
  fh = spec.fine_hidden
  for j in range(spec.num_shared_experts):        # the fused shared FFN, split into K_s FFNs
    wi = p["shared"]["wi"][:, :, j * fh:(j + 1) * fh]
    wo = p["shared"]["wo"][j * fh:(j + 1) * fh]
    out += np_swiglu(u, wi, wo)
  for t in range(u.shape[0]):
    top = np.argsort(-s[t], kind="stable")[:spec.routed_k]
    for i in top:
      out[t] += s[t, i] * np_swiglu(u[t], p["experts"]["wi"][i], p["experts"]["wo"][i])
  return out


def _init(spec, x):
  block = MoEBlock(spec)
  params = nn.meta.unbox(block.init(jax.random.key(0), x)["params"])
  return block, params


SPEC = MoESpec(num_experts=4, top_k=2, expert_hidden=32, segments=2, num_shared_experts=2,
               renormalize=False, load_balance_weight=0.01, device_balance_weight=0.05,
               num_device_groups=2, z_loss_weight=1e-3)


@pytest.mark.parametrize("dispatch,backend", [("dropless", "xla"), ("dropless", "reference"),
                                              ("capacity", "xla"), ("dropless", "pallas")])
def test_fine_grained_plus_shared_equals_explicit_sum(dispatch, backend):
  spec = dataclasses.replace(SPEC, dispatch=dispatch, capacity_factor=100.0, gmm_backend=backend)
  assert (spec.num_routed, spec.routed_k, spec.fine_hidden) == (6, 2, 16)
  x = jax.random.normal(jax.random.key(1), (3, 5, D))
  block, params = _init(spec, x)
  y = block.apply({"params": params}, x)
  want = deepseekmoe_reference(x.reshape(-1, D), params, spec).reshape(x.shape)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_gradients_match_explicit_sum():
  x = jax.random.normal(jax.random.key(2), (12, D))
  block, params = _init(SPEC, x)
  ref = lambda p, x: jnp.sum(jnp.sin(_jax_reference(x, p, SPEC)))
  got = jax.grad(lambda p, x: jnp.sum(jnp.sin(block.apply({"params": p}, x))), argnums=(0, 1))(
      params, x)
  want = jax.grad(ref, argnums=(0, 1))(params, x)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def _jax_reference(u, p, spec):
  """The same equation in jnp (for autodiff); selection is non-differentiable, as in the layer."""
  s = jax.nn.softmax(u @ p["router"]["kernel"], axis=-1)
  top = jax.lax.stop_gradient(jnp.argsort(-s, axis=-1)[:, :spec.routed_k])
  g = jnp.sum(jax.nn.one_hot(top, spec.num_routed), axis=1) * s
  ffn = lambda wi, wo: (jax.nn.silu(u @ wi[:, 0]) * (u @ wi[:, 1])) @ wo
  out = ffn(p["shared"]["wi"], p["shared"]["wo"])
  for i in range(spec.num_routed):
    out += g[:, i:i + 1] * ffn(p["experts"]["wi"][i], p["experts"]["wo"][i])
  return out


def test_sown_losses_and_metrics():
  x = jax.random.normal(jax.random.key(3), (40, D))
  spec = dataclasses.replace(SPEC, dispatch="capacity", capacity_factor=0.5)
  block, params = _init(spec, x)
  _, state = block.apply({"params": params}, x, mutable=["losses", "intermediates"])
  inter, sown = state["intermediates"], state["losses"]
  assert set(sown) == {"load_balance", "device_balance", "z_loss"}
  np.testing.assert_allclose(sown["load_balance"][0], 0.01 * inter["load_balance"][0], rtol=1e-6)
  np.testing.assert_allclose(sown["z_loss"][0], 1e-3 * inter["z_loss"][0], rtol=1e-6)
  np.testing.assert_allclose(np.sum(inter["expert_load"][0]), 1.0, rtol=1e-6)
  # capacity 0.5 must drop something and say how much
  assert 0 < float(inter["drop_fraction"][0]) < 1
  assert int(inter["num_dropped"][0]) == round(float(inter["drop_fraction"][0]) * 40 * 2)


def test_dense_equivalent_when_one_expert():
  """N=1, K=1, no renormalisation needed: the block is one SwiGLU scaled by gate 1."""
  spec = MoESpec(num_experts=1, top_k=1, expert_hidden=8)
  x = jax.random.normal(jax.random.key(4), (6, D))
  block, params = _init(spec, x)
  want = np_swiglu(np.asarray(x, np.float64), np.asarray(params["experts"]["wi"][0], np.float64),
                   np.asarray(params["experts"]["wo"][0], np.float64))
  np.testing.assert_allclose(block.apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fields,message", [
    (dict(segments=3), r"MoESpec.segments: must divide expert_hidden=32"),
    (dict(num_shared_experts=4), r"MoESpec.num_shared_experts: must be in \[0, segments\*top_k=4\)"),
    (dict(top_k=5), r"MoESpec.top_k: must be <= num_experts=4, got 5"),
    (dict(dispatch="magic"), r"MoESpec.dispatch: got 'magic'; allowed: 'dropless', 'capacity'"),
    (dict(capacity_factor=0.0), r"MoESpec.capacity_factor: must be > 0"),
])
def test_spec_validates_itself(fields, message):
  """A bad spec fails at construction, naming the field (not by flooring d_ff/m or in top_k)."""
  from moejax.errors import ConfigError
  with pytest.raises(ConfigError, match=message):
    dataclasses.replace(SPEC, **fields)


def test_routed_and_active_experts_stated_directly():
  """from_counts(63 routed, 7 active, hidden 64, 1 shared) is DeepSeekMoE's N=16, K=2, m=4 layer:
  same parameters, same output."""
  direct = MoESpec.from_counts(routed_experts=6, active_experts=2, expert_hidden=16,
                               shared_experts=2, renormalize=False)
  assert (direct.num_routed, direct.routed_k, direct.fine_hidden, direct.shared_hidden) == (
      SPEC.num_routed, SPEC.routed_k, SPEC.fine_hidden, SPEC.shared_hidden)
  x = jax.random.normal(jax.random.key(5), (7, D))
  block, params = _init(dataclasses.replace(SPEC, device_balance_weight=0.0, z_loss_weight=0.0),
                        x)
  y = MoEBlock(direct).apply({"params": params}, x)
  np.testing.assert_allclose(y, block.apply({"params": params}, x), rtol=1e-6, atol=1e-6)
  from moejax.errors import ConfigError
  with pytest.raises(ConfigError, match="active_experts must be <= routed_experts=6, got 7"):
    MoESpec.from_counts(routed_experts=6, active_experts=7, expert_hidden=16)


def test_moe_path_is_logged_once_per_layer_kind(caplog):
  import logging
  from moejax import logs
  x = jax.random.normal(jax.random.key(6), (2, 4, D))
  spec = dataclasses.replace(SPEC, gmm_backend="xla", decode_path="grouped")
  block, params = _init(spec, x)
  small = MoEBlock(dataclasses.replace(spec, decode_path="auto"))    # 16 slots <= 4 x 6
  logs._seen.clear()
  with caplog.at_level(logging.INFO, logger="moejax"):
    for _ in range(3):
      jax.jit(lambda p, x: block.apply({"params": p}, x))(params, x)
      block.apply({"params": params}, x)
      small.apply({"params": params}, x)
  lines = [r.getMessage() for r in caplog.records if "MoE layer" in r.getMessage()]
  assert [l for l in lines if "small-batch path" in l] == [
      "MoE layer (6 routed experts, top-2, dropless, 2 shared): small-batch path: each row's "
      "selected experts read in place, no sort or tile schedule (model.moe.decode_path=auto)"]
  lines = [l for l in lines if "small-batch path" not in l]
  assert lines == ["MoE layer (6 routed experts, top-2, dropless, 2 shared): single-device "
                   "dispatch (no 'expert' mesh axis in context), gmm backend xla"]


def test_chain_of_experts_iterations():
  """C = 2: y = MoE_0(x) + MoE_1(x + MoE_0(x)), one expert bank and shared expert, a router per
  iteration; C = 1 is the plain layer (same parameters, same output)."""
  spec2 = dataclasses.replace(SPEC, iterations=2)
  x = jax.random.normal(jax.random.key(5), (2, 6, D))
  block2 = MoEBlock(spec2)
  params = nn.meta.unbox(block2.init(jax.random.key(0), x)["params"])
  assert set(params) == {"router", "router_1", "experts", "shared"}
  y2 = block2.apply({"params": params}, x)
  u = np.asarray(x, np.float64).reshape(-1, D)
  first = deepseekmoe_reference(u, params, SPEC)
  second_params = dict(params, router=params["router_1"])
  want = first + deepseekmoe_reference(u + first, second_params, SPEC)
  np.testing.assert_allclose(np.asarray(y2).reshape(-1, D), want, rtol=1e-4, atol=1e-5)
  one = {k: v for k, v in params.items() if k != "router_1"}      # C = 1: the plain layer
  np.testing.assert_allclose(np.asarray(MoEBlock(SPEC).apply({"params": one}, x)).reshape(-1, D),
                             first, rtol=1e-5, atol=1e-5)

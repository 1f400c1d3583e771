"""Mixture-of-Head attention against standard attention and its gating equations in NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from moejax.layers.attention import Attention
from moejax.layers.moh import MixtureOfHeadsAttention, head_balance_loss, head_gates

H, G, DH, D = 4, 2, 8, 16


def _moh(**kw):
  return MixtureOfHeadsAttention(H, G, DH, **kw)


def _x():
  x = jax.random.normal(jax.random.key(0), (2, 6, D))
  return x, jnp.broadcast_to(jnp.arange(6), (2, 6))


def test_all_heads_active_with_uniform_gates_is_standard_attention():
  x, pos = _x()
  moh = _moh(shared_heads=1, active_heads=3, gating="code")
  params = nn.meta.unbox(moh.init(jax.random.key(1), x, pos)["params"])
  for name in ("shared_router", "head_router", "stage_router"):   # uniform router outputs
    params[name] = jnp.zeros_like(params[name])
  attn_params = {k: v for k, v in params.items() if not k.endswith("router")}
  want = Attention(H, G, DH).apply({"params": attn_params}, x, pos)
  got = moh.apply({"params": params}, x, pos)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def np_gates(x, ws, wr, wh, k, gating):
  sm = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(
      -1, keepdims=True)
  stage, logits = sm(x @ wh), x @ wr
  probs = sm(logits)
  top = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
  mask = np.zeros_like(logits)
  np.put_along_axis(mask, top, 1.0, -1)
  if gating == "code":
    masked = np.where(mask > 0, logits, -np.inf)
    routed, shared = sm(masked) * k, sm(x @ ws) * ws.shape[1]
    stage = stage * 2
  else:
    routed, shared = probs * mask, sm(x @ ws)
  return np.concatenate([stage[..., :1] * shared, stage[..., 1:] * routed], -1), probs, mask


@pytest.mark.parametrize("gating", ["code", "paper"])
def test_gates_and_balance_loss_match_numpy(gating):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(10, D))
  ws, wr, wh = rng.normal(size=(D, 1)), rng.normal(size=(D, 3)), rng.normal(size=(D, 2))
  gates, probs, mask = head_gates(jnp.asarray(x, jnp.float32), jnp.asarray(ws, jnp.float32),
                                  jnp.asarray(wr, jnp.float32), jnp.asarray(wh, jnp.float32), 2,
                                  gating)
  want, p, m = np_gates(x, ws, wr, wh, 2, gating)
  np.testing.assert_allclose(gates, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(mask, m)
  assert ((np.asarray(gates)[:, 1:] > 0).sum(-1) == 2).all()        # top-2 routed heads on
  f = m.sum(0) / (10 * 2)
  np.testing.assert_allclose(head_balance_loss(probs, mask, 2), 3 * np.sum(f * p.mean(0)),
                             rtol=1e-5)


def test_unselected_heads_do_not_contribute_and_routers_get_gradients():
  x, pos = _x()
  moh = _moh(shared_heads=1, active_heads=1)
  params = nn.meta.unbox(moh.init(jax.random.key(2), x, pos)["params"])
  y, state = moh.apply({"params": params}, x, pos, mutable=["losses", "intermediates"])
  load = np.asarray(state["intermediates"]["head_load"][0])
  np.testing.assert_allclose(load.sum(), 1.0, rtol=1e-6)               # one routed head each
  assert set(state["losses"]) == {"head_balance"}
  # (with K = 1 the code form's routed weight is softmax over one logit x 1 = 1, and with one
  # shared head its weight is 1 too: those routers then learn only from the balance loss, as
  # in the released code; 2 shared heads and K = 2 here)
  moh2 = _moh(shared_heads=2, active_heads=2)
  p2 = nn.meta.unbox(moh2.init(jax.random.key(2), x, pos)["params"])
  g = jax.grad(lambda p: jnp.sum(moh2.apply({"params": p}, x, pos) ** 2))(p2)
  for name in ("head_router", "stage_router", "shared_router"):
    assert float(jnp.abs(g[name]).sum()) > 0, name
  # a routed head's value weights get no gradient from tokens that did not select it:
  # with every token on one routed head, the other two routed heads get none from the output
  params2 = dict(params, head_router=params["head_router"] * 0
                 + jnp.array([[100.0, 0.0, 0.0]] * D) / D)
  x1 = jnp.abs(x)                                                       # all pick head 1
  g = jax.grad(lambda p: jnp.sum(moh.apply({"params": p}, x1, pos) ** 2))(params2)
  out_grad = np.abs(np.asarray(g["out"])).sum(axis=(1, 2))
  assert out_grad[1] > 0 and out_grad[2] == 0 and out_grad[3] == 0


def test_query_norm_router_and_binary_gates_match_numpy():
  from moejax.layers.moh import binary_gates, query_norm_logits
  q = np.random.default_rng(3).normal(size=(5, 4, 8))          # [T, H, dh], 1 shared head
  logits = np.asarray(query_norm_logits(jnp.asarray(q, jnp.float32), 1))
  n = np.linalg.norm(q[:, 1:], axis=-1)
  np.testing.assert_allclose(logits, (n - n.mean(-1, keepdims=True)) / (n.std(-1, keepdims=True)
                                                                        + 1e-6), rtol=1e-5)
  gates, probs, mask = binary_gates(jnp.asarray(logits), 2, 1)
  top = np.argsort(-logits, axis=-1, kind="stable")[:, :2]
  want = np.zeros((5, 3))
  np.put_along_axis(want, top, 1.0, -1)
  np.testing.assert_allclose(gates, np.concatenate([np.ones((5, 1)), want], -1), atol=1e-6)
  g = jax.grad(lambda l: jnp.sum(binary_gates(l, 2, 1)[0] * jnp.arange(4.0)))(jnp.asarray(logits))
  assert float(jnp.abs(g).sum()) > 0                              # straight-through gradient


@pytest.mark.parametrize("gating,shared,active,kv", [("code", 1, 2, 2), ("paper", 0, 2, 4),
                                                     ("code", 2, 1, 1)])
def test_selected_head_compute_equals_masked_all_heads_with_gradients(gating, shared, active, kv):
  """head_compute='selected' (grouped matmuls over (token, head) pairs) against the masked
  every-head form: same outputs and the same gradients for every parameter."""
  x, pos = _x()
  pos = pos.at[1].set(jnp.array([0, 1, 2, 3, 0, 1]))     # row 1: two packed documents
  kw = dict(shared_heads=shared, active_heads=active, gating=gating)
  dense = MixtureOfHeadsAttention(H, kv, DH, **kw)
  sel = MixtureOfHeadsAttention(H, kv, DH, head_compute="selected", **kw)
  params = nn.meta.unbox(dense.init(jax.random.key(4), x, pos)["params"])
  loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, x, pos)))
  np.testing.assert_allclose(sel.apply({"params": params}, x, pos),
                             dense.apply({"params": params}, x, pos), rtol=1e-5, atol=1e-5)
  got, want = jax.grad(loss(sel))(params), jax.grad(loss(dense))(params)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)
  if active > 1:       # (K = 1: the code form's routed weight is 1, see above)
    assert float(jnp.abs(got["head_router"]).sum()) > 0


def test_selected_head_compute_refuses_binary_gates():
  x, pos = _x()
  m = _moh(shared_heads=1, active_heads=2, gating="binary_ste", head_compute="selected")
  with pytest.raises(ValueError, match="head_compute='selected'.*binary_ste"):
    m.init(jax.random.key(0), x, pos)

"""The router zoo against its equations in NumPy: DeepSeek-V3 sigmoid + bias + groups (and
MoGE), top-p, null experts, expert choice; each inside the MoE block against a per-expert sum."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from moejax.errors import ConfigError
from moejax.layers import losses
from moejax.layers.moe import MoEBlock, MoESpec
from moejax.layers.routers import (ExpertChoiceRouter, ExpertRaceRouter, SigmoidRouter,
                                   TopKSoftmaxRouter, TopPRouter)
from moejax.layers.routers import batch_choice as expert_choice
from moejax.layers.routers import sigmoid, top_p

D = 16


def np_sigmoid_route(logits, bias, k, groups=1, keep=1, fill="neg_inf", routing="limited",
                     renorm=True, scaling=1.0):
  """DeepSeek-V3 selection and gates, row by row; -> list of {expert: gate} per token."""
  s = 1 / (1 + np.exp(-logits.astype(np.float64)))
  choice = s + bias
  t, e = s.shape
  m = e // groups
  out = []
  for r in range(t):
    c = choice[r]
    if groups == 1:
      sel = np.argsort(-c, kind="stable")[:k]
    elif routing == "balanced":
      sel = np.concatenate([g * m + np.argsort(-c[g * m:(g + 1) * m], kind="stable")[:k // groups]
                            for g in range(groups)])
    else:
      gs = np.array([np.sort(c[g * m:(g + 1) * m])[-2:].sum() for g in range(groups)])
      kept = np.argsort(-gs, kind="stable")[:keep]
      masked = np.full(e, -np.inf if fill == "neg_inf" else 0.0)
      for g in kept:
        masked[g * m:(g + 1) * m] = c[g * m:(g + 1) * m]
      sel = np.argsort(-masked, kind="stable")[:k]
    g = s[r, sel]
    if renorm:
      g = g / g.sum()
    out.append(dict(zip(sel.tolist(), (g * scaling).tolist())))
  return out


def as_dicts(index, gates):
  index, gates = np.asarray(index), np.asarray(gates)
  return [{int(i): float(w) for i, w in zip(ri, rw) if i >= 0} for ri, rw in zip(index, gates)]


def assert_routes_equal(got, want, tol=1e-5):
  assert len(got) == len(want)
  for t, (g, w) in enumerate(zip(got, want)):
    assert set(g) == set(w), f"token {t}: {sorted(g)} vs {sorted(w)}"
    for i in w:
      assert abs(g[i] - w[i]) <= tol * max(1, abs(w[i])), (t, i, g[i], w[i])


# ---------------------------------------------------------------------------- sigmoid (V3)
@pytest.mark.parametrize("case", [
    dict(k=2), dict(k=3, groups=4, keep=2), dict(k=2, groups=2, keep=1, fill="zero"),
    dict(k=4, groups=4, routing="balanced"), dict(k=2, renorm=False, scaling=2.5)])
def test_sigmoid_selection_and_gates(case):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(40, 8)).astype(np.float32)
  bias = rng.normal(scale=0.3, size=8).astype(np.float32)
  opts = dict(case)
  k = opts.pop("k")
  want = np_sigmoid_route(logits, bias, k, **opts)
  idx = sigmoid.sigmoid_select(jax.nn.sigmoid(jnp.asarray(logits)), jnp.asarray(bias), k,
                               num_groups=opts.get("groups", 1),
                               groups_per_token=opts.get("keep", 1),
                               group_mask_fill=opts.get("fill", "neg_inf"),
                               group_routing=opts.get("routing", "limited"))
  s = 1 / (1 + np.exp(-logits.astype(np.float64)))
  g = np.take_along_axis(s, np.asarray(idx), -1)
  if opts.get("renorm", True):
    g = g / g.sum(-1, keepdims=True)
  assert_routes_equal(as_dicts(idx, g * opts.get("scaling", 1.0)), want)


def test_sigmoid_ties_and_bias_excluding_groups():
  zeros = np.zeros((5, 8), np.float32)
  # all scores equal: the lowest expert ids win, the first groups are kept
  for groups, keep in ((1, 1), (4, 2)):
    idx = sigmoid.sigmoid_select(jax.nn.sigmoid(jnp.asarray(zeros)), jnp.zeros(8), 3,
                                 num_groups=groups, groups_per_token=keep)
    want = np_sigmoid_route(zeros, np.zeros(8), 3, groups=groups, keep=keep)
    assert_routes_equal(as_dicts(idx, np.ones_like(idx)), [{i: 1.0 for i in w} for w in want])
    assert {tuple(sorted(r)) for r in np.asarray(idx).tolist()} == {(0, 1, 2)}
  # a bias of -10 on groups 0 and 1 excludes them whatever the scores
  logits = np.random.default_rng(1).normal(size=(30, 8)).astype(np.float32)
  bias = np.array([-10] * 4 + [0] * 4, np.float32)
  idx = np.asarray(sigmoid.sigmoid_select(jax.nn.sigmoid(jnp.asarray(logits)), jnp.asarray(bias),
                                          2, num_groups=4, groups_per_token=2))
  assert idx.min() >= 4
  # with every bias negative, the transformers fill (0.0) lets masked experts win; neg_inf never
  bias = np.full(8, -2.0, np.float32)
  s = 1 / (1 + np.exp(-logits.astype(np.float64))) + bias
  kept = [set(np.argsort(-s[t].reshape(4, 2).sum(-1), kind="stable")[:2]) for t in range(30)]
  for fill in ("neg_inf", "zero"):
    idx = sigmoid.sigmoid_select(jax.nn.sigmoid(jnp.asarray(logits)), jnp.asarray(bias), 3,
                                 num_groups=4, groups_per_token=2, group_mask_fill=fill)
    want = np_sigmoid_route(logits, bias, 3, groups=4, keep=2, fill=fill)
    assert_routes_equal(as_dicts(idx, np.ones_like(idx)), [{i: 1.0 for i in w} for w in want])
    for t, row in enumerate(np.asarray(idx).tolist()):
      in_kept = [i // 2 in kept[t] for i in row]
      assert all(in_kept) if fill == "neg_inf" else not any(in_kept)


def test_sequence_balance_loss_and_bias_update_match_numpy():
  rng = np.random.default_rng(2)
  e, k, seqs, seq_len = 6, 2, 3, 5
  s = 1 / (1 + np.exp(-rng.normal(size=(seqs * seq_len, e))))
  probs = s / s.sum(-1, keepdims=True)
  index = np.stack([rng.choice(e, k, replace=False) for _ in range(seqs * seq_len)])
  want = []
  for q in range(seqs):
    rows = slice(q * seq_len, (q + 1) * seq_len)
    f = e / (k * seq_len) * np.bincount(index[rows].ravel(), minlength=e)
    want.append(np.sum(f * probs[rows].mean(0)))
  got = sigmoid.sequence_balance_loss(jnp.asarray(index), jnp.asarray(probs, jnp.float32), e,
                                      seq_len)
  np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)
  load = np.bincount(index.ravel(), minlength=e)
  np.testing.assert_allclose(sigmoid.bias_update(jnp.asarray(index), e, 1e-3),
                             1e-3 * np.sign(load.mean() - load), rtol=1e-6)


# ---------------------------------------------------------------------------- top-p
def np_top_p(probs, p, max_k, renorm):
  out = []
  for row in probs.astype(np.float64):
    order = np.argsort(-row, kind="stable")
    cum = np.cumsum(row[order])
    n = int(np.argmax(cum >= p)) + 1 if (cum >= p).any() else len(row)
    sel = order[:min(n, max_k)]
    g = row[sel] / (row[sel].sum() if renorm else 1.0)
    out.append(dict(zip(sel.tolist(), g.tolist())))
  return out


@pytest.mark.parametrize("p,max_k,renorm", [(1e-6, 4, False), (0.5, 4, False), (0.5, 4, True),
                                            (0.9, 2, False), (1.0, 8, False)])
def test_top_p_selection(p, max_k, renorm):
  logits = np.random.default_rng(3).normal(scale=1.5, size=(50, 8)).astype(np.float32)
  probs = jax.nn.softmax(jnp.asarray(logits), axis=-1)
  idx, gates = top_p.top_p_select(probs, p, max_k, renorm)
  assert idx.shape == (50, max_k)
  assert_routes_equal(as_dicts(idx, gates), np_top_p(np.asarray(probs), p, max_k, renorm))
  counts = (np.asarray(idx) >= 0).sum(-1)
  if p == 1e-6:
    assert (counts == 1).all()              # the top expert alone reaches p
  if p == 1.0:
    assert (counts == 8).all()              # every expert
  assert np.all(np.asarray(gates)[np.asarray(idx) < 0] == 0)


def test_top_p_entropy_loss_matches_numpy():
  x = jax.random.normal(jax.random.key(0), (2, 6, D))
  router = TopPRouter(num_experts=5, max_k=3, p=0.5, entropy_loss_weight=1e-4)
  params = router.init(jax.random.key(1), x)
  r = router.apply(params, x)
  p = np.asarray(r.probs, np.float64)
  np.testing.assert_allclose(r.losses["router_entropy_loss"],
                             np.mean(-(p * np.log(p)).sum(-1)), rtol=1e-5)
  assert dict(r.loss_weights)["router_entropy_loss"] == 1e-4


# ---------------------------------------------------------------------------- expert choice
def test_expert_choice_selection_and_threshold():
  logits = np.random.default_rng(4).normal(size=(20, 4)).astype(np.float32)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1))
  c = expert_choice.expert_capacity(20, 4, 2, 1.0)
  assert c == 10
  idx, gates, kth = expert_choice.expert_choice_select(jnp.asarray(probs), c)
  want = [dict() for _ in range(20)]
  for e in range(4):
    top = np.argsort(-probs[:, e], kind="stable")[:c]
    for t in top:
      want[t][e] = probs[t, e]
    assert kth[e] == pytest.approx(probs[top[-1], e])
  assert_routes_equal(as_dicts(idx, gates), want)
  assert (np.asarray(idx) >= 0).sum() == 4 * c                 # balanced by construction
  tau = np.array([0.2, 0.3, 0.25, 0.9], np.float32)
  idx, gates = expert_choice.threshold_select(jnp.asarray(probs), jnp.asarray(tau))
  want = [{e: probs[t, e] for e in range(4) if probs[t, e] >= tau[e]} for t in range(20)]
  assert_routes_equal(as_dicts(idx, gates), want)


def test_expert_choice_threshold_is_an_ema_of_the_capacity_score():
  x = jax.random.normal(jax.random.key(0), (1, 20, D))
  router = ExpertChoiceRouter(num_experts=4, k=2, threshold_momentum=0.9)
  params = router.init(jax.random.key(1), x)
  r, upd = router.apply(params, x, deterministic=False, mutable=["param_updates"])
  kth = [np.sort(np.asarray(r.probs)[:, e])[-10] for e in range(4)]
  np.testing.assert_allclose(upd["param_updates"]["threshold"][0], 0.1 * np.array(kth), rtol=1e-5)
  # causal form: one token's routing does not depend on the other tokens
  params = jax.tree.map(lambda a: a, params)
  params["params"]["threshold"] = jnp.full((4,), 0.25)
  full = router.apply(params, x)
  alone = router.apply(params, x[:, :3])
  np.testing.assert_array_equal(full.expert_index[:3], alone.expert_index)


def test_expert_race_selection_similarity_loss_and_threshold():
  logits = np.random.default_rng(5).normal(size=(12, 4)).astype(np.float32)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1), np.float64)
  idx, gates, kth = expert_choice.race_select(jnp.asarray(probs, jnp.float32), 2)
  flat = np.argsort(-probs.ravel(), kind="stable")[:24]
  want = [dict() for _ in range(12)]
  for f in flat:
    want[f // 4][f % 4] = probs.ravel()[f]
  assert_routes_equal(as_dicts(idx, gates), want)
  assert kth == pytest.approx(probs.ravel()[flat[-1]], rel=1e-6)
  m = (np.asarray(idx) >= 0).astype(np.float64)
  co = m.T @ m
  np.fill_diagonal(co, 0)
  unit = probs / np.linalg.norm(probs, axis=0)
  cos = unit.T @ unit
  np.testing.assert_allclose(
      expert_choice.router_similarity_loss(jnp.asarray(probs, jnp.float32), jnp.asarray(m > 0)),
      np.sum(co * cos) / co.sum(), rtol=1e-5)
  # threshold: a scalar EMA of the (T k)-th score; decoding is per token
  x = jax.random.normal(jax.random.key(0), (1, 12, D))
  router = ExpertRaceRouter(num_experts=4, k=2, threshold_momentum=0.8,
                            similarity_loss_weight=0.1)
  params = router.init(jax.random.key(1), x)
  r, upd = router.apply(params, x, deterministic=False, mutable=["param_updates"])
  kth = np.sort(np.asarray(r.probs).ravel())[-24]
  np.testing.assert_allclose(upd["param_updates"]["threshold"][0], 0.2 * kth, rtol=1e-5)
  assert "router_similarity" in r.losses
  params["params"]["threshold"] = jnp.asarray(0.3)
  np.testing.assert_array_equal(router.apply(params, x).expert_index[:4],
                                router.apply(params, x[:, :4]).expert_index)


# ---------------------------------------------------------------------------- in the block
def np_swiglu(u, wi, wo):
  g, up = u @ wi[:, 0], u @ wi[:, 1]
  return (g / (1 + np.exp(-g)) * up) @ wo


def np_block(u, params, routes):
  """sum over a token's routed experts of gate x FFN_e(u): the per-expert loop reference."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  out = np.zeros_like(u)
  for t, route in enumerate(routes):
    for e, g in route.items():
      out[t] += g * np_swiglu(u[t], p["experts"]["wi"][e], p["experts"]["wo"][e])
  return out


def _block(spec, x, deterministic=True):
  block = MoEBlock(spec)
  params = nn.meta.unbox(block.init(jax.random.key(0), x)["params"])
  for name in ("kernel", "null_kernel"):     # decisive routing
    if name in params["router"]:
      params["router"][name] = params["router"][name] * 50
  return block, params


BASE = dict(num_experts=8, top_k=2, expert_hidden=8, load_balance_weight=0.0)
ROUTER_SPECS = {
    "sigmoid_groups": dict(router="sigmoid", num_expert_groups=4, groups_per_token=2,
                           routed_scaling_factor=2.5, sequence_balance_weight=1e-4),
    "top_p": dict(router="top_p", top_k=4, top_p=0.6, renormalize=False),
    "null_experts": dict(router="topk_softmax", null_experts=3),
    "expert_choice": dict(router="expert_choice", expert_choice_eval="batch"),
    "expert_race": dict(router="expert_race", expert_choice_eval="batch",
                        similarity_loss_weight=0.01),
}


def np_routes(name, spec, u, params):
  logits = u @ np.asarray(params["router"]["kernel"], np.float64)
  if name == "sigmoid_groups":
    return np_sigmoid_route(logits, np.asarray(params["router"]["selection_bias"]),
                            spec.routed_k, groups=4, keep=2, scaling=2.5)
  if name == "null_experts":
    logits = np.concatenate([logits, u @ np.asarray(params["router"]["null_kernel"])], -1)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  if name == "top_p":
    return np_top_p(probs, 0.6, 4, False)
  if name == "null_experts":   # top-2 of 11, renormalised over both picks; nulls add nothing
    out = []
    for row in probs:
      sel = np.argsort(-row, kind="stable")[:2]
      out.append({int(i): row[i] / row[sel].sum() for i in sel if i < 8})
    return out
  if name == "expert_race":
    flat = np.argsort(-probs.ravel(), kind="stable")[:len(u) * 2]
    out = [dict() for _ in u]
    for f in flat:
      out[f // 8][f % 8] = probs.ravel()[f]
    return out
  c = expert_choice.expert_capacity(len(u), 8, 2, spec.capacity_factor)
  out = [dict() for _ in u]
  for e in range(8):
    for t in np.argsort(-probs[:, e], kind="stable")[:c]:
      out[t][e] = probs[t, e]
  return out


@pytest.mark.parametrize("name", list(ROUTER_SPECS))
def test_block_with_router_equals_per_expert_loop(name):
  spec = MoESpec(**{**BASE, **ROUTER_SPECS[name]})
  x = jax.random.normal(jax.random.key(1), (2, 12, D))
  block, params = _block(spec, x)
  y, state = block.apply({"params": params}, x, mutable=["intermediates", "losses"])
  u = np.asarray(x, np.float64).reshape(-1, D)
  want = np_block(u, params, np_routes(name, spec, u, params))
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, rtol=2e-4, atol=2e-5)
  inter = state["intermediates"]
  routed = sum(len(r) for r in np_routes(name, spec, u, params))
  np.testing.assert_allclose(inter["experts_per_token"][0], routed / len(u), rtol=1e-6)
  if name == "null_experts":
    assert 0 < float(inter["null_fraction"][0]) < 1
  if name == "sigmoid_groups":
    assert set(state["losses"]) == {"sequence_balance"}
  # gradients reach the router through the gates
  grad = jax.grad(lambda p: jnp.sum(block.apply({"params": p}, x) ** 2))(params)
  assert float(jnp.abs(grad["router"]["kernel"]).sum()) > 0
  for leaf in ("selection_bias", "threshold"):
    if leaf in grad["router"]:
      assert float(jnp.abs(grad["router"][leaf]).sum()) == 0   # not trained by gradients


def test_balance_loss_counts_null_experts():
  spec = MoESpec(**{**BASE, **ROUTER_SPECS["null_experts"]})
  x = jax.random.normal(jax.random.key(2), (1, 30, D))
  block, params = _block(spec, x)
  r = TopKSoftmaxRouter.from_spec(spec).apply({"params": params["router"]}, x)
  idx = np.asarray(r.expert_index)
  assert idx.max() >= 8                          # some null picks, ...
  assert (np.asarray(r.dispatch_index) < 8).all()  # ... never dispatched
  f = np.bincount(idx.ravel(), minlength=11) / idx.size
  want = 11 * np.sum(f * np.asarray(r.probs, np.float64).mean(0))
  np.testing.assert_allclose(losses.load_balance_loss(r), want, rtol=1e-5)


@pytest.mark.parametrize("fields,message", [
    (dict(null_experts=2, router="sigmoid"), "null_experts: is read only by .*'topk_softmax'"),
    (dict(bias_update_rate=1e-3), "bias_update_rate: is read only by .*'sigmoid'"),
    (dict(router="sigmoid", num_expert_groups=3), "num_expert_groups: must be > 0 and divide"),
    (dict(router="sigmoid", num_expert_groups=4, groups_per_token=1, top_k=3),
     "groups_per_token: .*keep at least the 3 active"),
    (dict(router="sigmoid", num_expert_groups=4, group_routing="balanced", top_k=3),
     "group_routing: 'balanced' takes exactly k/G"),
    (dict(router="sigmoid", group_mask_fill="nan"), "group_mask_fill: got 'nan'"),
    (dict(router="top_p", top_p=1.5), r"top_p: must be in \(0, 1\]"),
    (dict(router="expert_choice", dispatch="capacity"), "dispatch: .*no capacity to enforce"),
    (dict(similarity_loss_weight=0.1), "similarity_loss_weight: is read only by .*'expert_race'"),
    (dict(expert_choice_eval="batch"), "expert_choice_eval: .*'expert_choice' or 'expert_race'"),
    (dict(iterations=0), "iterations: must be >= 1"),
    (dict(iterations=2, router="recurrent"), "iterations=2 cannot combine with"),
    (dict(router="nope"), "router: got 'nope'; allowed: 'topk_softmax', 'sigmoid', 'top_p'"),
])
def test_router_settings_are_validated(fields, message):
  with pytest.raises(ConfigError, match=message):
    MoESpec(**{**BASE, **fields})


def test_from_spec_reads_the_options():
  spec = MoESpec(**{**BASE, **ROUTER_SPECS["sigmoid_groups"]}, bias_update_rate=1e-3)
  r = SigmoidRouter.from_spec(spec)
  assert (r.num_groups, r.groups_per_token, r.scaling, r.bias_update_rate) == (4, 2, 2.5, 1e-3)
  assert math.isclose(r.sequence_balance_weight, 1e-4)
  assert dataclasses.asdict(spec)["router"] == "sigmoid"


# ---------------------------------------------------------------------------- hash
def test_hash_routing_is_a_fixed_balanced_function_of_the_id():
  from moejax.layers.routers import hash as hash_router
  ids = jnp.arange(256)
  idx = np.asarray(hash_router.hash_experts(ids, 8, 2))
  assert idx.shape == (256, 2) and (idx[:, 0] != idx[:, 1]).all()
  again = np.asarray(hash_router.hash_experts(jnp.array([[5, 200], [5, 7]]), 8, 2))
  np.testing.assert_array_equal(again[0], idx[5])            # same id, same experts,
  np.testing.assert_array_equal(again[2], idx[5])            # whatever else is in the batch
  counts = np.bincount(idx.ravel(), minlength=8)
  assert counts.min() > 0.6 * 64 and counts.max() < 1.4 * 64   # ~balanced over ids
  assert not np.array_equal(np.asarray(hash_router.hash_experts(ids, 8, 2, salt=1)), idx)


def test_block_with_hash_router_uses_the_token_ids():
  spec = MoESpec(**{**BASE, "router": "hash"})
  x = jax.random.normal(jax.random.key(3), (2, 6, D))
  ids = jax.random.randint(jax.random.key(4), (2, 6), 0, 256)
  block = MoEBlock(spec)
  params = nn.meta.unbox(block.init(jax.random.key(0), x, token_ids=ids)["params"])
  assert "router" not in params                               # no router parameters
  y = block.apply({"params": params}, x, token_ids=ids)
  from moejax.layers.routers import hash as hash_router
  idx = np.asarray(hash_router.hash_experts(ids, 8, 2))
  routes = [{int(e): 0.5 for e in row} for row in idx]
  want = np_block(np.asarray(x, np.float64).reshape(-1, D), params, routes)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, rtol=2e-4, atol=2e-5)
  with pytest.raises(ValueError, match="routes by token id"):
    block.apply({"params": params}, x)


# ---------------------------------------------------------------------------- stochastic (THOR)
def test_stochastic_router_draws_distinct_uniform_experts():
  from moejax.layers.routers import StochasticRouter
  x = jnp.zeros((1, 4000, D))
  router = StochasticRouter(num_experts=8, k=2)
  r1 = router.apply({}, x, deterministic=False, rngs={"router": jax.random.key(1)})
  r2 = router.apply({}, x, deterministic=False, rngs={"router": jax.random.key(2)})
  idx = np.asarray(r1.expert_index)
  assert (idx[:, 0] != idx[:, 1]).all()
  assert not np.array_equal(idx, np.asarray(r2.expert_index))
  counts = np.bincount(idx.ravel(), minlength=8)
  assert np.abs(counts / counts.sum() - 1 / 8).max() < 0.02
  np.testing.assert_allclose(r1.weight, 0.5)
  np.testing.assert_array_equal(router.apply({}, x).expert_index,      # eval: a fixed draw
                                router.apply({}, x).expert_index)


def test_thor_consistency_loss_matches_numpy():
  from conftest import tiny_config
  from moejax import config as config_lib
  from moejax.train import steps
  c = config_lib.apply_overrides(tiny_config("deepseekmoe"), {
      "model.moe.router": "stochastic", "model.moe.consistency_loss_weight": 0.5,
      "model.moe.load_balance_weight": 0.0})
  model = steps.build_model(c)
  params, _ = steps.init_params(model, jax.random.key(0), 8)
  batch = jax.random.randint(jax.random.key(1), (2, 9), 0, 256)
  rng = jax.random.key(7)
  total, (ce, aux, _) = steps.loss_fn(model, params, batch, rng, False)
  logits = [np.asarray(steps.apply_model(model, params, batch[:, :-1], r, False)[0], np.float64)
            for r in (rng, jax.random.fold_in(rng, 1))]
  assert not np.allclose(logits[0], logits[1])          # two different draws
  logp = [l - np.log(np.exp(l).sum(-1, keepdims=True)) for l in logits]
  y = np.asarray(batch[:, 1:])
  ces = [-np.take_along_axis(lp, y[..., None], -1).mean() for lp in logp]
  p, q = np.exp(logp[0]), np.exp(logp[1])
  kl = lambda a, b, la, lb: np.mean(np.sum(a * (la - lb), -1))
  sym = (kl(p, q, logp[0], logp[1]) + kl(q, p, logp[1], logp[0])) / 2
  np.testing.assert_allclose(ce, np.mean(ces), rtol=1e-5)
  np.testing.assert_allclose(total, np.mean(ces) + 0.5 * sym, rtol=1e-5)


# ---------------------------------------------------------------------------- recurrent (RMoE)
def np_gru(h, x, p):
  f = h.shape[-1]
  sig = lambda a: 1 / (1 + np.exp(-a))
  gx = x @ p["input_kernel"] + p["input_bias"]
  gh = h @ p["recurrent_kernel"] + p["recurrent_bias"]
  r, z = sig(gx[:, :f] + gh[:, :f]), sig(gx[:, f:2 * f] + gh[:, f:2 * f])
  n = np.tanh(gx[:, 2 * f:] + r * gh[:, 2 * f:])
  return (1 - z) * n + z * h


def test_recurrent_router_threads_one_gru_through_layers():
  from moejax.layers.routers import GRU
  spec = MoESpec(**{**BASE, "router": "recurrent"})

  class TwoLayers(nn.Module):
    @nn.compact
    def __call__(self, x1, x2):
      gru = GRU(6, name="gru")
      y1, c1 = MoEBlock(spec, name="b1")(x1, router_state=(gru, None))
      y2, c2 = MoEBlock(spec, name="b2")(x2, router_state=(gru, c1))
      return y1, y2, c1, c2

  x1, x2 = (jax.random.normal(jax.random.key(i), (2, 5, D)) for i in (5, 6))
  model = TwoLayers()
  params = nn.meta.unbox(model.init(jax.random.key(0), x1, x2)["params"])
  for b in ("b1", "b2"):
    params[b]["router"]["kernel"] = params[b]["router"]["kernel"] * 50
  assert set(params) == {"gru", "b1", "b2"}                 # one GRU for both layers
  y1, y2, c1, c2 = model.apply({"params": params}, x1, x2)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = np.zeros((10, 6))
  for x, y, c, b in ((x1, y1, c1, "b1"), (x2, y2, c2, "b2")):
    u = np.asarray(x, np.float64).reshape(-1, D)
    h = np_gru(h, u @ p[b]["router"]["proj"], p["gru"])
    np.testing.assert_allclose(c, h, rtol=1e-5, atol=1e-6)
    logits = h @ p[b]["router"]["kernel"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    routes = []
    for row in probs:
      sel = np.argsort(-row, kind="stable")[:2]
      routes.append({int(i): row[i] / row[sel].sum() for i in sel})
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), np_block(u, p[b], routes),
                               rtol=2e-4, atol=2e-5)
  # the second layer's routing depends on the first layer's input through the GRU
  grad = jax.grad(lambda a: jnp.sum(model.apply({"params": params}, a, x2)[3]))(x1)
  assert float(jnp.abs(grad).sum()) > 0


@pytest.mark.parametrize("name", ["sigmoid_groups", "top_p", "null_experts"])
def test_routers_with_the_capacity_planner(name):
  """With room for every slot the capacity planner computes what the dropless one does; with
  little room it drops and says so (null and unused slots are never counted as drops)."""
  spec = MoESpec(**{**BASE, **ROUTER_SPECS[name]})
  x = jax.random.normal(jax.random.key(7), (2, 12, D))
  block, params = _block(spec, x)
  want = block.apply({"params": params}, x)
  roomy = MoEBlock(dataclasses.replace(spec, dispatch="capacity", capacity_factor=100.0))
  np.testing.assert_allclose(roomy.apply({"params": params}, x), want, rtol=1e-5, atol=1e-6)
  tight = MoEBlock(dataclasses.replace(spec, dispatch="capacity", capacity_factor=0.3))
  _, state = tight.apply({"params": params}, x, mutable=["intermediates"])
  inter = state["intermediates"]
  dropped, frac = int(inter["num_dropped"][0]), float(inter["drop_fraction"][0])
  assert dropped > 0 and 0 < frac < 1
  computed = dropped / frac                       # routed slots that reach a real expert
  np.testing.assert_allclose(float(inter["experts_per_token"][0]) * 24, computed - dropped,
                             rtol=1e-5)

"""Heterogeneous experts (HMoE): the column-block bank against a per-expert loop of SwiGLU FFNs
of the listed sizes; ladders, the parameter penalty, size metrics and FLOPs against hand counts."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from moejax import config as config_lib
from moejax.errors import ConfigError
from moejax.layers import heterogeneous as het
from moejax.layers import losses
from moejax.layers.moe import MoEBlock, MoESpec, size_metrics
from moejax.layers.routers import RoutingResult

D = 12


def np_swiglu(u, wi, wo, dy=None):
  """SwiGLU in float64; with ``dy``: (y, dx, dwi, dwo) by the chain rule written out."""
  g, up = u @ wi[:, 0], u @ wi[:, 1]
  sig = 1 / (1 + np.exp(-g))
  act = g * sig
  y = (act * up) @ wo
  if dy is None:
    return y
  dh = dy @ wo.T
  dg = dh * up * sig * (1 + g * (1 - sig))
  dup = dh * act
  dwi = np.stack([u.T @ dg, u.T @ dup], axis=1)
  return y, dg @ wi[:, 0].T + dup @ wi[:, 1].T, dwi, (act * up).T @ dy


def _bank(sizes, seed=0):
  bank = het.HeterogeneousSwiGLUExperts(tuple(sizes), D, gmm_backend="xla")
  xs = jnp.zeros((4, D))
  params = nn.meta.unbox(bank.init(jax.random.key(seed), xs, jnp.array([4] + [0] * (len(sizes) - 1),
                                                                        jnp.int32))["params"])
  return bank, params


def _full_weights(params, sizes):
  """Expert i's weights rebuilt by hand from the blocks (independent of ``expert_weights``)."""
  bounds = [0] + sorted(set(sizes))
  wi = [np.zeros((D, 2, h)) for h in sizes]
  wo = [np.zeros((h, D)) for h in sizes]
  for j, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
    members = [i for i, h in enumerate(sizes) if h >= hi]
    for r, i in enumerate(members):
      wi[i][:, :, lo:hi] = params[f"wi_{j}"][r]
      wo[i][lo:hi] = params[f"wo_{j}"][r]
  return wi, wo


ORDERED = ((48, 32, 16, 16, 8), (5, 0, 7, 3, 9))        # largest first; one expert gets nothing
ANY_ORDER = ((8, 64, 8, 24, 64, 8), (3, 4, 0, 6, 2, 5))  # runs of consecutive block members
# one large expert and many small ones; the large one with few of 256 rows (row tiles of 32:
# several tiles per group)
FEW_ROWS_WIDE = ((64, 16, 16, 16, 16, 16, 16, 16), (10, 40, 30, 50, 20, 40, 30, 33))


@pytest.mark.parametrize("sizes,counts,backend", [
    (*ORDERED, "xla"), (*ANY_ORDER, "xla"), (*FEW_ROWS_WIDE, "xla"),
    (*ANY_ORDER, "reference"), (*ANY_ORDER, "ragged_dot")])
def test_bank_equals_a_loop_of_swiglu_ffns_of_the_listed_sizes(sizes, counts, backend):
  bank, params = _bank(sizes)
  bank = bank.clone(gmm_backend=backend)
  assert sum(np.prod(v.shape) for v in jax.tree.leaves(params)) == 3 * D * sum(sizes)  # true size
  m = sum(counts) + 3                                   # 3 trailing rows of no expert
  xs = jax.random.normal(jax.random.key(1), (m, D))
  gs = jnp.asarray(counts, jnp.int32)
  ct = jax.random.normal(jax.random.key(2), (m, D))

  def loss(p, x):
    return jnp.sum(bank.apply({"params": p}, x, gs) * ct)

  val, (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, xs)
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  wi, wo = _full_weights(p64, sizes)
  x64, c64 = np.asarray(xs, np.float64), np.asarray(ct, np.float64)
  want, want_dx, row = np.zeros((m, D)), np.zeros((m, D)), 0
  want_dwi, want_dwo = [], []
  for i, n in enumerate(counts):
    y, dx, dwi, dwo = np_swiglu(x64[row:row + n], wi[i], wo[i], c64[row:row + n])
    want[row:row + n], want_dx[row:row + n] = y, dx
    want_dwi.append(dwi)
    want_dwo.append(dwo)
    row += n
  np.testing.assert_allclose(bank.apply({"params": params}, xs, gs), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(val, np.sum(want * c64), rtol=1e-4)
  np.testing.assert_allclose(gx, want_dx, rtol=1e-4, atol=1e-5)
  got_wi, got_wo = _full_weights(jax.tree.map(np.asarray, gp), sizes)
  blocks = len(set(sizes))
  for i in range(len(sizes)):
    np.testing.assert_allclose(got_wi[i], want_dwi[i], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_wo[i], want_dwo[i], rtol=1e-4, atol=1e-5)
    full = het.expert_weights((tuple(params[f"wi_{j}"] for j in range(blocks)),
                               tuple(params[f"wo_{j}"] for j in range(blocks))), sizes, i)
    np.testing.assert_allclose(full[0], wi[i], rtol=1e-6)
    np.testing.assert_allclose(full[1], wo[i], rtol=1e-6)


def test_pallas_kernels_run_the_column_blocks():
  sizes, counts = (32, 16, 16, 8), (9, 0, 21, 6)
  bank, params = _bank(sizes)
  xs = jax.random.normal(jax.random.key(3), (40, D))
  gs = jnp.asarray(counts, jnp.int32)
  want = bank.apply({"params": params}, xs, gs)
  got = bank.clone(gmm_backend="pallas").apply({"params": params}, xs, gs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_equal_sizes_are_the_homogeneous_bank():
  spec = MoESpec(num_experts=4, top_k=2, expert_hidden=16, gmm_backend="xla")
  het_spec = dataclasses.replace(spec, expert_sizes=(16,) * 4)
  x = jax.random.normal(jax.random.key(4), (2, 6, D))
  params = nn.meta.unbox(MoEBlock(spec).init(jax.random.key(0), x)["params"])
  hp = {"router": params["router"], "experts": {"wi_0": params["experts"]["wi"],
                                                "wo_0": params["experts"]["wo"]}}
  np.testing.assert_allclose(MoEBlock(het_spec).apply({"params": hp}, x),
                             MoEBlock(spec).apply({"params": params}, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,total,want", [
    ("geometric", 8 * 255, (1024, 512, 256, 128, 64, 32, 16, 8)),
    ("arithmetic", 8 * 128, tuple(8 * h for h in (23, 21, 19, 17, 15, 13, 11, 9))),
    ("hybrid", 8 * 16, (32, 32, 16, 16, 8, 8, 8, 8)),
])
def test_ladders_are_the_papers_shapes_scaled_to_the_total(kind, total, want):
  assert het.expert_size_ladder(kind, 8, total) == want
  twice = het.expert_size_ladder(kind, 16, 2 * total, repeats=2)
  assert twice == want + want
  # rounding: every size a multiple of 8, the total exact
  odd = het.expert_size_ladder(kind, 8, 8 * 100)
  assert sum(odd) == 800 and all(h % 8 == 0 and h >= 8 for h in odd)
  assert list(odd) == sorted(odd, reverse=True)


def test_size_errors_name_the_setting():
  c = config_lib.base_config()
  base = {"model.moe.num_experts": 4, "model.moe.expert_hidden": 32}
  cases = [
      ({"model.moe.expert_sizes": (8, 16)}, "config.model.moe.expert_sizes: needs one hidden "
                                            "size per routed expert"),
      ({"model.moe.expert_sizes": (8, 16, 0, 4)}, "positive integers"),
      ({"model.moe.expert_sizes": (8, 16, 8, 8), "model.moe.expert_total_hidden": 128},
       "sum to 40, but model.moe.expert_total_hidden=128"),
      ({"model.moe.expert_sizes": (8, 16, 8, 8), "model.moe.expert_size_ladder": "hybrid"},
       "set one"),
      ({"model.moe.expert_size_ladder": "fibonacci"}, "allowed: 'none', 'geometric'"),
      ({"model.moe.expert_total_hidden": 64}, "neither model.moe.expert_sizes nor"),
      ({"model.moe.expert_size_ladder": "geometric", "model.moe.expert_total_hidden": 12},
       "model.moe.expert_total_hidden=12"),
      ({"model.moe.expert_sizes": (8, 16, 8, 8), "model.moe.expert_bank": "ternary_swiglu"},
       "expert_bank='swiglu'"),
      ({"model.moe.expert_sizes": (8, 16, 16, 8), "mesh.expert": 2, "mesh.num_devices": -1},
       "every device's experts must have the same sizes"),
  ]
  for overrides, msg in cases:
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
      config_lib.validate(config_lib.apply_overrides(c, {**base, **overrides}))
  # the same sizes repeated per device pass
  config_lib.validate(config_lib.apply_overrides(c, {
      **base, "model.moe.expert_sizes": (16, 8, 16, 8), "mesh.expert": 2, "mesh.num_devices": -1}))
  assert het.local_sizes((16, 8, 16, 8), 2) == (16, 8)


def _routing(rng, t, e, k, unused=0.0):
  logits = rng.normal(size=(t, e))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  idx = np.argsort(-probs, axis=1)[:, :k].astype(np.int32)
  idx[rng.random(idx.shape) < unused] = -1
  idx[:, 0] = np.argmax(probs, 1)                      # every token keeps one expert
  w = np.where(idx >= 0, np.take_along_axis(probs, np.maximum(idx, 0), 1), 0.0)
  return RoutingResult(expert_index=jnp.asarray(idx), weight=jnp.asarray(w, jnp.float32),
                       probs=jnp.asarray(probs, jnp.float32),
                       logits=jnp.asarray(logits, jnp.float32))


def test_parameter_penalty_and_size_metrics_match_numpy():
  rng = np.random.default_rng(0)
  sizes = (64, 32, 16, 16, 8)
  r = _routing(rng, 40, 5, 3, unused=0.3)
  idx, probs = np.asarray(r.expert_index), np.asarray(r.probs, np.float64)
  t, k = idx.shape
  count = np.array([(idx == i).sum() for i in range(5)], np.float64)
  h = np.asarray(sizes, np.float64)
  # L_PP = N sum_i M_i Phat_i, M_i = (count_i / (T k)) h_i / mean(h)
  want = 5 * np.sum(count / (t * k) * h / h.mean() * probs.mean(0))
  np.testing.assert_allclose(losses.parameter_penalty_loss(r, sizes), want, rtol=1e-5)
  # equal sizes: the usual load-balance loss
  np.testing.assert_allclose(losses.parameter_penalty_loss(r, (16,) * 5),
                             losses.load_balance_loss(r), rtol=1e-6)
  per_token = np.array([sum(3 * D * sizes[i] for i in row if i >= 0) for row in idx])
  m = size_metrics(r, sizes, D)
  np.testing.assert_allclose(m["routed_params"], per_token.mean(), rtol=1e-6)
  np.testing.assert_allclose(m["routed_params_quantiles"],
                             np.quantile(per_token, [0.1, 0.25, 0.5, 0.75, 0.9]), rtol=1e-6)
  # share of the computed slots per size, sizes ascending (8, 16, 32, 64)
  share = np.array([count[4], count[2] + count[3], count[1], count[0]]) / count.sum()
  np.testing.assert_allclose(m["size_load"], share, rtol=1e-6)


def test_flops_follow_the_routing_not_the_widest_expert():
  for kind in ("geometric", "arithmetic"):
    sizes = het.expert_size_ladder(kind, 8, 8 * 255 if kind == "geometric" else 8 * 128)
    rows = np.random.default_rng(1).integers(0, 50, size=8)
    asked, done = het.hidden_flops(sizes, rows, D)
    # hand count: 2 FLOPs x (gate + up + down = 3 D h_i) per row of expert i
    assert asked == sum(6 * D * h * n for h, n in zip(sizes, rows))
    assert done == asked
    padded = 6 * D * max(sizes) * rows.sum()             # an [E, D, H_max] bank
    assert padded > 1.4 * asked


def test_block_trains_and_logs_sizes():
  spec = MoESpec(num_experts=8, top_k=2, expert_hidden=16, expert_size_ladder="hybrid",
                 router="top_p", top_p=0.5, entropy_loss_weight=0.03, load_balance_weight=0.0,
                 parameter_penalty_weight=0.1, gmm_backend="xla")
  assert spec.routed_sizes == (32, 32, 16, 16, 8, 8, 8, 8)
  x = jax.random.normal(jax.random.key(5), (2, 8, D))
  block = MoEBlock(spec)
  params = nn.meta.unbox(block.init(jax.random.key(0), x)["params"])

  def loss(p):
    y, st = block.apply({"params": p}, x, mutable=["losses", "intermediates"])
    return jnp.sum(y ** 2) + sum(jax.tree.leaves(st["losses"])), st
  (_, st), g = jax.value_and_grad(loss, has_aux=True)(params)
  assert set(st["losses"]) == {"parameter_penalty", "router_entropy_loss"}
  assert float(jnp.abs(g["router"]["kernel"]).sum()) > 0
  assert all(float(jnp.abs(v).sum()) > 0 for v in jax.tree.leaves(g["experts"]))
  inter = st["intermediates"]
  assert inter["size_load"][0].shape == (3,)
  np.testing.assert_allclose(float(inter["size_load"][0].sum()), 1.0, rtol=1e-6)


def test_upcycling_and_hf_export_refuse_heterogeneous_experts():
  from conftest import tiny_config
  from moejax.api import build_model
  from moejax.convert import ConversionError
  from moejax.convert.families import FAMILIES, check_exportable
  from moejax.train import upcycle
  dense = build_model(tiny_config("dense")).cfg
  moe = build_model(config_lib.apply_overrides(tiny_config("gshard"), {
      "model.moe.expert_sizes": (48, 16, 32, 32), "model.moe.dispatch": "dropless"})).cfg
  with pytest.raises(ConfigError, match="expert_sizes/expert_size_ladder"):
    upcycle.check_fit(dense, moe, "copy")
  with pytest.raises(ConversionError, match="model.moe.expert_sizes: HF families have experts"):
    check_exportable(FAMILIES["mixtral"], moe)

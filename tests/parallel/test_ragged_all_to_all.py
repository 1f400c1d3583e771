"""The ragged exchange: collective semantics, offsets/truncation plan, the EP layer with a
bounded receive buffer, and the GPU/TPU programs (lowered from this CPU host).

References are NumPy loops written from the documented semantics of
``jax.lax.ragged_all_to_all`` and from the receiver layout (expert-major, source-minor).
"""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from moejax.ops.grouped_matmul import gmm
from moejax.parallel import expert_parallel as ep_lib
from moejax.parallel.mesh import make_mesh
from moejax.parallel.ragged_all_to_all import RaggedExchange, ragged_all_to_all

pytestmark = pytest.mark.filterwarnings("ignore:model.moe.all_to_all='ragged'")


def _line_mesh(n):
  return Mesh(np.array(jax.devices()[:n]), ("x",), axis_types=(AxisType.Auto,))


def _run_exchange(mesh, operands, ex_arrays, out_rows):
  """The emulated collective on each device of ``mesh`` (leading axis = device)."""
  def body(op, *fields):
    ex = RaggedExchange(*(f[0] for f in fields))
    return ragged_all_to_all(op[0], ex, out_rows, "x", emulate=True)[None]

  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))(
      operands, *ex_arrays)


def test_emulation_reproduces_the_documented_example():
  """The example in jax.lax.ragged_all_to_all's docstring, axis of size 2."""
  ex = [np.array(a, np.int32) for a in (
      [[0, 1], [0, 1]],            # input_offsets
      [[1, 2], [1, 1]],            # send_sizes
      [[0, 0], [1, 2]],            # output_offsets
      [[1, 1], [2, 1]],            # recv_sizes
      [[0, 1], [0, 2]],            # recv_offsets (= all_to_all(output_offsets))
      [[0, 0], [1, 1]])]           # source_offsets (= all_to_all(input_offsets))
  got = _run_exchange(_line_mesh(2), jnp.array([[1., 2., 2.], [3., 4., 0.]]), ex, 4)
  np.testing.assert_array_equal(got, [[1, 3, 0, 0], [2, 2, 4, 0]])


def _random_exchange(rng, n, per_peer, max_size=3):
  """Random slices with gaps on both sides, in any order on the receivers."""
  k = n * per_peer
  send = rng.integers(0, max_size + 1, (n, k))
  gaps = rng.integers(0, 2, (n, k))
  in_off = np.cumsum(send + gaps, axis=1) - send
  out_off = np.zeros((n, k), np.int64)
  in_rows = int((send + gaps).sum(1).max()) + 1
  out_rows = 0
  for dst in range(n):
    arrivals = [(src, dst * per_peer + j) for src in range(n) for j in range(per_peer)]
    pos = 0
    for a in rng.permutation(len(arrivals)):
      src, i = arrivals[a]
      pos += int(rng.integers(0, 2))
      out_off[src, i] = pos
      pos += send[src, i]
    out_rows = max(out_rows, pos + 1)
  mine = lambda a, dst: a[:, dst * per_peer:(dst + 1) * per_peer].reshape(-1)
  recv = np.stack([mine(send, d) for d in range(n)])
  recv_off = np.stack([mine(out_off, d) for d in range(n)])
  src_off = np.stack([mine(in_off, d) for d in range(n)])
  fields = [in_off, send, out_off, recv, recv_off, src_off]
  return [f.astype(np.int32) for f in fields], in_rows, out_rows


def _numpy_exchange(operands, in_off, send, out_off, out_rows, per_peer):
  """The documented semantics: slice i of each source goes to device i // per_peer."""
  n = operands.shape[0]
  result = np.zeros((n, out_rows) + operands.shape[2:], operands.dtype)
  for src in range(n):
    for i in range(in_off.shape[1]):
      s = send[src, i]
      result[i // per_peer, out_off[src, i]:out_off[src, i] + s] = \
          operands[src, in_off[src, i]:in_off[src, i] + s]
  return result


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("per_peer", [1, 3])
def test_emulation_and_its_vjp_match_numpy(seed, per_peer):
  rng = np.random.default_rng(seed)
  n = 4
  fields, in_rows, out_rows = _random_exchange(rng, n, per_peer)
  ops = rng.standard_normal((n, in_rows, 2)).astype(np.float32)
  want = _numpy_exchange(ops, fields[0], fields[1], fields[2], out_rows, per_peer)
  mesh = _line_mesh(n)
  np.testing.assert_array_equal(_run_exchange(mesh, ops, fields, out_rows), want)

  # VJP: each sent row's cotangent is the cotangent of the row it landed on; unsent rows get 0.
  g = rng.standard_normal((n, out_rows, 2)).astype(np.float32)

  def body(op, gg, *f):
    ex = RaggedExchange(*(a[0] for a in f))
    _, vjp = jax.vjp(lambda o: ragged_all_to_all(o, ex, out_rows, "x", emulate=True), op[0])
    return vjp(gg[0])[0][None]

  got = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))(ops, g, *fields)
  want_t = np.zeros_like(ops)
  in_off, send, out_off = fields[:3]
  for src in range(n):
    for i in range(n * per_peer):
      s = send[src, i]
      want_t[src, in_off[src, i]:in_off[src, i] + s] = \
          g[i // per_peer, out_off[src, i]:out_off[src, i] + s]
  np.testing.assert_array_equal(got, want_t)


def _numpy_layout(counts, rows):
  """(sent, offset on receiver) per [src, E]: receiver d lays out its experts in order, each
  expert's slices by source, and cuts whatever passes ``rows``."""
  ep, e = counts.shape
  e_local = e // ep
  sent, where = np.zeros_like(counts), np.zeros_like(counts)
  for d in range(ep):
    pos = 0
    for l in range(e_local):
      for s in range(ep):
        x = d * e_local + l
        where[s, x] = pos
        sent[s, x] = min(counts[s, x], rows - pos)
        pos += sent[s, x]
  return sent, where


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("rows", [1, 7, 1000])
def test_exchange_plan_matches_numpy_layout(seed, rows):
  rng = np.random.default_rng(seed)
  ep, e = 4, 8
  counts = rng.integers(0, 6, (ep, e)).astype(np.int32)
  sent_want, where_want = _numpy_layout(counts, rows)
  sent = np.asarray(ep_lib.fit_to_buffer(jnp.asarray(counts), rows))
  np.testing.assert_array_equal(sent, sent_want)
  starts = np.cumsum(counts, 1) - counts
  el = e // ep
  for me in range(ep):
    plan = ep_lib.ragged_exchange_plan(jnp.asarray(counts), jnp.asarray(sent), jnp.int32(me))
    cols = slice(me * el, (me + 1) * el)
    np.testing.assert_array_equal(plan.input_offsets, starts[me])
    np.testing.assert_array_equal(plan.send_sizes, sent_want[me])
    np.testing.assert_array_equal(plan.output_offsets, where_want[me])
    np.testing.assert_array_equal(plan.recv_sizes, sent_want[:, cols].reshape(-1))
    np.testing.assert_array_equal(plan.recv_offsets, where_want[:, cols].reshape(-1))
    np.testing.assert_array_equal(plan.source_offsets, starts[:, cols].reshape(-1))


def test_buffer_rows_bound():
  # 4 devices x 16 tokens x min(k=2, E_l=2): every pair of the group can land on one device.
  assert ep_lib.ragged_buffer_rows(32, 2, 8, 4, None, 0.0) == 128
  # E_l = 1 < k: a token sends at most one pair to a device.
  assert ep_lib.ragged_buffer_rows(32, 2, 4, 4, None, 0.0) == 64
  assert ep_lib.ragged_buffer_rows(32, 2, 8, 4, 10, 0.0) == 20          # E_l * C
  assert ep_lib.ragged_buffer_rows(32, 2, 8, 4, None, 1.5) == 48        # ceil(1.5 * 32)
  assert ep_lib.ragged_buffer_rows(32, 2, 8, 4, None, 100.0) == 128     # never above worst


# --- the expert-parallel layer with a bounded buffer, against a NumPy per-pair reference ------

T, D, E, K = 64, 8, 8, 2
MESH = dict(data=2, fsdp=1, expert=4, tensor=1)


def _routing(rng, skew):
  if skew:   # most pairs go to the experts of device 0 of the expert axis
    idx = np.stack([rng.choice(E, 2, replace=False, p=[.35, .35, .05, .05, .05, .05, .05, .05])
                    for _ in range(T)])
  else:
    idx = np.stack([rng.choice(E, 2, replace=False) for _ in range(T)])
  return idx.astype(np.int32), rng.uniform(0.1, 1, (T, K)).astype(np.float32)


def _numpy_kept(idx, rows):
  """Which (token, slot) pairs fit their receivers' buffers: tokens split over 8 batch shards
  (data-major), shard 4g+j is source j of expert group g; each source's pairs of one expert are
  slot-major (first choices first, then token order: the dropless plan's order)."""
  kept = np.zeros(idx.shape, bool)
  ep, el, per = 4, E // 4, T // 8
  for g in range(2):
    shards = [range((4 * g + j) * per, (4 * g + j + 1) * per) for j in range(ep)]
    for d in range(ep):
      pos = 0
      for l in range(el):
        for j in range(ep):
          for s in range(K):
            for t in shards[j]:
              if idx[t, s] == d * el + l and pos < rows:
                kept[t, s] = True
                pos += 1
  return kept


def _reference(x, w, W, idx, kept):
  return jnp.einsum("td,tsdf,ts->tf", x, W[idx], jnp.where(kept, w, 0))


@pytest.mark.parametrize("skew,factor", [(False, 0.0), (True, 0.0), (True, 1.0), (True, 0.5)])
def test_ragged_layer_matches_per_pair_reference(skew, factor):
  rng = np.random.default_rng(0)
  idx, w = _routing(rng, skew)
  x = rng.standard_normal((T, D)).astype(np.float32)
  W = rng.standard_normal((E, D, D)).astype(np.float32) / np.sqrt(D)
  rows = ep_lib.ragged_buffer_rows(T // 8 * K, K, E, 4, None, factor)
  kept = _numpy_kept(idx, rows)
  if factor == 0.0:
    assert kept.all()
  else:
    assert not kept.all()                     # the case really overflows the buffer

  mesh = make_mesh(MESH)
  run = lambda params, rows_, sizes: gmm(rows_, params, sizes, backend="xla")

  def layer(x, w, W, all_to_all):
    y, dropped = ep_lib.expert_parallel_ffn(
        x, jnp.asarray(idx), w, W, P("expert"), run, num_experts=E, capacity_factor=None,
        all_to_all=all_to_all, buffer_factor=factor)
    return y, dropped

  batch = NamedSharding(mesh, P(("data", "fsdp", "expert")))
  args = (jax.device_put(x, batch), jax.device_put(w, batch),
          jax.device_put(W, NamedSharding(mesh, P("expert"))))
  with jax.set_mesh(mesh):
    y, dropped = jax.jit(layer, static_argnums=3)(*args, "ragged")
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(layer(*a, "ragged")[0] ** 2), argnums=(0, 1, 2)))(
        *args)
  want = _reference(x, w, W, idx, kept)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert int(dropped) == int((~kept).sum())
  want_grads = jax.grad(lambda *a: jnp.sum(_reference(*a, idx, kept) ** 2), argnums=(0, 1, 2))(
      x, w, W)
  for g, gw in zip(grads, want_grads):
    np.testing.assert_allclose(g, gw, rtol=1e-4, atol=1e-5)


# --- the program XLA gets on GPU and TPU ---------------------------------------------------------

@pytest.mark.parametrize("platform,backend", [("tpu", "tpu"), ("cuda", "gpu")])
def test_auto_lowers_to_ragged_all_to_all_on_gpu_and_tpu(monkeypatch, platform, backend):
  """With all_to_all='auto' the forward and backward of every MoE layer use the native ragged
  collective (two per layer each way) and the padded all_to_all is gone."""
  from conftest import tiny_config
  from moejax.parallel import sharding as sharding_lib
  from moejax.train import trainer

  monkeypatch.setattr(ep_lib, "_backend", lambda: backend)
  c = tiny_config("gshard")
  c.data.batch_size = 8
  c.model.moe.gmm_backend = "xla"     # the kernels themselves are tested in tests/pallas_kernels
  c.mesh.update(MESH)
  c.mesh.num_devices = -1
  run = trainer.Trainer(c)
  loss = lambda p, b: trainer.loss_fn(run.model, p, b, jax.random.key(1), False)[0]
  fn = jax.jit(jax.grad(loss), in_shardings=(run.shardings["params"],
                                             sharding_lib.batch_sharding(run.mesh)))
  batch = trainer.train_batch(run.data, 0, run.mesh)
  with jax.set_mesh(run.mesh):
    text = fn.trace(run.state["params"], batch).lower(lowering_platforms=(platform,)).as_text()
  moe_layers = c.model.num_layers
  assert text.count("custom_call @ragged_all_to_all(") == 4 * moe_layers
  assert "stablehlo.all_to_all" not in text.replace("ragged_all_to_all", "")

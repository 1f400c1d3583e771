"""Sharded training matches one device; golden sharding snapshots; cross-mesh checkpoints."""
import functools
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import tiny_config
from moejax.errors import ConfigError
from moejax.parallel import sharding as sharding_lib
from moejax.parallel.mesh import make_mesh, mesh_shape
from moejax.train import trainer

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
MESHES = {
    "data8": dict(data=8, fsdp=1, expert=1, tensor=1),
    "data2_expert4": dict(data=2, fsdp=1, expert=4, tensor=1),
    "fsdp2_expert2_tensor2": dict(data=1, fsdp=2, expert=2, tensor=2),
}


def _config(kind, mesh=None, skew=False):
  """``kind[:option]``: option "none" turns expert parallelism off, "ragged"/"padded" pick the
  all-to-all, "ragged@f" also sets the ragged buffer factor."""
  kind, _, option = kind.partition(":")
  c = tiny_config(kind)
  option, _, factor = option.partition("@")
  if option == "none":
    c.model.moe.expert_parallel = option
  elif option:
    c.model.moe.all_to_all = option
    c.model.moe.ragged_buffer_factor = float(factor or 0)
  c.data.batch_size = 8
  if kind != "dense":
    c.model.moe.z_loss_weight = 1e-3
    c.model.moe.device_balance_weight = 0.01
    c.model.moe.num_device_groups = 2
  if mesh:
    c.mesh.update(mesh)
    c.mesh.num_devices = -1
  return c


def _skew(params):
  """Zero router kernels: every logit ties, so every token picks experts 0..k-1 and the others
  receive nothing (all-to-one routing, empty experts, and heavy capacity drops)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if "router" in jax.tree_util.keystr(p) else x, params)


def _loss_and_grads(config, skew):
  run = trainer.Trainer(config)
  params = run.state["params"]
  if skew:
    params = _skew(params)
  fn = jax.jit(jax.value_and_grad(
      lambda p, b: trainer.loss_fn(run.model, p, b, jax.random.key(1), False), has_aux=True),
      in_shardings=(run.shardings["params"], sharding_lib.batch_sharding(run.mesh)),
      out_shardings=((None, None), run.shardings["params"]))
  with jax.set_mesh(run.mesh):
    (loss, (ce, aux, inter)), grads = fn(params, trainer.train_batch(run.data, 3, run.mesh))
  drops = [float(v) for k, v in jax.tree_util.tree_flatten_with_path(inter)[0]
           if "num_dropped" in jax.tree_util.keystr(k)]
  return float(loss), float(aux), jax.device_get(grads), grads, drops


@functools.lru_cache(maxsize=None)
def _single_device(kind, skew):
  loss, aux, grads, _, drops = _loss_and_grads(_config(kind), skew)
  return loss, aux, grads, drops


# The all-to-all options only matter where there is an expert axis to exchange over. "ragged"
# runs the all-gather emulation of ragged_all_to_all here (XLA:CPU lacks the collective).
CASES = ([(k, s, m) for k, s in [("dense", False), ("gshard", False), ("gshard", True),
                                 ("deepseekmoe", False), ("deepseekmoe", True),
                                 ("gshard:none", True)] for m in MESHES] +
         [(k, s, m) for k, s in [("gshard:ragged", True), ("deepseekmoe:ragged", True)]
          for m in MESHES if MESHES[m]["expert"] > 1])


@pytest.mark.filterwarnings("ignore:model.moe.all_to_all='ragged'")
@pytest.mark.parametrize("kind,skew,mesh", CASES)
def test_one_step_matches_single_device(kind, skew, mesh):
  want_loss, want_aux, want_grads, want_drops = _single_device(kind.split(":")[0], skew)
  loss, aux, grads, sharded, drops = _loss_and_grads(_config(kind, MESHES[mesh]), skew)
  np.testing.assert_allclose(loss, want_loss, rtol=2e-5)
  np.testing.assert_allclose(aux, want_aux, rtol=2e-5, atol=1e-7)
  assert drops == want_drops
  if skew and kind.startswith("gshard"):
    assert sum(drops) > 0                      # the skewed capacity case really drops tokens
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
  # The gradients really are distributed as the rules say (expert banks split over `expert`).
  leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(sharded)[0]}
  for name, x in leaves.items():
    if "experts" in name and MESHES[mesh]["expert"] > 1:
      assert x.sharding.spec[0] == "expert", name


@pytest.mark.parametrize("name", ["dense", "switch", "gshard", "deepseekmoe"])
def test_golden_sharding_snapshot(name):
  """Each parameter's logical axes and PartitionSpec; regenerate with MOEJAX_UPDATE_GOLDEN=1
  after reviewing the diff."""
  config = importlib.import_module(f"moejax.configs.{name}").get_config()
  model = trainer.build_model(config)
  boxed = jax.eval_shape(lambda r: model.init({"params": r}, jnp.zeros((1, 8), jnp.int32)),
                         jax.random.key(0))["params"]
  text = sharding_lib.describe(nn.get_partition_spec(boxed), None)
  path = os.path.join(GOLDEN, f"{name}.txt")
  if os.environ.get("MOEJAX_UPDATE_GOLDEN"):
    with open(path, "w") as f:
      f.write(text)
  with open(path) as f:
    assert text == f.read(), f"sharding of {name} changed; review, then MOEJAX_UPDATE_GOLDEN=1"


def test_checkpoint_restores_across_meshes(tmp_path):
  wd = str(tmp_path)
  src = trainer.Trainer(_config("gshard", MESHES["data2_expert4"]), wd)
  step = trainer.make_train_step(src.model, src.tx, src.config, src.shardings, src.mesh)
  state, _ = step(src.state, trainer.train_batch(src.data, 0, src.mesh))
  src.ckpt.save(1, state)
  src.ckpt.close()
  saved = jax.device_get(state)
  _, next_metrics = step(state, trainer.train_batch(src.data, 1, src.mesh))

  for mesh in [None, dict(data=2, fsdp=2, expert=2, tensor=1)]:
    dst = trainer.Trainer(_config("gshard", mesh), wd, restore=False)
    restored = dst.ckpt.restore(dst.state)
    for a, b, s in zip(jax.tree.leaves(restored), jax.tree.leaves(saved),
                       jax.tree.leaves(dst.shardings)):
      np.testing.assert_array_equal(np.asarray(a), b)
      assert a.sharding.is_equivalent_to(s, a.ndim)
    dst_step = trainer.make_train_step(dst.model, dst.tx, dst.config, dst.shardings, dst.mesh)
    _, m = dst_step(restored, trainer.train_batch(dst.data, 1, dst.mesh))
    np.testing.assert_allclose(float(m["loss"]), float(next_metrics["loss"]), rtol=1e-5)


def test_mesh_errors_name_the_setting():
  with pytest.raises(ConfigError, match=r"data\*fsdp\*expert\*tensor = 2\*2\*1\*1 = 4, but there are 8"):
    mesh_shape(dict(data=2, fsdp=2, expert=1, tensor=1), 8)
  with pytest.raises(ConfigError, match="at most one axis may be -1"):
    mesh_shape(dict(data=-1, fsdp=-1, expert=1, tensor=1), 8)
  with pytest.raises(ConfigError, match="does not divide the 8 devices"):
    mesh_shape(dict(data=-1, fsdp=3, expert=1, tensor=1), 8)
  assert mesh_shape(dict(data=-1, fsdp=2, expert=2, tensor=1), 8)["data"] == 2


def test_indivisible_parameter_is_a_clear_error():
  c = _config("gshard", dict(data=1, fsdp=1, expert=8, tensor=1))   # 4 experts, 8 ways
  with pytest.raises(ConfigError, match=r"experts/wi dimension 0 \(logical 'expert', size 4\) "
                                        r"cannot be split 8 ways"):
    trainer.Trainer(c)


def test_batch_must_divide_batch_axes():
  c = _config("dense", dict(data=8, fsdp=1, expert=1, tensor=1))
  c.data.batch_size = 4
  with pytest.raises(ConfigError, match=r"data.batch_size: must be divisible .* = 8\)"):
    trainer.Trainer(c)


def _programs(config):
  """(jaxpr text, compiled HLO text) of the loss on the config's mesh."""
  run = trainer.Trainer(config)
  loss = lambda p, b: trainer.loss_fn(run.model, p, b, jax.random.key(1), False)[0]
  fn = jax.jit(loss, in_shardings=(run.shardings["params"], sharding_lib.batch_sharding(run.mesh)))
  batch = trainer.train_batch(run.data, 0, run.mesh)
  with jax.set_mesh(run.mesh):
    return (str(jax.make_jaxpr(loss)(run.state["params"], batch)),
            fn.lower(run.state["params"], batch).compile().as_text())


@pytest.mark.parametrize("kind", ["gshard", "deepseekmoe"])
def test_expert_parallel_path_runs_shard_map_with_all_to_all(kind):
  mesh = MESHES["data2_expert4"]
  jaxpr, hlo = _programs(_config(kind, mesh))
  assert "shard_map" in jaxpr and "all_to_all" in jaxpr and "all-to-all" in hlo
  off = _config(kind, mesh)
  off.model.moe.expert_parallel = "none"
  assert "shard_map" not in _programs(off)[0]
  single = _config(kind)                         # no expert axis: the plain path
  assert "shard_map" not in _programs(single)[0]


def test_step_called_outside_its_mesh_compiles_the_same_program():
  """The expert-parallel path is chosen from the mesh seen while tracing; the step installs its
  own, so calling the jitted step with no mesh current must not build a single-device MoE."""
  run = trainer.Trainer(_config("gshard", MESHES["data2_expert4"]))
  step = trainer.make_train_step(run.model, run.tx, run.config, run.shardings, run.mesh)
  batch = trainer.train_batch(run.data, 0, run.mesh)
  outside = step.jitted.lower(run.state, batch).as_text()
  with jax.set_mesh(run.mesh):
    inside = step.jitted.lower(run.state, batch).as_text()
  assert "all_to_all" in outside
  assert outside == inside

"""Router state that is not trained by gradients (DeepSeek-V3's selection bias, expert choice's
threshold): updated after every optimiser step from the global batch, checkpointed, resumed
exactly, identical on every device; sharded runs of the new routers equal one device."""
import jax
import numpy as np
import pytest

from conftest import tiny_config
from moejax import config as config_lib
from moejax.train.trainer import Trainer

V3 = {"model.moe.router": "sigmoid", "model.moe.renormalize": True,
      "model.moe.bias_update_rate": 0.01, "model.moe.routed_scaling_factor": 2.5,
      "model.moe.num_expert_groups": 4, "model.moe.groups_per_token": 2,
      "model.moe.sequence_balance_weight": 1e-4}
VARIANTS = {
    "sigmoid": V3,
    "top_p": {"model.moe.router": "top_p", "model.moe.top_p": 0.5,
              "model.moe.entropy_loss_weight": 1e-3},
    "expert_choice": {"model.moe.router": "expert_choice"},
    "expert_race": {"model.moe.router": "expert_race", "model.moe.similarity_loss_weight": 0.01},
    "hash": {"model.moe.router": "hash"},
    "recurrent": {"model.moe.router": "recurrent", "model.moe.recurrent_router_dim": 16},
    "ternary_experts": {"model.moe.expert_bank": "ternary_swiglu"},
    # two sizes per device (expert 4): every device's block of experts is (24, 8)
    "heterogeneous": {"model.moe.expert_sizes": (24, 8) * 4,
                      "model.moe.parameter_penalty_weight": 0.1},
    "lory": {"model.moe.merge": "causal_segments", "model.moe.merge_segment": 4},
    "mixture_of_heads": {"model.attention": "mixture_of_heads", "model.moh.shared_heads": 1,
                         "model.moh.active_heads": 2},
    # only the selected heads computed (grouped matmuls over (token, head) pairs); its equality
    # with every-head masking is tested in tests/layers/test_moh.py
    "mixture_of_heads_selected": {"model.attention": "mixture_of_heads",
                                  "model.moh.shared_heads": 1, "model.moh.active_heads": 2,
                                  "model.moh.head_compute": "selected"},
}
# Mixture-of-heads shards its heads over 'tensor'; the others exchange experts over 'expert'.
MESHES = {"mixture_of_heads": {"mesh.data": 4, "mesh.tensor": 2},
          "mixture_of_heads_selected": {"mesh.data": 4, "mesh.tensor": 2}}


def _config(overrides, **extra):
  c = tiny_config("deepseekmoe")     # 8 routed experts, 2 active, 2 shared
  return config_lib.apply_overrides(c, {"train.log_every": 1, **overrides, **extra})


def _biases(params):
  return {k: np.asarray(v["moe"]["router"]["selection_bias"]) for k, v in params.items()
          if isinstance(v, dict) and "moe" in v}


def test_bias_follows_the_update_rule_step_by_step():
  trainer = Trainer(_config(V3))
  assert all((b == 0).all() for b in _biases(trainer.params).values())
  trainer.train(steps=4, progress=None)
  tk = trainer.config.data.batch_size * trainer.config.data.seq_len * 2   # T x k slots
  want = {}
  train = [r for r in trainer.history if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  for record in train:
    for layer in _biases(trainer.params):
      counts = np.round(np.asarray(record[f"{layer}/expert_load"]) * tk)   # this step's load
      want[layer] = want.get(layer, 0) + 0.01 * np.sign(counts.mean() - counts)
  got = _biases(trainer.params)
  for layer in got:
    np.testing.assert_allclose(got[layer], want[layer], atol=1e-7)
    assert np.abs(got[layer]).max() > 0


def test_resume_reproduces_the_bias_exactly(tmp_path):
  full = Trainer(_config(V3))
  full.train(steps=6, progress=None)
  half = Trainer(_config(V3, **{"train.checkpoint_every": 3}), str(tmp_path))
  half.train(steps=3, progress=None)
  half.close()
  resumed = Trainer(_config(V3, **{"train.checkpoint_every": 3}), str(tmp_path))
  assert resumed.step == 3
  resumed.train(steps=3, progress=None)
  resumed.close()
  for layer, b in _biases(full.params).items():
    np.testing.assert_array_equal(_biases(resumed.params)[layer], b)


# Expert Race, hash, recurrent, Lory, ternary experts and every-head MoH take paths the cases below already cover (routing on the
# global batch before the all-to-all, or no shard_map at all); they passed too and stay out of
# the suite's time budget (add them here to re-check).
# Latent attention under expert + tensor parallelism: tests/convert (a converted DeepSeek-V3).
EP_CASES = ["sigmoid", "top_p", "expert_choice", "heterogeneous",
            "mixture_of_heads_selected"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", EP_CASES)
def test_expert_parallel_training_equals_one_device(variant):
  """Two steps on 8 devices (data 2 x expert 4: experts and tokens exchanged by all-to-all)
  equal two steps on one device: parameters, router state and losses."""
  one = Trainer(_config(VARIANTS[variant], **{"data.batch_size": 8}))
  mesh = MESHES.get(variant, {"mesh.data": 2, "mesh.expert": 4})
  many = Trainer(_config(VARIANTS[variant], **{
      "data.batch_size": 8, "mesh.num_devices": -1, **mesh}))
  assert min(dict(many.mesh.shape)[k.split(".")[1]] for k in mesh) >= 2
  r1, r8 = one.train(steps=2, progress=None), many.train(steps=2, progress=None)
  np.testing.assert_allclose(r8.metrics["loss"], r1.metrics["loss"], rtol=2e-5)
  np.testing.assert_allclose(r8.metrics["aux"], r1.metrics["aux"], rtol=2e-4, atol=1e-7)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(many.params))[0],
                          jax.tree.leaves(jax.device_get(one.params))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))

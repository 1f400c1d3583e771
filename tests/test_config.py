"""Each validation rule stops a bad config with one message naming the key and what is allowed."""
import importlib

import pytest

from conftest import tiny_config
from moejax.config import ConfigError, validate

RULES = [
    # (path, value, base kind, expected message fragment)
    ("model.moe.top_k", 5, "gshard", r"config.model.moe.top_k: must be <= model.moe.num_experts=4"),
    ("model.moe.segments", 3, "deepseekmoe", r"model.moe.segments: must divide model.moe.expert_hidden=32"),
    ("model.moe.router", "sinkhorn", "gshard", r"model.moe.router: got 'sinkhorn'; allowed: 'topk_softmax'"),
    ("model.moe.dispatch", "magic", "gshard", r"model.moe.dispatch: got 'magic'; allowed: 'dropless', 'capacity'"),
    ("model.moe.row_align", 0, "gshard", r"model.moe.row_align: must be > 0, got 0"),
    ("model.moe.gmm_backend", "cuda", "gshard", r"model.moe.gmm_backend: got 'cuda'; allowed:.*'xla'"),
    ("model.moe.all_to_all", "nccl", "gshard", r"model.moe.all_to_all: got 'nccl'; allowed: 'auto', 'ragged', 'padded'"),
    ("model.moe.ragged_buffer_factor", -1.0, "gshard", r"model.moe.ragged_buffer_factor: must be >= 0 \(0 = worst-case"),
    ("data.path", "/no/such/file.txt", "dense", r"data.path: file not found: '/no/such/file.txt'"),
    ("model.num_kv_heads", 3, "dense", r"model.num_kv_heads: must divide model.num_heads=4"),
    ("model.head_dim", 7, "dense", r"model.head_dim: must be even"),
    ("model.dtype", "float16", "dense", r"model.dtype: got 'float16'; allowed: 'float32', 'bfloat16'"),
    ("model.moe.num_shared_experts", 4, "deepseekmoe", r"model.moe.num_shared_experts: must be in \[0, segments\*top_k=4\)"),
    ("model.moe.num_device_groups", 3, "deepseekmoe", r"model.moe.num_device_groups: must divide the routed experts .*=8\)"),
    ("model.moe.load_balance_scope", "local", "gshard", r"load_balance_scope: got 'local'; allowed: 'micro_batch', 'global_batch'"),
    ("model.moe.balance_micro_batches", 3, "gshard", r"balance_micro_batches: must be a positive divisor of data.batch_size=4"),
    ("mesh.expert", 0, "gshard", r"mesh.expert: must be a positive size or -1"),
    ("mesh.num_devices", 0, "gshard", r"mesh.num_devices: must be a positive count or -1"),
    ("model.moe.capacity_factor", 0.0, "switch", r"model.moe.capacity_factor: must be > 0"),
    ("model.moe.first_dense_layers", 2, "gshard", r"model.moe.first_dense_layers: must be < model.num_layers=2"),
    ("model.moe.num_experts", -1, "dense", r"model.moe.num_experts: must be >= 0"),
    ("model.moe.load_balance_weight", -0.1, "gshard", r"model.moe.load_balance_weight: must be >= 0"),
    ("data.val_fraction", 1.5, "dense", r"data.val_fraction: must be in \(0, 1\)"),
    ("train.warmup_steps", 8, "dense", r"train.warmup_steps: must be in \[0, train.steps=8\)"),
    ("train.steps", 0, "dense", r"train.steps: must be > 0"),
    ("sample.temperature", -1.0, "dense", r"sample.temperature: must be >= 0"),
    ("model.qk_norm", "layer", "dense", r"model.qk_norm: got 'layer'; allowed: 'none', 'head', 'full'"),
    ("model.moe.shared_expert_gate", True, "gshard", r"model.moe.shared_expert_gate: configures the shared experts, but model.moe.num_shared_experts=0"),
    ("model.moe.shared_expert_hidden", 64, "gshard", r"model.moe.shared_expert_hidden: configures the shared experts"),
    ("model.moe.shared_expert_hidden", -1, "deepseekmoe", r"model.moe.shared_expert_hidden: must be >= 0"),
]


@pytest.mark.parametrize("path,value,kind,message", RULES, ids=[r[0] for r in RULES])
def test_rule(path, value, kind, message):
  c = tiny_config(kind)
  node = c
  *parents, leaf = path.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=message):
    validate(c)


def test_ragged_buffer_factor_needs_the_ragged_exchange():
  c = tiny_config("gshard")
  c.model.moe.all_to_all, c.model.moe.ragged_buffer_factor = "padded", 1.5
  with pytest.raises(ConfigError, match=r"ragged_buffer_factor: sizes the ragged exchange's "
                                        r"buffer, but model.moe.all_to_all='padded'"):
    validate(c)
  c.model.moe.all_to_all = "ragged"
  validate(c)


@pytest.mark.parametrize("name", ["default", "dense", "switch", "gshard", "deepseekmoe"])
def test_shipped_configs_are_valid(name):
  validate(importlib.import_module(f"moejax.configs.{name}").get_config())


def test_shipped_configs_have_equal_active_ffn_size():
  """The routing comparison relies on every config activating 512 FFN hidden units per token."""
  from moejax.models.transformer import ModelConfig
  for name in ["switch", "gshard", "deepseekmoe"]:
    m = ModelConfig.from_config(importlib.import_module(f"moejax.configs.{name}").get_config().model)
    s = m.moe
    assert s.routed_k * s.fine_hidden + s.shared_hidden == 512, name
    assert s.num_routed * s.fine_hidden + s.shared_hidden == 4096, name


def test_latent_attention_rules():
  c = tiny_config("deepseekmoe")
  c.model.attention = "latent"
  validate(c)
  c.model.mla.qk_rope_head_dim = 3
  with pytest.raises(ConfigError, match=r"model.mla.qk_rope_head_dim: must be even for RoPE"):
    validate(c)
  c.model.mla.qk_rope_head_dim, c.model.qk_norm = 4, "head"
  with pytest.raises(ConfigError, match=r"model.attention: 'latent' has its own normalisations"):
    validate(c)

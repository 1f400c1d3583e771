"""Default experiment config and its validation.

``base_config()`` holds every field with its default; ``configs/*.py`` override a few. Any field is
overridable on the command line (``--config.model.moe.num_experts=8``). ``validate`` runs before
any compute and raises one ``ConfigError`` that names the key and what is allowed.
"""
from __future__ import annotations

import os

import ml_collections

from moejax.layers.dispatch import PLANNERS
from moejax.layers.routers import ROUTERS
from moejax.ops.grouped_matmul import backends as gmm_backends


from moejax.errors import ConfigError  # noqa: F401  (re-exported: config.ConfigError)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 256             # byte-level tokenizer
  m.d_model = 128
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 2             # grouped-query attention; = num_heads for MHA
  m.head_dim = 32
  m.ffn_hidden = 512             # hidden size of dense SwiGLU layers
  m.rope_theta = 10000.0
  m.norm_eps = 1e-6
  m.dtype = "float32"            # compute dtype; params stay float32

  m.moe = e = ml_collections.ConfigDict()
  e.num_experts = 0              # N; 0 = dense model
  e.top_k = 2                    # K
  e.expert_hidden = 512          # d_ff of one expert before segmentation
  e.segments = 1                 # m, fine-grained segmentation (DeepSeekMoE)
  e.num_shared_experts = 0       # K_s, in fine-grained experts
  e.router = "topk_softmax"
  e.renormalize = True           # renormalise top-k gates to sum to 1
  e.jitter_eps = 0.0             # multiplicative input jitter (Switch)
  e.noise_std = 0.0              # Gaussian logit noise (noisy top-k)
  e.dispatch = "dropless"        # dropless | capacity
  e.capacity_factor = 1.25
  e.load_balance_weight = 0.01   # Switch / DeepSeekMoE expert-level balance
  e.load_balance_scope = "micro_batch"   # or "global_batch" (Demons in the Detail)
  e.balance_micro_batches = 1    # split the batch into this many groups for the balance loss
                                 # (= data-parallel ranks x accumulation steps for the usual one)
  e.device_balance_weight = 0.0  # DeepSeekMoE device-level balance
  e.num_device_groups = 1
  e.z_loss_weight = 0.0          # ST-MoE router z-loss
  e.gmm_backend = "auto"
  e.row_align = 1                # start each expert's rows on a multiple of this (128: CPU tile)
  e.expert_parallel = "auto"     # auto: shard_map + all-to-all when mesh.expert > 1 | none
  e.all_to_all = "auto"          # auto (ragged on GPU/TPU, padded on CPU) | ragged | padded
  e.ragged_buffer_factor = 0.0   # 0: worst-case ragged receive buffer (never drops); f > 0:
                                 # f x the balanced rows, overflow dropped and counted
  e.moe_every = 1                # every n-th layer is MoE ...
  e.first_dense_layers = 0       # ... after the first k dense layers

  # Device mesh (see moejax/parallel/mesh.py); one axis may be -1 = "all remaining devices".
  # num_devices: -1 = every device; n = the first n (e.g. a single-device reference run).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1, num_devices=-1))

  c.data = d = ml_collections.ConfigDict()
  d.path = ""                    # text file; "" = the embedded generated corpus
  d.corpus_bytes = 2_000_000     # size of the generated corpus
  d.seq_len = 128
  d.batch_size = 16
  d.val_fraction = 0.1
  d.eval_batches = 16

  c.train = t = ml_collections.ConfigDict()
  t.steps = 500
  t.learning_rate = 3e-3
  t.warmup_steps = 50
  t.min_lr_ratio = 0.1
  t.weight_decay = 0.1
  t.b1 = 0.9
  t.b2 = 0.95
  t.grad_clip = 1.0
  t.log_every = 50
  t.eval_every = 200
  t.checkpoint_every = 200
  t.keep_checkpoints = 2
  t.max_steps_per_run = 0        # >0: stop (with a checkpoint) after this many steps; re-run
                                 # `train` to resume. For job time limits and preemption drills.

  c.sample = s = ml_collections.ConfigDict()
  s.prompt = "The "
  s.num_tokens = 200
  s.temperature = 0.8            # 0 = greedy
  s.seed = 0
  return c


def _require(ok: bool, key: str, msg: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}: {msg}")


def _one_of(value, key: str, allowed) -> None:
  _require(value in allowed, key, f"got {value!r}; allowed: {', '.join(map(repr, allowed))}")


def _positive(c, prefix: str, *names: str) -> None:
  for n in names:
    _require(c[n] > 0, f"{prefix}.{n}", f"must be > 0, got {c[n]!r}")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every rule before any compute; returns the config for chaining."""
  m, e, d, t = config.model, config.model.moe, config.data, config.train
  _positive(m, "model", "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
            "head_dim", "ffn_hidden")
  _require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
           f"must divide model.num_heads={m.num_heads}, got {m.num_kv_heads}")
  _require(m.head_dim % 2 == 0, "model.head_dim", f"must be even for RoPE, got {m.head_dim}")
  _one_of(m.dtype, "model.dtype", ("float32", "bfloat16"))

  _require(e.num_experts >= 0, "model.moe.num_experts", f"must be >= 0, got {e.num_experts}")
  if e.num_experts > 0:
    _positive(e, "model.moe", "top_k", "expert_hidden", "segments", "moe_every",
              "capacity_factor", "num_device_groups")
    _require(e.top_k <= e.num_experts, "model.moe.top_k",
             f"must be <= model.moe.num_experts={e.num_experts}, got {e.top_k}")
    _require(e.expert_hidden % e.segments == 0, "model.moe.segments",
             f"must divide model.moe.expert_hidden={e.expert_hidden}, got {e.segments}")
    _require(0 <= e.num_shared_experts < e.segments * e.top_k, "model.moe.num_shared_experts",
             f"must be in [0, segments*top_k={e.segments * e.top_k}) so at least one expert is "
             f"routed, got {e.num_shared_experts}")
    _one_of(e.router, "model.moe.router", tuple(ROUTERS))
    _one_of(e.dispatch, "model.moe.dispatch", tuple(PLANNERS))
    _one_of(e.gmm_backend, "model.moe.gmm_backend", gmm_backends())
    _positive(e, "model.moe", "row_align")
    _one_of(e.expert_parallel, "model.moe.expert_parallel", ("auto", "none"))
    _one_of(e.all_to_all, "model.moe.all_to_all", ("auto", "ragged", "padded"))
    _require(e.ragged_buffer_factor >= 0, "model.moe.ragged_buffer_factor",
             f"must be >= 0 (0 = worst-case buffer, never drops), got {e.ragged_buffer_factor}")
    _require(e.ragged_buffer_factor == 0 or e.all_to_all != "padded",
             "model.moe.ragged_buffer_factor",
             "sizes the ragged exchange's buffer, but model.moe.all_to_all='padded'; set it to 0 "
             "or use all_to_all='ragged'/'auto'")
    _one_of(e.load_balance_scope, "model.moe.load_balance_scope", ("micro_batch", "global_batch"))
    _require(e.balance_micro_batches > 0 and d.batch_size % e.balance_micro_batches == 0,
             "model.moe.balance_micro_batches",
             f"must be a positive divisor of data.batch_size={d.batch_size}, "
             f"got {e.balance_micro_batches}")
    routed = e.segments * e.num_experts - e.num_shared_experts
    _require(routed % e.num_device_groups == 0, "model.moe.num_device_groups",
             f"must divide the routed experts (segments*num_experts-num_shared_experts={routed}),"
             f" got {e.num_device_groups}")
    _require(e.first_dense_layers < m.num_layers, "model.moe.first_dense_layers",
             f"must be < model.num_layers={m.num_layers} or no layer is MoE, "
             f"got {e.first_dense_layers}")
    for w in ("load_balance_weight", "device_balance_weight", "z_loss_weight",
              "jitter_eps", "noise_std"):
      _require(e[w] >= 0, f"model.moe.{w}", f"must be >= 0, got {e[w]}")

  sizes = [config.mesh[a] for a in ("data", "fsdp", "expert", "tensor")]
  for a, v in zip(("data", "fsdp", "expert", "tensor"), sizes):
    _require(isinstance(v, int) and (v == -1 or v > 0), f"mesh.{a}",
             f"must be a positive size or -1 (fill), got {v!r}")
  _require(sizes.count(-1) <= 1, "mesh", f"at most one axis may be -1, got {sizes}")
  n = config.mesh.num_devices
  _require(isinstance(n, int) and (n == -1 or n > 0), "mesh.num_devices",
           f"must be a positive count or -1 (all devices), got {n!r}")

  if d.path:
    _require(os.path.isfile(d.path), "data.path", f"file not found: {d.path!r} "
             "(give a text file, or '' for the embedded generated corpus)")
  _positive(d, "data", "seq_len", "batch_size", "eval_batches", "corpus_bytes")
  _require(0 < d.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
  _positive(t, "train", "steps", "learning_rate", "log_every", "eval_every", "checkpoint_every",
            "keep_checkpoints")
  _require(t.max_steps_per_run >= 0, "train.max_steps_per_run",
           f"must be >= 0 (0 = no limit), got {t.max_steps_per_run}")
  _require(0 <= t.warmup_steps < t.steps, "train.warmup_steps",
           f"must be in [0, train.steps={t.steps}), got {t.warmup_steps}")
  _require(config.sample.temperature >= 0, "sample.temperature",
           f"must be >= 0 (0 = greedy), got {config.sample.temperature}")
  return config

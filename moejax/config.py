"""Default experiment config and its validation.

``base_config()`` holds every field with its default; ``configs/*.py`` override a few. Any field is
overridable on the command line (``--config.model.moe.num_experts=8``). ``validate`` runs before
any compute and raises one ``ConfigError`` that names the key and what is allowed.
"""
from __future__ import annotations

import difflib
import os
from typing import Any, Mapping

import ml_collections

from moejax.errors import ConfigError  # noqa: F401  (re-exported: config.ConfigError)
from moejax.layers.attention import QK_NORMS
from moejax.layers.moe_rules import check_moe_fields
from moejax.ops.grouped_matmul import backends as gmm_backends


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
  m.max_length = 0               # longest prompt + generated sequence; 0 = data.seq_len
  m.qkv_bias = False             # biases on the q/k/v projections (Qwen2-MoE)
  m.qk_norm = "none"             # RMSNorm of q and k before RoPE: none | head (per head over
                                 # head_dim: Qwen3-MoE) | full (all heads together: OLMoE)
  m.attention = "standard"       # standard | mixture_of_heads (MoH, moejax/layers/moh.py) |
                                 # latent (multi-head latent attention, DeepSeek-V2/V3)
  m.mla = a = ml_collections.ConfigDict()   # attention="latent" (moejax/layers/mla.py)
  a.q_lora_rank = 0              # 0 = full-rank query projection
  a.kv_lora_rank = 64            # r_kv: the per-token latent keys and values come from
  a.qk_nope_head_dim = 32        # per-head query/key dimensions without RoPE
  a.qk_rope_head_dim = 16        # decoupled RoPE dimensions (one key shared by the heads)
  a.v_head_dim = 32
  a.latent_norm_eps = 0.0        # eps of the q/kv latent RMSNorms; 0 = model.norm_eps
                                 # (DeepSeek-V3 uses 1e-6 whatever its rms_norm_eps)
  a.decode = "absorbed"          # generation reads the latent cache with the up-projections
                                 # absorbed into query/output (absorbed) or expands it (expanded)
  m.moh = h = ml_collections.ConfigDict()
  h.shared_heads = 0             # always-on heads (the first ones)
  h.active_heads = 2             # routed heads per token (top-K of num_heads - shared_heads)
  h.gating = "code"              # code (released code: all-active uniform = standard attention)
                                 # | paper (the paper's equations) | binary_ste (0/1 gates)
  h.router = "learned"           # learned | query_norm (parameter-free; needs binary_ste)
  h.balance_weight = 0.01        # head load-balance loss weight (beta)
  h.head_compute = "all"         # all (compute every head, mask) | selected (only the shared
                                 # and each token's selected heads; grouped matmuls with
                                 # model.moe.gmm_backend; not with binary_ste)

  m.moe = e = ml_collections.ConfigDict()
  e.num_experts = 0              # N; 0 = dense model
  e.top_k = 2                    # K
  # Or state the experts directly (then leave num_experts at 0; segments must stay 1):
  e.routed_experts = 0           # routed experts (excluding shared ones); 0 = use N, K, m
  e.active_experts = 0           # routed experts active per token
  e.expert_hidden = 512          # d_ff of one expert before segmentation
  e.segments = 1                 # m, fine-grained segmentation (DeepSeekMoE)
  e.num_shared_experts = 0       # K_s, in fine-grained experts
  e.shared_expert_hidden = 0     # hidden size of the fused shared experts; 0 = K_s * d_ff/m
  e.shared_expert_gate = False   # shared output x sigmoid(x @ w_g), a gate per token (Qwen2-MoE)
  e.router = "topk_softmax"
  e.expert_bank = "swiglu"       # routed experts: swiglu | ternary_swiglu (MoTE: {-1,0,1} x
                                 # scale, 8-bit activations, straight-through training) |
                                 # ternary_packed (its 2-bit inference form: eval/sample only)
  e.shared_trainable = True      # False: shared experts frozen (MoTE keeps the dense FFN)
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
  e.decode_path = "auto"         # inference with few rows: gather (each row's selected experts
                                 # read directly) | grouped (the training layout) | auto
                                 # (gather up to 4 slots per routed expert on CPU, 1 elsewhere)
  e.row_align = 1                # start each expert's rows on a multiple of this (a kernel tile)
  e.expert_parallel = "auto"     # auto: shard_map + all-to-all when mesh.expert > 1 | none
  e.all_to_all = "auto"          # auto (ragged on GPU/TPU, padded on CPU) | ragged | padded
  e.ragged_buffer_factor = 0.0   # 0: worst-case ragged receive buffer (never drops); f > 0:
                                 # f x the balanced rows, overflow dropped and counted
  # Router options (moejax/layers/routers/): each is read by one router only.
  e.null_experts = 0             # topk_softmax: AdaMoE zero-FLOP null experts
  e.routed_scaling_factor = 1.0  # sigmoid: gates x this (DeepSeek-V3: 2.5)
  e.bias_update_rate = 0.0       # sigmoid: aux-loss-free balancing gamma (V3: 0.001); 0 = off
  e.num_expert_groups = 1        # sigmoid: G groups of experts (V3: 8)
  e.groups_per_token = 1         # sigmoid: groups kept per token (V3: 4)
  e.group_mask_fill = "neg_inf"  # sigmoid: masked groups' scores: neg_inf (official) | zero (HF)
  e.group_routing = "limited"    # sigmoid: limited (V3) | balanced (MoGE: k/G per group)
  e.sequence_balance_weight = 0.0   # sigmoid: V3 sequence-wise balance loss (V3: 1e-4)
  e.top_p = 0.4                  # top_p: cumulative router probability to reach
  e.entropy_loss_weight = 0.0    # top_p: router entropy loss (paper: 1e-4)
  e.similarity_loss_weight = 0.0   # expert_race: router similarity loss
  e.consistency_loss_weight = 0.0  # stochastic (THOR): 2 forward passes + symmetric KL
  e.recurrent_router_dim = 0     # recurrent (RMoE): GRU width shared by layers; 0 = d_model
  e.expert_choice_eval = "threshold"   # expert_choice/expert_race at eval: causal threshold |
                                       # batch (the non-causal training form)
  e.merge = "none"               # soft merging instead of routing: none | sequence (SMEAR,
                                 # not causal) | causal_segments (Lory)
  e.merge_segment = 64           # causal_segments: tokens per segment (divides data.seq_len)
  e.merge_inference = "segments"  # causal_segments when sampling: segments (as trained) |
                                 # prompt (Lory: one expert merged from the prompt's mean)
  e.iterations = 1               # Chain-of-Experts: routed iterations in one layer, residual
                                 # between them, experts shared, a router each
  # Heterogeneous experts (HMoE): one hidden size per routed expert, as a list, or a ladder
  # (geometric | arithmetic | hybrid, the paper's shapes) scaled to expert_total_hidden
  # (0 = routed experts x expert hidden: the homogeneous bank's parameters).
  e.expert_sizes = ()
  e.expert_size_ladder = "none"
  e.expert_total_hidden = 0
  e.ladder_repeats = 1           # repeat a ladder per expert-parallel device (mesh.expert)
  e.parameter_penalty_weight = 0.0   # HMoE parameter penalty (paper: 0.1, replacing balance);
                                     # its f_i is count_i / (T k): a per-token frequency / k
  e.ternary_experts = 0          # the last n routed experts ternary, the others full precision
                                 # (mixed precision: python -m moejax.compress
                                 # --method=mixed_precision writes it)
  # Per-layer MoE settings, as JSON {"layer": {"expert_sizes": [...], "expert_map": [...]}}:
  # written by compression (moejax/compress/), where pruning leaves layers different.
  e.layer_overrides = "{}"
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

  # Start an MoE from a trained dense model (moejax/train/upcycle.py); used when a run starts
  # without a checkpoint. source: the dense run's workdir ("" = train from scratch).
  c.upcycle = u = ml_collections.ConfigDict()
  u.source = ""
  u.method = "copy"              # copy (sparse upcycling) | drop (Drop-Upcycling) | split
  u.drop_fraction = 0.5          # drop: share of each expert's hidden units re-initialised

  # Written by the Hugging Face importer (moejax/convert/hf_config.py): fields of the source
  # config.json no moejax setting holds (tied embeddings, token ids), restored on export.
  c.convert = ml_collections.ConfigDict(dict(hf_fields="{}"))

  c.sample = s = ml_collections.ConfigDict()
  s.prompt = "The "
  s.num_tokens = 0               # new tokens; 0 = up to model.max_length (default data.seq_len)
  s.temperature = 0.8            # 0 = greedy
  s.top_k = 0                    # sample among the k most probable tokens; 0 = all
  s.top_p = 1.0                  # nucleus: the smallest set reaching this mass; 1 = all
  s.stop = ""                    # stop a sample once it ends with this text; "" = never
  s.seed = 0

  # Inference-time steering (moejax/inference/steer.py), read by eval, sample, analyze and
  # generation; L = model layer index ('*' = every MoE layer), E = routed expert index.
  c.steer = st = ml_collections.ConfigDict()
  st.deactivate = ""             # "L:E,L:E": never route to these experts
  st.force = ""                  # "L:E": always route to these experts
  st.reinforce = ""              # "L:E:factor": gates of these experts x factor
  st.contrast_weight = 0.0       # b > 0: self-contrast decoding, (1+b) strong - b weak logits
  st.contrast_routing = "rank2"  # the weak routing: topN | rankN (only the N-th best expert)
  st.capacity_factor = 0.0       # > 0: expert capacity at inference, overflow as below
  st.overflow = "drop"           # drop | reroute (to the token's next-best expert with room)
  st.skip_rate = 0.0             # skip this share of routed slots (lowest gates; per-layer
                                 # thresholds calibrated on calibration_batches batches)
  st.calibration_batches = 2

  # Routing analysis (--mode=analyze, moejax/analysis/analyze.py): traces, report, plots.
  c.analyze = an = ml_collections.ConfigDict()
  an.sources = "generated"       # comma-separated: 'generated' (the embedded corpus) or text
                                 # files; each source's validation split is traced
  an.tokens = 4096               # at most this many tokens per source
  an.probs = False               # also save the router probabilities [M, N, E]
  an.fit_fraction = 0.5          # first part of each trace fits predictors and placement,
                                 # the rest scores them
  an.devices = 0                 # placement over this many devices; 0 = the first of
                                 # 4, 3, 2, 8, 5, 6, 7 that divides the routed experts
  an.balance_slack = -1.0        # >= 0: each device's load <= (1 + slack) x mean; < 0: off
  an.milp_time_limit = 20.0      # seconds for the placement MILP
  an.cache_sizes = ""            # e.g. "1,2,4"; "" = 1 .. E-1 (at most 8 sizes)
  return c


def moe_enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the model has MoE layers (experts stated either way)."""
  return config.model.moe.num_experts > 0 or config.model.moe.routed_experts > 0


def flatten(config: ml_collections.ConfigDict | Mapping, prefix: str = "") -> dict[str, Any]:
  """{'model': {'moe': {'top_k': 2}}} -> {'model.moe.top_k': 2} (leaves in key order)."""
  out = {}
  for k, v in config.items():
    if isinstance(v, (ml_collections.ConfigDict, Mapping)):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def unknown_key_error(key: str, known) -> ConfigError:
  """'config.model.moe.num_expertz: no such setting; nearest: model.moe.num_experts, ...'."""
  known = list(known)
  near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
  if not near:   # a typo in a parent ('modle.moe.top_k'): match on the last part alone
    leaf = key.rsplit(".", 1)[-1]
    near = [k for k in known if k.rsplit(".", 1)[-1] == leaf][:3]
  hint = f"nearest: {', '.join(near)}" if near else "see moejax/config.py:base_config()"
  return ConfigError(f"config.{key}: no such setting; {hint}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]):
  """Sets dotted keys ({'model.moe.top_k': 4}) on a copy of ``config``; unknown keys and values
  of the wrong type raise ``ConfigError`` naming the key (with the nearest valid keys)."""
  config = ml_collections.ConfigDict(config.to_dict())
  known = flatten(config)
  for key, value in overrides.items():
    if key not in known:
      raise unknown_key_error(key, known)
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    try:
      node[leaf] = value
    except TypeError as e:
      raise ConfigError(f"config.{key}: {e}") from None
  return config


def _require(ok: bool, key: str, msg: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}: {msg}")


def _one_of(value, key: str, allowed) -> None:
  _require(value in allowed, key, f"got {value!r}; allowed: {', '.join(map(repr, allowed))}")


def _positive(c, prefix: str, *names: str) -> None:
  for n in names:
    _require(c[n] > 0, f"{prefix}.{n}", f"must be > 0, got {c[n]!r}")


def _check_layer_overrides(config) -> None:
  """model.moe.layer_overrides: JSON {"layer": {field: value}} for MoE layers, each layer's
  spec valid by the same rules as the global one."""
  import dataclasses
  import json

  from moejax.layers.moe_spec import MoESpec
  e, key = config.model.moe, "model.moe.layer_overrides"
  try:
    table = json.loads(e.layer_overrides or "{}")
  except ValueError as err:
    raise ConfigError(f"config.{key}: not JSON ({err})") from None
  _require(isinstance(table, dict), key, 'must be a JSON object {"layer": {field: value}}')
  if not table:
    return
  moe_layers = [i for i in range(config.model.num_layers) if i >= e.first_dense_layers
                and (i - e.first_dense_layers) % e.moe_every == 0]
  base = MoESpec.from_config(e)
  allowed = {"expert_sizes", "expert_map", "expert_total_hidden"}
  for layer, fields in table.items():
    _require(layer.isdigit() and int(layer) in moe_layers, key,
             f"names layer {layer!r}; allowed: the MoE layers {moe_layers}")
    _require(isinstance(fields, dict) and set(fields) <= allowed, f"{key}[{layer}]",
             f"must map fields to values; allowed fields: {', '.join(sorted(allowed))}, got "
             f"{fields!r}")
    try:
      dataclasses.replace(base, **{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in fields.items()})
    except ConfigError as err:
      raise ConfigError(f"config.{key}[{layer}]: {err}") from None


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every rule before any compute; returns the config for chaining."""
  m, e, d, t = config.model, config.model.moe, config.data, config.train
  u = config.upcycle
  _one_of(u.method, "upcycle.method", ("copy", "drop", "split"))
  _require(0 <= u.drop_fraction <= 1, "upcycle.drop_fraction",
           f"must be in [0, 1], got {u.drop_fraction}")
  _require(not u.source or moe_enabled(config) or m.attention == "mixture_of_heads",
           "upcycle.source", "is set but the model is dense with standard attention: set "
           "model.moe.num_experts (or routed_experts) or model.attention=mixture_of_heads")
  _positive(m, "model", "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
            "head_dim", "ffn_hidden")
  _require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
           f"must divide model.num_heads={m.num_heads}, got {m.num_kv_heads}")
  _require(m.head_dim % 2 == 0, "model.head_dim", f"must be even for RoPE, got {m.head_dim}")
  _one_of(m.dtype, "model.dtype", ("float32", "bfloat16"))
  _require(isinstance(m.max_length, int) and m.max_length >= 0, "model.max_length",
           f"must be >= 0 (0 = data.seq_len), got {m.max_length!r}")
  _one_of(m.attention, "model.attention", ("standard", "mixture_of_heads", "latent"))
  if m.attention == "latent":
    _require(m.mla.q_lora_rank >= 0, "model.mla.q_lora_rank",
             f"must be >= 0 (0 = full-rank queries), got {m.mla.q_lora_rank}")
    _positive(m.mla, "model.mla", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
              "v_head_dim")
    _require(m.mla.qk_rope_head_dim % 2 == 0, "model.mla.qk_rope_head_dim",
             f"must be even for RoPE, got {m.mla.qk_rope_head_dim}")
    _require(m.mla.latent_norm_eps >= 0, "model.mla.latent_norm_eps",
             f"must be >= 0 (0 = model.norm_eps), got {m.mla.latent_norm_eps}")
    _one_of(m.mla.decode, "model.mla.decode", ("absorbed", "expanded"))
    _require(m.qk_norm == "none" and not m.qkv_bias, "model.attention",
             "'latent' has its own normalisations and no q/k/v biases: leave model.qk_norm="
             "'none' and model.qkv_bias=False")
  _one_of(m.qk_norm, "model.qk_norm", QK_NORMS)
  if m.attention == "mixture_of_heads":
    _one_of(m.moh.gating, "model.moh.gating", ("code", "paper", "binary_ste"))
    _one_of(m.moh.router, "model.moh.router", ("learned", "query_norm"))
    _require(m.moh.router == "learned" or m.moh.gating == "binary_ste", "model.moh.router",
             f"'query_norm' has no learned weights for the two-stage gates: use it with "
             f"model.moh.gating='binary_ste', got gating={m.moh.gating!r}")
    _require(0 <= m.moh.shared_heads < m.num_heads, "model.moh.shared_heads",
             f"must be in [0, model.num_heads={m.num_heads}) so some heads are routed, "
             f"got {m.moh.shared_heads}")
    routed = m.num_heads - m.moh.shared_heads
    _require(1 <= m.moh.active_heads <= routed, "model.moh.active_heads",
             f"must be in [1, num_heads - shared_heads = {routed}], got {m.moh.active_heads}")
    _one_of(m.moh.head_compute, "model.moh.head_compute", ("all", "selected"))
    _require(m.moh.head_compute == "all" or m.moh.gating != "binary_ste",
             "model.moh.head_compute", "'selected' needs model.moh.gating 'code' or 'paper': "
             "binary_ste's straight-through gradient reads every head's output")
    _require(m.moh.balance_weight >= 0, "model.moh.balance_weight",
             f"must be >= 0, got {m.moh.balance_weight}")

  _require(e.num_experts >= 0, "model.moe.num_experts", f"must be >= 0, got {e.num_experts}")
  if e.routed_experts or e.active_experts:
    _require(e.num_experts == 0 and e.segments == 1, "model.moe.routed_experts",
             "states the experts directly; leave model.moe.num_experts=0 and segments=1 (got "
             f"num_experts={e.num_experts}, segments={e.segments}), or use N, K, m instead")
    _positive(e, "model.moe", "routed_experts", "active_experts")
    _require(e.active_experts <= e.routed_experts, "model.moe.active_experts",
             f"must be <= model.moe.routed_experts={e.routed_experts}, got {e.active_experts}")
  if moe_enabled(config):
    if e.routed_experts:   # check the equivalent spec in the paper's units
      check_moe_fields({**e, "num_experts": e.routed_experts + e.num_shared_experts,
                        "top_k": e.active_experts + e.num_shared_experts},
                       key=lambda n: f"config.model.moe.{n}", ref=lambda n: f"model.moe.{n}")
    else:
      check_moe_fields(e, key=lambda n: f"config.model.moe.{n}", ref=lambda n: f"model.moe.{n}")
    _positive(e, "model.moe", "moe_every")
    _require(e.merge != "causal_segments" or d.seq_len % e.merge_segment == 0,
             "model.moe.merge_segment", f"must divide data.seq_len={d.seq_len} (segments of "
             f"equal length), got {e.merge_segment}")
    _one_of(e.gmm_backend, "model.moe.gmm_backend", gmm_backends())
    _require(d.batch_size % e.balance_micro_batches == 0, "model.moe.balance_micro_batches",
             f"must be a positive divisor of data.batch_size={d.batch_size}, "
             f"got {e.balance_micro_batches}")
    _require(e.first_dense_layers < m.num_layers, "model.moe.first_dense_layers",
             f"must be < model.num_layers={m.num_layers} or no layer is MoE, "
             f"got {e.first_dense_layers}")
    _check_layer_overrides(config)

  sizes = [config.mesh[a] for a in ("data", "fsdp", "expert", "tensor")]
  for a, v in zip(("data", "fsdp", "expert", "tensor"), sizes):
    _require(isinstance(v, int) and (v == -1 or v > 0), f"mesh.{a}",
             f"must be a positive size or -1 (fill), got {v!r}")
  _require(sizes.count(-1) <= 1, "mesh", f"at most one axis may be -1, got {sizes}")
  n = config.mesh.num_devices
  _require(isinstance(n, int) and (n == -1 or n > 0), "mesh.num_devices",
           f"must be a positive count or -1 (all devices), got {n!r}")
  if moe_enabled(config) and config.mesh.expert > 1 and e.expert_parallel == "auto":
    from moejax.layers.heterogeneous import local_sizes
    from moejax.layers.moe import MoESpec
    spec = MoESpec.from_config(e)
    # (an expert count the axis does not divide is reported with the parameter it splits)
    if spec.heterogeneous and spec.num_routed % config.mesh.expert == 0:
      local_sizes(spec.routed_sizes, spec.num_routed // config.mesh.expert)

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
  smp = config.sample
  _require(smp.temperature >= 0, "sample.temperature",
           f"must be >= 0 (0 = greedy), got {smp.temperature}")
  _require(isinstance(smp.top_k, int) and smp.top_k >= 0, "sample.top_k",
           f"must be an integer >= 0 (0 = no limit), got {smp.top_k!r}")
  _require(0 < smp.top_p <= 1, "sample.top_p", f"must be in (0, 1], got {smp.top_p}")
  _require(smp.num_tokens >= 0, "sample.num_tokens",
           f"must be >= 0 (0 = up to model.max_length), got {smp.num_tokens}")
  an = config.analyze
  _require(an.tokens > 0, "analyze.tokens", f"must be > 0, got {an.tokens}")
  _require(0 < an.fit_fraction < 1, "analyze.fit_fraction",
           f"must be in (0, 1), got {an.fit_fraction}")
  _require(an.devices >= 0, "analyze.devices", f"must be >= 0 (0 = auto), got {an.devices}")
  _require(an.milp_time_limit > 0, "analyze.milp_time_limit",
           f"must be > 0 seconds, got {an.milp_time_limit}")
  _require(config.steer.calibration_batches > 0, "steer.calibration_batches",
           f"must be > 0, got {config.steer.calibration_batches}")
  return config

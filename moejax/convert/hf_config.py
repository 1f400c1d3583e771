"""Hugging Face ``config.json`` <-> moejax config, reading every field as transformers does.

A field absent from a config.json takes the default of transformers' config class for that
family (``HF_DEFAULTS``: the ``__init__`` defaults of MixtralConfig, Qwen3MoeConfig,
OlmoeConfig, Qwen2MoeConfig and DeepseekV3Config; tests compare each with transformers itself),
never a default of ours: a DeepSeek-V3 config without ``rope_interleave`` is interleaved, one
without ``q_lora_rank`` has rank 1536, a Mixtral one without ``rope_theta`` uses 1e6. A field
present as ``null`` keeps transformers' meaning of null (``q_lora_rank: null`` = full-rank
queries, ``num_key_value_heads: null`` = one per head).

Fields moejax does not model but a round trip must keep (tied embeddings, token ids) travel in
the workdir's ``convert.hf_fields`` (a JSON object) and are written back on export.
"""
from __future__ import annotations

import json

from moejax.convert.families import Family, family_of
from moejax.errors import ConversionError

_COMMON = dict(hidden_act="silu", head_dim=None, tie_word_embeddings=False, pad_token_id=None,
               bos_token_id=None, eos_token_id=None, attention_bias=False)
HF_DEFAULTS: dict[str, dict] = {
    "mixtral": dict(_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=1,
                    eos_token_id=2, sliding_window=None, num_experts_per_tok=2,
                    num_local_experts=8, router_aux_loss_coef=0.001, router_jitter_noise=0.0,
                    rope_theta=1e6),
    "qwen3_moe": dict(_COMMON, vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                      num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=4,
                      max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False,
                      sliding_window=4096, decoder_sparse_step=1, moe_intermediate_size=768,
                      num_experts_per_tok=8, num_experts=128, norm_topk_prob=False,
                      router_aux_loss_coef=0.001, mlp_only_layers=None, rope_theta=10000.0),
    "olmoe": dict(_COMMON, vocab_size=50304, hidden_size=2048, intermediate_size=2048,
                  num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=None,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=1,
                  eos_token_id=50279, clip_qkv=None, num_experts_per_tok=8, num_experts=64,
                  router_aux_loss_coef=0.01, norm_topk_prob=False, rope_theta=10000.0),
    "qwen2_moe": dict(_COMMON, vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                      num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                      max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False,
                      sliding_window=4096, decoder_sparse_step=1, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, num_experts_per_tok=4,
                      num_experts=60, norm_topk_prob=False, router_aux_loss_coef=0.001,
                      mlp_only_layers=None, qkv_bias=True, rope_theta=10000.0),
    "deepseek_v3": dict(_COMMON, vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                        num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
                        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
                        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8,
                        topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
                        norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6,
                        bos_token_id=0, eos_token_id=1, rope_interleave=True,
                        rope_theta=10000.0),
}
# transformers' attribute_map: another spelling of the expert count
_EXPERT_ALIASES = ("num_local_experts", "num_experts", "n_routed_experts")
# kept on import, written back on export (no moejax setting holds them)
ROUND_TRIP_FIELDS = ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
# DeepSeek-V3's q/kv latent RMSNorms are built with their default eps, whatever rms_norm_eps is
DEEPSEEK_LATENT_NORM_EPS = 1e-6


def hf_field(fam: Family, hf: dict, key: str):
  """transformers' value of ``key`` for this config.json: its own, else the class default."""
  if key in hf:
    return hf[key]
  if key == fam.experts_key:
    for alias in _EXPERT_ALIASES:
      if alias in hf:
        return hf[alias]
  return HF_DEFAULTS[fam.name][key]


def _unsupported(key, value, why):
  raise ConversionError(f"HF config {key}={value!r} is not supported: {why}")


def _rope_theta(fam: Family, hf: dict) -> float:
  rope = hf.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default":
    _unsupported("rope_parameters.rope_type", rope.get("rope_type"), "only plain RoPE ('default')")
  if hf.get("rope_scaling"):
    _unsupported("rope_scaling", hf["rope_scaling"], "only plain RoPE")
  return float(rope.get("rope_theta", hf.get("rope_theta", HF_DEFAULTS[fam.name]["rope_theta"])))


def _dense_layers(fam: Family, hf: dict) -> tuple[int, int]:
  """(first_dense_layers, moe_every) from Qwen's decoder_sparse_step / mlp_only_layers."""
  step = int(hf_field(fam, hf, "decoder_sparse_step") or 1)
  only = sorted(hf_field(fam, hf, "mlp_only_layers") or [])
  if only and (only != list(range(len(only))) or step != 1):
    _unsupported("mlp_only_layers", only, "only a leading prefix of dense layers (0..n-1) with "
                 "decoder_sparse_step=1")
  return (len(only), 1) if only else (step - 1, step)


def _check_supported(fam: Family, hf: dict) -> None:
  get = lambda key: hf_field(fam, hf, key)
  if get("hidden_act") != "silu":
    _unsupported("hidden_act", get("hidden_act"), "experts and FFNs are SwiGLU (silu)")
  defaults = HF_DEFAULTS[fam.name]
  if "use_sliding_window" in defaults:          # Qwen: a window only when switched on
    if get("use_sliding_window"):
      _unsupported("use_sliding_window", True, "full causal attention only")
  elif "sliding_window" in defaults and get("sliding_window"):
    _unsupported("sliding_window", get("sliding_window"), "full causal attention only")
  if "clip_qkv" in defaults and get("clip_qkv") is not None:
    _unsupported("clip_qkv", get("clip_qkv"), "no clipping of q/k/v")
  if get("attention_bias"):
    _unsupported("attention_bias", True, "biases only on q/k/v (Qwen2-MoE's qkv_bias)")


def config_from_hf(hf: dict) -> tuple[Family, dict]:
  """-> (family, flat moejax config overrides) for an HF config.json dict."""
  fam = family_of(hf)
  _check_supported(fam, hf)
  get = lambda key: hf_field(fam, hf, key)
  heads = get("num_attention_heads")
  first_dense, every = _dense_layers(fam, hf) if "decoder_sparse_step" in HF_DEFAULTS[
      fam.name] else (0, 1)
  renorm = (fam.default_renormalize if fam.default_renormalize is not None
            else bool(get("norm_topk_prob")))
  o = {
      "model.vocab_size": get("vocab_size"), "model.d_model": get("hidden_size"),
      "model.num_layers": get("num_hidden_layers"), "model.num_heads": heads,
      "model.num_kv_heads": get("num_key_value_heads") or heads,
      "model.head_dim": get("head_dim") or get("hidden_size") // heads,
      "model.ffn_hidden": get("intermediate_size"), "model.rope_theta": _rope_theta(fam, hf),
      "model.norm_eps": float(get("rms_norm_eps")), "model.qk_norm": fam.qk_norm,
      "model.qkv_bias": bool(get("qkv_bias")) if fam.qkv_bias else False,
      "model.max_length": int(get("max_position_embeddings")),
      "model.moe.routed_experts": get(fam.experts_key),
      "model.moe.active_experts": get("num_experts_per_tok"),
      "model.moe.expert_hidden": get(fam.expert_hidden_key),
      "model.moe.router": "topk_softmax", "model.moe.renormalize": renorm,
      "model.moe.first_dense_layers": first_dense, "model.moe.moe_every": every,
      "model.moe.load_balance_weight": float(get("router_aux_loss_coef") if "router_aux_loss_coef"
                                             in HF_DEFAULTS[fam.name] else 0.0),
      "model.moe.jitter_eps": float((get("router_jitter_noise") if fam.name == "mixtral"
                                     else 0.0) or 0.0),
      "convert.hf_fields": json.dumps({k: get(k) for k in ROUND_TRIP_FIELDS}, sort_keys=True),
  }
  if fam.shared_gate:
    o.update({"model.moe.num_shared_experts": 1,
              "model.moe.shared_expert_hidden": get("shared_expert_intermediate_size"),
              "model.moe.shared_expert_gate": True})
  if fam.name == "deepseek_v3":
    o.update(_deepseek_v3(fam, hf))
  return fam, o


def rope_interleave(fam: Family, hf: dict) -> bool:
  """Whether the checkpoint's MLA RoPE rows are interleaved (DeepSeek's released layout)."""
  return fam.attention == "latent" and bool(hf_field(fam, hf, "rope_interleave"))


def _deepseek_v3(fam: Family, hf: dict) -> dict:
  get = lambda key: hf_field(fam, hf, key)
  if int(hf.get("moe_layer_freq", 1) or 1) != 1:       # not a transformers field: 1 if absent
    _unsupported("moe_layer_freq", hf["moe_layer_freq"], "every layer after the first "
                 "first_k_dense_replace is MoE")
  if hf.get("topk_method", "noaux_tc") != "noaux_tc":  # likewise
    _unsupported("topk_method", hf["topk_method"], "DeepSeek-V3's noaux_tc routing only")
  heads, dn, dr = get("num_attention_heads"), get("qk_nope_head_dim"), get("qk_rope_head_dim")
  return {
      "model.attention": "latent", "model.num_kv_heads": heads, "model.head_dim": dn + dr,
      "model.mla.q_lora_rank": get("q_lora_rank") or 0,
      "model.mla.kv_lora_rank": get("kv_lora_rank"), "model.mla.qk_nope_head_dim": dn,
      "model.mla.qk_rope_head_dim": dr, "model.mla.v_head_dim": get("v_head_dim"),
      "model.mla.latent_norm_eps": DEEPSEEK_LATENT_NORM_EPS,
      "model.moe.num_shared_experts": get("n_shared_experts") or 0,
      "model.moe.router": "sigmoid",
      "model.moe.routed_scaling_factor": float(get("routed_scaling_factor")),
      "model.moe.num_expert_groups": get("n_group") or 1,
      "model.moe.groups_per_token": get("topk_group") or 1,
      "model.moe.group_mask_fill": "neg_inf",
      "model.moe.first_dense_layers": get("first_k_dense_replace"),
      "model.moe.moe_every": 1, "model.moe.load_balance_weight": 0.0,
      "model.moe.jitter_eps": 0.0,
  }


def config_to_hf(fam: Family, cfg, hf_fields: dict | None = None, *, tied: bool = False) -> dict:
  """The config.json of ``cfg`` (a moejax ``ModelConfig``) as ``fam``; ``hf_fields``: the
  round-trip fields kept from an import; ``tied``: lm_head is the embedding (not written)."""
  s = cfg.moe
  out = {
      "architectures": [fam.architecture], "model_type": fam.name, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_hidden, "hidden_act": "silu",
      "rms_norm_eps": cfg.norm_eps,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      # merged experts are written once per router output (families.Entry.experts)
      fam.experts_key: cfg.moe_spec(cfg.moe_layer_ids[0]).router_experts,
      "num_experts_per_tok": s.routed_k,
      fam.expert_hidden_key: s.fine_hidden, "router_aux_loss_coef": s.load_balance_weight,
  }
  out.update({k: v for k, v in (hf_fields or {}).items() if k in ROUND_TRIP_FIELDS})
  out["tie_word_embeddings"] = tied
  if cfg.max_length:
    out["max_position_embeddings"] = cfg.max_length
  if fam.default_renormalize is None:
    out["norm_topk_prob"] = s.renormalize
  if fam.name in ("qwen3_moe", "qwen2_moe"):
    every, first = cfg.moe_every, cfg.first_dense_layers
    out.update(decoder_sparse_step=every,
               mlp_only_layers=list(range(first)) if every == 1 else [])
    if every > 1 and first != every - 1:
      raise ConversionError(f"cannot export as {fam.name}: model.moe.first_dense_layers="
                            f"{first} with moe_every={every}: Qwen's "
                            "decoder_sparse_step puts MoE layers at moe_every-1, 2*moe_every-1,..")
  if fam.shared_gate:
    out.update(qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=s.shared_hidden)
  if fam.name == "deepseek_v3":
    q_rank, kv_rank, dn, dr, dv = cfg.mla
    out.update(num_key_value_heads=cfg.num_heads, head_dim=dr, q_lora_rank=q_rank or None,
               kv_lora_rank=kv_rank, qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=dv,
               rope_interleave=True, n_shared_experts=s.num_shared_experts,
               n_group=s.num_expert_groups, topk_group=s.groups_per_token,
               routed_scaling_factor=s.routed_scaling_factor, norm_topk_prob=s.renormalize,
               first_k_dense_replace=cfg.first_dense_layers, topk_method="noaux_tc")
    if cfg.moe_every != 1:
      raise ConversionError("cannot export as deepseek_v3: model.moe.moe_every must be 1")
  return out

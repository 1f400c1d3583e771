"""Hugging Face MoE families as data: a config mapping and a name/reshape table per family.

A table lists, for every moejax parameter, the Hugging Face tensors it is made of and one of a
few transforms (``TRANSFORMS``): conversion in either direction walks the table, so a family is
~30 lines of names, never code paths inside the model. The model-side differences are moejax
options (``model.qk_norm``, ``model.qkv_bias``, ``model.moe.shared_expert_gate``, ...), usable
for training from scratch too.

  family       HF model_type  attention options        MoE block
  mixtral      mixtral        -                        top-k softmax, renormalised
  qwen3_moe    qwen3_moe      qk_norm=head             top-k softmax, norm_topk_prob
  olmoe        olmoe          qk_norm=full             top-k softmax, norm_topk_prob
  qwen2_moe    qwen2_moe      qkv_bias                 + one shared expert with a sigmoid gate
  deepseek_v3  deepseek_v3    attention=latent (MLA)   sigmoid router with selection bias and
                                                       group-limited top-k, shared experts,
                                                       first_k_dense_replace dense layers

Dense layers (Qwen ``decoder_sparse_step`` / a leading ``mlp_only_layers`` prefix) map to
``model.moe.moe_every`` / ``first_dense_layers``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from moejax.errors import ConversionError


@dataclasses.dataclass(frozen=True)
class Entry:
  """One moejax parameter <-> the HF tensors it is made of."""
  path: tuple[str, ...]
  hf: tuple[str, ...]
  kind: str                 # a key of TRANSFORMS
  n_in: int = 1             # "linear": how many leading moejax axes are the input
  # "linear" with interleaved RoPE rows in the HF weight (DeepSeek): (block, offset, d_rope):
  # in every block of `block` output rows, rows offset..offset+d_rope-1 hold RoPE pairs
  # (x0, x1), (x2, x3), ... that moejax's rotate-half layout wants as (x0, x2, ..| x1, x3, ..).
  rope: tuple[int, int, int] | None = None
  # Export of merged experts (model.moe.layer_overrides expert_map): HF has one expert per
  # router output, HF expert i being the moejax bank's expert experts[i] (a merged expert
  # written once per member, so transformers' routing equals the folded router exactly).
  experts: tuple[int, ...] | None = None


def _rope_perm(n_rows: int, rope) -> np.ndarray:
  block, offset, dr = rope
  perm = np.arange(n_rows)
  inner = np.concatenate([np.arange(0, dr, 2), np.arange(1, dr, 2)]) + offset
  for b0 in range(0, n_rows, block):
    perm[b0 + offset:b0 + offset + dr] = b0 + inner
  return perm


def _linear_to(ts, shape, e):
  t = ts[0] if e.rope is None else ts[0][_rope_perm(ts[0].shape[0], e.rope)]
  return t.T.reshape(shape)


def _linear_from(a, e):
  t = a.reshape(int(np.prod(a.shape[:e.n_in])), -1).T
  return [t if e.rope is None else t[np.argsort(_rope_perm(t.shape[0], e.rope))]]


def _gate_up_to(ts, shape, e):        # [.., D, 2, H] from (gate [H, D], up [H, D]) pairs
  # written into one preallocated array: the import's peak is the HF tensors plus the result
  out = np.empty((len(ts) // 2,) + tuple(shape[-3:]), ts[0].dtype)
  for i, (g, u) in enumerate(zip(ts[::2], ts[1::2])):
    out[i, :, 0], out[i, :, 1] = g.T, u.T
  return out.reshape(shape)


def _gate_up_from(a, e):
  banks = a if a.ndim == 4 else a[None]
  return [t for w in banks for t in (w[:, 0, :].T, w[:, 1, :].T)]


def _down_to(ts, shape, e):           # [E, H, D] from down_e [D, H]
  out = np.empty((len(ts),) + tuple(shape[-2:]), ts[0].dtype)
  for i, t in enumerate(ts):
    out[i] = t.T
  return out.reshape(shape)


TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda ts, shape, e: ts[0].reshape(shape),
             lambda a, e: [a.reshape(-1) if a.ndim > 1 else a]),
    "embed": (lambda ts, shape, e: ts[0].reshape(shape), lambda a, e: [a]),
    "linear": (_linear_to, _linear_from),
    "gate_up": (_gate_up_to, _gate_up_from),
    "down": (_down_to, lambda a, e: [w.T for w in a]),
}


def hf_shapes(entry: Entry, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
  """The HF tensor shapes an entry expects for a moejax parameter of ``shape``."""
  if entry.experts is not None:
    shape = (len(entry.experts),) + tuple(shape[1:])
  if entry.kind == "embed":
    return [shape]
  if entry.kind == "copy":
    return [(int(np.prod(shape)),)]
  if entry.kind == "linear":
    return [(int(np.prod(shape[entry.n_in:])), int(np.prod(shape[:entry.n_in])))]
  if entry.kind == "gate_up":
    e = shape[0] if len(shape) == 4 else 1
    return [(shape[-1], shape[-3])] * (2 * e)
  if entry.kind == "down":
    return [(shape[2], shape[1])] * shape[0]
  raise KeyError(entry.kind)


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  architecture: str                  # HF class name written to config.json
  moe_prefix: str                    # "block_sparse_moe" (Mixtral) | "mlp"
  expert_names: tuple[str, str, str]  # gate, up, down projections of one expert
  qk_norm: str = "none"
  qkv_bias: bool = False             # q/k/v biases allowed (Qwen2-MoE: its qkv_bias field)
  shared_prefix: str | None = None   # Qwen2-MoE: "shared_expert" (+ "shared_expert_gate")
  experts_key: str = "num_experts"
  expert_hidden_key: str = "moe_intermediate_size"
  default_renormalize: bool | None = None   # fixed (Mixtral) or read from norm_topk_prob
  attention: str = "standard"        # "standard" | "latent" (MLA)
  router: str = "topk_softmax"       # "topk_softmax" | "sigmoid" (bias + groups)
  shared_gate: bool = False          # Qwen2-MoE's sigmoid gate on the shared expert


FAMILIES = {f.name: f for f in (
    Family("mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"),
           experts_key="num_local_experts", expert_hidden_key="intermediate_size",
           default_renormalize=True),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
           qk_norm="head"),
    Family("olmoe", "OlmoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
           qk_norm="full", expert_hidden_key="intermediate_size"),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
           qkv_bias=True, shared_prefix="shared_expert", shared_gate=True),
    Family("deepseek_v3", "DeepseekV3ForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
           shared_prefix="shared_experts", experts_key="n_routed_experts", attention="latent",
           router="sigmoid"),
)}


def _mla_entries(a: str, mx: str, cfg, rope_interleave: bool) -> list[Entry]:
  q_rank, kv_rank, dn, dr, dv = cfg.mla
  rope = lambda block, offset: (block, offset, dr) if rope_interleave else None
  out = [Entry((mx, "attn", "kv_down"), (a + "kv_a_proj_with_mqa.weight",), "linear",
               rope=rope(kv_rank + dr, kv_rank)),
         Entry((mx, "attn", "kv_norm", "scale"), (a + "kv_a_layernorm.weight",), "copy"),
         Entry((mx, "attn", "kv_up"), (a + "kv_b_proj.weight",), "linear"),
         Entry((mx, "attn", "out"), (a + "o_proj.weight",), "linear", n_in=2)]
  if q_rank:
    out += [Entry((mx, "attn", "q_down"), (a + "q_a_proj.weight",), "linear"),
            Entry((mx, "attn", "q_norm", "scale"), (a + "q_a_layernorm.weight",), "copy"),
            Entry((mx, "attn", "q_up"), (a + "q_b_proj.weight",), "linear",
                  rope=rope(dn + dr, dn))]
  else:
    out.append(Entry((mx, "attn", "query"), (a + "q_proj.weight",), "linear",
                     rope=rope(dn + dr, dn)))
  return out


def table(fam: Family, cfg, rope_interleave: bool = False) -> list[Entry]:
  """Every parameter of the moejax ``ModelConfig`` ``cfg`` with its HF tensors
  (``rope_interleave``: DeepSeek's interleaved RoPE rows, see ``Entry.rope``)."""
  out = [Entry(("embed", "embedding"), ("model.embed_tokens.weight",), "embed"),
         Entry(("final_norm", "scale"), ("model.norm.weight",), "copy"),
         Entry(("unembed",), ("lm_head.weight",), "linear")]
  for i in range(cfg.num_layers):
    hf, mx = f"model.layers.{i}.", f"layer_{i}"
    a = hf + "self_attn."
    out += [Entry((mx, "attn_norm", "scale"), (hf + "input_layernorm.weight",), "copy"),
            Entry((mx, "ffn_norm", "scale"), (hf + "post_attention_layernorm.weight",), "copy")]
    if cfg.mla is not None:
      out += _mla_entries(a, mx, cfg, rope_interleave)
    else:
      out += [Entry((mx, "attn", "query"), (a + "q_proj.weight",), "linear"),
              Entry((mx, "attn", "key"), (a + "k_proj.weight",), "linear"),
              Entry((mx, "attn", "value"), (a + "v_proj.weight",), "linear"),
              Entry((mx, "attn", "out"), (a + "o_proj.weight",), "linear", n_in=2)]
    if cfg.qkv_bias:
      out += [Entry((mx, "attn", f"{n}_bias"), (a + f"{p}_proj.bias",), "copy")
              for n, p in (("query", "q"), ("key", "k"), ("value", "v"))]
    if cfg.qk_norm != "none":
      out += [Entry((mx, "attn", "query_norm", "scale"), (a + "q_norm.weight",), "copy"),
              Entry((mx, "attn", "key_norm", "scale"), (a + "k_norm.weight",), "copy")]
    gate, up, down = fam.expert_names
    if cfg.is_moe_layer(i):
      m, s = hf + fam.moe_prefix + ".", cfg.moe_spec(i)
      ex = lambda n: tuple(f"{m}experts.{e}.{n}.weight" for e in range(s.router_experts))
      emap = s.expert_map or None
      if s.router == "sigmoid":
        out.append(Entry((mx, "moe", "router", "selection_bias"),
                         (m + "gate.e_score_correction_bias",), "copy"))
      out += [Entry((mx, "moe", "router", "kernel"), (m + "gate.weight",), "linear"),
              Entry((mx, "moe", "experts", "wi"),
                    tuple(t for pair in zip(ex(gate), ex(up)) for t in pair), "gate_up",
                    experts=emap),
              Entry((mx, "moe", "experts", "wo"), ex(down), "down", experts=emap)]
      if s.num_shared_experts:
        sh = f"{m}{fam.shared_prefix}."
        out += [Entry((mx, "moe", "shared", "wi"),
                      (sh + "gate_proj.weight", sh + "up_proj.weight"), "gate_up"),
                Entry((mx, "moe", "shared", "wo"), (sh + "down_proj.weight",), "linear")]
      if s.shared_expert_gate:
        out.append(Entry((mx, "moe", "shared_gate"), (m + "shared_expert_gate.weight",),
                         "linear"))
    else:
      m = hf + "mlp."
      out += [Entry((mx, "ffn", "wi"), (m + "gate_proj.weight", m + "up_proj.weight"),
                    "gate_up"),
              Entry((mx, "ffn", "wo"), (m + "down_proj.weight",), "linear")]
  return out


def family_of(hf: dict) -> Family:
  mt = hf.get("model_type")
  if mt not in FAMILIES:
    raise ConversionError(f"HF model_type={mt!r} (architectures={hf.get('architectures')}) is "
                          f"not supported; supported: {', '.join(FAMILIES)}")
  return FAMILIES[mt]


def infer_family(cfg) -> Family:
  """The HF family a moejax model (``ModelConfig``) can be exported as, or ConversionError."""
  s = cfg.moe
  if s is None:
    raise ConversionError("model.moe: export to an HF MoE family needs an MoE model")
  for fam in FAMILIES.values():
    if (fam.qk_norm == cfg.qk_norm and (fam.qkv_bias or not cfg.qkv_bias)
        and fam.attention == ("latent" if cfg.mla is not None else "standard")
        and fam.router == s.router and fam.shared_gate == s.shared_expert_gate
        and (bool(fam.shared_prefix) == bool(s.num_shared_experts) or fam.name == "deepseek_v3")
        and (fam.default_renormalize is None or fam.default_renormalize == s.renormalize)
        and (fam.name not in ("mixtral", "olmoe")
             or (cfg.moe_every == 1 and cfg.first_dense_layers == 0))):
      return fam
  raise ConversionError(
      f"no HF family matches this model (qk_norm={cfg.qk_norm!r}, qkv_bias={cfg.qkv_bias}, "
      f"shared experts={s.num_shared_experts}, renormalize={s.renormalize}); supported: "
      f"{', '.join(FAMILIES)}")


def check_exportable(fam: Family, cfg) -> None:
  """Refuses, naming the setting, any moejax option the HF family cannot express."""
  s = cfg.moe
  checks = [
      (cfg.moh is None, "model.attention", "mixture_of_heads has no HF counterpart yet"),
      ((cfg.mla is not None) == (fam.attention == "latent"), "model.attention",
       f"{fam.name} uses {fam.attention!r} attention"),
      (cfg.qk_norm == fam.qk_norm, "model.qk_norm", f"{fam.name} uses {fam.qk_norm!r}"),
      (fam.qkv_bias or not cfg.qkv_bias, "model.qkv_bias", f"{fam.name} has no q/k/v biases"),
      (cfg.mla is None or (cfg.latent_norm_eps or cfg.norm_eps) == 1e-6,
       "model.mla.latent_norm_eps", "DeepSeek-V3's q/kv latent norms use eps 1e-6"),
      (s.router == fam.router and not s.null_experts, "model.moe.router",
       f"{fam.name} routes with {fam.router!r} (no null experts)"),
      (s.router != "sigmoid" or (s.group_mask_fill == "neg_inf" and s.group_routing == "limited"
                                 and s.sequence_balance_weight == 0),
       "model.moe.group_mask_fill/group_routing",
       "DeepSeek-V3 masks other groups with -inf, group-limited"),
      (s.expert_bank == "swiglu", "model.moe.expert_bank", "HF experts are full-precision SwiGLU"),
      (not s.heterogeneous and not any(sp.heterogeneous for _, sp in cfg.moe_layers),
       "model.moe.expert_sizes", "HF families have experts of one size (use --to=torch for "
       "heterogeneous experts, e.g. after neuron pruning)"),
      (len({cfg.moe_spec(i).router_experts for i in cfg.moe_layer_ids}) == 1,
       "model.moe.layer_overrides", "HF families route over one number of experts in every "
       "layer"),
      (s.merge == "none" and s.iterations == 1, "model.moe.merge/iterations",
       "soft merging and Chain-of-Experts have no HF counterpart"),
      (fam.default_renormalize is None or s.renormalize == fam.default_renormalize,
       "model.moe.renormalize", f"{fam.name} always renormalises the top-k gates"),
      (fam.name == "deepseek_v3" or (
          bool(fam.shared_prefix) == bool(s.num_shared_experts)
          and (not fam.shared_prefix or (s.num_shared_experts == 1 and s.shared_expert_gate))),
       "model.moe.num_shared_experts",
       f"{fam.name} has {'one gated shared expert' if fam.shared_prefix else 'no shared experts'}"),
      (fam.shared_gate == s.shared_expert_gate, "model.moe.shared_expert_gate",
       f"{fam.name} {'gates' if fam.shared_gate else 'does not gate'} its shared expert"),
      (fam.name != "deepseek_v3" or not s.shared_expert_hidden
       or s.shared_expert_hidden == s.num_shared_experts * s.fine_hidden,
       "model.moe.shared_expert_hidden", "DeepSeek-V3's shared experts have the experts' width"),
      (fam.name not in ("mixtral", "olmoe") or (cfg.moe_every == 1
                                                 and cfg.first_dense_layers == 0),
       "model.moe.moe_every/first_dense_layers", f"{fam.name} has no dense layers"),
  ]
  for ok, key, why in checks:
    if not ok:
      raise ConversionError(f"cannot export as {fam.name}: {key}: {why}")

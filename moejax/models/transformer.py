"""Decoder-only language model assembled from config (pre-norm, RMSNorm, RoPE, GQA, SwiGLU).

Which feed-forward a layer gets is data (``ModelConfig.is_moe_layer``), not a model-name branch:
layers < first_dense_layers are dense (DeepSeekMoE 16B: the first layer), after that every
``moe_every``-th layer is MoE (GShard/Switch: every other layer; DeepSeekMoE: every layer).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from moejax.layers.attention import Attention
from moejax.layers.dense import SwiGLU, kernel_init
from moejax.layers.merging import SoftMergeBlock
from moejax.layers.mla import LatentAttention
from moejax.layers.moe import MoEBlock, MoESpec
from moejax.layers.moh import MixtureOfHeadsAttention
from moejax.layers.norms import RMSNorm
from moejax.layers.routers import GRU, ROUTERS

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 256
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  ffn_hidden: int = 512
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  dtype: str = "float32"
  qkv_bias: bool = False            # attention options (layers/attention.py)
  qk_norm: str = "none"
  moe: Optional[MoESpec] = None     # None: every layer dense
  # ((layer, MoESpec), ...): MoE layers whose spec differs from ``moe`` (compressed models:
  # per-layer expert sizes or merged-expert maps; config model.moe.layer_overrides)
  moe_layers: tuple = ()
  moe_every: int = 1
  first_dense_layers: int = 0
  # None: standard attention; else mixture-of-heads options (layers/moh.py):
  # (shared_heads, active_heads, gating, router, balance_weight)
  moh: Optional[tuple] = None
  # None unless attention="latent" (layers/mla.py): (q_lora_rank, kv_lora_rank,
  # qk_nope_head_dim, qk_rope_head_dim, v_head_dim)
  mla: Optional[tuple] = None
  # inference-time steering: ((layer index, layers/steering.py LayerSteer), ...); () = none
  steer: tuple = ()
  latent_norm_eps: float = 0.0      # eps of MLA's q/kv latent norms; 0 = norm_eps
  mla_decode: str = "absorbed"      # how MLA reads its latent cache (layers/mla.py)
  # Longest sequence (prompt + generated tokens) generation accepts: the config's
  # model.max_length, else the training data.seq_len; 0 = no limit set.
  max_length: int = 0

  def is_moe_layer(self, i: int) -> bool:
    return (self.moe is not None and i >= self.first_dense_layers
            and (i - self.first_dense_layers) % self.moe_every == 0)

  def moe_spec(self, i: int) -> Optional[MoESpec]:
    """Layer ``i``'s MoE spec (its override, else ``moe``); None for a dense layer."""
    if not self.is_moe_layer(i):
      return None
    return dict(self.moe_layers).get(i, self.moe)

  @property
  def moe_layer_ids(self) -> list[int]:
    return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @classmethod
  def from_config(cls, model, default_max_length: int = 0) -> "ModelConfig":
    """Builds from the ``config.model`` ConfigDict (already validated); ``default_max_length``
    (the training sequence length) applies when ``model.max_length`` is 0."""
    moe_cfg = model.moe
    moe = MoESpec.from_config(moe_cfg)
    fields = {f.name for f in dataclasses.fields(cls)} - {"moe", "moe_every", "first_dense_layers",
                                                          "moh", "mla", "latent_norm_eps",
                                                          "mla_decode", "max_length", "steer",
                                                          "moe_layers"}
    moh = None
    if model.attention == "mixture_of_heads":
      h = model.moh
      moh = (h.shared_heads, h.active_heads, h.gating, h.router, h.balance_weight,
             h.head_compute, moe_cfg.gmm_backend)
    mla = None
    if model.attention == "latent":
      a = model.mla
      mla = (a.q_lora_rank, a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim)
    return cls(moe=moe, moe_layers=layer_specs(moe, moe_cfg.layer_overrides),
               moe_every=moe_cfg.moe_every,
               first_dense_layers=moe_cfg.first_dense_layers, moh=moh, mla=mla,
               latent_norm_eps=model.mla.latent_norm_eps, mla_decode=model.mla.decode,
               max_length=model.max_length or default_max_length,
               **{name: model[name] for name in fields})


def layer_specs(moe: Optional[MoESpec], overrides: str) -> tuple:
  """((layer, MoESpec), ...) from ``model.moe.layer_overrides`` (validated by config.py):
  a JSON object {"layer": {MoESpec field: value}}."""
  table = json.loads(overrides or "{}")
  if moe is None or not table:
    return ()
  return tuple((int(i), dataclasses.replace(moe, **{k: tuple(v) if isinstance(v, list) else v
                                                    for k, v in fields.items()}))
               for i, fields in sorted(table.items(), key=lambda kv: int(kv[0])))


class DecoderLayer(nn.Module):
  cfg: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, x: Array, positions: Array, *, deterministic: bool,
               tokens: Array | None = None, router_state: tuple | None = None,
               prompt_length: Array | None = None, cache_mode: str | None = None):
    """-> (x, router carry): the carry of a recurrent router (RMoE), passed through dense
    layers unchanged (None for other routers). ``prompt_length``: set by the sampler, read by
    the layers that treat the prompt differently at inference (Lory's merge). ``cache_mode``:
    None, "prefill" or "decode" (layers/kv_cache.py)."""
    c, dt = self.cfg, self.cfg.compute_dtype
    h = RMSNorm(c.norm_eps, dt, name="attn_norm")(x)
    options = dict(qkv_bias=c.qkv_bias, qk_norm=c.qk_norm, norm_eps=c.norm_eps)
    if c.mla is not None:
      q_rank, kv_rank, d_nope, d_rope, d_v = c.mla
      attn = LatentAttention(c.num_heads, kv_rank, d_nope, d_rope, d_v, q_rank, c.rope_theta,
                             c.norm_eps, dt, latent_norm_eps=c.latent_norm_eps or None,
                             decode_form=c.mla_decode, name="attn")
    elif c.moh is None:
      attn = Attention(c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta, dt, **options,
                       name="attn")
    else:
      shared, active, gating, router, weight, compute, backend = c.moh
      attn = MixtureOfHeadsAttention(c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta, dt,
                                     **options, shared_heads=shared, active_heads=active,
                                     gating=gating, router=router, balance_weight=weight,
                                     head_compute=compute, gmm_backend=backend, name="attn")
    x = x + attn(h, positions, cache_mode)
    h = RMSNorm(c.norm_eps, dt, name="ffn_norm")(x)
    carry = router_state[1] if router_state is not None else None
    if c.is_moe_layer(self.layer):
      if c.moe.merge == "none":
        block = MoEBlock(c.moe_spec(self.layer), dt, steer=dict(c.steer).get(self.layer),
                         name="moe")
        y = block(h, deterministic=deterministic, token_ids=tokens, router_state=router_state)
      else:
        y = SoftMergeBlock(c.moe, dt, name="moe")(h, prompt_length=prompt_length,
                                                  positions=positions, cache_mode=cache_mode)
      if router_state is not None:
        y, carry = y
    else:
      y = SwiGLU(c.ffn_hidden, dt, name="ffn")(h)
    x = x + y
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), carry


class Transformer(nn.Module):
  """tokens [B, L] int32 -> logits [B, L, V] float32.

  Generation (moejax/inference/) calls it with ``cache_mode="prefill"`` on the padded prompts,
  then ``"decode"`` with one token and its ``positions`` [B, 1] per row, passing the
  ``"cache"`` collection in and out (layers/kv_cache.py). ``prompt_length`` (a scalar or [B])
  is read by layers that route on the prompt at inference (Lory's and SMEAR's merges).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: Array, *, deterministic: bool = True,
               prompt_length: Array | None = None, positions: Array | None = None,
               cache_mode: str | None = None) -> Array:
    c = self.cfg
    embed = nn.Embed(c.vocab_size, c.d_model, dtype=c.compute_dtype, name="embed",
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(stddev=1.0), ("vocab", "embed")))
    x = nn.with_logical_constraint(embed(tokens), ("batch", "length", "embed"))
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    gru = carry = None
    if c.moe is not None and getattr(ROUTERS[c.moe.router], "recurrent", False):
      gru = GRU(c.moe.recurrent_router_dim or c.d_model, name="router_gru")   # shared by layers
    for i in range(c.num_layers):
      x, carry = DecoderLayer(c, i, name=f"layer_{i}")(
          x, positions, deterministic=deterministic, tokens=tokens, prompt_length=prompt_length,
          router_state=(gru, carry) if gru is not None else None, cache_mode=cache_mode)
    x = RMSNorm(c.norm_eps, c.compute_dtype, name="final_norm")(x)
    unembed = self.param("unembed", nn.with_logical_partitioning(
        kernel_init(0, 1), ("embed", "vocab")),
                         (c.d_model, c.vocab_size), jnp.float32)
    logits = jnp.einsum("bld,dv->blv", x, unembed.astype(c.compute_dtype),
                        preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

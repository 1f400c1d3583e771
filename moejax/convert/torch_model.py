"""moejax models in plain PyTorch, for checkpoints exported with ``moejax.convert.export_torch``.

This file is self-contained (torch and safetensors only: no moejax, no JAX) and is copied into
every export as ``modeling_moejax.py``:

  import modeling_moejax
  model = modeling_moejax.load("path/to/export")     # reads moejax_config.json + safetensors
  logits = model(torch.tensor(tokens))                # [B, L] int -> [B, L, V] float32

It covers the variants moejax trains that Hugging Face has no class for: mixture-of-heads
attention (code/paper/binary gates, learned or query-norm routers), ternary experts (MoTE:
2-bit packed weights + scales, 8-bit activations), soft merging of experts (SMEAR, Lory),
null experts (AdaMoE), Chain-of-Experts iterations, heterogeneous expert sizes (HMoE), plus
everything of the HF families (GQA, q/k norms, q/k/v biases, latent attention, top-k softmax
top-p and sigmoid group-limited routers, gated shared experts). Inference only, float32; weights
keep moejax's names ("layer_0/attn/query").
"""
from __future__ import annotations

import glob
import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def rms_norm(x, scale, eps):
  x = x.float()
  return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


def rope(x, positions, theta):
  """Rotate-half RoPE on x [B, L, H, d] at positions [L]."""
  d = x.shape[-1]
  freq = theta ** (-torch.arange(0, d // 2, dtype=torch.float32) * 2.0 / d)
  angle = positions[:, None].float() * freq
  cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
  a, b = x.float().chunk(2, dim=-1)
  return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def swiglu(x, wi, wo):
  """x [..., D], wi [D, 2, H], wo [H, D]."""
  h = torch.einsum("...d,dch->...ch", x, wi)
  return (F.silu(h[..., 0, :]) * h[..., 1, :]) @ wo


def causal_softmax(scores):
  """scores [..., Lq, Lk] -> causal softmax in float32."""
  lq, lk = scores.shape[-2:]
  mask = torch.ones(lq, lk, dtype=torch.bool).tril()
  return torch.softmax(scores.masked_fill(~mask, torch.finfo(torch.float32).min), dim=-1)


def quantize_activations(x, bits=8):
  top = 2 ** (bits - 1) - 1
  s = top / x.abs().amax(-1, keepdim=True).clamp_min(1e-8)
  return torch.clamp(torch.round(x * s), -top - 1, top) / s


def ternary_weights(w, dims):
  """Ternary weights from latent ones: one scale mean|w| per matrix (over ``dims``)."""
  scale = w.abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
  return torch.clamp(torch.round(w / scale), -1, 1) * scale


def unpack_planes(packed, k):
  """uint8 [E, P, N] in the K-planar 2-bit layout (moejax's ternary kernels and packed
  workdirs) -> codes [E, k, N] in {-1, 0, 1}: plane q holds rows q*P .. q*P + P - 1 in bits
  2q..2q+1 as code + 1."""
  planes = [((packed.to(torch.int32) >> (2 * q)) & 3) - 1 for q in range(4)]
  return torch.cat(planes, dim=1)[:, :k].to(torch.int8)


class MoejaxForCausalLM(torch.nn.Module):
  def __init__(self, config: dict, weights: dict):
    super().__init__()
    self.c, self.w = config, weights

  def p(self, *path):
    return self.w["/".join(path)]

  # --------------------------------------------------------------------------- attention
  def attention(self, i, x, pos):
    c, L = self.c, f"layer_{i}"
    if c["mla"]:
      return self.latent_attention(i, x, pos)
    q, k, v = (torch.einsum("bld,dhk->blhk", x, self.p(L, "attn", n)) for n in
               ("query", "key", "value"))
    if c["qkv_bias"]:
      q, k, v = (t + self.p(L, "attn", f"{n}_bias") for t, n in
                 ((q, "query"), (k, "key"), (v, "value")))
    if c["qk_norm"] == "head":
      q = rms_norm(q, self.p(L, "attn", "query_norm", "scale"), c["norm_eps"])
      k = rms_norm(k, self.p(L, "attn", "key_norm", "scale"), c["norm_eps"])
    elif c["qk_norm"] == "full":
      q = rms_norm(q.flatten(2), self.p(L, "attn", "query_norm", "scale"),
                   c["norm_eps"]).view(q.shape)
      k = rms_norm(k.flatten(2), self.p(L, "attn", "key_norm", "scale"),
                   c["norm_eps"]).view(k.shape)
    queries = q
    q, k = rope(q, pos, c["rope_theta"]), rope(k, pos, c["rope_theta"])
    b, l, h, dh = q.shape
    g = k.shape[2]
    qg = q.view(b, l, g, h // g, dh)
    scores = torch.einsum("bqgrd,bkgd->bgrqk", qg, k) / math.sqrt(dh)
    out = torch.einsum("bgrqk,bkgd->bqgrd", causal_softmax(scores), v).reshape(b, l, h, dh)
    if c["moh"]:
      out = out * self.head_gates(i, x, queries)[..., None]
    return torch.einsum("blhk,hkd->bld", out, self.p(L, "attn", "out"))

  def head_gates(self, i, x, queries):
    """Mixture-of-heads gates [B, L, H] (moejax/layers/moh.py)."""
    shared, k, gating, router = self.c["moh"][:4]
    L = f"layer_{i}"
    if gating == "binary_ste":
      if router == "query_norm":
        norms = queries[..., shared:, :].float().norm(dim=-1)
        logits = (norms - norms.mean(-1, keepdim=True)) / (
            norms.std(-1, unbiased=False, keepdim=True) + 1e-6)
      else:
        logits = x @ self.p(L, "attn", "head_router")
      mask = F.one_hot(logits.topk(k, dim=-1).indices, logits.shape[-1]).sum(-2).float()
      return torch.cat([torch.ones(*logits.shape[:-1], shared), mask], dim=-1)
    stage = torch.softmax(x @ self.p(L, "attn", "stage_router"), dim=-1)
    logits = x @ self.p(L, "attn", "head_router")
    mask = F.one_hot(logits.topk(k, dim=-1).indices, logits.shape[-1]).sum(-2).float()
    shared_p = torch.softmax(x @ self.p(L, "attn", "shared_router"), -1) if shared else None
    if gating == "code":
      routed = torch.softmax(logits.masked_fill(mask == 0, float("-inf")), dim=-1) * k
      shared_p = shared_p * shared if shared else None
      stage = stage * 2
    else:
      routed = torch.softmax(logits, dim=-1) * mask
    parts = [stage[..., 1:2] * routed]
    if shared:
      parts.insert(0, stage[..., 0:1] * shared_p)
    return torch.cat(parts, dim=-1)

  def latent_attention(self, i, x, pos):
    q_rank, r, dn, dr, dv = self.c["mla"]
    L, eps = f"layer_{i}", self.c["norm_eps"]
    if q_rank:
      q = torch.einsum("blr,rhk->blhk", rms_norm(x @ self.p(L, "attn", "q_down"),
                                                 self.p(L, "attn", "q_norm", "scale"), eps),
                       self.p(L, "attn", "q_up"))
    else:
      q = torch.einsum("bld,dhk->blhk", x, self.p(L, "attn", "query"))
    latent = x @ self.p(L, "attn", "kv_down")
    kv = torch.einsum("blr,rhk->blhk", rms_norm(latent[..., :r], self.p(L, "attn", "kv_norm",
                                                                        "scale"), eps),
                      self.p(L, "attn", "kv_up"))
    theta = self.c["rope_theta"]
    q_rope, k_rope = rope(q[..., dn:], pos, theta), rope(latent[..., None, r:], pos, theta)
    scores = (torch.einsum("bqhd,bkhd->bhqk", q[..., :dn], kv[..., :dn])
              + torch.einsum("bqhd,bkd->bhqk", q_rope, k_rope[:, :, 0])) / math.sqrt(dn + dr)
    out = torch.einsum("bhqk,bkhd->bqhd", causal_softmax(scores), kv[..., dn:])
    return torch.einsum("blhk,hkd->bld", out, self.p(L, "attn", "out"))

  # --------------------------------------------------------------------------- MoE
  def route(self, name, x):
    """-> (expert index [T, k], gate weight [T, k]); indices >= E are null experts."""
    m = self.c["moe"]
    logits = x @ self.w[f"{name}/kernel"]
    if m["router"] == "top_p":     # fewest experts reaching top_p (at most routed_k); -1 unused
      top, index = torch.softmax(logits, dim=-1).topk(m["routed_k"], dim=-1)
      used = (top.cumsum(-1) - top) < m["top_p"]
      used[:, 0] = True
      weight = torch.where(used, top, torch.zeros_like(top))
      if m["renormalize"]:
        weight = weight / weight.sum(-1, keepdim=True)
      return torch.where(used, index, torch.full_like(index, -1)), weight
    if m["router"] == "topk_softmax":
      if m["null_experts"]:
        logits = torch.cat([logits, x @ self.w[f"{name}/null_kernel"]], dim=-1)
      weight, index = torch.softmax(logits, dim=-1).topk(m["routed_k"], dim=-1)
      if m["renormalize"]:
        weight = weight / weight.sum(-1, keepdim=True)
      return index, weight
    scores = torch.sigmoid(logits)                                 # sigmoid (DeepSeek-V3)
    choice = scores + self.w[f"{name}/selection_bias"]
    g, e, k = m["num_expert_groups"], scores.shape[-1], m["routed_k"]
    if g > 1:
      grouped = choice.view(-1, g, e // g)
      if m["group_routing"] == "balanced":
        idx = grouped.topk(k // g, dim=-1).indices + (torch.arange(g) * (e // g))[:, None]
        index = idx.reshape(-1, k)
      else:
        group_score = grouped.topk(2, dim=-1).values.sum(-1)
        keep = group_score.topk(m["groups_per_token"], dim=-1).indices
        mask = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, keep, True)
        fill = float("-inf") if m["group_mask_fill"] == "neg_inf" else 0.0
        index = choice.masked_fill(~mask.repeat_interleave(e // g, dim=1), fill).topk(
            k, dim=-1).indices
    else:
      index = choice.topk(k, dim=-1).indices
    weight = scores.gather(1, index)
    if m["renormalize"]:
      weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
    return index, weight * m["routed_scaling_factor"]

  def layer_moe(self, L):
    """Layer L's MoE settings: the model's, with its per-layer ones (compressed models:
    expert sizes, the merged-expert map) on top."""
    return {**self.c["moe"], **self.c.get("moe_layers", {}).get(L.split("_")[1], {})}

  def expert_weights(self, L):
    """Per-expert (wi, wo) and whether they are ternary."""
    if f"{L}/moe/experts/wi_0" in self.w:   # heterogeneous sizes: column blocks, see
      sizes = self.layer_moe(L)["routed_sizes"]  # moejax/layers/heterogeneous.py
      wi, wo = [[] for _ in sizes], [[] for _ in sizes]
      for j, hi in enumerate(sorted(set(sizes))):
        for r, e in enumerate(i for i, h in enumerate(sizes) if h >= hi):
          wi[e].append(self.p(L, "moe", "experts", f"wi_{j}")[r])
          wo[e].append(self.p(L, "moe", "experts", f"wo_{j}")[r])
      return [torch.cat(a, -1) for a in wi], [torch.cat(b, 0) for b in wo], False
    if f"{L}/moe/experts/wi" in self.w:
      return self.p(L, "moe", "experts", "wi"), self.p(L, "moe", "experts", "wo"), False
    d, h = self.c["d_model"], self.c["moe"]["fine_hidden"]
    wi, wo = [unpack_planes(self.p(L, "moe", "experts", n, "packed"), k).float()
              * self.p(L, "moe", "experts", n, "scale")[:, None, :]
              for n, k in (("wi", d), ("wo", h))]
    return wi.reshape(wi.shape[0], d, 2, h), wo, True

  def experts(self, L, x, index, weight):
    wi, wo, ternary = self.expert_weights(L)
    emap = self.layer_moe(L).get("expert_map")
    if emap:    # merged experts: router output i runs expert emap[i] (moejax/layers/folding.py)
      index = torch.where(index >= 0, torch.tensor(emap)[index.clamp(min=0)], index)
    # mixed precision: the last ternary_experts experts are ternary (latent weights exported)
    first_ternary = len(wi) - self.layer_moe(L).get("ternary_experts", 0)
    y = torch.zeros_like(x)
    for e in range(len(wi)):
      tok, slot = torch.nonzero(index == e, as_tuple=True)
      if tok.numel() == 0:
        continue
      q = ternary or e >= first_ternary
      w_in, w_out = wi[e], wo[e]
      if e >= first_ternary and not ternary:
        w_in, w_out = ternary_weights(w_in, (0, 2)), ternary_weights(w_out, (0, 1))
      xs = quantize_activations(x[tok]) if q else x[tok]
      h = torch.einsum("td,dch->tch", xs, w_in)
      h = F.silu(h[:, 0]) * h[:, 1]
      out = (quantize_activations(h) if q else h) @ w_out
      y.index_add_(0, tok, out * weight[tok, slot, None])
    return y

  def shared(self, L, x):
    m = self.c["moe"]
    y = swiglu(x, self.p(L, "moe", "shared", "wi"), self.p(L, "moe", "shared", "wo"))
    if m["shared_expert_gate"]:
      y = y * torch.sigmoid(x @ self.p(L, "moe", "shared_gate"))
    return y

  def moe(self, i, x):
    m, L = self.c["moe"], f"layer_{i}"
    if m["merge"] != "none":
      return self.merged(L, x)
    b, l, d = x.shape
    h, out = x.reshape(-1, d), 0
    for j in range(m["iterations"]):
      index, weight = self.route(f"{L}/moe/" + ("router" if j == 0 else f"router_{j}"), h)
      y = self.experts(L, h, index, weight)
      if m["num_shared_experts"]:
        y = y + self.shared(L, h)
      out, h = out + y, h + y
    return out.reshape(b, l, d)

  def merged(self, L, x):
    """SMEAR (merge='sequence') and Lory (merge='causal_segments'), moejax/layers/merging.py."""
    m = self.c["moe"]
    b, l, d = x.shape
    kernel = self.p(L, "moe", "router", "kernel")
    if m["merge"] == "sequence":
      probs = torch.softmax(x.mean(1, keepdim=True) @ kernel, dim=-1)
      groups = x[:, None]
    else:
      seg = m["merge_segment"]
      means = x.reshape(b, l // seg, seg, d).mean(2)
      probs = torch.softmax(means[:, :-1] @ kernel, dim=-1)
      probs = torch.cat([torch.full((b, 1, kernel.shape[1]), 1.0 / kernel.shape[1]), probs], 1)
      groups = x.reshape(b, l // seg, seg, d)
    wi = torch.einsum("bse,edch->bsdch", probs, self.p(L, "moe", "experts", "wi"))
    wo = torch.einsum("bse,ehd->bshd", probs, self.p(L, "moe", "experts", "wo"))
    h = torch.einsum("bsgd,bsdch->bsgch", groups, wi)
    y = torch.einsum("bsgh,bshd->bsgd", F.silu(h[..., 0, :]) * h[..., 1, :], wo).reshape(x.shape)
    return y + self.shared(L, x) if m["num_shared_experts"] else y

  # --------------------------------------------------------------------------- model
  def is_moe_layer(self, i):
    c = self.c
    return (c["moe"] is not None and i >= c["first_dense_layers"]
            and (i - c["first_dense_layers"]) % c["moe_every"] == 0)

  @torch.no_grad()
  def forward(self, tokens):
    c = self.c
    pos = torch.arange(tokens.shape[1])
    x = self.p("embed", "embedding")[tokens].float()
    for i in range(c["num_layers"]):
      L = f"layer_{i}"
      x = x + self.attention(i, rms_norm(x, self.p(L, "attn_norm", "scale"), c["norm_eps"]), pos)
      h = rms_norm(x, self.p(L, "ffn_norm", "scale"), c["norm_eps"])
      x = x + (self.moe(i, h) if self.is_moe_layer(i)
               else swiglu(h, self.p(L, "ffn", "wi"), self.p(L, "ffn", "wo")))
    return rms_norm(x, self.p("final_norm", "scale"), c["norm_eps"]) @ self.p("unembed")


def load(directory: str) -> MoejaxForCausalLM:
  """An exported model: moejax_config.json + model.safetensors (or shards with their index)."""
  config = json.load(open(os.path.join(directory, "moejax_config.json")))
  weights = {}
  for f in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
    weights.update(load_file(f))
  weights = {k: (v if v.dtype == torch.uint8 else v.float()) for k, v in weights.items()}
  return MoejaxForCausalLM(config, weights).eval()

"""The MoE feed-forward block: router -> plan -> dispatch -> experts -> combine (+ shared experts).

DeepSeekMoE (Dai et al. 2024, arXiv 2401.06066, eq. 9-11) is the general form every config here
is a special case of:

  h_t = u_t + sum_{i <= K_s} FFN_i(u_t) + sum_{i = K_s+1}^{mN} g_{i,t} FFN_i(u_t)

with N experts of hidden size d_ff, each split into m fine-grained experts of size d_ff/m
(``segments``); K_s of the mN fine experts are shared (always on) and the router picks
mK - K_s of the remaining mN - K_s. Switch is N experts, K=1, m=1, K_s=0; GShard is K=2.
The residual u_t is added by the transformer block, not here.

Sown for the trainer:
  ``losses``:        weighted auxiliary losses (summed into the training objective).
  ``intermediates``: expert_load [E] (share of routed slots), drop_fraction, router_entropy,
                     and the unweighted loss values, for logging.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from moejax.errors import ConfigError
from moejax.layers import losses
from moejax.layers.dense import SwiGLU, kernel_init
from moejax.layers.dispatch import PLANNERS, combine, dispatch
from moejax.layers.experts import SwiGLUExperts
from moejax.layers.heterogeneous import LADDERS, HeterogeneousSwiGLUExperts, expert_size_ladder
from moejax.layers.ternary import PackedTernarySwiGLUExperts, TernarySwiGLUExperts
from moejax.layers.routers import ROUTERS, RoutingResult
from moejax.layers.steering import LayerSteer, steer_routing
from moejax.logs import log_once
from moejax.ops.grouped_matmul import resolve_backend
from moejax.parallel.expert_parallel import expert_axis_size, expert_parallel_ffn

Array = jax.Array


# decode_path="auto": gather while tokens x k <= this x routed experts. On CPU the gathered
# loop beat the grouped path up to 192 slots of 64 experts (3x) and lost at 384 (6x); elsewhere
# it reads a weight per slot, so it stops where the grouped path would read every expert once.
GATHER_SLOTS_PER_EXPERT = {"cpu": 4}

# Name -> expert bank (the routed experts' weights and compute; see layers/experts.py).
EXPERT_BANKS = {"swiglu": SwiGLUExperts, "ternary_swiglu": TernarySwiGLUExperts,
                "ternary_packed": PackedTernarySwiGLUExperts}   # inference form of the ternary


def check_moe_fields(v, key=lambda name: f"MoESpec.{name}",
                     ref=lambda name: name) -> None:
  """Raises one ``ConfigError`` for the first field of an MoE spec that cannot work.

  ``v`` maps field names to values (a ``MoESpec`` or the ``config.model.moe`` ConfigDict);
  ``key``/``ref`` spell a field in the message (``MoESpec.top_k`` here, ``config.model.moe.top_k``
  from config validation), so both entry points share one set of rules and wordings.
  """
  def require(ok, name, msg):
    if not ok:
      raise ConfigError(f"{key(name)}: {msg}")

  for name in ("num_experts", "top_k", "expert_hidden", "segments", "capacity_factor",
               "num_device_groups", "row_align", "balance_micro_batches"):
    require(v[name] > 0, name, f"must be > 0, got {v[name]!r}")
  require(v["top_k"] <= v["num_experts"], "top_k",
          f"must be <= {ref('num_experts')}={v['num_experts']}, got {v['top_k']}")
  require(v["expert_hidden"] % v["segments"] == 0, "segments",
          f"must divide {ref('expert_hidden')}={v['expert_hidden']} (each expert is split into "
          f"segments of equal hidden size), got {v['segments']}")
  active = v["segments"] * v["top_k"]
  require(0 <= v["num_shared_experts"] < active, "num_shared_experts",
          f"must be in [0, segments*top_k={active}) so at least one expert is routed, "
          f"got {v['num_shared_experts']}")
  require(v["shared_expert_hidden"] >= 0, "shared_expert_hidden",
          f"must be >= 0 (0 = {ref('num_shared_experts')} x the expert hidden size), got "
          f"{v['shared_expert_hidden']}")
  for name, off in (("shared_expert_hidden", 0), ("shared_expert_gate", False)):
    require(v[name] == off or v["num_shared_experts"] > 0, name,
            f"configures the shared experts, but {ref('num_shared_experts')}=0; set it > 0 or "
            f"leave {name} at {off!r}")
  require(v["router"] in ROUTERS, "router",
          f"got {v['router']!r}; allowed: {', '.join(map(repr, ROUTERS))}")
  require(v["expert_bank"] in EXPERT_BANKS, "expert_bank",
          f"got {v['expert_bank']!r}; allowed: {', '.join(map(repr, EXPERT_BANKS))}")
  require(v["dispatch"] in PLANNERS, "dispatch",
          f"got {v['dispatch']!r}; allowed: {', '.join(map(repr, PLANNERS))}")
  for name, allowed in (("expert_parallel", ("auto", "none")),
                        ("decode_path", ("auto", "gather", "grouped")),
                        ("all_to_all", ("auto", "ragged", "padded")),
                        ("load_balance_scope", ("micro_batch", "global_batch"))):
    require(v[name] in allowed, name, f"got {v[name]!r}; allowed: {', '.join(map(repr, allowed))}")
  require(v["ragged_buffer_factor"] >= 0, "ragged_buffer_factor",
          f"must be >= 0 (0 = worst-case buffer, never drops), got {v['ragged_buffer_factor']}")
  require(v["ragged_buffer_factor"] == 0 or v["all_to_all"] != "padded", "ragged_buffer_factor",
          f"sizes the ragged exchange's buffer, but {ref('all_to_all')}='padded'; set it to 0 "
          "or use all_to_all='ragged'/'auto'")
  routed = v["segments"] * v["num_experts"] - v["num_shared_experts"]
  require(routed % v["num_device_groups"] == 0, "num_device_groups",
          f"must divide the routed experts (segments*num_experts-num_shared_experts={routed}),"
          f" got {v['num_device_groups']}")
  for name in ("load_balance_weight", "device_balance_weight", "z_loss_weight", "jitter_eps",
               "noise_std", "null_experts", "bias_update_rate", "sequence_balance_weight",
               "entropy_loss_weight", "similarity_loss_weight", "consistency_loss_weight",
               "recurrent_router_dim"):
    require(v[name] >= 0, name, f"must be >= 0, got {v[name]}")
  _check_router_fields(v, require, ref, routed)
  _check_size_fields(v, require, ref, routed)


def _check_size_fields(v, require, ref, routed: int) -> None:
  """Heterogeneous experts: an explicit list or a ladder, never both; sizes that add up."""
  sizes, ladder = tuple(v["expert_sizes"]), v["expert_size_ladder"]
  require(ladder in ("none",) + LADDERS, "expert_size_ladder",
          f"got {ladder!r}; allowed: 'none', {', '.join(map(repr, LADDERS))}")
  require(not (sizes and ladder != "none"), "expert_sizes",
          f"lists the sizes and {ref('expert_size_ladder')}={ladder!r} generates them; set one")
  require(v["expert_total_hidden"] >= 0, "expert_total_hidden",
          f"must be >= 0 (0 = the routed experts x the expert hidden size), got "
          f"{v['expert_total_hidden']}")
  require(v["ladder_repeats"] >= 1 and routed % v["ladder_repeats"] == 0, "ladder_repeats",
          f"must be >= 1 and divide the routed experts ({routed}), got {v['ladder_repeats']}")
  require(v["parameter_penalty_weight"] >= 0, "parameter_penalty_weight",
          f"must be >= 0, got {v['parameter_penalty_weight']}")
  require(not (v["parameter_penalty_weight"] and v["null_experts"]), "parameter_penalty_weight",
          f"weights real experts by their size; it cannot combine with {ref('null_experts')}="
          f"{v['null_experts']}")
  hetero = bool(sizes) or ladder != "none"
  for name, off in (("expert_total_hidden", 0), ("ladder_repeats", 1)):
    require(v[name] == off or hetero, name,
            f"sizes heterogeneous experts, but neither {ref('expert_sizes')} nor "
            f"{ref('expert_size_ladder')} is set; set one or leave {name} at {off!r}")
  if not hetero:
    return
  require(v["expert_bank"] == "swiglu" and v["merge"] == "none", "expert_sizes",
          f"heterogeneous experts are a SwiGLU bank of their own: they need "
          f"{ref('expert_bank')}='swiglu' (got {v['expert_bank']!r}) and {ref('merge')}='none' "
          f"(got {v['merge']!r})")
  if ladder != "none":
    fine = v["expert_hidden"] // v["segments"]
    expert_size_ladder(ladder, routed, v["expert_total_hidden"] or routed * fine,
                       repeats=v["ladder_repeats"])   # raises ConfigError if it cannot fit
  if sizes:
    require(len(sizes) == routed, "expert_sizes",
            f"needs one hidden size per routed expert ({routed}), got {len(sizes)}")
    require(all(isinstance(h, (int, np.integer)) and h > 0 for h in sizes), "expert_sizes",
            f"sizes must be positive integers, got {list(sizes)}")
    total = v["expert_total_hidden"]
    require(not total or sum(sizes) == total, "expert_sizes",
            f"sum to {sum(sizes)}, but {ref('expert_total_hidden')}={total}")


# Settings that only one router reads: set for another router, they would silently do nothing.
_ROUTER_ONLY = {
    "null_experts": ("topk_softmax", 0), "routed_scaling_factor": ("sigmoid", 1.0),
    "bias_update_rate": ("sigmoid", 0.0), "num_expert_groups": ("sigmoid", 1),
    "sequence_balance_weight": ("sigmoid", 0.0), "entropy_loss_weight": ("top_p", 0.0),
    "similarity_loss_weight": ("expert_race", 0.0),
    "consistency_loss_weight": ("stochastic", 0.0),
    "recurrent_router_dim": ("recurrent", 0),
    "expert_choice_eval": (("expert_choice", "expert_race"), "threshold"),
}


def _check_router_fields(v, require, ref, routed: int) -> None:
  router, k = v["router"], v["segments"] * v["top_k"] - v["num_shared_experts"]
  for name, (owners, default) in _ROUTER_ONLY.items():
    owners = (owners,) if isinstance(owners, str) else owners
    require(v[name] == default or router in owners, name,
            f"is read only by {ref('router')}={' or '.join(map(repr, owners))} (here "
            f"{router!r}); leave it at {default!r} or use that router")
  require(v["merge"] in ("none", "sequence", "causal_segments"), "merge",
          f"got {v['merge']!r}; allowed: 'none', 'sequence', 'causal_segments'")
  require(v["merge_segment"] > 0, "merge_segment", f"must be > 0, got {v['merge_segment']}")
  require(v["merge_inference"] in ("segments", "prompt"), "merge_inference",
          f"got {v['merge_inference']!r}; allowed: 'segments', 'prompt'")
  require(v["merge_inference"] == "segments" or v["merge"] == "causal_segments",
          "merge_inference", f"='prompt' is Lory's inference form of {ref('merge')}="
          f"'causal_segments' (got merge={v['merge']!r})")
  require(v["iterations"] >= 1, "iterations", f"must be >= 1, got {v['iterations']}")
  require(v["iterations"] == 1 or (router != "recurrent" and v["merge"] == "none"), "iterations",
          f"Chain-of-Experts iterations={v['iterations']} cannot combine with "
          f"{ref('router')}='recurrent' or {ref('merge')} (got router={router!r}, "
          f"merge={v['merge']!r})")
  if v["merge"] != "none":
    require(router == "topk_softmax" and v["expert_bank"] == "swiglu", "merge",
            f"={v['merge']!r} merges the experts with its own softmax over all of them: it "
            f"needs {ref('router')}='topk_softmax' (got {router!r}) and "
            f"{ref('expert_bank')}='swiglu' (got {v['expert_bank']!r})")
  for name, allowed in (("group_mask_fill", ("neg_inf", "zero")),
                        ("group_routing", ("limited", "balanced")),
                        ("expert_choice_eval", ("threshold", "batch"))):
    require(v[name] in allowed, name, f"got {v[name]!r}; allowed: {', '.join(map(repr, allowed))}")
  require(v["routed_scaling_factor"] > 0, "routed_scaling_factor",
          f"must be > 0, got {v['routed_scaling_factor']}")
  g = v["num_expert_groups"]
  require(g > 0 and routed % g == 0, "num_expert_groups",
          f"must be > 0 and divide the routed experts ({routed}), got {g}")
  if g > 1 and v["group_routing"] == "balanced":
    require(k % g == 0, "group_routing",
            f"'balanced' takes exactly k/G experts from each group, so the active routed "
            f"experts ({k}) must be divisible by {ref('num_expert_groups')}={g}")
  elif g > 1:
    kg = v["groups_per_token"]
    require(1 <= kg <= g and kg * (routed // g) >= k, "groups_per_token",
            f"must be in [1, {ref('num_expert_groups')}={g}] and keep at least the {k} active "
            f"experts (groups_per_token * {routed // g} experts per group), got {kg}")
  if router == "top_p":
    require(0 < v["top_p"] <= 1, "top_p", f"must be in (0, 1], got {v['top_p']}")
  if router in ("expert_choice", "expert_race"):
    require(v["dispatch"] == "dropless", "dispatch",
            f"{ref('router')}={router!r} decides how many tokens each expert takes itself "
            f"(no capacity to enforce); use 'dropless', got {v['dispatch']!r}")


@dataclasses.dataclass(frozen=True)
class MoESpec:
  """Hyper-parameters of one MoE block, in the units of the DeepSeekMoE paper.

  ``MoESpec.from_counts(routed_experts=63, active_experts=7, expert_hidden=64, shared_experts=1)``
  states the routed and active experts directly instead (it sets segments = 1). The spec
  validates itself: a setting that cannot work raises ``ConfigError`` naming the field.
  """
  num_experts: int               # N, experts before fine-grained segmentation
  top_k: int                     # K, experts per token before segmentation
  expert_hidden: int             # d_ff of one unsegmented expert
  segments: int = 1              # m: each expert split into m experts of d_ff/m; m*K active
  num_shared_experts: int = 0    # K_s, counted in fine-grained experts, always active
  shared_expert_hidden: int = 0  # hidden of the fused shared experts; 0 = K_s * d_ff/m
  shared_expert_gate: bool = False   # shared output x sigmoid(x @ w_g) per token (Qwen2-MoE)
  router: str = "topk_softmax"
  expert_bank: str = "swiglu"    # routed experts: "swiglu" | "ternary_swiglu" (MoTE) |
                                 # "ternary_packed" (its 2-bit inference form; no training)
  shared_trainable: bool = True  # False: the shared experts are frozen (MoTE's default)
  renormalize: bool = True       # renormalise the selected gates to sum to 1
  jitter_eps: float = 0.0
  noise_std: float = 0.0
  dispatch: str = "dropless"     # "dropless" | "capacity"
  capacity_factor: float = 1.25
  load_balance_weight: float = 0.01
  load_balance_scope: str = "micro_batch"   # or "global_batch" (see losses.load_balance_loss)
  balance_micro_batches: int = 1
  device_balance_weight: float = 0.0
  num_device_groups: int = 1
  z_loss_weight: float = 0.0
  gmm_backend: str = "auto"
  # Start each expert's rows on a multiple of this (empty rows pad the groups): with the Pallas
  # kernels' row tile no tile is split between experts, at the cost of up to E*(row_align-1)
  # extra rows. The CPU loop's tiles never split (group-anchored), so there it only adds rows.
  row_align: int = 1
  # "auto": when the current mesh has an expert axis > 1, split experts over it and move tokens
  # by all-to-all inside shard_map (moejax/parallel/expert_parallel.py); "none": leave the
  # partitioning of the global computation to XLA.
  expert_parallel: str = "auto"
  all_to_all: str = "auto"       # "auto" | "ragged" | "padded" (see expert_parallel.py)
  # Inference (deterministic) on few rows, e.g. one token per sequence while generating:
  # "gather" reads each row's selected experts' weights (no sort, no tile schedule); "grouped"
  # keeps the training layout; "auto" gathers, where the bank can, when tokens x k <=
  # GATHER_SLOTS_PER_EXPERT x the routed experts.
  decode_path: str = "auto"
  ragged_buffer_factor: float = 0.0
  # Router options (see moejax/layers/routers/*.py; validation refuses one set for a router
  # that does not read it).
  null_experts: int = 0                 # topk_softmax: AdaMoE zero-FLOP experts
  routed_scaling_factor: float = 1.0    # sigmoid: gates x this (DeepSeek-V3: 2.5)
  bias_update_rate: float = 0.0         # sigmoid: aux-loss-free balancing gamma (V3: 0.001)
  num_expert_groups: int = 1            # sigmoid: G groups of experts
  groups_per_token: int = 1             # sigmoid, group_routing="limited": groups kept
  group_mask_fill: str = "neg_inf"      # sigmoid: masked groups' scores ("neg_inf" | "zero")
  group_routing: str = "limited"        # sigmoid: "limited" (V3) | "balanced" (MoGE)
  sequence_balance_weight: float = 0.0  # sigmoid: V3's sequence-wise balance loss alpha
  top_p: float = 0.4                    # top_p: cumulative probability to reach
  entropy_loss_weight: float = 0.0      # top_p: router entropy loss
  similarity_loss_weight: float = 0.0   # expert_race: router similarity loss
  consistency_loss_weight: float = 0.0  # stochastic (THOR): two passes + symmetric KL
  recurrent_router_dim: int = 0         # recurrent (RMoE): GRU width; 0 = d_model
  expert_choice_eval: str = "threshold"   # expert_choice/race: causal "threshold" | "batch"
  # Soft merging instead of routing (layers/merging.py): "none" | "sequence" (SMEAR) |
  # "causal_segments" (Lory, segments of merge_segment tokens).
  merge: str = "none"
  merge_segment: int = 64
  merge_inference: str = "segments"     # causal_segments when sampling: "segments" (as trained)
                                        # | "prompt" (Lory: one merge routed on the prompt)
  iterations: int = 1            # Chain-of-Experts: routed iterations inside the layer
  # Heterogeneous experts (HMoE, layers/heterogeneous.py): one hidden size per routed expert,
  # listed or generated by a ladder scaled to expert_total_hidden (0 = routed x fine hidden).
  expert_sizes: tuple = ()
  expert_size_ladder: str = "none"      # none | geometric | arithmetic | hybrid
  expert_total_hidden: int = 0
  ladder_repeats: int = 1               # repeat a ladder of routed/repeats sizes (one per device)
  parameter_penalty_weight: float = 0.0   # HMoE's parameter penalty (replaces load balance)

  def __post_init__(self):
    # Lists from JSON configs become tuples: the spec is hashable and compares by value.
    # (non-integers are kept, for validation to name them)
    object.__setattr__(self, "expert_sizes", tuple(
        int(h) if isinstance(h, (int, np.integer)) else h for h in self.expert_sizes))
    check_moe_fields(self.__dict__)

  @classmethod
  def from_counts(cls, routed_experts: int, active_experts: int, expert_hidden: int,
                  shared_experts: int = 0, **options) -> "MoESpec":
    """Routed experts, routed experts active per token and one expert's hidden size, directly.

    Shared experts (always on) have the same hidden size. Equivalent to the paper's notation
    with m = 1: N = routed + shared, K = active + shared, K_s = shared.
    """
    for name, value in (("routed_experts", routed_experts), ("active_experts", active_experts)):
      if value <= 0:
        raise ConfigError(f"MoESpec.from_counts: {name} must be > 0, got {value}")
    if active_experts > routed_experts:
      raise ConfigError(f"MoESpec.from_counts: active_experts must be <= routed_experts="
                        f"{routed_experts}, got {active_experts}")
    return cls(num_experts=routed_experts + shared_experts, top_k=active_experts + shared_experts,
               expert_hidden=expert_hidden, segments=1, num_shared_experts=shared_experts,
               **options)

  @classmethod
  def from_config(cls, e) -> "MoESpec | None":
    """From ``config.model.moe`` (validated): None for a dense model.

    Experts are given either in the paper's units (num_experts, top_k, segments) or directly
    (routed_experts, active_experts); config validation refuses both at once.
    """
    counts = ("num_experts", "top_k", "expert_hidden", "segments", "num_shared_experts")
    options = {f.name: e[f.name] for f in dataclasses.fields(cls) if f.name not in counts}
    if e.routed_experts > 0:
      return cls.from_counts(e.routed_experts, e.active_experts, e.expert_hidden,
                             e.num_shared_experts, **options)
    if e.num_experts > 0:
      return cls(**{name: e[name] for name in counts}, **options)
    return None

  @property
  def num_routed(self) -> int:        # N' = mN - K_s
    return self.segments * self.num_experts - self.num_shared_experts

  @property
  def routed_k(self) -> int:          # K' = mK - K_s
    return self.segments * self.top_k - self.num_shared_experts

  @property
  def fine_hidden(self) -> int:       # d_ff / m
    return self.expert_hidden // self.segments

  @property
  def heterogeneous(self) -> bool:
    return bool(self.expert_sizes) or self.expert_size_ladder != "none"

  @property
  def routed_sizes(self) -> tuple[int, ...]:
    """Hidden size of every routed expert (all ``fine_hidden`` unless heterogeneous)."""
    if self.expert_sizes:
      return self.expert_sizes
    if self.expert_size_ladder != "none":
      return expert_size_ladder(self.expert_size_ladder, self.num_routed,
                                self.expert_total_hidden or self.num_routed * self.fine_hidden,
                                repeats=self.ladder_repeats)
    return (self.fine_hidden,) * self.num_routed

  def make_bank(self, d_model: int, dtype, name: str = "experts") -> nn.Module:
    """The routed experts' bank (layers/experts.py contract)."""
    if self.heterogeneous:
      return HeterogeneousSwiGLUExperts(self.routed_sizes, d_model, dtype, self.gmm_backend,
                                        name=name)
    return EXPERT_BANKS[self.expert_bank](self.num_routed, d_model, self.fine_hidden, dtype,
                                          self.gmm_backend, name=name)

  @property
  def shared_hidden(self) -> int:     # K_s shared experts fused into one SwiGLU of K_s * d_ff/m
    return self.shared_expert_hidden or self.num_shared_experts * self.fine_hidden


def shared_output(module: nn.Module, shared, tokens: Array, gate: bool) -> Array:
  """The shared experts' output, times Qwen2-MoE's per-token gate sigmoid(x @ w_g) when
  ``gate`` (w_g [D, 1] is ``module``'s "shared_gate" parameter)."""
  y = shared(tokens)
  if not gate:
    return y
  w = module.param("shared_gate", nn.with_logical_partitioning(kernel_init(0, 1),
                                                               ("embed", None)),
                   (tokens.shape[-1], 1), jnp.float32)
  g = jax.nn.sigmoid(tokens.astype(jnp.float32) @ w)
  return (y.astype(jnp.float32) * g).astype(y.dtype)


def routing_metrics(routing: RoutingResult, num_dropped: Array) -> dict[str, Array]:
  """expert_load (share of routed slots, null experts included), drops among the slots that
  are computed, router entropy, and real experts per token (variable-k routers, null experts)."""
  computed = jnp.sum(routing.dispatch_index >= 0)
  out = {
      "expert_load": losses.expert_fraction(routing),
      "drop_fraction": num_dropped / jnp.maximum(computed, 1),
      "num_dropped": num_dropped,
      "router_entropy": losses.router_entropy(routing),
      "experts_per_token": (computed - num_dropped) / routing.expert_index.shape[0],
  }
  if routing.num_null:
    out["null_fraction"] = jnp.mean(routing.expert_index >= routing.num_real_experts)
  return out


PARAM_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def size_metrics(routing: RoutingResult, sizes, d_model: int) -> dict[str, Array]:
  """Heterogeneous experts: routed parameters per token (mean, and its PARAM_QUANTILES) and
  the share of the computed routed slots per distinct expert size (ascending sizes; sums to 1,
  unused top-p slots and null experts left out)."""
  per_token = losses.routed_params_per_token(routing, sizes, d_model)
  counts = losses.expert_counts(routing.expert_index, routing.num_experts)[:len(sizes)]
  distinct = np.unique(sizes)
  onehot = jnp.asarray(np.asarray(sizes)[:, None] == distinct[None, :], jnp.float32)
  return {"routed_params": jnp.mean(per_token),
          "routed_params_quantiles": jnp.quantile(per_token, jnp.asarray(PARAM_QUANTILES)),
          "size_load": counts @ onehot / jnp.maximum(jnp.sum(counts), 1.0)}


class MoEBlock(nn.Module):
  """``steer``: inference-time edits of this layer's routing (layers/steering.py), applied
  between the router and dispatch; what they changed is sown as ``steer_*`` intermediates.

  The routing the experts run (after steering) is also sown to the ``"traces"`` collection
  (``expert_index`` [T, k] int32, -1 where no expert is computed; ``gate`` [T, k]) and the router's
  probabilities to ``"router_probs"``; both cost nothing unless the caller makes them mutable
  (moejax/analysis/traces.py)."""
  spec: MoESpec
  dtype: jnp.dtype = jnp.float32
  steer: LayerSteer | None = None

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True, token_ids: Array | None = None,
               router_state: tuple | None = None):
    """x [..., D] -> [..., D]. ``token_ids`` [...]: the input ids, for routers that route by
    them (hash). ``router_state=(gru, carry)``: for the recurrent router (RMoE), which then
    returns (y, new carry). The transformer passes both.

    ``spec.iterations`` = C > 1 is Chain-of-Experts (Wang et al. 2025, arXiv 2506.18945):
    h_0 = x, h_j = h_{j-1} + MoE_j(h_{j-1}) with a router per iteration and the experts (and
    shared experts) shared; the block returns h_C - x, so the transformer's residual gives h_C.
    C = 1 is the plain layer."""
    s = self.spec
    experts = s.make_bank(x.shape[-1], self.dtype)
    shared = SwiGLU(s.shared_hidden, self.dtype, name="shared") if s.num_shared_experts else None
    ep = expert_axis_size() if s.expert_parallel == "auto" else 1
    carry = router_state[1] if router_state is not None else None
    h, out = x, None
    for j in range(s.iterations):
      router = ROUTERS[s.router].from_spec(s, name="router" if j == 0 else f"router_{j}")
      if getattr(router, "recurrent", False):
        routing, carry = router(h, deterministic=deterministic,
                                gru=router_state[0] if router_state else None, carry=carry)
      elif getattr(router, "needs_token_ids", False):
        routing = router(h, deterministic=deterministic, token_ids=token_ids)
      else:
        routing = router(h, deterministic=deterministic)
      if self.steer is not None:
        routing, changes = steer_routing(routing, self.steer)
        for name, value in changes.items():
          self.sow("intermediates", name, value)
      self._trace(routing)
      gathers = self._gathers(experts, routing.dispatch_index.size, ep, deterministic)
      self._log_path(ep, gathers)
      y, num_dropped = self._routed(h.reshape(-1, x.shape[-1]), routing, experts, ep, gathers)
      if shared is not None:
        y = y + shared_output(self, shared, h.reshape(-1, x.shape[-1]), s.shared_expert_gate)
      self._record(routing, num_dropped, x.shape[-1])
      y = y.reshape(x.shape).astype(self.dtype)
      out = y if out is None else out + y
      h = h + y
    return (out, carry) if router_state is not None else out

  def _trace(self, routing: RoutingResult) -> None:
    index = routing.dispatch_index
    self.sow("traces", "expert_index", index)
    self.sow("traces", "gate", jnp.where(index >= 0, routing.weight, 0.0).astype(jnp.float32))
    self.sow("router_probs", "probs", routing.probs)

  def _gathers(self, experts, slots: int, ep: int, deterministic: bool) -> bool:
    """Whether this call takes the small-batch path (``spec.decode_path``): inference only, one
    device's experts, a bank that can gather its weights (``run_gathered``). Dropless: every
    selected expert is computed whatever ``dispatch`` says (nothing competes for capacity)."""
    s = self.spec
    if (not deterministic or ep > 1 or s.decode_path == "grouped"
        or getattr(experts, "run_gathered", None) is None):
      return False
    limit = GATHER_SLOTS_PER_EXPERT.get(jax.default_backend(), 1) * s.num_routed
    return s.decode_path == "gather" or slots <= limit

  def _routed(self, tokens: Array, routing: RoutingResult, experts, ep: int,
              gathers: bool = False):
    """Routed experts' output [T, D] and the dropped-slot count, on one device or
    expert-parallel. Null-expert and unused slots are never computed."""
    s, index = self.spec, routing.dispatch_index
    if gathers:
      return experts.run_gathered(experts.weights(), tokens, index, routing.weight), \
          jnp.zeros((), jnp.int32)
    if ep > 1:
      return expert_parallel_ffn(
          tokens, index, routing.weight, experts.weights(), experts.weight_specs(), experts.run,
          num_experts=s.num_routed,
          capacity_factor=s.capacity_factor if s.dispatch == "capacity" else None,
          all_to_all=s.all_to_all, buffer_factor=s.ragged_buffer_factor)
    plan = PLANNERS[s.dispatch](index, s.num_routed, capacity_factor=s.capacity_factor,
                                align=s.row_align)
    return combine(experts(dispatch(tokens, plan), plan.group_sizes), plan,
                   routing.weight), plan.num_dropped

  def _log_path(self, ep: int, gathers: bool = False) -> None:
    """Says once per layer kind which program the layer traced to (expert-parallel or not)."""
    s = self.spec
    kind = (f"MoE layer ({s.num_routed} routed experts, top-{s.routed_k}, {s.dispatch}"
            f"{', %d shared' % s.num_shared_experts if s.num_shared_experts else ''})")
    if gathers:
      path = ("small-batch path: each row's selected experts read in place, no sort or tile "
              f"schedule (model.moe.decode_path={s.decode_path})")
    elif ep > 1:
      path = (f"expert-parallel: shard_map over mesh axis 'expert' ({ep} devices, "
              f"{s.num_routed // ep} experts each), all_to_all={s.all_to_all}")
    else:
      path = (f"single-device dispatch (no 'expert' mesh axis in context"
              f"{'' if s.expert_parallel == 'auto' else ', expert_parallel=none'}), "
              f"gmm backend {resolve_backend(s.gmm_backend)}")
    log_once((s, ep, self.dtype, gathers), "%s: %s", kind, path)

  def _record(self, routing: RoutingResult, num_dropped: Array, d_model: int) -> None:
    s = self.spec
    terms = {
        "load_balance": (s.load_balance_weight, lambda: losses.load_balance_loss(
            routing, s.balance_micro_batches, s.load_balance_scope)),
        "device_balance": (s.device_balance_weight,
                           lambda: losses.device_balance_loss(routing, s.num_device_groups)),
        "z_loss": (s.z_loss_weight, lambda: losses.router_z_loss(routing)),
        "parameter_penalty": (s.parameter_penalty_weight, lambda: losses.parameter_penalty_loss(
            routing, s.routed_sizes)),
        # the router's own losses (sequence-wise balance, entropy, ...)
        **{name: (w, lambda name=name: routing.losses[name])
           for name, w in routing.loss_weights if name in routing.losses},
    }
    for name, (weight, fn) in terms.items():
      if weight > 0:
        value = fn()
        self.sow("losses", name, weight * value)
        self.sow("intermediates", name, value)
    for name, value in routing_metrics(routing, num_dropped).items():
      self.sow("intermediates", name, value)
    if s.heterogeneous:
      for name, value in size_metrics(routing, s.routed_sizes, d_model).items():
        self.sow("intermediates", name, value)

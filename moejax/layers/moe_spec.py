"""``MoESpec``: the hyper-parameters of one MoE block, validated on construction."""
from __future__ import annotations

import dataclasses

import numpy as np
from flax import linen as nn

from moejax.errors import ConfigError
from moejax.layers.heterogeneous import HeterogeneousSwiGLUExperts, expert_size_ladder
from moejax.layers.moe_rules import EXPERT_BANKS, check_moe_fields
from moejax.layers.ternary import MixedTernarySwiGLUExperts, PackedMixedExperts


# Fields set per MoE layer only (model.moe.layer_overrides), never globally in the config.
LAYER_ONLY = frozenset({"expert_map"})


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
  # by all-to-all inside shard_map (expert_parallel.py of the parallel package); "none": leave the
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
  # Merged experts (moejax/compress/merge.py): the router keeps one output per original expert
  # and expert_map[i] names the bank expert that router output i runs (layers/folding.py);
  # () = identity. Set per layer by compression (model.moe.layer_overrides).
  expert_map: tuple = ()
  # Mixed precision (MC#-style, moejax/compress/methods.py): the last n routed experts run with
  # ternary weights and 8-bit activations, the others at full precision (swiglu bank only).
  ternary_experts: int = 0

  def __post_init__(self):
    # Lists from JSON configs become tuples: the spec is hashable and compares by value.
    # (non-integers are kept, for validation to name them)
    for name in ("expert_sizes", "expert_map"):
      object.__setattr__(self, name, tuple(
          int(h) if isinstance(h, (int, np.integer)) else h for h in getattr(self, name)))
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
    options = {f.name: e[f.name] for f in dataclasses.fields(cls)
               if f.name not in counts and f.name not in LAYER_ONLY}
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
  def router_experts(self) -> int:
    """Outputs of the router: one per original expert when experts were merged."""
    return len(self.expert_map) or self.num_routed

  def router_spec(self) -> "MoESpec":
    """The spec the router is built from: ``router_experts`` routed experts (the bank's count
    differs only when ``expert_map`` folds several router outputs onto one merged expert)."""
    if not self.expert_map:
      return self
    return dataclasses.replace(self, num_experts=len(self.expert_map) + self.num_shared_experts,
                               expert_map=())

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
    if self.ternary_experts:
      bank = (PackedMixedExperts if self.expert_bank == "ternary_packed"
              else MixedTernarySwiGLUExperts)
      return bank(self.num_routed, d_model, self.fine_hidden, dtype, self.gmm_backend,
                  ternary=self.ternary_experts, name=name)
    return EXPERT_BANKS[self.expert_bank](self.num_routed, d_model, self.fine_hidden, dtype,
                                          self.gmm_backend, name=name)

  @property
  def shared_hidden(self) -> int:     # K_s shared experts fused into one SwiGLU of K_s * d_ff/m
    return self.shared_expert_hidden or self.num_shared_experts * self.fine_hidden

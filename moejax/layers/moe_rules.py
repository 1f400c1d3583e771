"""The rules an MoE spec must satisfy: one ``ConfigError`` naming the first field that cannot work.

Shared by ``MoESpec`` (layers/moe_spec.py) and config validation (moejax/config.py), so both
entry points refuse the same settings with the same words.
"""
from __future__ import annotations

import numpy as np

from moejax.errors import ConfigError
from moejax.layers.dispatch import PLANNERS
from moejax.layers.experts import SwiGLUExperts
from moejax.layers.heterogeneous import LADDERS, expert_size_ladder
from moejax.layers.routers import ROUTERS
from moejax.layers.ternary import PackedTernarySwiGLUExperts, TernarySwiGLUExperts

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
  emap = tuple(v.get("expert_map", ()))
  limit = len(emap) + v["num_shared_experts"] if emap else v["num_experts"]
  require(v["top_k"] <= limit, "top_k",
          f"must be <= {ref('num_experts')}={v['num_experts']}, got {v['top_k']}"
          if not emap else f"must be <= the router's outputs + shared experts = {limit}, "
          f"got {v['top_k']}")
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
  if emap:
    _check_expert_map(v, emap, require, ref, routed)
  n = v.get("ternary_experts", 0)
  require(isinstance(n, (int, np.integer)) and 0 <= n <= routed, "ternary_experts",
          f"must be an integer in [0, {routed}] (the routed experts), got {n!r}")
  if n:
    require(v["expert_bank"] in ("swiglu", "ternary_packed") and v["merge"] == "none"
            and not v["expert_sizes"] and v["expert_size_ladder"] == "none", "ternary_experts",
            f"makes the last experts of a full-precision bank ternary: it needs "
            f"{ref('expert_bank')}='swiglu' (or 'ternary_packed', its packed form), experts of "
            f"one size and no {ref('merge')}")


def _check_expert_map(v, emap, require, ref, routed: int) -> None:
  """Merged experts: every bank expert is the target of some router output."""
  require(all(isinstance(i, (int, np.integer)) for i in emap)
          and sorted(set(emap)) == list(range(routed)), "expert_map",
          f"must map the router's outputs onto every one of the {routed} routed experts "
          f"(integers 0..{routed - 1}, each used at least once), got {list(emap)}")
  require(v["segments"] == 1 and not v["null_experts"] and v["merge"] == "none"
          and v["iterations"] == 1, "expert_map",
          f"folds router outputs onto merged experts; it needs {ref('segments')}=1, no "
          f"{ref('null_experts')}, {ref('merge')}='none' and {ref('iterations')}=1")


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

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
from flax import linen as nn

from moejax.layers import losses
from moejax.layers.dense import SwiGLU
from jax.sharding import PartitionSpec as P

from moejax.layers.dispatch import PLANNERS, combine, dispatch
from moejax.layers.experts import SwiGLUExperts
from moejax.layers.routers import ROUTERS, RoutingResult
from moejax.parallel.expert_parallel import expert_axis_size, expert_parallel_ffn

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MoESpec:
  """Hyper-parameters of one MoE block, in the units of the DeepSeekMoE paper."""
  num_experts: int               # N, experts before fine-grained segmentation
  top_k: int                     # K, experts per token before segmentation
  expert_hidden: int             # d_ff of one unsegmented expert
  segments: int = 1              # m: each expert split into m experts of d_ff/m; m*K active
  num_shared_experts: int = 0    # K_s, counted in fine-grained experts, always active
  router: str = "topk_softmax"
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
  # Start each expert's rows on a multiple of this (empty rows pad the groups): with the gmm
  # tile (128 on CPU) no tile is split between experts, which pays off under skewed routing
  # but costs up to E*(row_align-1) extra rows of activations (see experiments/bench_moe.py).
  row_align: int = 1
  # "auto": when the current mesh has an expert axis > 1, split experts over it and move tokens
  # by all-to-all inside shard_map (moejax/parallel/expert_parallel.py); "none": leave the
  # partitioning of the global computation to XLA.
  expert_parallel: str = "auto"
  all_to_all: str = "auto"       # "auto" | "ragged" | "padded" (see expert_parallel.py)
  ragged_buffer_factor: float = 0.0

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
  def shared_hidden(self) -> int:     # K_s shared experts fused into one SwiGLU of K_s * d_ff/m
    return self.num_shared_experts * self.fine_hidden


def routing_metrics(routing: RoutingResult, num_dropped: Array) -> dict[str, Array]:
  routed = jnp.maximum(jnp.sum(routing.expert_index >= 0), 1)
  return {
      "expert_load": losses.expert_fraction(routing),
      "drop_fraction": num_dropped / routed,
      "num_dropped": num_dropped,
      "router_entropy": losses.router_entropy(routing),
  }


class MoEBlock(nn.Module):
  spec: MoESpec
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    s = self.spec
    tokens = x.reshape(-1, x.shape[-1])
    router = ROUTERS[s.router](num_experts=s.num_routed, k=s.routed_k, renormalize=s.renormalize,
                               jitter_eps=s.jitter_eps, noise_std=s.noise_std, name="router")
    routing = router(tokens, deterministic=deterministic)
    experts = SwiGLUExperts(s.num_routed, x.shape[-1], s.fine_hidden, self.dtype, s.gmm_backend,
                            name="experts")
    if s.expert_parallel == "auto" and expert_axis_size() > 1:
      y, num_dropped = expert_parallel_ffn(
          tokens, routing.expert_index, routing.weight, experts.weights(),
          (P("expert"), P("expert")), experts.run, num_experts=s.num_routed,
          capacity_factor=s.capacity_factor if s.dispatch == "capacity" else None,
          all_to_all=s.all_to_all, buffer_factor=s.ragged_buffer_factor)
    else:
      plan = PLANNERS[s.dispatch](routing.expert_index, s.num_routed,
                                  capacity_factor=s.capacity_factor, align=s.row_align)
      y = combine(experts(dispatch(tokens, plan), plan.group_sizes), plan, routing.weight)
      num_dropped = plan.num_dropped
    if s.num_shared_experts:
      y = y + SwiGLU(s.shared_hidden, self.dtype, name="shared")(tokens)
    self._record(routing, num_dropped)
    return y.reshape(x.shape).astype(self.dtype)

  def _record(self, routing: RoutingResult, num_dropped: Array) -> None:
    s = self.spec
    terms = {
        "load_balance": (s.load_balance_weight, lambda: losses.load_balance_loss(
            routing, s.balance_micro_batches, s.load_balance_scope)),
        "device_balance": (s.device_balance_weight,
                           lambda: losses.device_balance_loss(routing, s.num_device_groups)),
        "z_loss": (s.z_loss_weight, lambda: losses.router_z_loss(routing)),
    }
    for name, (weight, fn) in terms.items():
      if weight > 0:
        value = fn()
        self.sow("losses", name, weight * value)
        self.sow("intermediates", name, value)
    for name, value in routing_metrics(routing, num_dropped).items():
      self.sow("intermediates", name, value)

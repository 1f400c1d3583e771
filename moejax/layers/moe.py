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

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from moejax.layers import losses
from moejax.layers.dense import SwiGLU, kernel_init
from moejax.layers.expert_execution import execution_for
from moejax.layers.folding import fold_routing
from moejax.layers.moe_rules import EXPERT_BANKS, check_moe_fields  # noqa: F401  (re-exported)
from moejax.layers.moe_spec import MoESpec  # noqa: F401  (re-exported)
from moejax.layers.routers import ROUTERS, RoutingResult
from moejax.layers.steering import LayerSteer, steer_routing
from moejax.logs import log_once
from moejax.ops.grouped_matmul import resolve_backend

Array = jax.Array


# decode_path="auto": gather while tokens x k <= this x routed experts. On CPU the gathered
# loop beat the grouped path up to 192 slots of 64 experts (3x) and lost at 384 (6x); elsewhere
# it reads a weight per slot, so it stops where the grouped path would read every expert once.
GATHER_SLOTS_PER_EXPERT = {"cpu": 4}


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
    execution, ep = execution_for(s)
    carry = router_state[1] if router_state is not None else None
    h, out = x, None
    for j in range(s.iterations):
      router = ROUTERS[s.router].from_spec(s.router_spec(),
                                           name="router" if j == 0 else f"router_{j}")
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
      if s.expert_map:
        routing = fold_routing(routing, s.expert_map)
      self._trace(routing)
      gathers = self._gathers(experts, routing.dispatch_index.size, ep, deterministic)
      self._log_path(execution, ep, gathers)
      tokens = h.reshape(-1, x.shape[-1])
      if gathers:     # dropless: every selected expert is computed
        y, num_dropped = experts.run_gathered(experts.weights(), tokens, routing.dispatch_index,
                                              routing.weight), jnp.zeros((), jnp.int32)
      else:
        y, num_dropped = execution.run(tokens, routing, experts, s)
      if shared is not None:
        y = y + shared_output(self, shared, h.reshape(-1, x.shape[-1]), s.shared_expert_gate)
      self._record(routing, num_dropped, x.shape[-1])
      # what compression's calibration reads (moejax/compress/calibration.py); no cost unless
      # a caller makes "moe_inputs" mutable or passes "perturbations" (the output's gradient)
      self.sow("moe_inputs", "x", tokens)
      y = self.perturb("output", y.reshape(-1, x.shape[-1]))
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

  def _log_path(self, execution, ep: int, gathers: bool = False) -> None:
    """Says once per layer kind which program the layer traced to (expert-parallel or not)."""
    s = self.spec
    kind = (f"MoE layer ({s.num_routed} routed experts, top-{s.routed_k}, {s.dispatch}"
            f"{', %d shared' % s.num_shared_experts if s.num_shared_experts else ''})")
    if gathers:
      path = ("small-batch path: each row's selected experts read in place, no sort or tile "
              f"schedule (model.moe.decode_path={s.decode_path})")
    elif ep > 1:
      path = execution.describe(s, ep)
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

"""Inference-time steering of one MoE layer's routing: an edit of the router's ``RoutingResult``.

Every router returns the same ``RoutingResult`` (expert_index [T, k], weight [T, k], probs
[T, E]), so every edit here works on every router and runs before dispatch: the block computes
exactly the experts the steered result names. Edits, applied in this order:

1. **Selection** (``deactivate``, ``force``, ``route``). Each token keeps as many slots as its
   router used (variable-k routers keep their k_t). Candidates are ranked: forced experts first,
   then the token's own selection in slot order, then the remaining experts by router
   probability; deactivated experts are never candidates. ``route`` replaces the ranking by the
   router's probabilities alone (the weak routing of self-contrast decoding): ``topN`` keeps
   the N most probable experts, ``rankN`` only the N-th most probable.
   Gates: a token whose set of experts is unchanged keeps its gates exactly; a changed token's
   gate mass sum_j g_j is kept and split over its new experts in proportion to their router
   probabilities (equal shares where those are all 0, e.g. hash routing). For a renormalising
   top-k softmax router this equals masking the logits before the softmax, as Mixture of
   Tunable Experts (fTRI) deactivates experts; forcing is its "forced expert activation".
2. **Reinforce** (``reinforce``): g_{t,e} <- factor_e x g_{t,e} for the listed experts where
   selected, no renormalisation (RICE, "Two Experts Are All You Need for Steering Thinking",
   reinforces identified experts at inference).
3. **Capacity** (``capacity_factor`` > 0; "Capacity-Aware Inference" against stragglers): each
   expert takes at most C = ceil(capacity_factor x S / E) slots of the call (S: used slots, E:
   real routed experts), in token order (earlier tokens first, then slot order). Overflow is
   ``"drop"`` (the slot is not computed, its gate is 0) or ``"reroute"``: token by token, each
   overflowing slot moves to the token's most probable expert that it does not already use,
   is not deactivated and still has room, with gate g x p_new / p_old (the slot's gate-to-
   probability ratio); a slot with no such expert is dropped.
4. **Skip** (``skip_threshold`` > 0; dynamic expert skipping): a slot whose gate is below the
   threshold is not computed. The threshold is calibrated per layer on data to a target share
   of skipped slots (moejax/inference/steer.py); 0 skips nothing. This is the thresholding
   step of MoDES on the router's own gate; MoDES's global layer-importance modulation and
   frontier search are not implemented.

``steer_routing`` returns the steered result and what it changed (slot counts), which the block
sows as ``steer_*`` intermediates for the eval report.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.layers.routers.result import RoutingResult

Array = jax.Array

OVERFLOW = ("drop", "reroute")


@dataclasses.dataclass(frozen=True)
class LayerSteer:
  """The steering of one MoE layer (hashable: part of the model's static config).

  deactivate / force: routed expert ids; reinforce: ((expert, factor), ...); route: "" (the
  router's own selection) | "topN" | "rankN"; capacity_factor: 0 = no inference capacity;
  overflow: "drop" | "reroute"; skip_threshold: 0 = no skipping.
  """
  deactivate: tuple = ()
  force: tuple = ()
  reinforce: tuple = ()
  route: str = ""
  capacity_factor: float = 0.0
  overflow: str = "drop"
  skip_threshold: float = 0.0

  @property
  def selects(self) -> bool:
    return bool(self.deactivate or self.force or self.route)


def parse_route(route: str) -> tuple[str, int]:
  """"top2" -> ("top", 2); "rank2" -> ("rank", 2); raises ValueError otherwise."""
  for kind in ("top", "rank"):
    if route.startswith(kind) and route[len(kind):].isdigit() and int(route[len(kind):]) > 0:
      return kind, int(route[len(kind):])
  raise ValueError(f"route {route!r}: expected 'topN' or 'rankN' with N >= 1")


def _dense(index: Array, values: Array, num_experts: int) -> Array:
  """[T, k] slots -> [T, E] (values summed per expert; unused slots -1 left out)."""
  onehot = jax.nn.one_hot(index, num_experts, dtype=values.dtype)   # -1 -> all zeros
  return jnp.einsum("tke,tk->te", onehot, values)


def _select(index: Array, weight: Array, probs: Array, s: LayerSteer, real: int):
  """Step 1 -> (index, weight, tokens whose set of experts changed)."""
  t, k = index.shape
  e = probs.shape[-1]
  used = index >= 0
  ids = jnp.arange(e)
  banned = jnp.isin(ids, jnp.asarray(s.deactivate, jnp.int32)) & (ids < real)
  p = jnp.clip(probs.astype(jnp.float32), 0.0, 1.0)
  if s.route:
    kind, n = parse_route(s.route)
    width, n_used = (max(k, n), jnp.full((t,), n)) if kind == "top" else (k, jnp.ones((t,)))
    priority = jnp.where(banned[None], -jnp.inf, p)
    if kind == "rank":       # the n-th most probable expert first, alone
      nth = jax.lax.top_k(priority, n)[1][:, n - 1]
      priority = jnp.where(ids[None] == nth[:, None], 2.0, priority)
  else:
    width, n_used = k, jnp.sum(used, axis=1)
    order = jnp.where(used, 3.0 - jnp.arange(k)[None, :] / k, 0.0)   # own slots, in order
    own = jnp.max(jax.nn.one_hot(index, e) * order[..., None], axis=1)
    forced = jnp.isin(ids, jnp.asarray(s.force, jnp.int32))
    priority = jnp.where(own > 0, own, p)
    priority = jnp.where(forced[None], 10.0 - ids[None] / e, priority)
    priority = jnp.where(banned[None], -jnp.inf, priority)
  top, new = jax.lax.top_k(priority, min(width, e))
  keep = (jnp.arange(new.shape[1])[None, :] < n_used[:, None]) & (top > -jnp.inf)
  new = jnp.where(keep, new, -1).astype(jnp.int32)
  changed = jnp.any((_dense(index, used.astype(jnp.float32), e) > 0)
                    != (_dense(new, keep.astype(jnp.float32), e) > 0), axis=1)
  # unchanged tokens keep their gates (by expert); a changed one splits its gate mass by p
  safe = jnp.maximum(new, 0)
  kept_gate = jnp.take_along_axis(_dense(index, weight.astype(jnp.float32), e), safe, axis=1)
  mass = jnp.sum(jnp.where(used, weight, 0.0), axis=1, keepdims=True)
  p_new = jnp.where(keep, jnp.take_along_axis(p, safe, axis=1), 0.0)
  total = jnp.sum(p_new, axis=1, keepdims=True)
  equal = keep / jnp.maximum(jnp.sum(keep, axis=1, keepdims=True), 1)
  share = jnp.where(total > 0, p_new / jnp.where(total > 0, total, 1.0), equal)
  gate = jnp.where(changed[:, None], mass * share, kept_gate)
  return new, jnp.where(keep, gate, 0.0).astype(weight.dtype), jnp.sum(changed)


def capacity(num_slots: Array, num_experts: int, factor: float) -> Array:
  """C = ceil(factor x used slots / experts), at least 1."""
  return jnp.maximum(jnp.ceil(factor * num_slots / num_experts), 1).astype(jnp.int32)


def _capacity(index: Array, weight: Array, probs: Array, s: LayerSteer, real: int):
  """Step 3 -> (index, weight, slots dropped, slots re-routed)."""
  t, k = index.shape
  real_slot = (index >= 0) & (index < real)
  cap = capacity(jnp.sum(real_slot), real, s.capacity_factor)
  flat = jnp.where(real_slot, index, real).reshape(-1)        # others -> a spare column
  onehot = jax.nn.one_hot(flat, real + 1, dtype=jnp.int32)
  position = (jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=1) - 1).reshape(t, k)
  over = real_slot & (position >= cap)
  if s.overflow == "drop":
    return (jnp.where(over, -1, index), jnp.where(over, 0.0, weight), jnp.sum(over),
            jnp.zeros((), jnp.int32))
  counts = jnp.minimum(jnp.bincount(flat, length=real + 1)[:real], cap)
  allowed = ~jnp.isin(jnp.arange(real), jnp.asarray(s.deactivate, jnp.int32))

  def token(counts, row):        # one token: its overflowing slots in slot order
    idx, w, ov, p = row
    held = jnp.any(jnp.arange(real)[:, None] == idx[None, :], axis=1)
    out_i, out_w, moved = idx, w, jnp.zeros((), jnp.int32)
    for j in range(k):
      score = jnp.where((counts < cap) & allowed & ~held, p[:real], -1.0)
      best = jnp.argmax(score)
      ok = ov[j] & (score[best] >= 0)
      p_old = p[jnp.maximum(idx[j], 0)]
      w_new = jnp.where(p_old > 0, p[best] * w[j] / jnp.where(p_old > 0, p_old, 1.0), w[j])
      out_i = out_i.at[j].set(jnp.where(ok, best, jnp.where(ov[j], -1, idx[j])))
      out_w = out_w.at[j].set(jnp.where(ok, w_new, jnp.where(ov[j], 0.0, w[j])))
      counts = counts.at[best].add(ok.astype(counts.dtype))
      held = held.at[best].set(held[best] | ok)
      moved = moved + ok
    return counts, (out_i, out_w, moved)

  _, (index, weight, moved) = jax.lax.scan(token, counts, (index, weight, over, probs))
  rerouted = jnp.sum(moved)
  return index, weight, jnp.sum(over) - rerouted, rerouted


def steer_routing(routing: RoutingResult, s: LayerSteer) -> tuple[RoutingResult, dict]:
  """-> (the steered routing, {steer_slots, steer_changed_tokens, steer_dropped,
  steer_rerouted, steer_skipped}: used slots before steering and what each step changed)."""
  index, weight, probs = routing.expert_index, routing.weight, routing.probs
  real = routing.num_real_experts
  zero = jnp.zeros((), jnp.int32)
  stats = {"steer_slots": jnp.sum(index >= 0), "steer_changed_tokens": zero,
           "steer_dropped": zero, "steer_rerouted": zero, "steer_skipped": zero}
  if s.selects:
    index, weight, stats["steer_changed_tokens"] = _select(index, weight, probs, s, real)
  if s.reinforce:
    factor = jnp.ones((probs.shape[-1],), jnp.float32).at[
        jnp.asarray([e for e, _ in s.reinforce], jnp.int32)].set(
        jnp.asarray([f for _, f in s.reinforce], jnp.float32))
    weight = jnp.where(index >= 0, weight * factor[jnp.maximum(index, 0)], weight)
  if s.capacity_factor > 0:
    index, weight, stats["steer_dropped"], stats["steer_rerouted"] = _capacity(
        index, weight, probs, s, real)
  if s.skip_threshold > 0:
    skip = (index >= 0) & (index < real) & (weight < s.skip_threshold)
    index, weight = jnp.where(skip, -1, index), jnp.where(skip, 0.0, weight)
    stats["steer_skipped"] = jnp.sum(skip)
  stats = {name: jnp.asarray(v, jnp.int32) for name, v in stats.items()}
  return routing.replace(expert_index=index.astype(jnp.int32),
                         weight=weight.astype(routing.weight.dtype)), stats

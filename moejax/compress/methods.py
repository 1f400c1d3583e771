"""Compression methods: one registry, each a small function from calibration statistics to a
``CompressionPlan`` (like the router registry). ``keep`` is the fraction of each layer's
routed-expert parameters kept.

Expert pruning keeps, per layer, the n = max(1, round(keep x E)) experts of highest score:

  frequency  f_e = #slots routed to e                            (routing frequency)
  gate_mass  m_e = sum_t g_{t,e}                                  (weight mass)
  task       PreMoe's task-conditioned expected selection score ("PreMoe: Lightening MoEs on
             Constrained Memory by Expert Pruning and Retrieval", 2025), as we read it: s_e = mean_t p_{t,e} [p_{t,e} >= r max_j p_{t,j}],
             the router probability of e on the task's tokens where e is a candidate (within a
             factor r = ``task_ratio`` of the token's best expert), so experts the task nearly
             selects count too; the calibration text is the task
  domain     EASY-EP ("Domain-Specific Pruning of Large Mixture-of-Experts Models with Few-shot
             Demonstrations", 2025): output-aware importance weighted by
             token contribution, s_e = sum_t c_t sum_{slots of e} g_{t,e} ||FFN_e(x_t)||_2 with
             c_t = 1 - cos(x_t, x_t + y_t), y_t the routed experts' output; a few in-domain
             examples are the calibration text

  neuron     HEAPr ("Hessian-based Efficient Atomic Expert Pruning in Output Space", 2025): every hidden unit j of expert e is an atomic expert
             with output g a_j(x) w_o,j; removing it changes the layer output by -g a_j w_o,j,
             and the second-order loss change in output space, with the Hessian approximated by
             the empirical Fisher H = sum_t grad_y L_t grad_y L_t^T of the calibration loss, is
               s_{e,j} = 1/2 (w_o,j^T H w_o,j) sum_{t -> e} (g_{t,e} a_j(x_t))^2.
             The lowest-scored units of the layer are pruned across experts; each expert keeps a
             multiple of ``neuron_multiple`` units (at least one multiple), so experts become
             heterogeneous and run on the HMoE bank.
  merge      M-SMoE (moejax/compress/merge.py): n = round(keep x E) merged experts.

  mixed_precision  MC# ("Mixture Compressor for Mixture-of-Experts Large Models", 2025): its
             pre-loading mixed-precision quantisation allocates bits per expert by a linear
             program over expert significance and quantisation error. With two widths, full
             (32 bits) and ternary (2 bits when packed), and experts of one size, that program
             (minimise sum over ternary experts of m_e err_e under the byte budget) is solved
             exactly by keeping at full precision the n_full experts of largest m_e err_e,
             m_e the gate mass and err_e = ||W - Q(W)||^2 / ||W||^2 the expert's relative ternary
             error; n_full = floor(E (32 keep - 2) / 30), so ``keep`` is the share of
             routed-expert bytes with the ternary experts packed. The ternary experts run with
             the straight-through estimator (trainable; layers/ternary.py).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from moejax.compress import merge as merge_lib
from moejax.compress.bank import swiglu_np
from moejax.compress.calibration import LayerStats
from moejax.compress.plan import CompressionPlan, LayerPlan
from moejax.errors import ConfigError


@dataclasses.dataclass
class LayerInput:
  stats: LayerStats
  experts: list            # [(wi [D, 2, h], wo [h, D])] the layer's routed experts
  spec: object             # the layer's MoESpec


@dataclasses.dataclass(frozen=True)
class Method:
  plan: Callable           # (layers {i: LayerInput}, keep, options) -> CompressionPlan
  gradients: bool = False  # calibration needs the loss gradient at each MoE output
  merges: bool = False
  prunes_neurons: bool = False
  quantizes: bool = False


def experts_kept(num: int, keep: float) -> int:
  return max(1, int(round(keep * num)))


def top(scores: np.ndarray, n: int) -> tuple[int, ...]:
  """The n highest scores' ids, in ascending id order (ties: lower id first)."""
  order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))[:n]
  return tuple(sorted(order))


def task_score(stats: LayerStats, ratio: float) -> np.ndarray:
  p = stats.probs.astype(np.float64)
  candidate = p >= ratio * p.max(axis=1, keepdims=True)
  return (p * candidate).mean(axis=0)


def expert_outputs(stats: LayerStats, experts) -> tuple[np.ndarray, np.ndarray]:
  """(||FFN_e(x_t)|| per slot [T, k], routed output y [T, D]) from the layer's experts."""
  t, k = stats.index.shape
  norms = np.zeros((t, k))
  y = np.zeros((t, stats.x.shape[1]))
  for e, expert in enumerate(experts):
    rows, slots = np.nonzero(stats.index == e)
    if len(rows):
      _, out = swiglu_np(stats.x[rows], expert)
      norms[rows, slots] = np.linalg.norm(out, axis=1)
      np.add.at(y, rows, stats.gate[rows, slots, None] * out)
  return norms, y


def domain_score(stats: LayerStats, experts) -> np.ndarray:
  norms, y = expert_outputs(stats, experts)
  x = stats.x.astype(np.float64)
  after = x + y
  cos = np.sum(x * after, 1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(after, axis=1),
                                           1e-12)
  c = 1.0 - cos
  ok = stats.index >= 0
  contrib = (c[:, None] * stats.gate * norms)[ok]
  return np.bincount(stats.index[ok], weights=contrib, minlength=len(experts))


def neuron_scores(stats: LayerStats, experts) -> list[np.ndarray]:
  """HEAPr's s_{e,j} (module doc) per expert: [h_e] each."""
  if stats.grad is None:
    raise ValueError("neuron scores need calibration gradients")
  g = stats.grad.astype(np.float64)
  fisher = g.T @ g                                              # [D, D]
  out = []
  for e, expert in enumerate(experts):
    wo = expert[1].astype(np.float64)
    curvature = np.einsum("jd,de,je->j", wo, fisher, wo)
    rows, slots = np.nonzero(stats.index == e)
    act = np.zeros(wo.shape[0])
    if len(rows):
      a, _ = swiglu_np(stats.x[rows], expert)
      act = np.sum((stats.gate[rows, slots, None] * a) ** 2, axis=0)
    out.append(0.5 * curvature * act)
  return out


def neuron_keep(scores: list[np.ndarray], keep: float, multiple: int) -> tuple[np.ndarray, ...]:
  """Hidden units kept per expert: the layer's top ``keep`` share by score, each expert's count
  rounded to a multiple of ``multiple`` (at least one multiple, at most its size), then its
  highest-scored units (in their original order)."""
  flat = np.concatenate(scores)
  budget = max(1, int(round(keep * len(flat))))
  threshold_order = np.argsort(-flat, kind="stable")[:budget]
  chosen = np.zeros(len(flat), bool)
  chosen[threshold_order] = True
  out, start = [], 0
  for s in scores:
    h = len(s)
    n = int(chosen[start:start + h].sum())
    start += h
    n = min(h, max(multiple, int(round(n / multiple)) * multiple)) if h >= multiple else h
    out.append(np.sort(np.argsort(-s, kind="stable")[:n]))
  return tuple(out)


def _prune_by(score_fn) -> Callable:
  def plan(layers, keep, options, name):
    out = {}
    for i, li in layers.items():
      scores = score_fn(li, options)
      out[i] = LayerPlan(keep=top(scores, experts_kept(len(li.experts), keep)), scores=scores)
    return CompressionPlan(name, keep, out)
  return plan


def _neuron(layers, keep, options, name):
  out = {}
  for i, li in layers.items():
    scores = neuron_scores(li.stats, li.experts)
    kept = neuron_keep(scores, keep, options.get("neuron_multiple", 8))
    out[i] = LayerPlan(keep=tuple(range(len(li.experts))), neurons=kept,
                       scores=np.concatenate(scores))
  return CompressionPlan(name, keep, out)


def _merge(layers, keep, options, name):
  out = {}
  for i, li in layers.items():
    sizes = {wo.shape[0] for _, wo in li.experts}
    if len(sizes) > 1:
      raise ConfigError("--method=merge aligns hidden units one to one: it needs experts of one "
                        f"size (layer {i} has sizes {sorted(sizes)})")
    n = experts_kept(len(li.experts), keep)
    if n < li.spec.routed_k:
      raise ConfigError(f"--keep={keep}: merging {len(li.experts)} experts into {n} leaves fewer "
                        f"experts than each token uses ({li.spec.routed_k}); keep at least "
                        f"{li.spec.routed_k / len(li.experts):.3g}")
    freq = li.stats.counts()
    groups = merge_lib.group(freq, merge_lib.router_similarity(li.stats.probs), n)
    weights = tuple(merge_lib.merge_weights(freq, g) for g in groups)
    out[i] = LayerPlan(keep=tuple(range(len(li.experts))), groups=tuple(map(tuple, groups)),
                       weights=weights, scores=freq)
  return CompressionPlan(name, keep, out)


def ternary_error(expert) -> float:
  """||W - Q(W)||^2 / ||W||^2 over the expert's gate, up and down matrices (Q: the ternary
  quantiser of layers/ternary.py, one scale per matrix)."""
  wi, wo = (np.asarray(w, np.float64) for w in expert)
  err = norm = 0.0
  for m in (wi[:, 0], wi[:, 1], wo):
    scale = max(np.mean(np.abs(m)), 1e-8)
    q = np.clip(np.round(m / scale), -1, 1) * scale
    err, norm = err + np.sum((m - q) ** 2), norm + np.sum(m ** 2)
  return err / max(norm, 1e-30)


def full_precision_experts(num: int, keep: float) -> int:
  if keep < 2 / 32:
    raise ConfigError(f"--keep={keep}: mixed precision keeps at least every expert in ternary "
                      f"form (2 of 32 bits per weight); --keep must be >= 0.0625")
  return min(num, int(np.floor(num * (32 * keep - 2) / 30 + 1e-9)))


def _mixed(layers, keep, options, name):
  out = {}
  for i, li in layers.items():
    n = len(li.experts)
    scores = li.stats.gate_mass() * np.asarray([ternary_error(e) for e in li.experts])
    full = top(scores, full_precision_experts(n, keep))
    rest = tuple(e for e in range(n) if e not in full)
    out[i] = LayerPlan(keep=full + rest, scores=scores, ternary=len(rest))
  return CompressionPlan(name, keep, out)


METHODS: dict[str, Method] = {
    "frequency": Method(_prune_by(lambda li, o: li.stats.counts())),
    "gate_mass": Method(_prune_by(lambda li, o: li.stats.gate_mass())),
    "task": Method(_prune_by(lambda li, o: task_score(li.stats, o.get("task_ratio", 0.1)))),
    "domain": Method(_prune_by(lambda li, o: domain_score(li.stats, li.experts))),
    "neuron": Method(_neuron, gradients=True, prunes_neurons=True),
    "merge": Method(_merge, merges=True),
    "mixed_precision": Method(_mixed, quantizes=True),
}


def make_plan(name: str, layers, keep: float, options=None) -> CompressionPlan:
  if name not in METHODS:
    raise ConfigError(f"--method={name!r}; allowed: {', '.join(METHODS)}")
  return METHODS[name].plan(layers, keep, options or {}, name)

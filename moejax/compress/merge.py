"""Merging experts (M-SMoE, Li et al. 2024, "Merge, Then Compress", arXiv 2310.01334).

1. Dominant experts: the n most frequently routed (n = experts after merging).
2. Groups: every other expert joins the dominant expert whose router logits over the calibration
   tokens are most similar (cosine of the columns of log p, which for a softmax router are the
   logits up to a per-token constant, removed by centering each token's row).
3. Alignment: a SwiGLU is a sum over hidden units, so permuting an expert's hidden units leaves
   its function unchanged; each member is permuted to best match the dominant expert, the
   permutation pi maximising sum_j <u_j^dom, u_pi(j)^member> with u_j = [W_g[:, j]; W_u[:, j];
   W_o[j, :]] (``scipy.optimize.linear_sum_assignment``).
4. Merge: W = sum_i f_i W_i^aligned / sum_i f_i, f_i the member's activation frequency.

The router is not retrained: it keeps an output per original expert and ``expert_map`` sends a
member's tokens to its group's merged expert (layers/folding.py).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from moejax.compress.bank import Expert


def unit_features(expert: Expert) -> np.ndarray:
  """[h, 3D]: each hidden unit's gate column, up column and down row."""
  wi, wo = expert
  return np.concatenate([wi[:, 0].T, wi[:, 1].T, wo], axis=1).astype(np.float64)


def align(reference: Expert, expert: Expert) -> np.ndarray:
  """The permutation of ``expert``'s hidden units that best matches ``reference``'s:
  ``permute(expert, perm)`` has unit j = expert's unit perm[j]."""
  sim = unit_features(reference) @ unit_features(expert).T          # [h_ref, h]
  rows, cols = linear_sum_assignment(-sim)
  perm = np.empty(len(rows), np.int64)
  perm[rows] = cols
  return perm


def permute(expert: Expert, perm: np.ndarray) -> Expert:
  wi, wo = expert
  return wi[..., perm], wo[perm]


def router_similarity(probs: np.ndarray) -> np.ndarray:
  """[E, E] cosine similarity of the experts' centred log-probability columns."""
  logits = np.log(np.maximum(probs.astype(np.float64), 1e-30))
  logits -= logits.mean(axis=1, keepdims=True)
  cols = logits / np.maximum(np.linalg.norm(logits, axis=0, keepdims=True), 1e-12)
  return cols.T @ cols


def group(frequency: np.ndarray, similarity: np.ndarray, n: int) -> list[list[int]]:
  """n groups, each led by one of the n most used experts (ties: lower id)."""
  order = sorted(range(len(frequency)), key=lambda e: (-frequency[e], e))
  dominant = order[:n]
  groups = [[d] for d in dominant]
  for e in order[n:]:
    best = max(range(n), key=lambda g: (similarity[e, dominant[g]], -g))
    groups[best].append(e)
  return groups


def merge_weights(frequency: np.ndarray, members) -> np.ndarray:
  """f_i / sum f over the group (uniform when no member was routed to)."""
  f = np.asarray([frequency[m] for m in members], np.float64)
  return f / f.sum() if f.sum() > 0 else np.full(len(members), 1.0 / len(members))


def merge_group(experts: list[Expert], members, weights: np.ndarray) -> Expert:
  """The merged expert of ``members`` (dominant first), each aligned to the dominant one."""
  w = weights
  ref = experts[members[0]]
  wi = np.zeros(ref[0].shape, np.float64)
  wo = np.zeros(ref[1].shape, np.float64)
  for weight, m in zip(w, members):
    e = experts[m] if m == members[0] else permute(experts[m], align(ref, experts[m]))
    wi += weight * e[0]
    wo += weight * e[1]
  return wi.astype(np.float32), wo.astype(np.float32)

"""Statistics of routing traces (analysis/traces.py): load, specialisation, inter-layer
affinity, mutual information, cross-layer prediction. NumPy only; every function takes the
trace arrays, so a trace file from anywhere works.

Notation: M MoE layers, N tokens, k slots, E routed experts; S_m(t) the set of experts token t
used at MoE layer m (slots with expert -1 are not in it).
"""
from __future__ import annotations

import numpy as np


def counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
  """experts [M, N, k] -> [M, E]: how many tokens used each expert at each layer."""
  m = experts.shape[0]
  flat = experts.reshape(m, -1)
  out = np.zeros((m, num_experts), np.int64)
  for i in range(m):
    used = flat[i][flat[i] >= 0]
    out[i] = np.bincount(used, minlength=num_experts)[:num_experts]
  return out


def expert_load(experts: np.ndarray, num_experts: int) -> np.ndarray:
  """[M, E] share of the used slots of each layer that went to each expert (rows sum to 1)."""
  c = counts(experts, num_experts).astype(np.float64)
  return c / np.maximum(c.sum(axis=1, keepdims=True), 1)


def activation_frequency(experts: np.ndarray, num_experts: int) -> np.ndarray:
  """[M, E] f_m(e) = share of tokens that used expert e at layer m (MoTE's fTRI frequency)."""
  return counts(experts, num_experts) / max(experts.shape[1], 1)


def specialisation(freqs: np.ndarray) -> np.ndarray:
  """freqs [S, M, E] (activation frequency per source) -> [M, E] in [0, 1].

  q_s(e) = f_s(e) / sum_s' f_s'(e) is how an expert's use splits over the S sources (per token
  of each source, so source size does not count); the score is 1 - H(q) / log S: 0 when every
  source uses the expert equally often, 1 when only one source uses it. An expert no source
  uses scores 0.
  """
  s = freqs.shape[0]
  if s < 2:
    return np.zeros(freqs.shape[1:])
  total = freqs.sum(axis=0)
  q = freqs / np.where(total > 0, total, 1.0)
  with np.errstate(divide="ignore", invalid="ignore"):
    h = -np.sum(np.where(q > 0, q * np.log(q), 0.0), axis=0)
  return np.where(total > 0, 1.0 - h / np.log(s), 0.0)


def contrast(freq_a: np.ndarray, freq_b: np.ndarray) -> np.ndarray:
  """[M, E] f_a(e) - f_b(e): how much more often source a uses each expert (fTRI's ranking)."""
  return freq_a - freq_b


def most_specific(freq_a: np.ndarray, freq_b: np.ndarray, n: int,
                  layers: np.ndarray | None = None) -> list[tuple[int, int]]:
  """The n (layer, expert) pairs with the largest contrast toward source a (layer = the model
  layer index when ``layers`` is given, else the MoE layer's position)."""
  c = contrast(freq_a, freq_b)
  order = np.argsort(-c, axis=None, kind="stable")[:n]
  m, e = np.unravel_index(order, c.shape)
  names = layers if layers is not None else np.arange(c.shape[0])
  return [(int(names[i]), int(j)) for i, j in zip(m, e)]


def transition_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
  """[M-1, E, E]: C_m[i, j] = tokens with i in S_m(t) and j in S_{m+1}(t) (every pair of the
  two sets counts once)."""
  m, n, _ = experts.shape
  out = np.zeros((max(m - 1, 0), num_experts, num_experts), np.int64)
  for layer in range(m - 1):
    a = _onehot(experts[layer], num_experts)        # [N, E]
    b = _onehot(experts[layer + 1], num_experts)
    out[layer] = a.T @ b
  return out


def _onehot(index: np.ndarray, num_experts: int) -> np.ndarray:
  """[N, k] -> [N, E] int64 membership (unused slots -1 left out)."""
  out = np.zeros((index.shape[0], num_experts + 1), np.int64)
  np.put_along_axis(out, np.where(index >= 0, index, num_experts), 1, axis=1)
  return out[:, :num_experts]


def affinity(transitions: np.ndarray) -> np.ndarray:
  """[M-1, E, E] P(expert j at layer m+1 | expert i at layer m) = C_m[i, j] / sum_j C_m[i, j]
  (a row of an unused expert is 0)."""
  rows = transitions.sum(axis=-1, keepdims=True)
  return transitions / np.where(rows > 0, rows, 1)


def mutual_information(transitions: np.ndarray) -> np.ndarray:
  """[M-1] bits: I = sum_ij P(i, j) log2(P(i, j) / (P(i) P(j))) with P(i, j) = C_m[i, j] / sum C_m
  (a token with k experts per layer contributes its k x k pairs). 0 = layer m+1's routing is
  independent of layer m's; at most min(H(P(i)), H(P(j)))."""
  out = []
  for c in transitions:
    p = c / max(c.sum(), 1)
    pi, pj = p.sum(axis=1, keepdims=True), p.sum(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
      terms = np.where(p > 0, p * np.log2(p / (pi * pj)), 0.0)
    out.append(float(terms.sum()))
  return np.asarray(out)


def entropy_bits(p: np.ndarray) -> float:
  p = p[p > 0]
  return float(-np.sum(p * np.log2(p)))


def predict_next(experts_m: np.ndarray, table: np.ndarray, sizes: np.ndarray) -> np.ndarray:
  """Predicts each token's experts at layer m+1 from its experts at layer m: the ``sizes[t]``
  experts j with the largest sum_{i in S_m(t)} table[i, j] (ties: lower id). -> [N, k] -1 padded."""
  score = _onehot(experts_m, table.shape[0]).astype(np.float64) @ table
  order = np.argsort(-score, axis=1, kind="stable")
  k = int(sizes.max()) if sizes.size else 0
  pred = order[:, :k]
  return np.where(np.arange(k)[None, :] < sizes[:, None], pred, -1)


def prediction_accuracy(fit: np.ndarray, test: np.ndarray, num_experts: int) -> dict:
  """Cross-layer gate prediction, fitted on ``fit`` traces [M, N1, k], scored on ``test``.

  For each consecutive pair (m, m+1), the predictor is the fitted affinity P(j | i); a token's
  prediction is the |S_{m+1}(t)| experts with the largest sum_{i in S_m(t)} P(j | i) (what a
  prefetcher knows one layer ahead). Accuracy = mean over held-out tokens of
  |predicted ∩ S_{m+1}(t)| / |S_{m+1}(t)|. The baseline predicts layer m+1's most used experts
  (from the fitted part) for every token. -> {"affinity": [M-1], "frequency": [M-1]}.
  """
  table = affinity(transition_counts(fit, num_experts))
  freq = counts(fit, num_experts)
  acc, base = [], []
  for m in range(test.shape[0] - 1):
    actual = test[m + 1]
    sizes = np.sum(actual >= 0, axis=1)
    truth = _onehot(actual, num_experts)
    pred = predict_next(test[m], table[m], sizes)
    popular = np.where(np.arange(actual.shape[1])[None, :] < sizes[:, None],
                       np.argsort(-freq[m + 1], kind="stable")[:actual.shape[1]][None, :], -1)
    valid = sizes > 0
    for out, guess in ((acc, pred), (base, popular)):
      hits = np.sum(_onehot(guess, num_experts) * truth, axis=1)
      out.append(float(np.mean(hits[valid] / sizes[valid])) if valid.any() else float("nan"))
  return {"affinity": np.asarray(acc), "frequency": np.asarray(base)}

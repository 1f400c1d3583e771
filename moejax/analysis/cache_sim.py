"""Expert offloading: hit rate of a per-layer expert cache replayed on routing traces.

Offloaded inference (ExpertFlow, HOBBIT, EdgeMoE, HybriMoE) keeps ``size`` of a layer's E
experts in fast memory and fetches the rest on demand. Replayed here token by token, layer by
layer, each layer with its own cache of ``size`` experts; a token's experts at a layer are
requested in slot order, a request is a hit when the expert is cached, else a miss that loads it
(evicting one expert when full). Policies:

  lru       evict the least recently requested expert;
  lfu       evict the expert requested least often so far (counts kept after eviction; ties:
            least recently requested);
  prefetch  LRU plus, before layer m+1 of a token, load the experts a predictor expects there:
            the |S_m(t)| experts j with the largest sum_{i in S_m(t)} P(j | i) under the affinity
            fitted on other traces (analysis/routing.py). A prefetch is a transfer, not a hit;
            the result counts both, since a prefetcher that loads everything would hit always.
"""
from __future__ import annotations

import collections

import numpy as np

from moejax.analysis.routing import predict_next

POLICIES = ("lru", "lfu", "prefetch")


def _replay(requests: list[list[int]], size: int, policy: str,
            prefetches: list[list[int]] | None = None) -> tuple[int, int, int]:
  """One layer: requests[t] are token t's experts. -> (hits, requests, prefetched loads)."""
  cache: collections.OrderedDict[int, None] = collections.OrderedDict()   # oldest first
  freq: collections.Counter = collections.Counter()
  hits = total = loads = 0

  def insert(expert):
    if len(cache) >= size:
      if policy == "lfu":
        victim = min(cache, key=lambda e: freq[e])    # OrderedDict order breaks ties by age
      else:
        victim = next(iter(cache))
      del cache[victim]
    cache[expert] = None

  for t, wanted in enumerate(requests):
    if prefetches is not None:
      for expert in prefetches[t]:
        if expert not in cache:
          insert(expert)
          loads += 1
    for expert in wanted:
      total += 1
      freq[expert] += 1
      if expert in cache:
        hits += 1
        cache.move_to_end(expert)
      else:
        insert(expert)
  return hits, total, loads


def simulate(experts: np.ndarray, size: int, policy: str,
             affinity: np.ndarray | None = None) -> dict:
  """experts [M, N, k] (-1 unused) -> {"hit_rate": [M], "overall": float, "prefetch_loads": int}.
  ``affinity`` [M-1, E, E] is needed by "prefetch" (layer 0 has no previous layer: plain LRU)."""
  if policy not in POLICIES:
    raise ValueError(f"policy {policy!r}; allowed: {', '.join(POLICIES)}")
  if size < 1:
    raise ValueError(f"cache size must be >= 1, got {size}")
  if policy == "prefetch" and affinity is None:
    raise ValueError("policy 'prefetch' needs the fitted affinity")
  rates, hits_all, total_all, loads_all = [], 0, 0, 0
  for m in range(experts.shape[0]):
    requests = [[int(e) for e in row if e >= 0] for row in experts[m]]
    pre = None
    if policy == "prefetch" and m > 0:
      sizes = np.sum(experts[m] >= 0, axis=1)
      pred = predict_next(experts[m - 1], affinity[m - 1], sizes)
      pre = [[int(e) for e in row if e >= 0] for row in pred]
    hits, total, loads = _replay(requests, size, "lru" if policy == "prefetch" else policy, pre)
    rates.append(hits / max(total, 1))
    hits_all, total_all, loads_all = hits_all + hits, total_all + total, loads_all + loads
  return {"hit_rate": np.asarray(rates), "overall": hits_all / max(total_all, 1),
          "prefetch_loads": loads_all, "requests": total_all}

"""Statistics for multi-seed comparisons: mean ± std across seeds and paired differences.

Runs of one seed share their initialisation key, router noise and data order across configs
(the runner checks the data), so two configs are compared by their per-seed differences
d_s = a_s - b_s (a paired design: the seed's luck cancels). A difference is *resolved* when the
two-sided Student-t confidence interval of mean(d) excludes zero:

    mean(d) ± t_{(1+c)/2, n-1} * sd(d) / sqrt(n),   sd with n - 1 degrees of freedom.

With 3 seeds t_{0.975, 2} = 4.30, so only a gap well above its spread counts. Anything else is
reported as "within seed noise", whatever the means say.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats


@dataclasses.dataclass(frozen=True)
class Summary:
  """One config's metric across seeds."""
  mean: float
  std: float                  # sample standard deviation (ddof=1); nan with one seed
  values: tuple[float, ...]   # per seed, in the order of ``seeds``
  seeds: tuple[int, ...]

  @property
  def n(self) -> int:
    return len(self.values)

  def __str__(self) -> str:
    return f"{self.mean:.4f} ± {self.std:.4f}" if self.n > 1 else f"{self.mean:.4f}"


def mean_std(values: Sequence[float]) -> str:
  """'mean ± std' over seeds for a table cell (std 0 with one seed)."""
  v = np.asarray(values, np.float64)
  return f"{v.mean():.4f} ± {v.std(ddof=1) if v.size > 1 else 0:.4f}"


def summarize(values: Sequence[float], seeds: Sequence[int] | None = None) -> Summary:
  v = np.asarray(values, np.float64)
  if v.size == 0:
    raise ValueError("summarize: no values")
  seeds = tuple(range(v.size)) if seeds is None else tuple(int(s) for s in seeds)
  std = float(np.std(v, ddof=1)) if v.size > 1 else float("nan")
  return Summary(float(np.mean(v)), std, tuple(float(x) for x in v), seeds)


@dataclasses.dataclass(frozen=True)
class Comparison:
  """a vs b on one metric, paired by seed."""
  a: str
  b: str
  metric: str
  diffs: tuple[float, ...]    # a_s - b_s per seed
  mean_diff: float
  std_diff: float
  ci: tuple[float, float]     # confidence interval of mean_diff (nan, nan with one seed)
  confidence: float
  a_wins: int                 # seeds where a is lower (higher, if higher_is_better)
  higher_is_better: bool

  @property
  def n(self) -> int:
    return len(self.diffs)

  @property
  def resolved(self) -> bool:
    """The interval excludes zero: the ordering holds beyond the seed noise."""
    lo, hi = self.ci
    return bool(lo > 0 or hi < 0)

  @property
  def verdict(self) -> str:
    """'<a or b> lower' (or 'higher') for a resolved difference, else 'within seed noise'."""
    if not self.resolved:
      return "within seed noise"
    a_better = (self.mean_diff > 0) == self.higher_is_better
    return f"{self.a if a_better else self.b} {'higher' if self.higher_is_better else 'lower'}"

  @property
  def sentence(self) -> str:
    """'+0.0123 (95% interval -0.0010 .. +0.0256, 3 seeds): within seed noise'."""
    return (f"{self.mean_diff:+.4f} ({self.confidence:.0%} interval {self.ci[0]:+.4f} .. "
            f"{self.ci[1]:+.4f}, {self.n} seeds): {self.verdict}")


def t_interval(diffs: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
  d = np.asarray(diffs, np.float64)
  if d.size < 2:
    return float("nan"), float("nan")
  half = scipy_stats.t.ppf((1 + confidence) / 2, d.size - 1) * np.std(d, ddof=1) / math.sqrt(d.size)
  m = float(np.mean(d))
  return m - float(half), m + float(half)


def compare(a: str, b: str, a_values: Sequence[float], b_values: Sequence[float], *,
            metric: str = "", confidence: float = 0.95,
            higher_is_better: bool = False) -> Comparison:
  """Paired comparison; ``a_values[s]`` and ``b_values[s]`` must come from the same seed.
  ``higher_is_better`` only changes the wording (and which seeds count as a's wins)."""
  av, bv = np.asarray(a_values, np.float64), np.asarray(b_values, np.float64)
  if av.shape != bv.shape or av.ndim != 1 or av.size == 0:
    raise ValueError(f"compare {a} vs {b}: need one value per seed for both, got "
                     f"{av.shape} and {bv.shape}")
  d = av - bv
  wins = int(np.sum(d > 0) if higher_is_better else np.sum(d < 0))
  return Comparison(a, b, metric, tuple(float(x) for x in d), float(np.mean(d)),
                    float(np.std(d, ddof=1)) if d.size > 1 else float("nan"),
                    t_interval(d, confidence), confidence, wins, higher_is_better)


def band(curves: Sequence[Sequence[tuple[int, float]]]
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Mean and std across seeds of (step, value) curves, at the steps every curve has."""
  if not curves:
    raise ValueError("band: no curves")
  common = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
  table = np.array([[dict(c)[s] for s in common] for c in curves], np.float64)
  std = table.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(common))
  return np.asarray(common), table.mean(axis=0), std

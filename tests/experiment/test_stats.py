"""Multi-seed statistics against NumPy (and a t-table value) on made-up results."""
import math

import numpy as np
import pytest

from moejax.experiment import stats

# Student-t 0.975 quantiles from a printed table (df = 1, 2, 4): an independent reference for
# the scipy call inside t_interval.
T975 = {1: 12.706, 2: 4.303, 4: 2.776}


def test_summarize_matches_numpy():
  v = [1.50, 1.56, 1.53, 1.61]
  s = stats.summarize(v, seeds=[0, 1, 2, 3])
  assert s.mean == pytest.approx(np.mean(v))
  assert s.std == pytest.approx(math.sqrt(sum((x - np.mean(v)) ** 2 for x in v) / 3))
  assert s.values == tuple(v) and s.seeds == (0, 1, 2, 3) and s.n == 4
  one = stats.summarize([2.0])
  assert one.mean == 2.0 and math.isnan(one.std) and str(one) == "2.0000"
  with pytest.raises(ValueError):
    stats.summarize([])


@pytest.mark.parametrize("n", [2, 3, 5])
def test_paired_interval_matches_t_table(n):
  rng = np.random.default_rng(n)
  a, b = rng.normal(1.5, 0.02, n), rng.normal(1.52, 0.02, n)
  c = stats.compare("a", "b", a, b, metric="val_loss")
  d = a - b
  half = T975[n - 1] * d.std(ddof=1) / math.sqrt(n)
  assert c.diffs == pytest.approx(tuple(d))
  assert c.mean_diff == pytest.approx(d.mean())
  assert c.std_diff == pytest.approx(d.std(ddof=1))
  assert c.ci[0] == pytest.approx(d.mean() - half, rel=1e-3)
  assert c.ci[1] == pytest.approx(d.mean() + half, rel=1e-3)
  assert c.a_wins == int(np.sum(d < 0)) and c.n == n


def test_verdicts():
  # a consistently 0.03 lower than b with small spread of the difference: resolved, a better
  c = stats.compare("a", "b", [1.50, 1.55, 1.60], [1.53, 1.58, 1.63 + 1e-3])
  assert c.resolved and c.verdict == "a lower" and c.a_wins == 3
  # the same configs, but b's luck varies by more than the gap: within noise
  c = stats.compare("a", "b", [1.50, 1.55, 1.60], [1.53, 1.54, 1.62])
  assert not c.resolved and c.verdict == "within seed noise" and c.a_wins == 2
  # higher is better (e.g. tokens/s): b faster on every seed
  c = stats.compare("a", "b", [100.0, 101.0, 99.0], [150.0, 152.0, 149.0], higher_is_better=True)
  assert c.verdict == "b higher" and c.a_wins == 0
  # ties count as wins for neither; one seed has no interval
  c = stats.compare("a", "b", [1.0], [1.0])
  assert c.a_wins == 0 and not c.resolved and all(math.isnan(x) for x in c.ci)
  with pytest.raises(ValueError, match="one value per seed"):
    stats.compare("a", "b", [1.0, 2.0], [1.0])


def test_band_uses_common_steps():
  c1 = [(0, 3.0), (10, 2.0), (20, 1.0)]
  c2 = [(0, 5.0), (10, 4.0)]            # stopped early: step 20 is not in every curve
  c3 = [(0, 4.0), (10, 3.0), (20, 2.0)]
  steps, mean, std = stats.band([c1, c2, c3])
  np.testing.assert_array_equal(steps, [0, 10])
  np.testing.assert_allclose(mean, [4.0, 3.0])
  np.testing.assert_allclose(std, [np.std([3, 5, 4], ddof=1)] * 2)
  steps, mean, std = stats.band([c1])
  np.testing.assert_array_equal(std, [0, 0, 0])

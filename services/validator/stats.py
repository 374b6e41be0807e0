"""Two-sample statistics for soak verdicts: candidate replicas against baseline replicas.

Everything here is pure: numbers in, a ``SampleComparison`` out.

Two questions are asked of every metric:

* did the *location* move? Mann-Whitney U (two-sided, plus both one-sided
  alternatives so the caller can ask "better" and "worse" in the metric's
  direction), with the Hodges-Lehmann shift (median of all pairwise differences
  candidate - baseline) and its distribution-free confidence interval read off
  the ordered pairwise differences at the order statistics given by the null
  distribution of U;
* did the *shape* change? The two-sample Kolmogorov-Smirnov test, which sees a
  candidate that keeps the median but widens the spread (a fatter latency
  tail) where a rank-location test does not. Tail quantiles in the metric's bad
  direction tell which way such a change goes.

Too few samples on either side is the explicit ``no_data`` outcome: statistics
are not computed, so nothing downstream can read silence as "no difference".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from scipy import stats as sps

DEFAULT_MIN_N = 10

# Below this many pairwise differences they are materialised and selected
# exactly; above it (pooled long soaks) order statistics are found by
# bisection, so memory stays O(m + n).
MAX_MATERIALISED_PAIRS = 2_000_000

# The exact null distribution of U is used for the CI when both samples are
# smaller than this and there are no ties, as is customary; otherwise the
# tie-corrected normal approximation.
EXACT_CI_MAX_N = 50


@dataclass(frozen=True)
class SampleComparison:
    """Everything measured about one metric on one pair of samples.

    Shifts and effects are oriented *candidate minus baseline*: a positive
    ``shift`` means the candidate's values are larger, whether that is good or
    bad depends on the metric's direction. ``p_better``/``p_worse`` are the
    one-sided Mann-Whitney p-values in the metric's direction.
    """

    direction: str
    n_candidate: int
    n_baseline: int
    min_n: int
    candidate_median: float | None = None
    baseline_median: float | None = None
    u_statistic: float | None = None
    p_two_sided: float | None = None
    p_better: float | None = None
    p_worse: float | None = None
    shift: float | None = None
    shift_ci_low: float | None = None
    shift_ci_high: float | None = None
    confidence: float | None = None
    relative_shift: float | None = None
    rank_biserial: float | None = None
    ks_statistic: float | None = None
    p_ks: float | None = None
    tail_quantile: float | None = None
    candidate_tail: float | None = None
    baseline_tail: float | None = None
    relative_tail_shift: float | None = None

    @property
    def no_data(self) -> bool:
        return self.n_candidate < self.min_n or self.n_baseline < self.min_n

    def to_dict(self) -> dict[str, float | int | str | None]:
        """JSON-safe: infinities (a shift against a zero baseline) become null."""
        out: dict[str, float | int | str | None] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            out[name] = value
        out["no_data"] = self.no_data
        return out


def clean(samples: Iterable[float]) -> np.ndarray:
    """Finite values only: a NaN or an infinity is a broken measurement, and the
    runner reports a broken episode as an incident rather than a sample."""
    arr = np.asarray(list(samples), dtype=float).ravel()
    return arr[np.isfinite(arr)]


def compare_samples(
    candidate: Iterable[float],
    baseline: Iterable[float],
    *,
    direction: str = "lower",
    min_n: int = DEFAULT_MIN_N,
    confidence: float = 0.95,
    tail_quantile: float = 0.95,
) -> SampleComparison:
    """Compare two samples of one metric; ``direction`` is where better lies."""
    if direction not in ("lower", "higher"):
        raise ValueError(f"direction must be 'lower' or 'higher', not {direction!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must lie strictly between 0 and 1")
    x = clean(candidate)
    y = clean(baseline)
    m, n = len(x), len(y)
    if m < max(min_n, 1) or n < max(min_n, 1):
        return SampleComparison(direction=direction, n_candidate=m, n_baseline=n, min_n=max(min_n, 1))

    u, p_two = _mann_whitney(x, y, "two-sided")
    _, p_greater = _mann_whitney(x, y, "greater")
    _, p_less = _mann_whitney(x, y, "less")
    p_better, p_worse = (p_less, p_greater) if direction == "lower" else (p_greater, p_less)

    shift, ci_low, ci_high = hodges_lehmann(x, y, confidence=confidence)
    base_median = float(np.median(y))
    ks = sps.ks_2samp(x, y)

    # The tail that hurts: high values for lower-is-better metrics, low values
    # for higher-is-better ones.
    q = tail_quantile if direction == "lower" else 1.0 - tail_quantile
    cand_tail = float(np.quantile(x, q))
    base_tail = float(np.quantile(y, q))

    return SampleComparison(
        direction=direction,
        n_candidate=m,
        n_baseline=n,
        min_n=max(min_n, 1),
        candidate_median=float(np.median(x)),
        baseline_median=base_median,
        u_statistic=u,
        p_two_sided=p_two,
        p_better=p_better,
        p_worse=p_worse,
        shift=shift,
        shift_ci_low=ci_low,
        shift_ci_high=ci_high,
        confidence=confidence,
        relative_shift=relative(shift, base_median),
        rank_biserial=2.0 * u / (m * n) - 1.0,
        ks_statistic=float(ks.statistic),
        p_ks=_finite_p(ks.pvalue),
        tail_quantile=q,
        candidate_tail=cand_tail,
        baseline_tail=base_tail,
        relative_tail_shift=relative(cand_tail - base_tail, base_tail),
    )


def relative(change: float, reference: float) -> float:
    """``change`` as a fraction of ``|reference|``; against a zero reference any
    change is infinitely large and no change is none."""
    if reference == 0.0:
        return 0.0 if change == 0.0 else math.copysign(math.inf, change)
    return change / abs(reference)


def _mann_whitney(x: np.ndarray, y: np.ndarray, alternative: str) -> tuple[float, float]:
    result = sps.mannwhitneyu(x, y, alternative=alternative, method="auto")
    return float(result.statistic), _finite_p(result.pvalue)


def _finite_p(p: float) -> float:
    # scipy answers NaN when every value is tied: no evidence of a difference.
    p = float(p)
    return 1.0 if math.isnan(p) else min(max(p, 0.0), 1.0)


# --- Hodges-Lehmann shift and its distribution-free interval ---------------------


def hodges_lehmann(
    x: Iterable[float], y: Iterable[float], *, confidence: float = 0.95,
    max_pairs: int = MAX_MATERIALISED_PAIRS,
) -> tuple[float, float, float]:
    """(shift, ci_low, ci_high) of x relative to y.

    The shift is the median of the m*n differences x_i - y_j. The interval is
    [D_(k), D_(mn+1-k)] of the ordered differences, with k the lower
    alpha/2 quantile of the null distribution of U (Lehmann; as R's
    ``wilcox.test(conf.int=TRUE)`` does for exact samples).
    """
    xs = np.sort(clean(x))
    ys = np.sort(clean(y))
    m, n = len(xs), len(ys)
    if m == 0 or n == 0:
        raise ValueError("Hodges-Lehmann needs at least one value on each side")
    total = m * n
    alpha = 1.0 - confidence
    k = _ci_order_statistic(xs, ys, alpha)

    wanted = {k, total - k + 1}
    if total % 2:
        wanted.add((total + 1) // 2)
    else:
        wanted.update({total // 2, total // 2 + 1})
    ranks = sorted(wanted)  # 1-based order statistics
    if total <= max_pairs:
        diffs = (xs[:, None] - ys[None, :]).ravel()
        part = np.partition(diffs, [r - 1 for r in ranks])
        picked = {r: float(part[r - 1]) for r in ranks}
    else:
        picked = {r: _kth_difference(xs, ys, r) for r in ranks}

    if total % 2:
        shift = picked[(total + 1) // 2]
    else:
        shift = 0.5 * (picked[total // 2] + picked[total // 2 + 1])
    return shift, picked[k], picked[total - k + 1]


def _ci_order_statistic(xs: np.ndarray, ys: np.ndarray, alpha: float) -> int:
    m, n = len(xs), len(ys)
    total = m * n
    pooled = np.concatenate([xs, ys])
    has_ties = len(np.unique(pooled)) < len(pooled)
    if m < EXACT_CI_MAX_N and n < EXACT_CI_MAX_N and not has_ties:
        cdf = np.cumsum(_u_null_distribution(m, n))
        # smallest u with P(U <= u) >= alpha/2, as qwilcox
        k = int(np.searchsorted(cdf, alpha / 2.0 - 1e-12, side="left"))
    else:
        _, counts = np.unique(pooled, return_counts=True)
        big_n = m + n
        tie_term = float(np.sum(counts.astype(float) ** 3 - counts)) / (big_n * (big_n - 1))
        sigma = math.sqrt(total / 12.0 * ((big_n + 1) - tie_term))
        z = float(sps.norm.ppf(1.0 - alpha / 2.0))
        # floor keeps the interval at least as wide as the nominal level asks
        k = int(math.floor(total / 2.0 - z * sigma))
    return min(max(k, 1), (total + 1) // 2)


def _u_null_distribution(m: int, n: int) -> np.ndarray:
    """P(U = u), u = 0..mn, for samples of sizes m and n without ties.

    Recurrence on the largest pooled observation: it belongs to x with
    probability m/(m+n) (and then beats all n y's) or to y.
    """
    # rows[b] holds the distribution for (a, b) of the current a
    prev = [np.ones(1) for _ in range(n + 1)]  # a = 0: U is 0
    for a in range(1, m + 1):
        row = [np.ones(1)]  # b = 0: U is 0
        for b in range(1, n + 1):
            dist = np.zeros(a * b + 1)
            from_x = prev[b]  # (a-1, b), shifted by b
            dist[b : b + len(from_x)] += (a / (a + b)) * from_x
            from_y = row[b - 1]  # (a, b-1)
            dist[: len(from_y)] += (b / (a + b)) * from_y
            row.append(dist)
        prev = row
    return prev[n]


def _kth_difference(xs: np.ndarray, ys: np.ndarray, k: int) -> float:
    """k-th smallest (1-based) of x_i - y_j without materialising the m*n matrix."""
    m, n = len(xs), len(ys)

    def at_most(t: float) -> int:
        # x_i - y_j <= t  <=>  y_j >= x_i - t
        return int(m * n - np.searchsorted(ys, xs - t, side="left").sum())

    lo = float(xs[0] - ys[-1])
    hi = float(xs[-1] - ys[0])
    if at_most(lo) >= k:
        return lo
    for _ in range(200):
        mid = lo + (hi - lo) / 2.0
        if mid <= lo or mid >= hi:
            break
        if at_most(mid) >= k:
            hi = mid
        else:
            lo = mid
    return hi

import math

import numpy as np
import pytest

from services.validator.stats import (
    _ci_order_statistic,
    _u_null_distribution,
    compare_samples,
    hodges_lehmann,
    relative,
)


def test_empty_or_small_samples_are_no_data_without_statistics():
    for candidate, baseline in [([], [1.0] * 20), ([1.0] * 20, []), ([1.0] * 4, [1.0] * 20)]:
        result = compare_samples(candidate, baseline, min_n=5)
        assert result.no_data
        assert result.p_two_sided is None and result.shift is None and result.p_ks is None
        assert result.to_dict()["no_data"] is True


def test_non_finite_values_are_dropped_before_counting():
    result = compare_samples([1.0, float("nan"), float("inf"), 2.0], [1.0, 2.0, 3.0], min_n=2)
    assert result.n_candidate == 2
    assert not result.no_data


def test_location_shift_is_found_with_hodges_lehmann_estimate_and_interval():
    rng = np.random.default_rng(11)
    baseline = rng.normal(2.0, 0.1, 200)
    candidate = rng.normal(2.3, 0.1, 200)
    result = compare_samples(candidate, baseline, direction="lower", confidence=0.99)
    assert result.p_worse < 1e-10 and result.p_better > 0.99
    assert result.p_two_sided < 1e-10
    assert result.shift_ci_low < 0.3 < result.shift_ci_high
    assert result.shift == pytest.approx(0.3, abs=0.03)
    assert result.relative_shift == pytest.approx(0.15, abs=0.02)
    assert result.rank_biserial > 0.9


def test_direction_swaps_the_one_sided_p_values():
    rng = np.random.default_rng(12)
    baseline = rng.normal(0.4, 0.02, 60)
    candidate = rng.normal(0.45, 0.02, 60)
    higher = compare_samples(candidate, baseline, direction="higher")
    lower = compare_samples(candidate, baseline, direction="lower")
    assert higher.p_better == lower.p_worse
    assert higher.p_better < 1e-6


def test_same_location_wider_spread_is_seen_by_ks_not_by_mann_whitney():
    rng = np.random.default_rng(3)
    baseline = rng.normal(100.0, 5.0, 400)
    candidate = rng.normal(100.0, 10.0, 400)  # 4x the variance
    result = compare_samples(candidate, baseline, direction="lower")
    assert result.p_two_sided > 0.05
    assert result.p_ks < 0.001
    assert result.candidate_tail > result.baseline_tail
    assert result.tail_quantile == 0.95


def test_tail_for_higher_is_better_metrics_is_the_low_end():
    rng = np.random.default_rng(4)
    result = compare_samples(rng.normal(0, 2, 100), rng.normal(0, 1, 100), direction="higher")
    assert result.tail_quantile == pytest.approx(0.05)
    assert result.candidate_tail < result.baseline_tail


def test_exact_null_distribution_of_u_matches_counts():
    # m = n = 5: C(10, 5) = 252 arrangements; P(U=0..4) = 1, 1, 2, 3, 5 / 252
    dist = _u_null_distribution(5, 5)
    assert len(dist) == 26
    assert dist.sum() == pytest.approx(1.0)
    assert np.allclose(dist[:5] * 252, [1, 1, 2, 3, 5])
    assert np.allclose(dist, dist[::-1])


def test_exact_interval_uses_the_qwilcox_order_statistic():
    # qwilcox(0.025, 5, 5) is 3 in R: the 95% interval is [D(3), D(23)]
    x = np.array([1.1, 2.3, 3.7, 4.2, 5.9])
    y = np.array([0.5, 1.6, 2.8, 3.1, 4.4])
    assert _ci_order_statistic(x, y, 0.05) == 3
    diffs = np.sort((x[:, None] - y[None, :]).ravel())
    shift, low, high = hodges_lehmann(x, y, confidence=0.95)
    assert shift == diffs[12]
    assert (low, high) == (diffs[2], diffs[22])


def test_large_samples_select_order_statistics_without_materialising():
    rng = np.random.default_rng(5)
    x, y = rng.normal(1, 1, 300), rng.normal(0, 1, 250)
    exact = hodges_lehmann(x, y)
    bisected = hodges_lehmann(x, y, max_pairs=0)
    assert bisected == pytest.approx(exact, rel=1e-12, abs=1e-12)


def test_interval_covers_the_true_shift_at_about_the_nominal_rate():
    rng = np.random.default_rng(6)
    covered = 0
    trials = 300
    for _ in range(trials):
        _, low, high = hodges_lehmann(rng.standard_t(3, 30) + 0.5, rng.standard_t(3, 30), confidence=0.9)
        covered += low <= 0.5 <= high
    assert 0.85 <= covered / trials <= 0.96


def test_all_ties_mean_no_evidence():
    result = compare_samples([0.0] * 30, [0.0] * 30)
    assert result.p_two_sided == 1.0 and result.p_ks == 1.0
    assert result.shift == 0.0 and result.relative_shift == 0.0
    assert result.rank_biserial == 0.0


def test_relative_change_against_zero_is_infinite_and_serialises_as_null():
    assert relative(0.0, 0.0) == 0.0
    assert relative(1.0, 0.0) == math.inf
    assert relative(-1.0, 4.0) == -0.25
    result = compare_samples([1.0] * 10 + [2.0] * 10, [0.0] * 20)
    assert result.relative_shift == math.inf
    assert result.to_dict()["relative_shift"] is None


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        compare_samples([1.0], [1.0], direction="up")
    with pytest.raises(ValueError):
        compare_samples([1.0], [1.0], confidence=1.0)

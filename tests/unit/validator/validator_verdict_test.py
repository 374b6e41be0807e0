import copy
import json

import numpy as np
import pytest

from services.validator.judgement import (
    VERDICT_ORDER,
    judge_cycle,
    judge_metric,
    judge_run,
    longest_failing_streak,
    rejudge,
)
from services.validator.samples import CycleSamples, ReplicaResult
from services.validator.thresholds import Thresholds

SHA = "a" * 64
BASELINE = dict(loss=2.0, accuracy=0.40, latency=(100.0, 5.0), rss=800.0, error_rate=0.0)


def episodes(rng, n, *, loss, accuracy, latency, rss, error_rate):
    return {
        "mntp_loss": rng.normal(loss, 0.02, n).tolist(),
        "mntp_accuracy": rng.normal(accuracy, 0.01, n).tolist(),
        "latency_ms": rng.normal(latency[0], latency[1], n).tolist(),
        "rss_mb": rng.normal(rss, 5.0, n).tolist(),
        "errors": rng.binomial(1, error_rate, n).astype(float).tolist(),
    }


def raw_run(seed, *, cycles=3, replicas=3, episodes_per_cycle=40, candidate=None, candidate_by_cycle=None,
            crash=None):
    """Raw data as the replica runner writes it. ``crash`` = (cycle, replica index, episodes kept)."""
    rng = np.random.default_rng(seed)
    out = {"validation_id": "val-test", "adapter_sha256": SHA, "baseline": {"kind": "base", "adapter_sha256": None},
           "kind": "mntp", "cycles": []}
    for cycle in range(1, cycles + 1):
        cand = {**BASELINE, **(candidate or {}), **((candidate_by_cycle or {}).get(cycle, {}))}
        reps = []
        for side, params in (("candidate", cand), ("baseline", BASELINE)):
            for i in range(replicas):
                samples = episodes(rng, episodes_per_cycle, **params)
                incident = None
                if side == "candidate" and crash and crash[:2] == (cycle, i):
                    samples = {m: v[: crash[2]] for m, v in samples.items()}
                    incident = {"reason": "killed by the OOM killer"}
                reps.append({"replica_id": f"{side}-{i}", "side": side, "samples": samples, "incident": incident})
        out["cycles"].append({"cycle": cycle, "replicas": reps})
    return out


BETTER = dict(loss=1.8, accuracy=0.45)
MUCH_WORSE_LOSS = dict(loss=2.6)


def test_clearly_better_candidate_passes():
    verdict = rejudge(raw_run(1, candidate=BETTER), Thresholds())
    assert verdict.outcome == "pass", verdict.reason
    assert verdict.metrics["mntp_loss"].outcome == "better"
    assert verdict.metrics["mntp_accuracy"].outcome == "better"
    assert all(c.outcome == "pass" for c in verdict.cycles)
    assert verdict.reason.startswith("pass")
    assert verdict.score >= Thresholds().pass_score


def test_much_worse_loss_fails_by_critical_veto_even_with_better_accuracy():
    verdict = rejudge(raw_run(2, candidate={**MUCH_WORSE_LOSS, "accuracy": 0.5}), Thresholds())
    assert verdict.outcome == "fail"
    assert verdict.vetoes == ("mntp_loss",)
    assert all(c.vetoes == ("mntp_loss",) for c in verdict.cycles)
    assert "critical metric worse" in verdict.reason and "mntp_loss worse" in verdict.reason
    loss = verdict.metrics["mntp_loss"]
    assert loss.comparison.p_worse < 1e-6 and loss.comparison.shift_ci_low > 0.5


def test_wider_latency_spread_is_caught_by_the_shape_check_only():
    rng = np.random.default_rng(3)
    baseline = rng.normal(100.0, 5.0, 400)
    candidate = rng.normal(100.0, 10.0, 400)  # same median, 4x the variance
    spec = Thresholds().metrics["latency_ms"]
    verdict = judge_metric("latency_ms", candidate, baseline, spec)
    assert verdict.outcome == "worse"
    assert "worse in the tail" in verdict.reason and "KS" in verdict.reason
    assert verdict.comparison.p_worse > spec.alpha and verdict.comparison.p_better > spec.alpha
    without_shape = judge_metric("latency_ms", candidate, baseline, Thresholds().with_metric(
        "latency_ms", shape_check=False).metrics["latency_ms"])
    assert without_shape.outcome == "same"


def test_wider_latency_spread_in_a_run_marks_latency_worse():
    raw = raw_run(4, cycles=2, replicas=4, episodes_per_cycle=100, candidate={"latency": (100.0, 10.0)})
    verdict = rejudge(raw, Thresholds())
    assert verdict.metrics["latency_ms"].outcome == "worse"
    assert verdict.outcome != "pass"


def test_empty_samples_are_no_data_and_inconclusive_never_pass():
    empty = {"validation_id": "v", "adapter_sha256": SHA, "kind": "mntp", "cycles": [
        {"cycle": 1, "replicas": [
            {"replica_id": "c0", "side": "candidate", "samples": {}, "incident": {"reason": "never started"}},
            {"replica_id": "b0", "side": "baseline", "samples": {"mntp_loss": [2.0] * 50}, "incident": None},
        ]}]}
    verdict = rejudge(empty, Thresholds())
    assert verdict.outcome == "inconclusive"
    assert verdict.score is None
    assert all(mv.outcome == "no_data" for mv in verdict.metrics.values())
    assert "no data" in verdict.reason
    assert rejudge({**empty, "cycles": []}, Thresholds()).outcome == "inconclusive"
    assert judge_run([], Thresholds()).outcome == "inconclusive"


def test_missing_critical_metric_with_other_metrics_good_is_inconclusive():
    rng = np.random.default_rng(5)
    samples = {m: (rng.normal(10, 1, 50), rng.normal(12, 1, 50)) for m in ("latency_ms", "rss_mb")}
    cycle = judge_cycle(samples, Thresholds(), kind="mntp", cycle=1)
    assert cycle.metrics["mntp_loss"].outcome == "no_data"
    assert cycle.outcome == "inconclusive"
    # without a kind only the metrics present are judged
    assert judge_cycle(samples, Thresholds()).outcome == "pass"


def test_rejudge_is_repeatable_and_stricter_thresholds_never_loosen():
    # loss 0.75 % worse (below the 1 % minimum effect), accuracy clearly better
    raw = raw_run(6, candidate={"loss": 2.015, "accuracy": 0.42})
    before = json.dumps(raw, sort_keys=True)
    first = rejudge(raw, Thresholds())
    again = rejudge(copy.deepcopy(raw), Thresholds())
    assert json.dumps(raw, sort_keys=True) == before
    assert first.outcome == again.outcome == "pass"
    assert first.to_payload() == again.to_payload()
    assert first.metrics["mntp_loss"].outcome == "same"

    strict_effect = rejudge(raw, Thresholds().with_metric("mntp_loss", min_effect=0.002))
    assert strict_effect.outcome == "fail" and strict_effect.vetoes == ("mntp_loss",)
    strict_score = rejudge(raw, Thresholds.from_dict({"pass_score": 0.9}))
    assert strict_score.outcome == "inconclusive"
    for stricter in (strict_effect, strict_score):
        assert VERDICT_ORDER[stricter.outcome] < VERDICT_ORDER[first.outcome]
    assert strict_score.thresholds.pass_score == 0.9
    assert first.to_payload()["thresholds"] == Thresholds().to_dict()


def test_crashed_replica_shows_as_reduced_sample_size_and_incident():
    raw = raw_run(7, candidate=BETTER, crash=(2, 1, 10))
    verdict = rejudge(raw, Thresholds())
    assert verdict.sample_sizes["candidate"]["mntp_loss"] == 3 * 3 * 40 - 30
    assert verdict.sample_sizes["baseline"]["mntp_loss"] == 360
    assert verdict.replicas["candidate"] == {"replicas": 3, "with_incident": 1}
    assert [i.describe() for i in verdict.incidents] == [
        "cycle 2, candidate replica candidate-1: killed by the OOM killer"
    ]
    assert "candidate 330 vs baseline 360" in verdict.reason
    assert "incident" in verdict.reason and "OOM" in verdict.reason
    assert verdict.outcome == "pass"
    payload = verdict.to_payload()
    assert payload["sample_sizes"]["candidate"]["errors"] == 330
    assert payload["incidents"][0]["replica_id"] == "candidate-1"


def test_long_soak_fails_only_after_consecutive_failing_cycles():
    thresholds = Thresholds()  # consecutive_failures = 3
    bad = {c: MUCH_WORSE_LOSS for c in (2, 3, 5)}
    scattered = rejudge(raw_run(8, cycles=6, candidate=BETTER, candidate_by_cycle=bad), thresholds)
    assert [c.outcome for c in scattered.cycles] == ["pass", "fail", "fail", "pass", "fail", "pass"]
    assert scattered.longest_failing_streak == 2
    assert scattered.outcome != "fail"

    bad = {c: MUCH_WORSE_LOSS for c in (2, 3, 4)}
    streak = rejudge(raw_run(8, cycles=6, candidate=BETTER, candidate_by_cycle=bad), thresholds)
    assert streak.outcome == "fail"
    assert streak.longest_failing_streak == 3
    assert "3 consecutive failing cycles (2, 3, 4)" in streak.reason


def test_short_run_is_judged_on_its_pooled_samples():
    verdict = rejudge(raw_run(9, cycles=2, candidate=MUCH_WORSE_LOSS), Thresholds())
    assert verdict.outcome == "fail"


def test_long_soak_with_pooled_regression_but_no_streak_is_not_a_pass():
    bad = {c: MUCH_WORSE_LOSS for c in (1, 3, 5)}
    verdict = rejudge(raw_run(10, cycles=5, candidate_by_cycle=bad), Thresholds())
    assert verdict.pooled.outcome == "fail"
    assert verdict.outcome == "inconclusive"
    assert "no 3 consecutive cycles failed" in verdict.reason


def test_streak_is_not_broken_by_inconclusive_cycles():
    assert longest_failing_streak(["fail", "inconclusive", "fail", "fail", "pass", "fail"]) == 3
    assert longest_failing_streak(["fail", "marginal", "fail"]) == 1
    assert longest_failing_streak([]) == 0


def test_errors_appearing_in_some_episodes_veto():
    raw = raw_run(11, candidate={**BETTER, "error_rate": 0.3})
    verdict = rejudge(raw, Thresholds())
    assert verdict.metrics["errors"].outcome == "worse"
    assert verdict.outcome == "fail"


def test_raw_data_shape_errors_are_reported():
    with pytest.raises(ValueError):
        rejudge({"kind": "mntp"}, Thresholds())
    with pytest.raises(ValueError):
        rejudge({"kind": "vision", "cycles": []}, Thresholds())
    with pytest.raises(ValueError):
        CycleSamples.from_raw({"cycle": 1, "replicas": [{"side": "candidate", "samples": {}}]})
    with pytest.raises(ValueError):
        ReplicaResult.from_dict({"replica_id": "x", "side": "middle", "samples": {}})

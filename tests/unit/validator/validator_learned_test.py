"""Adapters judged on what they learned: an RL adapter against the adapter it started from, with its own
reward and settings, failing when its policy collapsed; an MNTP adapter also as an encoder."""

from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from services.validator.domain import Baseline, RunFinished, decide, evolve, initial_state
from services.validator.judgement import COLLAPSE_VETO, rejudge
from services.validator.thresholds import Thresholds
from shared.contracts.schemas import validate_payload

SHA, PARENT, PROD = "a" * 64, "b" * 64, "c" * 64
T0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)


@dataclass
class Event:
    type: str
    payload: dict
    aggregate_id: str = "agg"
    occurred_at: datetime = field(default=T0)


def trained(kind="rl", **overrides):
    payload = {"job_id": "job-1", "cycle_id": "cyc-1", "status": "trained", "kind": kind,
               "adapter_uri": f"artefact://sha256/{SHA}", "adapter_sha256": SHA,
               "config": {"reward": "digits_only", "temperature": 0.7, "max_new_tokens": 6, "steps": 4,
                          "learning_rate": 0.02},
               "warm_start": PARENT, **overrides}
    return Event("training.completed", payload, aggregate_id="job-1")


def production_state():
    promoted = Event("adapter.promoted", {"adapter_sha256": PROD, "adapter_uri": f"artefact://sha256/{PROD}",
                                          "kind": "rl", "channel": "production"})
    return evolve(initial_state(), promoted)


def test_an_rl_adapter_is_soaked_against_the_adapter_it_started_from_with_its_own_reward():
    [started] = decide(trained(), production_state())
    validate_payload("validation.started", 1, started.payload)
    assert started.payload["baseline"] == Baseline("parent", PARENT, f"artefact://sha256/{PARENT}").to_dict()
    assert started.payload["evaluation"] == {"reward": "digits_only", "temperature": 0.7, "max_new_tokens": 6}


def test_a_run_without_a_dataset_is_soaked_on_the_prompt_set_it_trained_on():
    [started] = decide(trained(prompt_set="reward:digits_only:v1", dataset_uri=None), initial_state())
    validate_payload("validation.started", 1, started.payload)
    assert started.payload["evaluation"]["prompt_set"] == "reward:digits_only:v1"


def test_an_rl_adapter_trained_from_scratch_is_soaked_against_production_and_mntp_carries_no_evaluation():
    [rl] = decide(trained(warm_start=None), production_state())
    assert rl.payload["baseline"]["kind"] == "production"
    [mntp] = decide(trained(kind="mntp"), initial_state())
    assert mntp.payload["baseline"]["kind"] == "base" and "evaluation" not in mntp.payload


def raw(candidate, baseline, cycles=2, replicas=2, kind="rl"):
    """Raw data whose every replica reports ``candidate``/``baseline`` samples (metric -> (mean, sd))."""
    rng = np.random.default_rng(7)
    out = []
    for c in range(1, cycles + 1):
        reps = []
        for side, spec in (("candidate", candidate), ("baseline", baseline)):
            for i in range(replicas):
                samples = {m: np.clip(rng.normal(mu, sd, 15), 0, None).tolist() for m, (mu, sd) in spec.items()}
                samples.update(latency_ms=rng.normal(100, 3, 15).tolist(), rss_mb=rng.normal(800, 3, 15).tolist(),
                               errors=[0.0] * 15)
                reps.append({"replica_id": f"{side}-{i}", "side": side, "samples": samples, "incident": None})
        out.append({"cycle": c, "replicas": reps})
    return {"validation_id": "val-1", "adapter_sha256": SHA, "baseline": {"kind": "parent"}, "kind": kind,
            "cycles": out}


HEALTHY = {"reward": (0.5, 0.05), "reward_spread": (0.2, 0.02), "distinct_share": (0.9, 0.05)}
COLLAPSED = {"reward": (0.95, 0.01), "reward_spread": (0.0, 0.0), "distinct_share": (0.05, 0.0)}


def test_a_collapsed_policy_fails_however_high_its_reward():
    verdict = rejudge(raw(COLLAPSED, HEALTHY), Thresholds())
    assert verdict.outcome == "fail"
    assert COLLAPSE_VETO in verdict.vetoes and "policy collapsed" in verdict.reason
    assert verdict.metrics["reward"].outcome == "better"  # the reward alone would have passed it
    payload = verdict.to_payload()
    assert payload["policy"]["collapsed"] is True
    assert payload["policy"]["candidate"]["distinct_share"] < 0.1


def test_a_collapse_fails_a_long_soak_without_a_streak_of_failing_cycles():
    thresholds = Thresholds(consecutive_failures=3)
    verdict = rejudge(raw(COLLAPSED, HEALTHY, cycles=4), thresholds)
    assert verdict.outcome == "fail"


def test_a_policy_that_learned_passes_and_the_verdict_carries_both_sides():
    better = {**HEALTHY, "reward": (0.8, 0.05)}
    verdict = rejudge(raw(better, HEALTHY), Thresholds())
    assert verdict.outcome == "pass"
    policy = verdict.to_payload()["policy"]
    assert policy["collapsed"] is False and policy["collapse_reason"] is None
    assert policy["candidate"]["reward_mean"] > policy["baseline"]["reward_mean"]


ENCODER = {"mntp_loss": (2.0, 0.02), "mntp_accuracy": (0.4, 0.01)}


def test_an_encoder_that_finds_related_text_worse_fails_even_with_a_better_loss():
    candidate = {**ENCODER, "mntp_loss": (1.8, 0.02), "retrieval_recall_at_1": (0.2, 0.05),
                 "retrieval_mrr": (0.35, 0.05)}
    baseline = {**ENCODER, "retrieval_recall_at_1": (0.7, 0.05), "retrieval_mrr": (0.8, 0.05)}
    verdict = rejudge(raw(candidate, baseline, kind="mntp"), Thresholds())
    assert verdict.outcome == "fail"
    assert set(verdict.vetoes) == {"retrieval_recall_at_1", "retrieval_mrr"}


def test_an_encoder_within_the_tolerance_passes_and_the_verdict_carries_its_retrieval():
    # a loss of 0.05 in both is significant here, and within the default tolerance of 0.1
    candidate = {**ENCODER, "mntp_loss": (1.8, 0.02), "retrieval_recall_at_1": (0.55, 0.02),
                 "retrieval_mrr": (0.65, 0.02)}
    baseline = {**ENCODER, "retrieval_recall_at_1": (0.6, 0.02), "retrieval_mrr": (0.7, 0.02)}
    verdict = rejudge(raw(candidate, baseline, kind="mntp"), Thresholds())
    assert verdict.outcome == "pass", verdict.reason
    assert verdict.metrics["retrieval_mrr"].outcome == "same" and verdict.metrics["retrieval_mrr"].comparison.p_worse < 0.01
    stricter = Thresholds.from_dict({"metrics": {"retrieval_mrr": {"min_effect": 0.02}}})
    assert rejudge(raw(candidate, baseline, kind="mntp"), stricter).outcome == "fail"
    retrieval = verdict.to_payload()["retrieval"]
    assert retrieval["candidate"]["episodes"] == 60 and 0.55 < retrieval["baseline"]["recall_at_1"] < 0.65


def test_the_tolerance_comes_from_the_thresholds_file_and_is_stored_with_the_verdict():
    thresholds = Thresholds.from_dict({"metrics": {"retrieval_mrr": {"min_effect": 0.9}},
                                       "collapse_max_distinct_share": 0.1})
    assert thresholds.metrics["retrieval_mrr"].min_effect == 0.9
    assert Thresholds.restore(thresholds.to_dict()) == thresholds


def test_verdicts_with_the_new_evidence_are_valid_validation_completed_payloads():
    state = evolve(initial_state(), Event("validation.started", decide(trained(), initial_state())[0].payload))
    for data in (raw(COLLAPSED, HEALTHY), raw({**ENCODER, "retrieval_mrr": (0.5, 0.1)}, ENCODER, kind="mntp")):
        [completed] = decide(RunFinished("val-" + SHA[:16], {**data, "validation_id": "val-" + SHA[:16]},
                                         "artefact://raw"), state)
        validate_payload("validation.completed", 1, completed.payload)

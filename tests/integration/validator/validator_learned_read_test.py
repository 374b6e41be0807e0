"""What an adapter learned, as the registry shows it: an RL run's reward curve, a soak's reward and an
encoder's retrieval per cycle and in its verdict, and `neurons validate show`'s lines for them (the
registry's real handler on real SQL, every event signed and archived)."""

from __future__ import annotations

import pytest

from cli.demo_cmds import _retrieval_change
from cli.registry_cmds import learned_lines
from services.registry import queries
from tests.support import make_event
from tests.unit.registry.registry_harness import Registry, adapter_sha, trainer_event

SHA, PARENT = adapter_sha(41), adapter_sha(42)
THRESHOLDS = {"metrics": {}, "groups": {}, "pass_score": 0.6, "marginal_score": 0.4, "consecutive_failures": 2,
              "min_samples": 5}


@pytest.fixture
def registry(tmp_path):
    return Registry(tmp_path / "var")


def rl_run(job: str, sha: str) -> list:
    progress = [trainer_event("training.progressed", job, {
        "job_id": job, "cycle_id": "cyc-rl", "step": step, "total_steps": 3, "loss": 0.1, "learning_rate": 0.02,
        "reward_mean": 0.2 * step, "reward_std": 0.3 / step, "kl": 0.01 * step, "distinct_share": 1.0 - 0.1 * step,
        "tokens_per_s": 10.0, "energy_j": None}, sequence=1 + step) for step in (1, 2, 3)]
    completed = trainer_event("training.completed", job, {
        "job_id": job, "cycle_id": "cyc-rl", "adapter_uri": f"artefact://sha256/{sha}", "adapter_sha256": sha,
        "status": "trained", "fallback_reason": None, "kind": "rl",
        "metrics": {"before": {"reward_mean": 0.2}, "after": {"reward_mean": 0.6}}, "duration_s": 3.0,
        "energy": None, "base_model": "tiny", "base_model_checksum": None, "dataset_sha256": None,
        "config": {"reward": "digits_only", "steps": 3}, "warm_start": PARENT}, sequence=5)
    return [trainer_event("training.started", job, {"job_id": job, "cycle_id": "cyc-rl", "kind": "rl", "model": "tiny",
                                                    "dataset_sha256": None, "config": {}, "resumed_from_step": None}),
            *progress, completed]


def soak(validation: str, sha: str, kind: str, medians: dict, evidence: dict) -> list:
    identity = {"validation_id": validation, "adapter_sha256": sha, "adapter_uri": f"artefact://sha256/{sha}",
                "kind": kind, "purpose": "candidate", "cycle_id": "cyc-rl",
                "baseline": {"kind": "parent", "adapter_sha256": PARENT, "adapter_uri": f"artefact://sha256/{PARENT}"}}
    metrics = {name: {"metric": name, "outcome": "same", "reason": "", "critical": True, "n_candidate": 10,
                      "n_baseline": 10, "no_data": False, "candidate_median": c, "baseline_median": b}
               for name, (c, b) in medians.items()}
    return [
        make_event("validation.started", validation, {**identity, "replicas": 1, "cycles": 1, "episodes": 10},
                   service="validator"),
        make_event("validation.cycle_completed", validation, {
            "validation_id": validation, "cycle": 1, "outcome": "pass", "score": 0.7, "metrics": metrics,
            "vetoes": [], "reason": "", "incidents": [], "failing_streak": 0, "stop_early": False, "replicas": []},
            sequence=2, service="validator"),
        make_event("validation.completed", validation, {
            **identity, "verdict": "pass", "explanation": "pass", "score": 0.7, "raw_data_uri": None,
            "sample_sizes": {"candidate": {}, "baseline": {}}, "thresholds": THRESHOLDS, **evidence},
            sequence=3, service="validator"),
    ]


def test_an_rl_runs_reward_curve_and_its_soaks_policy_evidence_are_shown(registry):
    policy = {"candidate": {"reward_mean": 0.6, "reward_spread": 0.2, "distinct_share": 0.9, "episodes": 10},
              "baseline": {"reward_mean": 0.2, "reward_spread": 0.3, "distinct_share": 1.0, "episodes": 10},
              "collapsed": False, "collapse_reason": None}
    registry.feed(*rl_run("job-rl", SHA), *soak("val-rl", SHA, "rl", {"reward": (0.6, 0.2)}, {"policy": policy}))

    with registry.session() as session:
        [run] = queries.training_runs(session)
        snap = queries.snapshot(session, "val-rl")

    assert [p["reward_mean"] for p in run["reward_curve"]] == pytest.approx([0.2, 0.4, 0.6])
    assert run["reward_curve"][-1] == pytest.approx({"step": 3, "reward_mean": 0.6, "reward_spread": 0.1,
                                                     "kl": 0.03, "distinct_share": 0.7})
    assert snap["reward_curve"] == run["reward_curve"]
    assert snap["policy"] == policy and snap["retrieval"] is None
    assert snap["cycles"][0]["measured"] == {"reward": {"candidate": 0.6, "baseline": 0.2}}
    lines = learned_lines(snap)
    assert lines[0].startswith("policy       reward 0.200 -> 0.600") and "not collapsed" in lines[0]
    assert lines[1].startswith("reward curve 1: 0.200±0.30 kl 0.010 distinct 90%")


def test_an_encoders_retrieval_is_shown_for_both_sides(registry):
    retrieval = {"candidate": {"recall_at_1": 0.75, "mrr": 0.85, "episodes": 10},
                 "baseline": {"recall_at_1": 0.5, "mrr": 0.7, "episodes": 10}}
    registry.feed(*soak("val-enc", SHA, "mntp", {"retrieval_recall_at_1": (0.75, 0.5), "mntp_loss": (1.0, 2.0)},
                        {"retrieval": retrieval}))

    with registry.session() as session:
        snap = queries.snapshot(session, "val-enc")
        [listed] = queries.dashboard(session)["validations"]

    assert snap["retrieval"] == retrieval and listed["retrieval"] == retrieval
    assert snap["cycles"][0]["measured"] == {"retrieval_recall_at_1": {"candidate": 0.75, "baseline": 0.5}}
    assert learned_lines(snap) == [
        "retrieval    recall@1 0.500 -> 0.750  MRR 0.700 -> 0.850  (baseline -> candidate)"]
    # the demo's summary row, before (the base model) -> after (the adapter)
    assert _retrieval_change({"validation_id": "val-enc"}, registry.settings) == \
        "recall@1 0.500 -> 0.750, MRR 0.700 -> 0.850 (before -> after)"

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from services.validator.domain import (
    AbandonRun,
    Baseline,
    CycleFinished,
    RunFinished,
    StartDriftSoak,
    decide,
    evolve,
    initial_state,
)
from services.validator.soak_plan import SoakPlan, blocking_drift_run
from shared.contracts.schemas import validate_payload

SHA = "c" * 64
PROD_SHA = "d" * 64
T0 = datetime(2025, 3, 4, 14, 3, tzinfo=timezone.utc)


@dataclass
class Event:
    type: str
    payload: dict
    aggregate_id: str = "agg"
    occurred_at: datetime = field(default=T0)


def training_completed(**overrides):
    payload = {"training_id": "tr-1", "cycle_id": "cyc-1", "status": "trained", "fallback": False,
               "adapter_uri": "file:///var/artefacts/a.safetensors", "adapter_sha256": SHA, "kind": "mntp"}
    return Event("training.completed", {**payload, **overrides}, aggregate_id="tr-1")


def apply(state, events, at=T0):
    for e in events:
        validate_payload(e.type, 1, e.payload)
        state = evolve(state, Event(e.type, e.payload, e.aggregate_id, at))
    return state


def replicas(seed, *, loss_shift=0.0, crash=False):
    rng = np.random.default_rng(seed)
    out = []
    for side in ("candidate", "baseline"):
        for i in range(2):
            n = 5 if (crash and side == "candidate" and i == 0) else 30
            shift = loss_shift if side == "candidate" else 0.0
            out.append({
                "replica_id": f"{side}-{i}", "side": side,
                "samples": {
                    "mntp_loss": rng.normal(2.0 + shift, 0.02, n).tolist(),
                    "mntp_accuracy": rng.normal(0.4 - shift / 10, 0.01, n).tolist(),
                    "latency_ms": rng.normal(100, 5, n).tolist(),
                    "rss_mb": rng.normal(800, 5, n).tolist(),
                    "errors": [0.0] * n,
                },
                "incident": {"reason": "segfault"} if (crash and side == "candidate" and i == 0) else None,
                "load": {"cpu_percent": 88.0} if side == "baseline" else None,
            })
    return out


def test_trained_adapter_starts_a_run_against_the_base_model_then_production():
    events = decide(training_completed(), initial_state())
    assert [e.type for e in events] == ["validation.started"]
    started = events[0]
    validate_payload("validation.started", 1, started.payload)
    assert started.aggregate_type == "validation" and started.aggregate_id == started.payload["validation_id"]
    assert started.payload["baseline"] == {"kind": "base", "adapter_sha256": None, "adapter_uri": None}
    assert started.payload["purpose"] == "candidate" and started.payload["kind"] == "mntp"
    plan = SoakPlan()
    assert (started.payload["replicas"], started.payload["cycles"], started.payload["episodes"]) == (
        plan.replicas, plan.cycles, plan.episodes)

    promoted = Event("adapter.promoted", {"adapter_sha256": PROD_SHA, "adapter_uri": "file:///prod", "kind": "mntp"})
    state = evolve(initial_state(), promoted)
    baseline = decide(training_completed(), state)[0].payload["baseline"]
    assert baseline == {"kind": "production", "adapter_sha256": PROD_SHA, "adapter_uri": "file:///prod"}
    rl = decide(training_completed(kind="rl"), state)[0].payload
    assert rl["baseline"]["kind"] == "base" and rl["kind"] == "rl"


@pytest.mark.parametrize("advice, per_side", [(None, 3), (0, 1), (1, 1), (2, 1), (3, 1), (4, 2), (6, 3), (16, 3)])
def test_a_soak_fits_its_replicas_and_their_twins_in_the_advice(advice, per_side):
    plan = SoakPlan(replicas=3, episodes=4).fitted(advice, min_samples=10)
    # a candidate replica and its baseline twin are two processes: 2 x per_side fit the advice
    assert plan.replicas == per_side
    assert advice is None or advice < 2 or 2 * plan.replicas <= advice
    # fewer replicas run more episodes, so each side still gathers the samples a verdict needs
    assert plan.replicas * plan.episodes >= 10 and plan.episodes >= 4
    assert (plan.cycles, plan.drift_stale_after_s) == (SoakPlan().cycles, SoakPlan().drift_stale_after_s)


def test_a_run_names_the_advice_its_soak_was_sized_to():
    advised = SoakPlan(replicas=3, episodes=4).fitted(4, min_samples=10, advice_event_id="evt-scaling-1")
    state = replace(initial_state(), plan=advised)
    started = decide(training_completed(), state)[0].payload
    validate_payload("validation.started", 1, started)
    assert started["sized_by"] == {"event_id": "evt-scaling-1", "validator_replicas": 4}
    assert started["replicas"] == 2
    # an energy budget used up (advice 0): the smallest soak, one replica of each side
    spent = decide(training_completed(), replace(initial_state(), plan=SoakPlan().fitted(0, 10, "evt-3")))[0].payload
    validate_payload("validation.started", 1, spent)
    assert spent["sized_by"] == {"event_id": "evt-3", "validator_replicas": 0} and spent["replicas"] == 1
    # no advice yet: the run is planned as configured and says so
    for plan in (SoakPlan(), SoakPlan().fitted(None, 10, "evt-scaling-2")):
        payload = decide(training_completed(), replace(initial_state(), plan=plan))[0].payload
        validate_payload("validation.started", 1, payload)
        assert payload["sized_by"] is None and payload["replicas"] == plan.replicas == SoakPlan().replicas


@pytest.mark.parametrize("overrides", [{"fallback": True}, {"status": "failed"}, {"status": "cancelled"}])
def test_fallback_or_unsuccessful_training_starts_nothing(overrides):
    assert decide(training_completed(**overrides), initial_state()) == []


def test_duplicate_training_completed_does_not_start_a_second_run():
    state = apply(initial_state(), decide(training_completed(), initial_state()))
    assert decide(training_completed(), state) == []
    assert decide(training_completed(training_id="tr-2", cycle_id="cyc-2"), state) == []


def test_other_events_are_ignored():
    assert decide(Event("energy.reported", {}), initial_state()) == []


def test_cycles_then_run_finish_with_payloads_that_validate():
    state = apply(initial_state(), decide(training_completed(), initial_state()))
    vid = next(iter(state.runs))
    events = decide(CycleFinished(vid, 1, replicas(1, loss_shift=-0.2, crash=True)), state)
    assert [e.type for e in events] == ["validation.cycle_completed"]
    cycle = events[0].payload
    validate_payload("validation.cycle_completed", 1, cycle)
    assert cycle["outcome"] == "pass" and cycle["stop_early"] is False
    assert cycle["metrics"]["mntp_loss"]["n_candidate"] == 35 and cycle["metrics"]["mntp_loss"]["n_baseline"] == 60
    assert cycle["incidents"] == [{"cycle": 1, "replica_id": "candidate-0", "side": "candidate", "reason": "segfault"}]
    loads = {r["replica_id"]: r for r in cycle["replicas"]}
    assert loads["candidate-0"]["episodes"] == 5 and loads["candidate-0"]["incident"] == "segfault"
    assert loads["baseline-0"]["cpu_percent"] == 88.0 and loads["candidate-1"]["rss_mb"] > 780
    state = apply(state, events)
    assert decide(CycleFinished(vid, 1, replicas(1)), state) == []  # redelivered

    raw = {"validation_id": vid, "adapter_sha256": SHA, "baseline": {"kind": "base", "adapter_sha256": None},
           "kind": "mntp", "cycles": [{"cycle": 1, "replicas": replicas(1, loss_shift=-0.2, crash=True)},
                                      {"cycle": 2, "replicas": replicas(2, loss_shift=-0.2)}]}
    done = decide(RunFinished(vid, raw, "file:///var/validation/raw.json"), state)
    assert [e.type for e in done] == ["validation.completed"]
    payload = done[0].payload
    validate_payload("validation.completed", 1, payload)
    assert payload["verdict"] == "pass"
    assert payload["raw_data_uri"] == "file:///var/validation/raw.json"
    assert payload["sample_sizes"]["candidate"]["mntp_loss"] == 95
    assert payload["sample_sizes"]["baseline"]["mntp_loss"] == 120
    assert payload["thresholds"]["consecutive_failures"] == 3
    assert "segfault" in payload["explanation"]
    state = apply(state, done)
    assert state.runs[vid].status == "completed" and state.runs[vid].verdict == "pass"
    assert decide(RunFinished(vid, raw, "file:///again"), state) == []
    assert decide(CycleFinished(vid, 3, replicas(3)), state) == []


def test_consecutive_failing_cycles_ask_the_runner_to_stop_early():
    state = apply(initial_state(), decide(training_completed(), initial_state()))
    vid = next(iter(state.runs))
    streaks = []
    for cycle in (1, 2, 3):
        events = decide(CycleFinished(vid, cycle, replicas(cycle, loss_shift=0.5)), state)
        state = apply(state, events)
        streaks.append((events[0].payload["failing_streak"], events[0].payload["stop_early"]))
    assert streaks == [(1, False), (2, False), (3, True)]


def test_run_finished_refuses_raw_data_of_another_run():
    state = apply(initial_state(), decide(training_completed(), initial_state()))
    vid = next(iter(state.runs))
    with pytest.raises(ValueError):
        decide(RunFinished(vid, {"validation_id": "other", "adapter_sha256": SHA, "cycles": []}, "u"), state)
    with pytest.raises(ValueError):
        decide(RunFinished(vid, {"validation_id": vid, "adapter_sha256": "e" * 64, "cycles": []}, "u"), state)
    with pytest.raises(ValueError):
        decide(CycleFinished("nope", 1, []), state)


def test_abandoned_run_completes_inconclusive():
    state = apply(initial_state(), decide(training_completed(), initial_state()))
    vid = next(iter(state.runs))
    events = decide(AbandonRun(vid, "node lost"), state)
    validate_payload("validation.completed", 1, events[0].payload)
    assert events[0].payload["verdict"] == "inconclusive" and events[0].payload["raw_data_uri"] is None
    assert "node lost" in events[0].payload["explanation"]


def drift(at, **kw):
    return StartDriftSoak(adapter_sha256=PROD_SHA, adapter_uri="file:///prod", kind="mntp", requested_at=at, **kw)


def test_one_active_drift_run_per_adapter_and_a_failing_run_never_blocks_the_next():
    state = initial_state()
    first = decide(drift(T0), state)
    assert [e.type for e in first] == ["validation.started"]
    assert first[0].payload["purpose"] == "drift" and first[0].payload["baseline"]["kind"] == "base"
    state = apply(state, first)
    vid = first[0].aggregate_id
    assert decide(drift(T0), state) == []  # same request redelivered
    assert decide(drift(T0 + timedelta(minutes=30)), state) == []  # still running
    assert blocking_drift_run(state, PROD_SHA, T0 + timedelta(minutes=30)).validation_id == vid
    other = StartDriftSoak(adapter_sha256="f" * 64, adapter_uri="u", kind="rl", requested_at=T0)
    assert len(decide(other, state)) == 1  # another adapter is not blocked

    failed = Event("validation.completed", {"validation_id": vid, "verdict": "fail"})
    state = evolve(state, failed)
    assert blocking_drift_run(state, PROD_SHA, T0 + timedelta(hours=1)) is None
    later = decide(drift(T0 + timedelta(hours=1)), state)
    assert [e.type for e in later] == ["validation.started"]
    assert later[0].aggregate_id != vid


def test_a_silent_drift_run_is_closed_when_the_next_is_due():
    state = initial_state(plan=SoakPlan(drift_stale_after_s=3600))
    state = apply(state, decide(drift(T0), state))
    stuck = next(iter(state.runs))
    events = decide(drift(T0 + timedelta(hours=2)), state)
    assert [e.type for e in events] == ["validation.completed", "validation.started"]
    assert events[0].aggregate_id == stuck and events[0].payload["verdict"] == "inconclusive"
    assert "superseded" in events[0].payload["explanation"]
    for e in events:
        validate_payload(e.type, 1, e.payload)
    state = apply(state, events)
    assert not state.runs[stuck].active


def test_drift_run_with_production_baseline_and_explicit_id():
    cmd = drift(T0, baseline=Baseline("production", "e" * 64, "file:///older"), validation_id="drift-x",
                cycle_id="research-7")
    (started,) = decide(cmd, initial_state())
    validate_payload("validation.started", 1, started.payload)
    assert started.aggregate_id == "drift-x" and started.payload["cycle_id"] == "research-7"
    assert started.payload["started_at"] == "2025-03-04T14:03:00Z"

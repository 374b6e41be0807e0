"""Given events, when a job finishes or hardware is profiled, then these energy events."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from services.energy.domain import (
    BUDGET_EXCEEDED,
    ENERGY_REPORTED,
    HARDWARE_PROFILED,
    SCALING_RECOMMENDED,
    BudgetWindow,
    EnergyConfig,
    ProfileHardware,
    RecommendScaling,
    budget_status,
    decide,
    evolve,
    initial_state,
    parse_budgets,
    recommend_scaling,
)
from shared.contracts.schemas import validate_payload

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=timezone.utc)
GiB = 2**30


@dataclass
class Event:
    type: str
    aggregate_id: str
    payload: dict[str, Any] = field(default_factory=dict)
    occurred_at: datetime = T0


def completed(job_id: str, joules: float | None, at: datetime = T0, kind: str = "training", **extra) -> Event:
    energy = {
        "joules": joules,
        "method": "rapl" if joules is not None else None,
        "components": [{"name": "package-0", "joules": joules, "method": "rapl"}] if joules is not None else [],
        "duration_s": 60.0,
        "cpu_s": 50.0,
        "reason": None if joules is not None else "no energy source: RAPL: not readable",
    }
    payload = {"job_id": job_id, "cycle_id": "cycle-1", "energy": energy, **extra}
    return Event(f"{kind}.completed", job_id, payload, at)


def run(state, message, config):
    """decide, then evolve the state by what was decided (as the service does)."""
    events = decide(message, state, config)
    for event in events:
        state = evolve(state, Event(event.type, event.aggregate_id, event.payload, getattr(message, "occurred_at", T0)))
    return state, events


def wh(x: float) -> float:
    return x * 3600.0


def test_training_completed_is_reported_in_joules_wh_and_co2():
    config = EnergyConfig(carbon_intensity_g_per_kwh=400.0, pue=1.2)
    events = decide(completed("train-1", 3.6e6), initial_state(config), config)
    assert [e.type for e in events] == [ENERGY_REPORTED]
    report = events[0].payload
    assert events[0].aggregate_id == "train-1"
    assert report["job_kind"] == "training" and report["cycle_id"] == "cycle-1"
    assert report["joules"] == pytest.approx(3.6e6)
    assert report["wh"] == pytest.approx(1000.0)
    assert report["gco2e"] == pytest.approx(1.0 * 1.2 * 400.0)
    assert report["methods"] == {"package-0": "rapl"}
    assert report["window"]["ended_at"] == "2026-03-02T08:00:00Z"
    assert report["window"]["started_at"] == "2026-03-02T07:59:00Z"
    validate_payload(ENERGY_REPORTED, 1, report)


def test_validation_completed_is_reported_as_validation():
    config = EnergyConfig()
    event = Event("validation.completed", "val-9", {"validation_id": "val-9", "energy": {"joules": 10.0, "method": "model", "components": [], "reason": "CPU modelled"}})
    report = decide(event, initial_state(config), config)[0].payload
    assert report["job_kind"] == "validation" and report["job_id"] == "val-9"
    assert report["method"] == "model" and report["reason"] == "CPU modelled"
    validate_payload(ENERGY_REPORTED, 1, report)


@pytest.mark.parametrize(
    "payload, why",
    [
        ({"job_id": "j", "energy": None}, "no reading"),
        ({"job_id": "j"}, "no energy reading"),
        ({"job_id": "j", "energy": {"joules": None, "reason": "RAPL unreadable"}}, "RAPL unreadable"),
        ({"job_id": "j", "energy": {"joules": -5.0}}, "impossible"),
    ],
)
def test_missing_energy_is_null_with_a_reason_never_zero(payload, why):
    config = EnergyConfig(budgets=(BudgetWindow("24h", timedelta(hours=24), 0.0),))
    events = decide(Event("training.completed", "j", payload), initial_state(config), config)
    assert [e.type for e in events] == [ENERGY_REPORTED]  # and no budget event, even at a 0 Wh budget
    report = events[0].payload
    assert report["joules"] is None and report["wh"] is None and report["gco2e"] is None
    assert why in report["reason"]
    validate_payload(ENERGY_REPORTED, 1, report)


def test_a_job_is_reported_once_even_when_its_completion_is_delivered_twice():
    config = EnergyConfig()
    state, first = run(initial_state(config), completed("train-1", 100.0), config)
    _, again = run(state, completed("train-1", 100.0), config)
    assert len(first) == 1 and again == []


def test_budget_crossing_is_raised_once_per_crossing():
    config = EnergyConfig(budgets=parse_budgets("24h=100"))
    state = initial_state(config)
    emitted = []
    for i, hours in enumerate([0, 1, 2, 3, 4]):
        state, events = run(state, completed(f"j{i}", wh(40), T0 + timedelta(hours=hours)), config)
        emitted.append([e for e in events if e.type == BUDGET_EXCEEDED])
    assert [len(e) for e in emitted] == [0, 0, 1, 0, 0]
    crossing = emitted[2][0].payload
    assert crossing["window"] == "24h" and crossing["budget_wh"] == 100.0
    assert crossing["used_wh"] == pytest.approx(120.0)
    assert crossing["crossed_at"] == "2026-03-02T10:00:00Z"
    # Dropping the 40 Wh of 08:00 brings it back to 80 Wh, within budget, a day later.
    assert crossing["until"] == "2026-03-03T08:00:00Z"
    validate_payload(BUDGET_EXCEEDED, 1, crossing)

    # Once the window has emptied, the next crossing is a new one.
    later = T0 + timedelta(hours=40)
    news = []
    for i in range(3):
        state, events = run(state, completed(f"k{i}", wh(40), later + timedelta(minutes=i)), config)
        news += [e for e in events if e.type == BUDGET_EXCEEDED]
    assert len(news) == 1


def test_each_window_crosses_on_its_own():
    config = EnergyConfig(budgets=parse_budgets("12h=50,24h=100"))
    state = initial_state(config)
    windows = []
    for i, hours in enumerate([0, 13, 14, 15]):
        state, events = run(state, completed(f"j{i}", wh(30), T0 + timedelta(hours=hours)), config)
        windows += [e.payload["window"] for e in events if e.type == BUDGET_EXCEEDED]
    # 12h: 30+30 at 13h-14h crosses; 24h: 30x4 = 120 at 15h crosses.
    assert windows == ["12h", "24h"]


def test_budget_status_for_the_gate():
    config = EnergyConfig(budgets=parse_budgets("12h=50,24h=100"))
    state = initial_state(config)
    for i, hours in enumerate([0, 11]):
        state, _ = run(state, completed(f"j{i}", wh(30), T0 + timedelta(hours=hours)), config)
    state, _ = run(state, completed("unknown", None, T0 + timedelta(hours=11, minutes=5)), config)
    status = budget_status(state, T0 + timedelta(hours=11, minutes=30))
    assert status["12h"]["used_wh"] == pytest.approx(60.0)
    assert status["12h"]["exceeded"] is True
    assert status["12h"]["until"] == "2026-03-02T20:00:00Z"
    assert status["12h"]["unmeasured_jobs"] == 1
    assert status["24h"] == {
        "used_wh": pytest.approx(60.0),
        "budget_wh": 100.0,
        "remaining_wh": pytest.approx(40.0),
        "exceeded": False,
        "until": None,
        "unmeasured_jobs": 1,
        "window_s": 86400.0,
    }
    later = budget_status(state, T0 + timedelta(hours=13))
    assert later["12h"]["used_wh"] == pytest.approx(30.0) and not later["12h"]["exceeded"]


def test_parse_budgets_rejects_nonsense():
    assert parse_budgets("") == ()
    assert parse_budgets("90m=5")[0].span == timedelta(minutes=90)
    for bad in ("24h", "24x=5", "24h=lots", "24h=-1", "24h=1,24h=2"):
        with pytest.raises(ValueError):
            parse_budgets(bad)


# --- scaling --------------------------------------------------------------------

SMALL = {"cores": 4, "memory_total_bytes": 8 * GiB, "memory_available_bytes": 6 * GiB, "gpus": [], "load_avg": [0.0, 0.0, 0.0], "cpu_model": "x"}
BIG = {**SMALL, "cores": 32, "memory_total_bytes": 128 * GiB, "memory_available_bytes": 120 * GiB}
GPU = {**SMALL, "gpus": [{"index": 0, "name": "H100", "memory_total_bytes": 80 * GiB, "memory_free_bytes": 78 * GiB}]}


def test_scaling_follows_memory_and_cores():
    small = recommend_scaling(SMALL, model_params=135_000_000)
    big = recommend_scaling(BIG, model_params=135_000_000)
    assert small["trainer_replicas"] == 1 and big["trainer_replicas"] == 8
    assert big["validator_replicas"] > small["validator_replicas"]
    assert small["micro_batch"] * small["gradient_accumulation"] >= 32
    for rec in (small, big):
        assert all(rec["reasons"][k] for k in ("micro_batch", "gradient_accumulation", "trainer_replicas", "validator_replicas"))


def test_less_memory_means_smaller_micro_batches_and_more_accumulation():
    roomy = recommend_scaling(SMALL, model_params=135_000_000)
    tight = recommend_scaling({**SMALL, "memory_available_bytes": 2 * GiB}, model_params=135_000_000)
    assert tight["micro_batch"] < roomy["micro_batch"]
    assert tight["gradient_accumulation"] > roomy["gradient_accumulation"]
    bigger_model = recommend_scaling(SMALL, model_params=1_700_000_000)
    assert bigger_model["micro_batch"] < roomy["micro_batch"]


def test_load_takes_cores_away():
    idle = recommend_scaling(BIG, model_params=135_000_000)
    busy = recommend_scaling({**BIG, "load_avg": [30.0, 20.0, 10.0]}, model_params=135_000_000)
    assert busy["validator_replicas"] < idle["validator_replicas"]
    assert busy["trainer_replicas"] < idle["trainer_replicas"]


def test_gpu_profile_trains_on_the_gpu():
    rec = recommend_scaling(GPU, model_params=135_000_000)
    assert rec["device"] == "cuda" and rec["trainer_replicas"] == 1


def test_scaling_respects_the_energy_left():
    exhausted = recommend_scaling(BIG, model_params=135_000_000, remaining_wh=0.0, binding_window="24h")
    assert exhausted["trainer_replicas"] == 0 and exhausted["validator_replicas"] == 0
    assert any("used up" in r for r in exhausted["reasons"]["trainer_replicas"])
    some = recommend_scaling(
        BIG, model_params=135_000_000, remaining_wh=25.0, binding_window="24h", wh_per_training=10.0, wh_per_validation=5.0
    )
    assert some["trainer_replicas"] == 2 and some["validator_replicas"] == 5


def test_profiling_hardware_records_it_and_recommends_deterministically():
    config = EnergyConfig(budgets=parse_budgets("24h=100"))
    state = initial_state(config)
    state, _ = run(state, completed("t1", wh(30), T0 - timedelta(hours=1)), config)
    command = ProfileHardware("node-a", BIG, at=T0, model_params=135_000_000)
    events = decide(command, state, config)
    assert [e.type for e in events] == [HARDWARE_PROFILED, SCALING_RECOMMENDED]
    assert decide(command, state, config) == events
    rec = events[1].payload
    assert rec["node"] == "node-a" and rec["inputs"]["remaining_wh"] == pytest.approx(70.0)
    assert rec["trainer_replicas"] == 2  # 70 Wh left / 30 Wh per training
    validate_payload(HARDWARE_PROFILED, 1, events[0].payload)
    validate_payload(SCALING_RECOMMENDED, 1, rec)

    for event in events:
        state = evolve(state, Event(event.type, event.aggregate_id, event.payload, T0))
    again = decide(RecommendScaling("node-a", at=T0), state, config)
    assert [e.type for e in again] == [SCALING_RECOMMENDED]
    assert decide(RecommendScaling("node-b", at=T0), state, config) == []


def test_unrelated_events_change_nothing():
    config = EnergyConfig()
    state = initial_state(config)
    assert decide(Event("cycle.proposed", "c1"), state, config) == []
    assert evolve(state, Event("cycle.proposed", "c1")) == state

"""Gates before a cycle is proposed: each closed gate defers with its reason and
the cycle is tried again by the first Tick at or after retry_at."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from services.evolution import domain, gates
from services.evolution.domain import Tick
from shared.contracts.trust import parse_time


def deferred_then(run, config, given, dataset_registered, now):
    """Given facts, when a dataset arrives: the cycle is deferred. Returns (state, deferred event)."""
    state = domain.replay(given)
    state, events = run(config, [dataset_registered("ds-1", occurred_at=now)], state)
    assert [e.type for e in events] == ["cycle.deferred"]
    return state, events[0]


def test_an_open_gate_proposes_the_cycle(run, config, dataset_registered, facts, assert_valid, now):
    state, events = run(config, [facts.hardware(0.4), dataset_registered("ds-1")])

    assert [e.type for e in events] == ["cycle.proposed"]
    payload = events[0].payload
    assert payload["kind"] == "mntp"
    assert payload["dataset"] == {"dataset_id": "ds-1", "sha256": "a" * 64, "uri": "file:///data/ds-1.jsonl"}
    assert payload["energy_estimate_wh"] == 8.0  # 200 steps x 8 samples x 0.005 Wh, nothing measured yet
    assert payload["individual"]["generation"] == 0
    assert payload["warm_start"] is None
    assert payload["carbon_mode"] == "normal"
    assert events[0].correlation_id == payload["cycle_id"]
    assert state.cycles[payload["cycle_id"]].status == "proposed"
    assert_valid(events)


def test_open_incidents_defer_until_they_are_resolved(run, config, dataset_registered, facts, assert_valid, now):
    drift = facts.validation_completed(None, verdict="fail", purpose="drift", adapter="d" * 64)
    state, deferred = deferred_then(run, config, [drift], dataset_registered, now)

    assert deferred.payload["gate"] == "incidents"
    assert deferred.payload["reason"] == "1 open incidents (limit 0)"
    retry_at = parse_time(deferred.payload["retry_at"])
    assert retry_at == now + config.retry_after
    assert_valid([deferred])

    state = domain.evolve(state, facts.validation_completed(None, verdict="pass", purpose="drift", adapter="d" * 64))
    _, early = run(config, [Tick(retry_at - timedelta(seconds=1))], state)
    assert early == []
    _, events = run(config, [Tick(retry_at)], state)
    assert [e.type for e in events] == ["cycle.proposed"]
    assert events[0].payload["cycle_id"] == deferred.payload["cycle_id"]


def test_pending_approvals_at_the_limit_defer(run, config, dataset_registered, facts, now):
    pending = [facts.approval_requested(f"apr-promotion-val-{i}") for i in range(3)]
    state, deferred = deferred_then(run, config, pending, dataset_registered, now)

    assert deferred.payload["gate"] == "approvals"
    assert deferred.payload["reason"] == "3 approvals pending (limit 3)"
    retry_at = parse_time(deferred.payload["retry_at"])

    still, events = run(config, [Tick(retry_at)], state)
    assert [e.type for e in events] == ["cycle.deferred"]  # nothing changed: deferred again
    assert events[0].payload["attempt"] == 2
    assert parse_time(events[0].payload["retry_at"]) == retry_at + config.retry_after

    still = domain.evolve(still, facts.approval_expired("apr-promotion-val-0"))
    _, events = run(config, [Tick(retry_at + config.retry_after)], still)
    assert [e.type for e in events] == ["cycle.proposed"]


def test_energy_over_the_rolling_budget_defers_until_enough_use_leaves_the_window(
        run, config, dataset_registered, facts, now):
    config = replace(config, energy_budget_wh=100.0, energy_window=timedelta(hours=24))
    used = [facts.energy_reported(60.0, now - timedelta(hours=20)),
            facts.energy_reported(35.0, now - timedelta(hours=1))]
    state, deferred = deferred_then(run, config, used, dataset_registered, now)

    assert deferred.payload["gate"] == "energy"
    assert deferred.payload["reason"] == ("95.00 Wh used in the last 24 h + 8.00 Wh estimated "
                                          "exceeds the budget of 100.00 Wh")
    retry_at = parse_time(deferred.payload["retry_at"])
    # the 60 Wh job leaves the window 24 h after it ended
    assert retry_at == now - timedelta(hours=20) + timedelta(hours=24, seconds=1)

    _, events = run(config, [Tick(retry_at)], state)
    assert [e.type for e in events] == ["cycle.proposed"]


def test_a_standing_budget_exceeded_defers_until_its_until(run, config, dataset_registered, facts, now):
    until = now + timedelta(hours=3)
    state, deferred = deferred_then(run, config, [facts.budget_exceeded(until)], dataset_registered, now)

    assert deferred.payload["gate"] == "energy"
    assert "budget is exceeded" in deferred.payload["reason"]
    assert parse_time(deferred.payload["retry_at"]) == until

    _, events = run(config, [Tick(until)], state)
    assert [e.type for e in events] == ["cycle.proposed"]


def test_carbon_intensity_at_the_pause_threshold_defers(run, config, dataset_registered, facts, now):
    dirty = facts.energy_reported(1.0, now - timedelta(hours=1), carbon=500.0)
    state, deferred = deferred_then(run, config, [dirty], dataset_registered, now)

    assert deferred.payload["gate"] == "carbon"
    assert deferred.payload["reason"] == ("grid carbon intensity 500 gCO2e/kWh is at or above "
                                          "the pause threshold 500")
    retry_at = parse_time(deferred.payload["retry_at"])

    state = domain.evolve(state, facts.energy_reported(1.0, now, carbon=120.0))
    _, events = run(config, [Tick(retry_at)], state)
    assert [e.type for e in events] == ["cycle.proposed"]
    assert events[0].payload["carbon_mode"] == "normal"


def test_carbon_intensity_at_caution_proposes_a_smaller_cycle(run, config, dataset_registered, facts,
                                                              assert_valid, now):
    caution = facts.energy_reported(1.0, now - timedelta(hours=1), carbon=460.0)

    _, events = run(config, [caution, dataset_registered("ds-1")])

    assert [e.type for e in events] == ["cycle.proposed"]
    payload = events[0].payload
    assert payload["carbon_mode"] == "caution"
    assert payload["config"]["steps"] == 100  # half the 200 steps it would have had
    assert payload["energy_estimate_wh"] < 8.0
    assert_valid(events)


def test_a_loaded_node_defers_until_the_load_drops(run, config, dataset_registered, facts, now):
    state, deferred = deferred_then(run, config, [facts.hardware(3.8, cores=4)], dataset_registered, now)

    assert deferred.payload["gate"] == "hardware"
    assert deferred.payload["reason"] == "load average per core 0.95 is above 0.85"
    retry_at = parse_time(deferred.payload["retry_at"])

    state = domain.evolve(state, facts.hardware(1.0, cores=4))
    _, events = run(config, [Tick(retry_at + timedelta(minutes=1))], state)
    assert [e.type for e in events] == ["cycle.proposed"]


def test_too_little_free_memory_defers(run, config, dataset_registered, facts, now):
    _, deferred = deferred_then(run, config, [facts.hardware(0.5, available_gib=1.0)], dataset_registered, now)

    assert deferred.payload["gate"] == "hardware"
    assert deferred.payload["reason"] == "1.00 GiB memory available, below 2 GiB"


def test_the_first_closed_gate_in_order_is_the_one_reported(run, config, dataset_registered, facts, now):
    given = [facts.hardware(3.8), facts.energy_reported(1.0, now, carbon=900.0),
             facts.validation_completed(None, verdict="fail", purpose="drift", adapter="d" * 64)]

    _, deferred = deferred_then(run, config, given, dataset_registered, now)

    assert deferred.payload["gate"] == "incidents"


def test_a_deferred_cycle_whose_dataset_was_quarantined_is_abandoned(run, config, dataset_registered, facts,
                                                                     assert_valid, now):
    state, deferred = deferred_then(run, config, [facts.hardware(3.8)], dataset_registered, now)
    state = domain.evolve(state, dataset_registered("ds-1", quarantined=True))

    state, events = run(config, [Tick(parse_time(deferred.payload["retry_at"]))], state)

    assert [(e.type, e.payload["outcome"]) for e in events] == [("cycle.completed", "abandoned")]
    assert state.cycles[deferred.payload["cycle_id"]].status == "completed"
    assert_valid(events)


def test_next_due_names_the_earliest_retry(run, config, dataset_registered, facts, now):
    state, deferred = deferred_then(run, config, [facts.hardware(3.8)], dataset_registered, now)

    assert gates.next_due(state, config, now) == parse_time(deferred.payload["retry_at"])


def test_after_a_budget_crossing_the_energy_services_budget_still_holds(run, config, dataset_registered, facts, now):
    crossed = now - timedelta(hours=23)
    given = [facts.energy_reported(495.0, crossed), facts.budget_exceeded(until=now, at=crossed)]
    state, deferred = deferred_then(run, config, given, dataset_registered, now)

    assert deferred.payload["gate"] == "energy"
    assert deferred.payload["reason"].endswith("exceeds the budget of 500.00 Wh")
    retry_at = parse_time(deferred.payload["retry_at"])
    assert retry_at == crossed + timedelta(hours=24, seconds=1)  # the 24 h window of energy.budget_exceeded

    _, events = run(config, [Tick(retry_at)], state)
    assert [e.type for e in events] == ["cycle.proposed"]


def test_the_default_grid_figure_trains_the_steps_asked(run, dataset_registered, facts, now):
    default_grid = 400.0  # NEURONS_CARBON_INTENSITY when a site sets none (shared/settings.py)
    config = domain.EvolutionConfig(carbon_intensity_g_per_kwh=default_grid, schedule_interval=None)
    grid = facts.energy_reported(1.0, now - timedelta(hours=1), carbon=default_grid)

    _, events = run(config, [grid, dataset_registered("ds-1")])

    assert [e.type for e in events] == ["cycle.proposed"]
    assert events[0].payload["carbon_mode"] == "normal"

"""An operator's request is carried out as asked, or refused with the reason; never changed or held back silently.

Explicit settings run exactly as given (the search varies only the others),
an admin may let a cycle pass the hardware gate, and the schedule waits an
interval after start-up and after the latest cycle."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from services.evolution import domain, gates
from services.evolution.domain import CommandRejected, RequestCycle, Tick
from services.evolution.requests import setting_problems
from services.evolution.search import DEFAULT_SPACE
from shared.contracts.envelope import iso
from shared.contracts.policies import proposal_subject
from shared.contracts.trust import decision_subject, public_key_b64, sign_decision


@pytest.fixture
def admin_config(config, keys, now):
    """The keyring also holds root, an admin."""
    config.keyring.add("root", public_key_b64(keys["mallory"]), ["admin"], created_at=now)
    return config


def _proposal(run, config, state, command):
    state, events = run(config, [command], state)
    (proposal,) = events
    return state, proposal


# --- explicit settings ---------------------------------------------------------------


def test_an_explicit_learning_rate_is_proposed_exactly_and_reaches_training(run, config, dataset_registered,
                                                                            event, keys, now, assert_valid):
    state = domain.replay([dataset_registered("ds-1")])
    searched = gates.cycle_settings("mntp", None, state.population, config.search, config.research_config)[1]

    state, proposal = _proposal(run, config, state,
                                RequestCycle("bob", now, config={"learning_rate": 0.00012345}, command_id="c-1"))

    assert proposal.type == "cycle.proposed"
    settings = proposal.payload["config"]
    assert settings["learning_rate"] == 0.00012345  # not rounded, not moved
    assert {k: v for k, v in settings.items() if k != "learning_rate"} == \
        {k: v for k, v in searched.items() if k != "learning_rate"}  # the search filled in the rest
    cycle_id = proposal.payload["cycle_id"]
    signed = sign_decision(f"apr-cycle-{cycle_id}", "grant", "alice", keys["alice"], now, now + timedelta(hours=1),
                           subject=decision_subject("cycle", proposal_subject(proposal.payload)))
    granted = event("approval.granted", f"apr-cycle-{cycle_id}", {
        "request_id": f"apr-cycle-{cycle_id}", "kind": "cycle", "subject_id": cycle_id, "cycle_id": cycle_id,
        "actor": "operator:alice", "decision": signed, "policy": None, "granted_at": iso(now)})
    _, (training,) = run(config, [granted], state)
    assert training.type == "training.requested"
    assert training.payload["config"]["learning_rate"] == 0.00012345
    assert_valid([proposal, training])


@pytest.mark.parametrize("settings, reason", [
    ({"learning_rate": 0.005}, "learning_rate=0.005 is outside the allowed range [1e-05, 0.001]"),
    ({"lora_rank": 7}, "lora_rank=7 is not one of [4, 8, 16, 32, 64]"),
    ({"steps": 12.5}, "steps=12.5 is not a whole number"),
    ({"steps": 5}, "steps=5 is outside the allowed range [20, 2000]"),
    ({"mask_ratio": "high"}, "mask_ratio='high' is not a number"),
    ({"batch_size": True}, "batch_size=True is not one of"),
])
def test_an_explicit_setting_the_cycle_cannot_run_as_given_is_refused_with_the_reason(
        config, dataset_registered, now, settings, reason):
    state = domain.replay([dataset_registered("ds-1")])

    with pytest.raises(CommandRejected) as refused:
        domain.decide(RequestCycle("bob", now, config=settings, command_id="c-1"), state, config)

    assert str(refused.value).startswith(reason)
    assert "\n" not in str(refused.value)


def test_every_problem_is_named_at_once():
    problems = setting_problems(DEFAULT_SPACE, {"learning_rate": 1.0, "lora_rank": 3, "steps": 40})

    assert [p.split("=")[0] for p in problems] == ["learning_rate", "lora_rank"]


def test_the_bounds_themselves_are_allowed():
    assert setting_problems(DEFAULT_SPACE, {"learning_rate": 1e-3, "steps": 20, "mask_ratio": 0.5}) == []


def test_carbon_caution_shortens_searched_steps_but_never_explicit_ones(run, config, dataset_registered, now):
    state = domain.replay([dataset_registered("ds-1")])
    cautious = replace(config, carbon_intensity_g_per_kwh=470.0)  # between caution (450) and pause (500)

    _, searched = _proposal(run, cautious, state, RequestCycle("bob", now, config={}, command_id="c-1"))
    _, explicit = _proposal(run, cautious, state, RequestCycle("bob", now, config={"steps": 300}, command_id="c-2"))

    assert searched.payload["carbon_mode"] == explicit.payload["carbon_mode"] == "caution"
    assert searched.payload["config"]["steps"] == config.search.initial_config["steps"] // 2
    assert explicit.payload["config"]["steps"] == 300


def test_the_default_grid_intensity_trains_in_the_normal_mode(run, config, dataset_registered, now, monkeypatch):
    from shared.settings import Settings

    monkeypatch.delenv("NEURONS_CARBON_INTENSITY", raising=False)
    default = Settings.from_env().carbon_intensity_g_per_kwh
    site = replace(config, carbon_intensity_g_per_kwh=default)
    state = domain.replay([dataset_registered("ds-1")])

    _, proposal = _proposal(run, site, state, RequestCycle("bob", now, config={"steps": 40}, command_id="c-1"))

    assert default < site.carbon_caution_g_per_kwh
    assert proposal.payload["carbon_mode"] == "normal"
    assert proposal.payload["config"]["steps"] == 40


# --- the hardware gate and an admin's say ---------------------------------------------


def test_a_busy_machine_defers_an_operators_cycle_with_the_gate_and_the_retry(run, config, dataset_registered,
                                                                               facts, now):
    state = domain.replay([dataset_registered("ds-1"), facts.hardware(load_1m=4.0, cores=4)])

    _, (deferred,) = run(config, [RequestCycle("bob", now, command_id="c-1")], state)

    assert deferred.type == "cycle.deferred"
    assert deferred.payload["gate"] == "hardware"
    assert deferred.payload["reason"] == "load average per core 1.00 is above 0.85"
    assert deferred.payload["retry_at"] == iso(now + config.retry_after)


def test_an_admin_may_start_a_cycle_the_hardware_gate_would_defer(run, admin_config, dataset_registered, facts,
                                                                  now, assert_valid):
    state = domain.replay([dataset_registered("ds-1"), facts.hardware(load_1m=4.0, cores=4)])

    _, proposal = _proposal(run, admin_config, state,
                            RequestCycle("root", now, command_id="c-1", force_gates=("hardware",)))

    assert proposal.type == "cycle.proposed"
    assert proposal.payload["trigger"]["force_gates"] == ["hardware"]  # the proposal says what was forced
    assert proposal.payload["hardware"]["load_per_core"] == 1.0
    assert_valid([proposal])


def test_forcing_the_hardware_gate_opens_no_other_gate(run, admin_config, dataset_registered, facts, now):
    cfg = replace(admin_config, energy_budget_wh=0.0)
    state = domain.replay([dataset_registered("ds-1"), facts.hardware(load_1m=4.0, cores=4)])

    _, (deferred,) = run(cfg, [RequestCycle("root", now, command_id="c-1", force_gates=("hardware",))], state)

    assert deferred.type == "cycle.deferred" and deferred.payload["gate"] == "energy"


@pytest.mark.parametrize("operator, gates_, reason", [
    ("bob", ("hardware",), "forcing the hardware gate needs the admin role; bob holds approver, requester"),
    ("dave", ("hardware",), "forcing the hardware gate needs the admin role; dave holds no role in the keyring"),
    ("root", ("energy",), "gate energy cannot be forced; forceable: hardware"),
])
def test_forcing_a_gate_is_refused_with_the_reason(admin_config, dataset_registered, facts, now, operator,
                                                   gates_, reason):
    state = domain.replay([dataset_registered("ds-1"), facts.hardware(load_1m=4.0, cores=4)])

    with pytest.raises(CommandRejected, match=f"^{reason}$"):
        domain.decide(RequestCycle(operator, now, command_id="c-1", force_gates=gates_), state, admin_config)


def test_a_forced_cycle_redelivered_after_the_admin_lost_the_role_is_not_refused_after_the_fact(
        run, admin_config, dataset_registered, facts, now):
    state = domain.replay([dataset_registered("ds-1"), facts.hardware(load_1m=4.0, cores=4)])
    command = RequestCycle("root", now, command_id="c-1", force_gates=("hardware",))
    state, _ = run(admin_config, [command], state)
    del admin_config.keyring.operators["root"]

    _, again = run(admin_config, [command], state)

    assert again == []


# --- the schedule ----------------------------------------------------------------------


@pytest.fixture
def scheduled(config):
    return replace(config, schedule_interval=timedelta(hours=1), schedule_jitter=timedelta(minutes=5))


def test_the_first_scheduled_cycle_waits_one_interval_after_start_up(run, scheduled, dataset_registered, now):
    state = domain.replay([dataset_registered("ds-1")])
    started = now

    _, at_start = run(scheduled, [Tick(now + timedelta(seconds=5), started_at=started)], state)
    _, within = run(scheduled, [Tick(now + timedelta(minutes=59), started_at=started)], state)
    later = now + timedelta(hours=1, minutes=6)  # past the interval and any slot's jitter
    _, after = run(scheduled, [Tick(later, started_at=started)], state)

    assert at_start == [] and within == []
    assert [e.type for e in after] == ["cycle.proposed"]
    assert after[0].payload["trigger"]["type"] == "schedule"
    assert gates.next_due(state, scheduled, now, started) >= started + scheduled.schedule_interval


def test_the_schedule_waits_one_interval_after_the_latest_cycle(run, scheduled, dataset_registered, now):
    started = now - timedelta(days=1)  # up for long: only the operator's cycle holds the schedule back
    state, _ = run(scheduled, [dataset_registered("ds-1"), RequestCycle("bob", now, command_id="c-1")])

    _, soon = run(scheduled, [Tick(now + timedelta(minutes=30), started_at=started)], state)
    _, after = run(scheduled, [Tick(now + timedelta(hours=1, minutes=6), started_at=started)], state)

    assert soon == []
    assert [e.payload["trigger"]["type"] for e in after] == ["schedule"]

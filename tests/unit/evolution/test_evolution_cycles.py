"""Cycles from trigger to end: schedule, datasets and operators start them;
training, validation and promotion finish them and score their configuration."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from services.evolution import domain, gates
from services.evolution.domain import CommandRejected, RequestCycle, RequestResearch, Tick
from services.evolution.search import FAIL_FITNESS
from shared.contracts.envelope import iso
from shared.contracts.policies import proposal_subject
from shared.contracts.trust import decision_subject, sign_decision

ADAPTER = "c" * 64


@pytest.fixture
def approved(run, config, dataset_registered, event, keys, now):
    """A cycle approved by alice: training has been requested."""
    state, (proposal,) = run(config, [dataset_registered("ds-1")])
    cycle_id = proposal.payload["cycle_id"]
    signed = sign_decision(f"apr-cycle-{cycle_id}", "grant", "alice", keys["alice"], now, now + timedelta(hours=1),
                           subject=decision_subject("cycle", proposal_subject(proposal.payload)))
    granted = event("approval.granted", f"apr-cycle-{cycle_id}", {
        "request_id": f"apr-cycle-{cycle_id}", "kind": "cycle", "subject_id": cycle_id, "cycle_id": cycle_id,
        "actor": "operator:alice", "decision": signed, "policy": None, "granted_at": iso(now)})
    state, events = run(config, [granted], state)
    assert [e.type for e in events] == ["training.requested"]
    return state, cycle_id


# --- triggers ---------------------------------------------------------------------


def test_a_quarantined_dataset_triggers_nothing(run, config, dataset_registered):
    state, events = run(config, [dataset_registered("ds-1", quarantined=True)])

    assert events == []
    assert state.latest_dataset_id is None


def test_the_same_dataset_registered_twice_triggers_one_cycle(run, config, dataset_registered):
    _, events = run(config, [dataset_registered("ds-1"), dataset_registered("ds-1")])

    assert [e.type for e in events] == ["cycle.proposed"]


def test_the_schedule_fires_once_per_slot_after_its_jitter(run, keyring, dataset_registered):
    config = domain.EvolutionConfig(keyring=keyring, schedule_interval=timedelta(hours=6),
                                    schedule_jitter=timedelta(minutes=30))
    state = domain.replay([dataset_registered("ds-1")])
    slot_start = datetime(2025, 3, 4, 12, 0, tzinfo=timezone.utc)
    due = gates.schedule_due_at(int(slot_start.timestamp() // 21600), config)
    assert slot_start <= due < slot_start + timedelta(minutes=30)

    _, early = run(config, [Tick(due - timedelta(seconds=1))], state)
    state, fired = run(config, [Tick(due)], state)
    _, again = run(config, [Tick(due + timedelta(hours=1))], state)
    _, next_slot = run(config, [Tick(slot_start + timedelta(hours=6, minutes=30))], state)

    assert early == []
    assert [e.type for e in fired] == ["cycle.proposed"]
    assert fired[0].payload["trigger"]["type"] == "schedule"
    assert again == []
    assert [e.type for e in next_slot] == ["cycle.proposed"]
    assert next_slot[0].payload["cycle_id"] != fired[0].payload["cycle_id"]
    assert gates.next_due(state, config, due) > due


def test_the_schedule_waits_for_a_dataset(run, keyring):
    config = domain.EvolutionConfig(keyring=keyring, schedule_interval=timedelta(hours=6))

    _, events = run(config, [Tick(datetime(2025, 3, 4, 12, 45, tzinfo=timezone.utc))])

    assert events == []


def test_an_operator_can_request_a_cycle_with_settings(run, config, dataset_registered, now, assert_valid):
    _, events = run(config, [dataset_registered("ds-1"),
                             RequestCycle("bob", now, config={"steps": 50, "lora_rank": 16}, command_id="c-1")])

    proposal = events[-1]
    assert proposal.type == "cycle.proposed"
    assert proposal.payload["config"]["steps"] == 50
    assert proposal.payload["config"]["lora_rank"] == 16
    assert proposal.payload["requested_by"] == "bob"
    assert proposal.payload["trigger"]["type"] == "operator"
    assert_valid(events)


def test_a_command_delivered_twice_starts_one_cycle(run, config, dataset_registered, now):
    state, _ = run(config, [dataset_registered("ds-1"), RequestCycle("bob", now, command_id="c-1")])

    _, again = run(config, [RequestCycle("bob", now, command_id="c-1")], state)

    assert again == []


@pytest.mark.parametrize("command, message", [
    (RequestCycle("bob", datetime(2025, 3, 4, tzinfo=timezone.utc), dataset_id="ds-bad"), "quarantined"),
    (RequestCycle("bob", datetime(2025, 3, 4, tzinfo=timezone.utc), config={"temperature": 2}),
     "unknown settings"),
    (RequestResearch("bob", datetime(2025, 3, 4, tzinfo=timezone.utc)), "needs an adapter"),
])
def test_commands_that_cannot_be_carried_out_are_rejected(run, config, dataset_registered, command, message):
    state = domain.replay([dataset_registered("ds-1"), dataset_registered("ds-bad", quarantined=True)])

    with pytest.raises(CommandRejected, match=message):
        domain.decide(command, state, config)


def test_research_is_proposed_on_the_promoted_adapter(run, config, dataset_registered, facts, now, assert_valid):
    state = domain.replay([dataset_registered("ds-1"), facts.adapter_promoted("e" * 64)])

    _, events = run(config, [RequestResearch("bob", now, config={"reward": "helpfulness"}, command_id="r-1")],
                    state)

    assert [e.type for e in events] == ["research.proposed"]
    payload = events[0].payload
    assert payload["kind"] == "rl"
    assert payload["warm_start"] == "e" * 64
    assert payload["config"]["reward"] == "helpfulness"
    assert payload["cycle_id"].startswith("res-")
    assert_valid(events)


def test_a_promoted_adapter_warm_starts_the_next_cycle(run, config, dataset_registered, facts):
    _, events = run(config, [facts.adapter_promoted("e" * 64), dataset_registered("ds-1")])

    assert events[0].payload["warm_start"] == "e" * 64


# --- from training to the end of the cycle -------------------------------------------------


def test_a_passing_cycle_is_scored_and_completes_when_promoted(approved, run, config, facts, assert_valid):
    state, cycle_id = approved

    state, after_training = run(config, [facts.training_completed(cycle_id, loss_before=3.0, loss_after=2.5,
                                                                   joules=36_000.0)], state)
    state, after_validation = run(config, [facts.validation_completed(cycle_id, "pass")], state)
    state, after_promotion = run(config, [facts.adapter_promoted(ADAPTER)], state)

    assert after_training == []
    assert [e.type for e in after_validation] == ["cycle.evaluated"]
    evaluated = after_validation[0].payload
    assert evaluated["fitness"] == pytest.approx(0.5 / 0.01)  # 0.5 loss per 10 Wh = 50 per kWh
    assert evaluated["energy_wh"] == pytest.approx(10.0)
    assert [e.type for e in after_promotion] == ["cycle.completed"]
    completed = after_promotion[0].payload
    assert completed["outcome"] == "promoted"
    assert completed["adapter_sha256"] == ADAPTER
    assert completed["fitness"] == pytest.approx(50.0)
    assert state.population.by_cycle(cycle_id).fitness == pytest.approx(50.0)
    assert state.promoted_adapter == ADAPTER
    assert_valid(after_validation + after_promotion)


def test_validation_before_training_news_is_scored_once_both_are_known(approved, run, config, facts):
    state, cycle_id = approved

    state, first = run(config, [facts.validation_completed(cycle_id, "pass")], state)
    state, second = run(config, [facts.training_completed(cycle_id)], state)

    assert first == []
    assert [e.type for e in second] == ["cycle.evaluated"]


def test_a_failed_verdict_ends_the_cycle_with_the_lowest_fitness(approved, run, config, facts, assert_valid):
    state, cycle_id = approved

    state, events = run(config, [facts.training_completed(cycle_id), facts.validation_completed(cycle_id, "fail")],
                        state)

    assert [e.type for e in events] == ["cycle.evaluated", "cycle.completed"]
    assert events[1].payload["outcome"] == "failed"
    assert events[1].payload["fitness"] == FAIL_FITNESS
    assert state.cycles[cycle_id].status == "completed"
    assert_valid(events)


def test_failed_training_ends_the_cycle(approved, run, config, facts):
    state, cycle_id = approved

    _, events = run(config, [facts.training_failed(cycle_id)], state)

    assert [(e.type, e.payload.get("outcome")) for e in events] == [("cycle.evaluated", None),
                                                                    ("cycle.completed", "training_failed")]


def test_a_fallback_artefact_ends_the_cycle_without_scoring_it(approved, run, config, facts):
    state, cycle_id = approved

    state, events = run(config, [facts.training_completed(cycle_id, status="fallback")], state)

    assert [(e.type, e.payload["outcome"]) for e in events] == [("cycle.completed", "fallback")]
    assert state.population.by_cycle(cycle_id).fitness is None


def test_an_inconclusive_verdict_ends_the_cycle_without_scoring_it(approved, run, config, facts):
    state, cycle_id = approved

    _, events = run(config, [facts.training_completed(cycle_id), facts.validation_completed(cycle_id,
                                                                                             "inconclusive")],
                    state)

    assert [(e.type, e.payload["outcome"]) for e in events] == [("cycle.completed", "inconclusive")]


def test_a_rejected_proposal_ends_the_cycle(run, config, dataset_registered, event, now):
    state, (proposal,) = run(config, [dataset_registered("ds-1")])
    cycle_id = proposal.payload["cycle_id"]
    rejected = event("approval.rejected", f"apr-cycle-{cycle_id}", {
        "request_id": f"apr-cycle-{cycle_id}", "kind": "cycle", "subject_id": cycle_id, "cycle_id": cycle_id})

    state, events = run(config, [rejected], state)

    assert [(e.type, e.payload["outcome"]) for e in events] == [("cycle.completed", "rejected")]
    assert state.cycles[cycle_id].status == "completed"


def test_measured_energy_replaces_the_default_estimate(approved, run, config, facts, dataset_registered):
    state, cycle_id = approved
    state, _ = run(config, [facts.training_completed(cycle_id, joules=7200.0),  # 2 Wh for 200 x 8
                            facts.validation_completed(cycle_id, "pass")], state)

    _, events = run(config, [dataset_registered("ds-2")], state)

    work = events[0].payload["config"]["steps"] * events[0].payload["config"]["batch_size"]
    assert events[0].payload["energy_estimate_wh"] == pytest.approx(2.0 / 1600 * work)


# --- state ------------------------------------------------------------------------------


def test_the_state_survives_a_json_round_trip_and_a_replay(approved, run, config, facts, dataset_registered, now):
    state, cycle_id = approved
    log = [facts.hardware(3.9), dataset_registered("ds-2", occurred_at=now), facts.scaling(),
           facts.energy_reported(3.0, now), facts.budget_exceeded(now + timedelta(hours=2)),
           facts.training_completed(cycle_id), facts.validation_completed(cycle_id, "pass")]
    state, emitted = run(config, log, state)

    restored = domain.EvolutionState.from_dict(json.loads(json.dumps(state.to_dict())))

    assert restored == state
    assert state.cycles[cycle_id].status == "evaluated"
    assert any(c.status == "deferred" for c in state.cycles.values())


def test_replaying_the_log_gives_the_state_that_handling_it_built(config, dataset_registered, facts, now):
    messages = [facts.hardware(3.9, at=now), dataset_registered("ds-1"), Tick(now + timedelta(hours=1)),
                facts.hardware(0.2, at=now + timedelta(hours=1)), Tick(now + timedelta(hours=2))]
    state, log = domain.initial_state(), []
    for message in messages:
        state, events = domain.handle(message, state, config)
        # the log holds the facts consumed and the decisions, in the order they happened
        log += ([] if isinstance(message, Tick) else [message]) + events

    assert [e.type for e in log if e.type.startswith("cycle.")] == ["cycle.deferred", "cycle.deferred",
                                                                    "cycle.proposed"]
    assert domain.replay(log) == state


def test_an_event_type_evolution_does_not_read_changes_nothing(approved, config, event):
    state, _ = approved
    for unread in (event("incident.opened", "inc-1", {"incident_id": "inc-1"}),
                   event("training.progressed", "job-1", {"job_id": "job-1", "step": 3})):
        assert domain.evolve(state, unread) == state
        assert domain.decide(unread, state, config) == []

"""Approval requests: opened by proposals and passing validations, decided by
policy or left to an approver, expired by the clock."""

from __future__ import annotations

from datetime import datetime, timedelta

from services.approval import domain
from services.approval.domain import SubmitDecision, Tick
from shared.contracts.trust import parse_time


def test_a_cycle_proposal_opens_a_request_that_expires_after_the_ttl(config, cycle_proposed, now, assert_valid):
    proposal = cycle_proposed("cyc-1", energy_wh=120.0)

    state, events = domain.handle(proposal, domain.initial_state(), config)

    assert [e.type for e in events] == ["approval.requested"]
    payload = events[0].payload
    assert events[0].aggregate_id == "apr-cycle-cyc-1"
    assert payload["kind"] == "cycle"
    assert payload["subject_id"] == "cyc-1"
    assert payload["subject"]["training_kind"] == "mntp"
    assert payload["policy"]["name"] == "cycle-needs-approver"
    assert payload["policy"]["auto_approve"] is False
    assert payload["requested_by"] == "evolution"
    assert parse_time(payload["expires_at"]) == now + timedelta(hours=24)
    assert {"type": "cycle.proposed", "id": "cyc-1", "event_id": proposal.event_id} in payload["evidence"]
    assert state.requests["apr-cycle-cyc-1"].status == "pending"
    assert_valid(events)


def test_a_duplicate_proposal_produces_nothing(config, cycle_proposed):
    state, _ = domain.handle(cycle_proposed("cyc-1"), domain.initial_state(), config)

    again, events = domain.handle(cycle_proposed("cyc-1"), state, config)

    assert events == []
    assert again == state


def test_a_small_mntp_cycle_is_auto_approved_by_policy(config, cycle_proposed, assert_valid):
    state, events = domain.handle(cycle_proposed("cyc-1", energy_wh=12.5), domain.initial_state(), config)

    assert [e.type for e in events] == ["approval.requested", "approval.granted"]
    granted = events[1].payload
    assert granted["actor"] == "policy:auto-mntp-under-energy"
    assert granted["policy"]["name"] == "auto-mntp-under-energy"
    assert granted["policy"]["rule"]["when"] == {"training_kind": "mntp", "energy_wh_below": 50.0}
    assert granted["decision"] is None
    assert state.requests["apr-cycle-cyc-1"].status == "granted"
    assert state.requests["apr-cycle-cyc-1"].decided_by == "policy:auto-mntp-under-energy"
    assert_valid(events)


def test_research_always_waits_for_an_approver(config, cycle_proposed, assert_valid):
    state, events = domain.handle(cycle_proposed("res-1", kind="rl", energy_wh=1.0), domain.initial_state(), config)

    assert [e.type for e in events] == ["approval.requested"]
    assert events[0].aggregate_id == "apr-research-res-1"
    assert events[0].payload["policy"]["name"] == "research-needs-approver"
    assert_valid(events)


def test_a_passing_candidate_validation_asks_for_promotion_with_its_evidence(
        config, validation_completed, assert_valid):
    validation = validation_completed("val-1", verdict="pass")

    state, events = domain.handle(validation, domain.initial_state(), config)

    assert [e.type for e in events] == ["approval.requested"]
    payload = events[0].payload
    assert events[0].aggregate_id == "apr-promotion-val-1"
    assert payload["kind"] == "promotion"
    assert payload["subject"]["adapter_sha256"] == "c" * 64
    assert payload["subject"]["summary"]["explanation"] == "pass: 3 of 3 soak cycles"
    assert payload["policy"]["name"] == "promotion-needs-approver"
    assert {"type": "validation.completed", "id": "val-1", "event_id": validation.event_id} in payload["evidence"]
    assert {"type": "adapter", "id": "c" * 64, "sha256": "c" * 64} in payload["evidence"]
    assert_valid(events)


def test_failing_inconclusive_and_drift_validations_ask_for_nothing(config, validation_completed):
    for event in (validation_completed("val-1", verdict="fail"),
                  validation_completed("val-2", verdict="inconclusive"),
                  validation_completed("val-3", verdict="pass", purpose="drift")):
        state, events = domain.handle(event, domain.initial_state(), config)
        assert events == []


def test_whoever_requested_the_cycle_cannot_approve_its_promotion(config, cycle_proposed, validation_completed,
                                                                  sign, now):
    state, _ = domain.handle(cycle_proposed("cyc-1", requested_by="bob"), domain.initial_state(), config)
    state, events = domain.handle(validation_completed("val-1", cycle_id="cyc-1"), state, config)
    assert events[0].payload["requested_by"] == "bob"

    after, events = domain.handle(SubmitDecision(sign("apr-promotion-val-1", "grant", "bob"),
                                                 now + timedelta(minutes=2)), state, config)

    assert events[0].type == "approval.refused"
    assert events[0].payload["reason"] == "self_approval"
    assert after == state


def test_tick_expires_pending_requests_past_their_expiry(config, cycle_proposed, now, assert_valid):
    state, _ = domain.handle(cycle_proposed("cyc-1", occurred_at=now), domain.initial_state(), config)
    state, _ = domain.handle(cycle_proposed("cyc-2", occurred_at=now + timedelta(hours=2)), state, config)

    at_expiry, events = domain.handle(Tick(now + timedelta(hours=24)), state, config)
    assert events == []  # expires_at itself is still in time

    later, events = domain.handle(Tick(now + timedelta(hours=25)), at_expiry, config)

    assert [(e.type, e.aggregate_id) for e in events] == [("approval.expired", "apr-cycle-cyc-1")]
    assert later.requests["apr-cycle-cyc-1"].status == "expired"
    assert later.requests["apr-cycle-cyc-2"].status == "pending"
    assert_valid(events)
    _, again = domain.handle(Tick(now + timedelta(hours=25)), later, config)
    assert again == []


def test_decided_requests_do_not_expire(config, cycle_proposed, sign, now):
    state, _ = domain.handle(cycle_proposed("cyc-1"), domain.initial_state(), config)
    state, _ = domain.handle(SubmitDecision(sign("apr-cycle-cyc-1"), now + timedelta(minutes=2)), state, config)

    _, events = domain.handle(Tick(now + timedelta(days=3)), state, config)

    assert events == []


def test_the_state_survives_a_json_round_trip(config, cycle_proposed, sign, now):
    state, _ = domain.handle(cycle_proposed("cyc-1"), domain.initial_state(), config)
    state, _ = domain.handle(SubmitDecision(sign("apr-cycle-cyc-1"), now + timedelta(minutes=2)), state, config)
    state, _ = domain.handle(cycle_proposed("cyc-2"), state, config)

    import json
    restored = domain.ApprovalState.from_dict(json.loads(json.dumps(state.to_dict())))

    assert restored == state


def test_replaying_the_emitted_events_rebuilds_the_state(config, cycle_proposed, validation_completed, sign, now):
    state, log = domain.initial_state(), []
    for message in (cycle_proposed("cyc-1"), cycle_proposed("cyc-2", energy_wh=3.0),
                    SubmitDecision(sign("apr-cycle-cyc-1", "reject"), now + timedelta(minutes=2)),
                    validation_completed("val-9"), Tick(now + timedelta(days=2))):
        state, events = domain.handle(message, state, config)
        log += events

    assert domain.replay(log) == state
    assert isinstance(state.requests["apr-promotion-val-9"].expires_at, datetime)

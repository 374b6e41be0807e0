"""Only a verified approval starts training: operator grants must carry a decision
signed by an approver, policy grants must name the policy that really applies."""

from __future__ import annotations

import base64
from dataclasses import replace
from datetime import timedelta

import pytest

from services.approval import domain as approval
from services.evolution import domain, gates
from services.evolution.domain import RequestCycle, RequestResearch
from shared.contracts.envelope import iso
from shared.contracts.policies import proposal_subject
from shared.contracts.trust import config_digest, decision_subject, sign_decision


@pytest.fixture
def proposed(run, config, dataset_registered, facts):
    """A proposed MNTP cycle (8 Wh: the default policy would auto-approve it)."""
    state, events = run(config, [facts.scaling(), dataset_registered("ds-1")])
    assert [e.type for e in events] == ["cycle.proposed"]
    return state, events[0]


def grant_event(event, cycle_id, *, actor, decision=None, kind="cycle", granted_at, policy=None):
    request_id = f"apr-{kind}-{cycle_id}"
    return event("approval.granted", request_id, {
        "request_id": request_id, "kind": kind, "subject_id": cycle_id, "subject": {}, "cycle_id": cycle_id,
        "requested_by": "evolution", "actor": actor, "policy": policy, "decision": decision,
        "granted_at": iso(granted_at)}, granted_at)


def signed_grant(keys, cycle_id, proposal, operator="alice", key=None, at=None, kind="cycle", decision="grant",
                 subject=None):
    """``operator``'s decision on ``cycle_id``'s request, signing ``subject``: by default what the proposal
    (a ``cycle.proposed``/``research.proposed`` payload) will train, its cycle and configuration digest."""
    subject = decision_subject(kind, proposal_subject(proposal)) if subject is None else subject
    return sign_decision(f"apr-{kind}-{cycle_id}", decision, operator, keys[key or operator], at,
                         at + timedelta(minutes=10), subject=subject)


def test_a_signed_operator_grant_requests_training(proposed, config, keys, event, run, facts, now, assert_valid):
    state, proposal = proposed
    cycle_id = proposal.payload["cycle_id"]
    granted = grant_event(event, cycle_id, actor="operator:alice", granted_at=now + timedelta(minutes=1),
                          decision=signed_grant(keys, cycle_id, proposal.payload, at=now))

    state, events = run(config, [granted], state)

    assert [e.type for e in events] == ["training.requested"]
    payload = events[0].payload
    assert events[0].aggregate_id == payload["job_id"] == f"job-{cycle_id}"
    assert payload["cycle_id"] == cycle_id
    assert payload["kind"] == "mntp"
    assert payload["model"] == "smollm2"
    assert payload["dataset"] == {"dataset_id": "ds-1", "sha256": "a" * 64, "uri": "file:///data/ds-1.jsonl"}
    assert payload["config"] == proposal.payload["config"]
    assert payload["warm_start"] is None
    assert payload["hardware_plan"]["micro_batch"] == 4
    assert payload["requested_by"] == "evolution"
    assert state.cycles[cycle_id].status == "approved"
    assert_valid(events)
    # delivered again: already acted on
    _, again = run(config, [granted], state)
    assert again == []


def test_the_approval_services_policy_grant_is_accepted(proposed, config, run, consumed):
    state, proposal = proposed
    _, approval_events = approval.handle(consumed(proposal), approval.initial_state(),
                                         approval.ApprovalConfig(policies=config.policies))
    assert approval_events[1].payload["actor"] == "policy:auto-mntp-under-energy"

    _, events = run(config, [consumed(approval_events[1])], state)

    assert [e.type for e in events] == ["training.requested"]


def test_the_whole_flow_through_the_approval_domain_with_an_operator(run, config, keys, dataset_registered, now,
                                                                     consumed):
    config = replace(config, default_wh_per_sample_step=1.0)  # 1600 Wh: too big for the policy
    state, (proposal,) = run(config, [dataset_registered("ds-1")])
    approval_config = approval.ApprovalConfig(keyring=config.keyring, policies=config.policies)
    approvals, (requested,) = approval.handle(consumed(proposal), approval.initial_state(), approval_config)
    assert requested.payload["policy"]["auto_approve"] is False
    signed = signed_grant(keys, proposal.payload["cycle_id"], proposal.payload, at=now)
    _, (granted,) = approval.handle(approval.SubmitDecision(signed, now + timedelta(minutes=1)), approvals,
                                    approval_config)
    state = domain.evolve(state, consumed(requested))
    _, events = run(config, [consumed(granted, now + timedelta(minutes=1))], state)

    assert [e.type for e in events] == ["training.requested"]


# --- grants that must change nothing --------------------------------------------------


def assert_ignored(run, config, state, granted, reason):
    """``granted`` changes nothing, and the gate turns it down for ``reason``."""
    after, events = run(config, [granted], state)
    assert events == []
    assert after == state
    cycle = state.cycles[granted.payload["cycle_id"]]
    verdict = gates.verify_grant(granted.payload, cycle, keyring=config.keyring, policies=config.policies)
    assert (verdict.ok, verdict.reason) == (False, reason)


def test_a_grant_without_a_signed_decision_is_ignored(proposed, config, event, run, now):
    state, proposal = proposed
    granted = grant_event(event, proposal.payload["cycle_id"], actor="operator:alice", granted_at=now)

    assert_ignored(run, config, state, granted, "malformed")


def test_a_grant_whose_signature_does_not_verify_is_ignored(proposed, config, keys, event, run, now):
    state, proposal = proposed
    cycle_id = proposal.payload["cycle_id"]
    signed = {**signed_grant(keys, cycle_id, proposal.payload, at=now),
              "signature": base64.b64encode(b"\x01" * 64).decode()}
    granted = grant_event(event, cycle_id, actor="operator:alice", granted_at=now, decision=signed)

    assert_ignored(run, config, state, granted, "bad_signature")


def test_a_grant_signed_by_a_key_outside_the_keyring_is_ignored(proposed, config, keys, event, run, now):
    state, proposal = proposed
    cycle_id = proposal.payload["cycle_id"]
    signed = signed_grant(keys, cycle_id, proposal.payload, operator="mallory", at=now)
    granted = grant_event(event, cycle_id, actor="operator:mallory", granted_at=now, decision=signed)

    assert_ignored(run, config, state, granted, "unknown_operator")


def test_a_grant_signed_by_a_requester_without_the_approver_role_is_ignored(proposed, config, keys, event,
                                                                            run, now):
    state, proposal = proposed
    cycle_id = proposal.payload["cycle_id"]
    granted = grant_event(event, cycle_id, actor="operator:carol", granted_at=now,
                          decision=signed_grant(keys, cycle_id, proposal.payload, operator="carol", at=now))

    assert_ignored(run, config, state, granted, "missing_role")


def test_a_grant_for_another_request_is_ignored(proposed, config, keys, event, run, now):
    state, proposal = proposed
    cycle_id = proposal.payload["cycle_id"]
    granted = grant_event(event, cycle_id, actor="operator:alice", granted_at=now,
                          decision=signed_grant(keys, "cyc-other", proposal.payload, at=now))

    assert_ignored(run, config, state, granted, "request_mismatch")


def test_a_signed_reject_dressed_up_as_a_grant_is_ignored(proposed, config, keys, event, run, now):
    state, proposal = proposed
    cycle_id = proposal.payload["cycle_id"]
    granted = grant_event(event, cycle_id, actor="operator:alice", granted_at=now,
                          decision=signed_grant(keys, cycle_id, proposal.payload, at=now, decision="reject"))

    assert_ignored(run, config, state, granted, "not_a_grant")


def test_a_grant_recorded_after_its_decision_expired_is_ignored(proposed, config, keys, event, run, now):
    state, proposal = proposed
    cycle_id = proposal.payload["cycle_id"]
    granted = grant_event(event, cycle_id, actor="operator:alice", granted_at=now + timedelta(hours=1),
                          decision=signed_grant(keys, cycle_id, proposal.payload, at=now))

    assert_ignored(run, config, state, granted, "expired")


def test_a_grant_naming_an_unknown_policy_is_ignored(proposed, config, event, run, now):
    state, proposal = proposed
    granted = grant_event(event, proposal.payload["cycle_id"], actor="policy:approve-everything",
                          granted_at=now, policy={"name": "approve-everything", "rule": {}})

    assert_ignored(run, config, state, granted, "unknown_policy")


def test_a_policy_grant_on_research_is_ignored(run, config, event, dataset_registered, facts, now):
    state, events = run(config, [dataset_registered("ds-1"), facts.adapter_promoted(),
                                 RequestResearch("bob", now, command_id="r-1")])
    research = events[-1]
    assert research.type == "research.proposed"
    granted = grant_event(event, research.payload["cycle_id"], kind="research",
                          actor="policy:auto-mntp-under-energy", granted_at=now)

    assert_ignored(run, config, state, granted, "policy_does_not_apply")


def test_a_grant_by_the_operator_who_requested_the_cycle_is_ignored(run, config, keys, event,
                                                                    dataset_registered, now):
    state, events = run(config, [dataset_registered("ds-1"), RequestCycle("bob", now, command_id="c-1")])
    cycle_id = events[-1].payload["cycle_id"]
    assert events[-1].payload["requested_by"] == "bob"
    granted = grant_event(event, cycle_id, actor="operator:bob", granted_at=now,
                          decision=signed_grant(keys, cycle_id, events[-1].payload, operator="bob", at=now))

    assert_ignored(run, config, state, granted, "self_approval")


def test_an_operator_grant_signs_the_cycle_and_the_digest_of_its_configuration(proposed, keys, now):
    _, proposal = proposed
    cycle_id = proposal.payload["cycle_id"]

    signed = signed_grant(keys, cycle_id, proposal.payload, at=now)

    assert signed["subject"] == {"cycle_id": cycle_id, "config_digest": config_digest(proposal.payload["config"])}


def test_a_grant_that_signed_another_configuration_is_ignored(proposed, config, keys, event, run, now):
    state, proposal = proposed
    cycle_id = proposal.payload["cycle_id"]
    bigger = {**proposal.payload, "config": {**proposal.payload["config"], "steps": 100_000}}
    signed = signed_grant(keys, cycle_id, bigger, at=now)  # what alice approved is not what would train
    assert signed["subject"]["cycle_id"] == cycle_id
    assert signed["subject"]["config_digest"] != config_digest(proposal.payload["config"])
    granted = grant_event(event, cycle_id, actor="operator:alice", granted_at=now, decision=signed)

    assert_ignored(run, config, state, granted, "subject_mismatch")


def test_a_grant_that_signed_another_cycle_is_ignored(proposed, config, keys, event, run, now):
    state, proposal = proposed
    cycle_id = proposal.payload["cycle_id"]
    signed = signed_grant(keys, cycle_id, {**proposal.payload, "cycle_id": "cyc-other"}, at=now)
    granted = grant_event(event, cycle_id, actor="operator:alice", granted_at=now, decision=signed)

    assert_ignored(run, config, state, granted, "subject_mismatch")


def test_a_research_grant_signs_what_the_research_proposal_will_train(run, config, keys, event, dataset_registered,
                                                                      facts, now):
    state, events = run(config, [dataset_registered("ds-1"), facts.adapter_promoted(),
                                 RequestResearch("bob", now, command_id="r-1")])
    research = events[-1]
    cycle_id = research.payload["cycle_id"]
    other = signed_grant(keys, cycle_id, {**research.payload, "config": {**research.payload["config"], "seed": 7}},
                         at=now, kind="research")
    refused = grant_event(event, cycle_id, kind="research", actor="operator:alice", granted_at=now, decision=other)
    assert_ignored(run, config, state, refused, "subject_mismatch")

    granted = grant_event(event, cycle_id, kind="research", actor="operator:alice", granted_at=now,
                          decision=signed_grant(keys, cycle_id, research.payload, at=now, kind="research"))
    _, events = run(config, [granted], state)

    assert [e.type for e in events] == ["training.requested"]
    assert events[0].payload["config"] == research.payload["config"]

"""Signed operator decisions: accepted ones decide the request, every forged or
invalid one is refused (audited as approval.refused) and changes nothing."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest

from services.approval import domain
from services.approval.domain import SubmitDecision
from shared.contracts.trust import canonical_json, config_digest, decision_subject, signed_body

REQUEST = "apr-cycle-cyc-1"


def submit(state, config, signed, at, **kw):
    return domain.handle(SubmitDecision(signed, at, **kw), state, config)


def assert_refused(events, state_before, state_after, reason):
    assert [e.type for e in events] == ["approval.refused"]
    assert events[0].payload["reason"] == reason
    assert state_after == state_before


# --- accepted decisions ----------------------------------------------------------


def test_a_signed_grant_by_an_approver_grants_the_request(requested, config, sign, now, assert_valid):
    signed = sign(REQUEST, "grant", "alice")

    state, events = submit(requested, config, signed, now + timedelta(minutes=2))

    assert [e.type for e in events] == ["approval.granted"]
    granted = events[0]
    assert granted.aggregate_id == REQUEST
    assert granted.payload["actor"] == "operator:alice"
    assert granted.payload["decision"] == signed
    assert granted.payload["cycle_id"] == "cyc-1"
    assert granted.correlation_id == "cyc-1"
    assert state.requests[REQUEST].status == "granted"
    assert signed["nonce"] in state.used_nonces
    assert_valid(events)


def test_a_signed_reject_rejects_the_request_with_its_reason(requested, config, sign, now, assert_valid):
    signed = sign(REQUEST, "reject", "alice", reason="too close to the release")

    state, events = submit(requested, config, signed, now + timedelta(minutes=2))

    assert [e.type for e in events] == ["approval.rejected"]
    assert events[0].payload["reason"] == "too close to the release"
    assert state.requests[REQUEST].status == "rejected"
    assert_valid(events)


# --- forged or invalid decisions: one refusal each --------------------------------


def test_bad_signature_is_refused(requested, config, sign, now, assert_valid):
    signed = sign(REQUEST, "grant", "alice")
    forged = {**signed, "signature": base64.b64encode(b"\x00" * 64).decode()}

    state, events = submit(requested, config, forged, now + timedelta(minutes=2))

    assert_refused(events, requested, state, "bad_signature")
    assert events[0].payload["operator_id"] == "alice"
    assert events[0].payload["decision"] == forged
    assert_valid(events)


def test_a_key_not_in_the_keyring_is_refused(requested, config, sign, now):
    signed = sign(REQUEST, "grant", "mallory")

    state, events = submit(requested, config, signed, now + timedelta(minutes=2))

    assert_refused(events, requested, state, "unknown_operator")


def test_a_decision_signed_with_someone_elses_key_is_refused(requested, config, sign, now):
    # mallory signs and claims to be alice
    signed = sign(REQUEST, "grant", "alice", key="mallory")

    state, events = submit(requested, config, signed, now + timedelta(minutes=2))

    assert_refused(events, requested, state, "bad_signature")


def test_an_operator_without_the_approver_role_is_refused(requested, config, sign, now):
    signed = sign(REQUEST, "grant", "carol")  # a requester only

    state, events = submit(requested, config, signed, now + timedelta(minutes=2))

    assert_refused(events, requested, state, "missing_role")


def test_admin_does_not_imply_approver(requested, config, sign, now):
    signed = sign(REQUEST, "grant", "dave")

    state, events = submit(requested, config, signed, now + timedelta(minutes=2))

    assert_refused(events, requested, state, "missing_role")


def test_self_approval_is_refused(config, sign, cycle_proposed, now):
    state, _ = domain.handle(cycle_proposed("cyc-1", requested_by="bob"), domain.initial_state(), config)
    signed = sign(REQUEST, "grant", "bob")

    after, events = submit(state, config, signed, now + timedelta(minutes=2))

    assert_refused(events, state, after, "self_approval")


def test_an_expired_decision_is_refused(requested, config, sign, now):
    signed = sign(REQUEST, "grant", "alice", ttl=timedelta(minutes=5))

    state, events = submit(requested, config, signed, now + timedelta(minutes=7))

    assert_refused(events, requested, state, "expired")


def test_a_decision_issued_in_the_future_is_refused(requested, config, sign, now):
    signed = sign(REQUEST, "grant", "alice", issued_at=now + timedelta(hours=1))

    state, events = submit(requested, config, signed, now + timedelta(minutes=2))

    assert_refused(events, requested, state, "not_yet_valid")


def test_a_replayed_nonce_is_refused(config, sign, cycle_proposed, now):
    state, _ = domain.handle(cycle_proposed("cyc-1"), domain.initial_state(), config)
    state, _ = domain.handle(cycle_proposed("cyc-2"), state, config)
    state, events = submit(state, config, sign("apr-cycle-cyc-1", nonce="n-1"), now + timedelta(minutes=2))
    assert events[0].type == "approval.granted"
    # a fresh, validly signed decision on another request that reuses the nonce
    replay = sign("apr-cycle-cyc-2", nonce="n-1")

    after, events = submit(state, config, replay, now + timedelta(minutes=3))

    assert_refused(events, state, after, "nonce_reused")


def test_the_same_decision_submitted_twice_is_refused_the_second_time(requested, config, sign, now):
    signed = sign(REQUEST, "grant", "alice")
    state, _ = submit(requested, config, signed, now + timedelta(minutes=2))

    after, events = submit(state, config, signed, now + timedelta(minutes=3))

    assert_refused(events, state, after, "not_pending")


@pytest.mark.parametrize("field, value", [
    ("decision", "reject"),
    ("request_id", "apr-cycle-cyc-2"),
    ("expires_at", "2030-01-01T00:00:00Z"),
    ("reason", "changed my mind"),
    ("extra", {"profile": "other"}),
    ("subject", {"cycle_id": "cyc-1", "config_digest": "0" * 64}),
])
def test_a_decision_changed_after_signing_is_refused(requested, config, sign, now, field, value):
    tampered = {**sign(REQUEST, "grant", "alice"), field: value}

    state, events = submit(requested, config, tampered, now + timedelta(minutes=2))

    assert_refused(events, requested, state, "bad_signature")


def test_an_unsigned_field_added_to_a_decision_is_refused(requested, config, sign, now):
    padded = {**sign(REQUEST, "grant", "alice"), "note": "also promote it"}

    state, events = submit(requested, config, padded, now + timedelta(minutes=2))

    assert_refused(events, requested, state, "malformed")


def test_a_decision_without_a_signature_is_refused(requested, config, sign, now):
    unsigned = {k: v for k, v in sign(REQUEST, "grant", "alice").items() if k != "signature"}

    state, events = submit(requested, config, unsigned, now + timedelta(minutes=2))

    assert_refused(events, requested, state, "malformed")


def test_a_decision_for_an_unknown_request_is_refused(requested, config, sign, now, assert_valid):
    signed = sign("apr-cycle-nope", "grant", "alice")

    state, events = submit(requested, config, signed, now + timedelta(minutes=2))

    assert_refused(events, requested, state, "unknown_request")
    assert events[0].aggregate_id == "apr-cycle-nope"
    assert_valid(events)


def test_a_decision_for_another_request_than_the_one_named_is_refused(requested, config, sign, now):
    signed = sign("apr-cycle-other", "grant", "alice")

    state, events = submit(requested, config, signed, now + timedelta(minutes=2), request_id=REQUEST)

    assert_refused(events, requested, state, "request_mismatch")


def test_a_grant_signs_the_cycle_and_the_digest_of_the_configuration_it_will_train(requested, config, sign):
    request = requested.requests[REQUEST]

    signed = sign(REQUEST, "grant", "alice")

    assert signed["subject"] == {"cycle_id": "cyc-1", "config_digest": config_digest(request.subject["config"])}
    assert signed["subject"] == decision_subject("cycle", request.subject)


def test_a_cycle_grant_that_signed_another_configuration_is_refused(requested, config, sign, now, assert_valid):
    request = requested.requests[REQUEST]
    other = decision_subject("cycle", {**request.subject, "config": {**request.subject["config"], "steps": 20000}})
    assert other["cycle_id"] == "cyc-1" and other["config_digest"] != sign(REQUEST)["subject"]["config_digest"]
    signed = sign(REQUEST, "grant", "alice", subject=other)

    state, events = submit(requested, config, signed, now + timedelta(minutes=2))

    assert_refused(events, requested, state, "subject_mismatch")
    assert events[0].payload["decision"] == signed
    assert_valid(events)


def test_a_promotion_grant_that_signed_another_adapter_is_refused(config, validation_completed, sign, now):
    state, events = domain.handle(validation_completed("val-1"), domain.initial_state(), config)
    request = state.requests["apr-promotion-val-1"]
    assert request.status == "pending"
    other = decision_subject("promotion", {**request.subject, "adapter_sha256": "d" * 64})
    signed = sign("apr-promotion-val-1", "grant", "alice", subject=other)

    after, events = submit(state, config, signed, now + timedelta(minutes=2))

    assert_refused(events, state, after, "subject_mismatch")
    # the same operator signing the adapter that passed is granted
    _, events = submit(state, config, sign("apr-promotion-val-1", "grant", "alice"), now + timedelta(minutes=2))
    assert [e.type for e in events] == ["approval.granted"]


def test_a_decision_signed_without_a_subject_is_refused(requested, config, sign, now, keys):
    # the format from before subjects were signed: a valid signature over the other fields
    legacy = {k: v for k, v in sign(REQUEST, "grant", "alice").items() if k not in ("subject", "signature")}
    legacy["signature"] = base64.b64encode(keys["alice"].sign(canonical_json(signed_body(legacy)))).decode()

    state, events = submit(requested, config, legacy, now + timedelta(minutes=2))

    assert_refused(events, requested, state, "malformed")


def test_a_decision_other_than_grant_or_reject_is_refused(requested, config, sign, now):
    signed = sign(REQUEST, "rollback", "alice")

    state, events = submit(requested, config, signed, now + timedelta(minutes=2))

    assert_refused(events, requested, state, "unsupported_decision")


def test_a_decision_on_an_expired_request_is_refused(requested, config, sign, now):
    late = now + timedelta(hours=25)
    signed = sign(REQUEST, "grant", "alice", issued_at=late)

    state, events = submit(requested, config, signed, late + timedelta(seconds=1))

    assert_refused(events, requested, state, "request_expired")


def test_something_that_is_not_a_decision_is_refused(requested, config, now, assert_valid):
    state, events = submit(requested, config, "grant it please", now)

    assert_refused(events, requested, state, "malformed")
    assert events[0].aggregate_id == "apr-unknown"
    assert_valid(events)


def test_refusals_leave_no_trace_in_the_state_when_replayed(requested, config, sign, now):
    forged = {**sign(REQUEST, "grant", "alice"), "decision": "reject"}
    _, refused = submit(requested, config, forged, now + timedelta(minutes=2))

    replayed = domain.replay(refused, requested)

    assert replayed == requested

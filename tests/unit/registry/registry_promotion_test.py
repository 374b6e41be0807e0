"""Promotion and rollback, given/when/then on plain values."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.unit.registry.registry_givens import (
    NOW,
    SHA_A,
    SHA_B,
    Ev,
    given,
    granted,
    profile_create,
    promotion_request_id,
    requested,
    subject_of,
    trained,
    valid,
    validated,
    when,
)


def types(events):
    return [e.type for e in events]


def test_a_verified_grant_of_a_passing_adapter_promotes_it(config, sign):
    state = given(trained(SHA_A), validated(SHA_A), requested(SHA_A), config=config)
    grant = granted(SHA_A, sign(f"apr-promotion-val-{SHA_A[:16]}"))

    state, events = when(grant, state, config)

    [promoted] = events
    assert promoted.type == "adapter.promoted" and promoted.aggregate_id == "production"
    assert promoted.payload["adapter_sha256"] == SHA_A
    assert promoted.payload["approver"] == "alice"
    assert promoted.payload["previous_adapter_sha256"] is None
    assert promoted.payload["approval_request_id"] == grant.payload["request_id"]
    assert promoted.payload["decision"] == grant.payload["decision"]  # what put it in service travels with it
    assert state.channels["production"].current.sha256 == SHA_A


def test_a_grant_signs_the_adapter_the_validation_and_the_channel(sign):
    signed = sign(promotion_request_id(SHA_A))

    assert signed["subject"] == {"adapter_sha256": SHA_A, "validation_id": f"val-{SHA_A[:16]}",
                                 "channel": "production"}


@pytest.mark.parametrize("field, value", [
    ("adapter_sha256", SHA_B),               # the operator approved another adapter
    ("validation_id", f"val-{SHA_B[:16]}"),  # ...or the same adapter on another soak
    ("channel", "canary"),                   # ...or for another channel
])
def test_a_grant_that_signed_another_subject_is_refused(config, sign, field, value):
    state = given(validated(SHA_A), validated(SHA_B), requested(SHA_A), config=config)
    request_id = promotion_request_id(SHA_A)
    signed = sign(request_id, subject={**subject_of(request_id), field: value})

    after, events = when(granted(SHA_A, signed), state, config)

    assert types(events) == ["adapter.promotion_refused"]
    assert events[0].payload["reason"] == "subject_mismatch"
    assert events[0].payload["adapter_sha256"] == SHA_A and events[0].payload["operator_id"] == "alice"
    assert after.channels == state.channels and after.acted_on == state.acted_on
    # the refusal used up nothing: the operator's grant of this very subject still promotes
    _, events = when(granted(SHA_A, sign(request_id)), after, config)
    assert types(events) == ["adapter.promoted"]


def test_the_second_promotion_names_the_adapter_it_replaces(config, sign):
    state = given(validated(SHA_A), requested(SHA_A), granted(SHA_A, sign(f"apr-promotion-val-{SHA_A[:16]}")),
                  validated(SHA_B), requested(SHA_B), config=config)

    _, events = when(granted(SHA_B, sign(f"apr-promotion-val-{SHA_B[:16]}")), state, config)

    assert types(events) == ["adapter.promoted"]
    assert events[0].payload["previous_adapter_sha256"] == SHA_A


def test_a_signed_extra_channel_chooses_the_channel(config, sign):
    state = given(validated(SHA_A), requested(SHA_A), config=config)
    signed = sign(f"apr-promotion-val-{SHA_A[:16]}", extra={"channel": "canary"})

    state, [promoted] = when(granted(SHA_A, signed), state, config)

    assert promoted.type == "adapter.promoted"
    assert promoted.payload["channel"] == "canary" and "production" not in state.channels
    assert signed["subject"]["channel"] == "canary"


@pytest.mark.parametrize("who, key, reason", [
    ("mallory", "mallory", "unknown_operator"),      # a key nobody put in the keyring
    ("alice", "mallory", "bad_signature"),           # alice's name, someone else's key
    ("carol", "carol", "missing_role"),              # a requester, not an approver
])
def test_an_unverified_grant_changes_nothing(config, sign, who, key, reason):
    state = given(validated(SHA_A), requested(SHA_A), config=config)
    signed = sign(f"apr-promotion-val-{SHA_A[:16]}", operator=who, key=key)

    after, events = when(granted(SHA_A, signed, operator=who), state, config)

    assert types(events) == ["adapter.promotion_refused"]
    assert events[0].payload["reason"] == reason
    assert after.channels == state.channels and after.acted_on == state.acted_on


def test_a_tampered_grant_is_refused(config, sign):
    state = given(validated(SHA_A), requested(SHA_A), config=config)
    signed = sign(f"apr-promotion-val-{SHA_A[:16]}")
    signed["reason"] = "edited after signing"

    _, events = when(granted(SHA_A, signed), state, config)

    assert events[0].payload["reason"] == "bad_signature"


def test_a_policy_grant_does_not_promote(config):
    state = given(validated(SHA_A), requested(SHA_A), config=config)

    _, events = when(granted(SHA_A, None, operator=None), state, config)

    assert types(events) == ["adapter.promotion_refused"]
    assert events[0].payload["reason"] == "unsigned"


def test_a_grant_signed_for_another_request_is_refused(config, sign):
    state = given(validated(SHA_A), requested(SHA_A), config=config)

    _, events = when(granted(SHA_A, sign("apr-promotion-val-somethingelse")), state, config)

    assert events[0].payload["reason"] == "request_mismatch"


def test_an_expired_decision_is_refused(config, sign):
    state = given(validated(SHA_A), requested(SHA_A), config=config)
    signed = sign(f"apr-promotion-val-{SHA_A[:16]}", at=NOW - timedelta(hours=1))

    _, events = when(granted(SHA_A, signed), state, config)

    assert events[0].payload["reason"] == "expired"


def test_the_requester_may_not_approve_the_promotion(config, sign):
    state = given(validated(SHA_A), requested(SHA_A, requested_by="alice"), config=config)

    _, events = when(granted(SHA_A, sign(f"apr-promotion-val-{SHA_A[:16]}")), state, config)

    assert events[0].payload["reason"] == "self_approval"


def test_a_failed_validation_is_not_promoted(config, sign):
    state = given(validated(SHA_A, verdict="fail"), requested(SHA_A), config=config)

    _, events = when(granted(SHA_A, sign(f"apr-promotion-val-{SHA_A[:16]}")), state, config)

    assert events[0].payload["reason"] == "validation_not_passed"


def test_a_fallback_artefact_is_not_promoted(config, sign):
    state = given(trained(SHA_A, status="fallback"), validated(SHA_A), requested(SHA_A), config=config)

    _, events = when(granted(SHA_A, sign(f"apr-promotion-val-{SHA_A[:16]}")), state, config)

    assert events[0].payload["reason"] == "fallback_artefact"


def test_a_drift_soak_does_not_count_as_the_candidate_validation(config, sign):
    state = given(validated(SHA_A, verdict="fail"), validated(SHA_A, purpose="drift"), requested(SHA_A),
                  config=config)

    _, events = when(granted(SHA_A, sign(f"apr-promotion-val-{SHA_A[:16]}")), state, config)

    assert events[0].payload["reason"] == "validation_not_passed"


def test_a_grant_that_overtakes_its_validation_waits_for_it(config, sign):
    state = given(requested(SHA_A), config=config)

    state, events = when(granted(SHA_A, sign(f"apr-promotion-val-{SHA_A[:16]}")), state, config)
    assert events == [] and state.parked

    state, events = when(validated(SHA_A), state, config)
    assert types(events) == ["adapter.promoted"] and not state.parked


def test_a_grant_delivered_again_promotes_once(config, sign):
    grant = granted(SHA_A, sign(f"apr-promotion-val-{SHA_A[:16]}"))
    state = given(validated(SHA_A), requested(SHA_A), grant, config=config)

    _, events = when(grant, state, config)

    assert events == []


def test_a_forged_grant_does_not_block_the_genuine_one(config, sign):
    state = given(validated(SHA_A), requested(SHA_A),
                  granted(SHA_A, sign(f"apr-promotion-val-{SHA_A[:16]}", operator="alice", key="mallory")),
                  config=config)

    _, events = when(granted(SHA_A, sign(f"apr-promotion-val-{SHA_A[:16]}")), state, config)

    assert types(events) == ["adapter.promoted"]


def test_a_promotion_moves_every_profile_on_that_channel(config, sign):
    state = given(profile_create("p-1"), profile_create("p-2"), profile_create("p-3", channel="staging"),
                  validated(SHA_A), requested(SHA_A), config=config)

    state, events = when(granted(SHA_A, sign(f"apr-promotion-val-{SHA_A[:16]}")), state, config)

    assert types(events) == ["adapter.promoted", "profile.adapter_updated", "profile.adapter_updated"]
    assert sorted(e.aggregate_id for e in events[1:]) == ["p-1", "p-2"]
    assert all(e.payload["decision"] == events[0].payload["decision"] for e in events[1:])
    assert state.profiles["p-1"].active_adapter_sha256 == SHA_A
    assert state.profiles["p-3"].active_adapter_sha256 is None
    assert state.profiles["p-1"].version == 1  # the version counts edits, not promotions


# --- rollback ---------------------------------------------------------------------


def rollback(sign, sha: str, operator: str = "dave", channel: str = "production", **kw) -> Ev:
    signed = sign(f"rb-{channel}-1", decision="rollback", operator=operator,
                  extra={"channel": channel, "adapter_sha256": sha}, **kw)
    return valid(Ev("adapter.rollback_requested", "rb-1", {
        "channel": channel, "adapter_sha256": sha, "signed": signed, "submitted_via": "cli"}))


@pytest.fixture
def two_promotions(config, sign):
    return given(profile_create("p-1"),
                 validated(SHA_A), requested(SHA_A), granted(SHA_A, sign(f"apr-promotion-val-{SHA_A[:16]}")),
                 validated(SHA_B), requested(SHA_B), granted(SHA_B, sign(f"apr-promotion-val-{SHA_B[:16]}")),
                 config=config)


def test_an_admin_rolls_a_channel_back_to_an_adapter_it_served(config, sign, two_promotions):
    state, events = when(rollback(sign, SHA_A), two_promotions, config)

    assert types(events) == ["adapter.rolled_back", "profile.adapter_updated"]
    assert events[0].payload["previous_adapter_sha256"] == SHA_B
    assert events[0].payload["operator_id"] == "dave"
    assert events[0].payload["decision"]["decision"] == "rollback"
    assert events[1].payload["decision"] == events[0].payload["decision"]  # the signed rollback, not a grant
    assert state.channels["production"].current.sha256 == SHA_A
    assert state.profiles["p-1"].active_adapter_sha256 == SHA_A


@pytest.mark.parametrize("operator, key, reason", [
    ("alice", "alice", "missing_role"),       # approvers promote, admins roll back
    ("dave", "mallory", "bad_signature"),
])
def test_a_rollback_needs_an_admins_signature(config, sign, two_promotions, operator, key, reason):
    after, events = when(rollback(sign, SHA_A, operator=operator, key=key), two_promotions, config)

    assert types(events) == ["adapter.rollback_refused"]
    assert events[0].payload["reason"] == reason
    assert after.channels == two_promotions.channels


def test_a_rollback_to_an_adapter_that_never_served_is_refused(config, sign, two_promotions):
    _, events = when(rollback(sign, "c" * 64), two_promotions, config)

    assert events[0].payload["reason"] == "never_served"


def test_a_signature_for_another_target_is_refused(config, sign, two_promotions):
    command = rollback(sign, SHA_A)
    command.payload["adapter_sha256"] = SHA_B  # the signed extra still names SHA_A

    _, events = when(command, two_promotions, config)

    assert events[0].payload["reason"] == "subject_mismatch"  # the signed subject names SHA_A


def test_a_replayed_rollback_is_refused(config, sign, two_promotions):
    first = rollback(sign, SHA_A, nonce="n-1")
    state, _ = when(first, two_promotions, config)
    state, _ = when(rollback(sign, SHA_B, nonce="n-2"), state, config)

    _, events = when(Ev(first.type, first.aggregate_id, first.payload), state, config)

    assert events[0].payload["reason"] == "nonce_reused"

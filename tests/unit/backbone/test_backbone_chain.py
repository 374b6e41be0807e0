"""The chain of trust behind the events that start training or put an adapter in service
(shared.contracts.chain): what authorised them travels with them, and is checked again where they act."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.bus import signed_values
from shared.contracts.chain import verify_service_decision, verify_training_grant
from shared.contracts.envelope import Envelope, NewEvent, Producer, iso, seal
from shared.contracts.policies import proposal_subject
from shared.contracts.signing import Signer, TrustState
from shared.contracts.trust import Keyring, decision_subject, public_key_b64, sign_decision

T0 = datetime(2025, 3, 4, 14, 3, tzinfo=timezone.utc)
ADAPTER, OTHER = "c" * 64, "d" * 64
OPERATORS = {"alice": ("approver",), "carol": ("requester",), "dave": ("admin",)}
KEYS = {name: Ed25519PrivateKey.from_private_bytes(bytes([i + 21]) * 32)
        for i, name in enumerate([*OPERATORS, "mallory"])}
APPROVAL = Signer("service:approval", Ed25519PrivateKey.from_private_bytes(bytes([31]) * 32))
TRAINER = Signer("service:trainer", Ed25519PrivateKey.from_private_bytes(bytes([32]) * 32))
STRANGER = Signer("service:approval", Ed25519PrivateKey.from_private_bytes(bytes([33]) * 32))  # not anchored


@pytest.fixture
def trust() -> TrustState:
    return TrustState.from_anchors({"services": {"approval": {"public_key": APPROVAL.public_key},
                                                 "trainer": {"public_key": TRAINER.public_key}}})


@pytest.fixture
def keyring() -> Keyring:
    ring = Keyring()
    for name, roles in OPERATORS.items():
        ring.add(name, public_key_b64(KEYS[name]), roles, created_at=T0 - timedelta(days=1))
    return ring


PROPOSAL = {"cycle_id": "cyc-1", "kind": "mntp", "model": "smollm2",
            "dataset": {"dataset_id": "ds-1", "sha256": "a" * 64, "uri": "file:///data/ds-1.jsonl"},
            "config": {"learning_rate": 2e-4, "lora_rank": 8, "steps": 200}, "warm_start": None,
            "energy_estimate_wh": 120.0, "requested_by": "evolution"}
SUBJECT = proposal_subject(PROPOSAL)


def decide(decision: str = "grant", operator: str = "alice", *, request_id: str = "apr-cycle-cyc-1",
           subject: dict | None = None, key: str | None = None, at: datetime = T0, extra: dict | None = None) -> dict:
    return sign_decision(request_id, decision, operator, KEYS[key or operator], at - timedelta(minutes=1),
                         at + timedelta(minutes=9), subject=subject, extra=extra)


def granted(decision: dict | None, *, signer: Signer = APPROVAL, subject: dict = SUBJECT, kind: str = "cycle",
            event_type: str = "approval.granted", producer: str = "approval") -> dict:
    """The approval.granted envelope as the approval service publishes it (signed), as a dict."""
    event = seal(NewEvent(event_type, "apr-cycle-cyc-1", {
        "request_id": "apr-cycle-cyc-1", "kind": kind, "subject_id": "cyc-1", "subject": dict(subject),
        "cycle_id": "cyc-1", "requested_by": "evolution",
        "actor": f"operator:{decision['operator_id']}" if decision else "policy:auto-mntp-under-energy",
        "policy": None if decision else {"name": "auto-mntp-under-energy", "rule": {}},
        "decision": decision, "granted_at": iso(T0)}), sequence=2,
        producer=Producer(service=producer, node="n"), correlation_id="cyc-1", causation_id=None, schema_version=1,
        occurred_at=T0)
    return Envelope.from_json(signed_values(signer, [event], [None])[0]).to_dict()


def training(grant: dict | None, config: dict | None = None) -> dict:
    """A training.requested payload resting on ``grant``."""
    return {"job_id": "job-cyc-1", "cycle_id": "cyc-1", "kind": "mntp", "model": "smollm2",
            "config": dict(PROPOSAL["config"] if config is None else config), "grant": grant}


def operator_grant() -> dict:
    return granted(decide(subject=decision_subject("cycle", SUBJECT)))


# --- training.requested ----------------------------------------------------------------------------


def test_an_operators_grant_of_this_cycle_and_configuration_lets_training_start(trust, keyring):
    result = verify_training_grant(training(operator_grant()), trust, keyring)

    assert result.ok, result


def test_a_policy_grant_rests_on_the_approval_services_signature(trust, keyring):
    assert verify_training_grant(training(granted(None)), trust, keyring).ok


@pytest.mark.parametrize("grant, reason", [
    (None, "no_grant"),
    ({"type": "approval.granted"}, "malformed_grant"),
])
def test_training_without_a_grant_is_refused(trust, keyring, grant, reason):
    assert verify_training_grant(training(grant), trust, keyring).reason == reason


def test_a_grant_that_is_another_event_is_refused(trust, keyring):
    other = granted(None, event_type="approval.rejected")

    assert verify_training_grant(training(other), trust, keyring).reason == "malformed_grant"


def test_a_grant_changed_after_the_approval_service_signed_it_is_refused(trust, keyring):
    grant = operator_grant()
    grant["payload"]["subject"] = {**grant["payload"]["subject"], "config": {"steps": 100_000}}

    assert verify_training_grant(training(grant), trust, keyring).reason == "grant_bad_signature"


@pytest.mark.parametrize("signer, producer, reason", [
    (STRANGER, "approval", "grant_unknown_key"),              # a key nobody anchored
    (TRAINER, "trainer", "grant_unauthorised_producer"),      # a service that may not grant
    (TRAINER, "approval", "grant_unauthorised_producer"),     # ...even naming the approval service
])
def test_a_grant_not_signed_by_the_approval_service_is_refused(trust, keyring, signer, producer, reason):
    grant = granted(decide(subject=decision_subject("cycle", SUBJECT)), signer=signer, producer=producer)

    assert verify_training_grant(training(grant), trust, keyring).reason == reason


def test_an_unsigned_grant_is_refused(trust, keyring):
    grant = operator_grant()
    del grant["signature"]

    assert verify_training_grant(training(grant), trust, keyring).reason == "grant_unsigned"


def test_a_grant_of_another_cycle_is_refused(trust, keyring):
    payload = {**training(operator_grant()), "cycle_id": "cyc-2"}

    assert verify_training_grant(payload, trust, keyring).reason == "grant_mismatch"


def test_a_configuration_other_than_the_one_granted_is_refused(trust, keyring):
    payload = training(operator_grant(), config={**PROPOSAL["config"], "steps": 100_000})

    assert verify_training_grant(payload, trust, keyring).reason == "config_mismatch"


def test_an_operator_decision_that_signed_another_configuration_is_refused(trust, keyring):
    # the approval service vouched for the grant, but alice signed a different configuration
    elsewhere = decision_subject("cycle", {**SUBJECT, "config": {**SUBJECT["config"], "steps": 100_000}})
    grant = granted(decide(subject=elsewhere))

    assert verify_training_grant(training(grant), trust, keyring).reason == "subject_mismatch"


@pytest.mark.parametrize("operator, key, reason", [
    ("carol", "carol", "missing_role"),
    ("mallory", "mallory", "unknown_operator"),
    ("alice", "mallory", "bad_signature"),
])
def test_an_operator_decision_that_does_not_verify_is_refused(trust, keyring, operator, key, reason):
    grant = granted(decide(operator=operator, key=key, subject=decision_subject("cycle", SUBJECT)))

    assert verify_training_grant(training(grant), trust, keyring).reason == reason


def test_a_decision_that_had_expired_when_it_was_granted_is_refused(trust, keyring):
    grant = granted(decide(subject=decision_subject("cycle", SUBJECT), at=T0 - timedelta(hours=1)))

    assert verify_training_grant(training(grant), trust, keyring).reason == "expired"


# --- adapters put in service ---------------------------------------------------------------------


def promotion_decision(**subject) -> dict:
    about = {"adapter_sha256": ADAPTER, "validation_id": "val-1", "channel": "production", **subject}
    return decide(request_id="apr-promotion-val-1", subject=decision_subject("promotion", about))


def promoted(decision: dict | None, **changes) -> dict:
    return {"channel": "production", "adapter_sha256": ADAPTER, "adapter_uri": f"artefact://sha256/{ADAPTER}",
            "validation_id": "val-1", "approver": "alice", "decision": decision, **changes}


def profile_updated(decision: dict | None, cause: str = "adapter.promoted", **changes) -> dict:
    return {"profile_id": "p-1", "channel": "production", "adapter_sha256": ADAPTER, "cause": cause,
            "decision": decision, **changes}


def test_a_promotion_an_approver_signed_for_this_adapter_and_channel_is_served(keyring):
    decision = promotion_decision()

    assert verify_service_decision(promoted(decision), keyring, cause="adapter.promoted").ok
    assert verify_service_decision(profile_updated(decision), keyring, cause="adapter.promoted").ok


@pytest.mark.parametrize("payload, reason", [
    (promoted(None), "no_decision"),
    (promoted(promotion_decision(adapter_sha256=OTHER)), "subject_mismatch"),
    (promoted(promotion_decision(channel="staging")), "subject_mismatch"),
    (promoted(promotion_decision(validation_id="val-2")), "subject_mismatch"),
    (promoted(promotion_decision(), adapter_sha256=OTHER), "subject_mismatch"),  # the event names another adapter
    (profile_updated(promotion_decision(), channel="staging"), "subject_mismatch"),
])
def test_a_promotion_without_a_decision_for_this_adapter_is_not_served(keyring, payload, reason):
    assert verify_service_decision(payload, keyring, cause="adapter.promoted").reason == reason


def test_a_promotion_decision_by_someone_who_may_not_approve_is_not_served(keyring):
    about = {"adapter_sha256": ADAPTER, "validation_id": "val-1", "channel": "production"}
    by_requester = sign_decision("apr-promotion-val-1", "grant", "carol", KEYS["carol"], T0, T0 + timedelta(minutes=9),
                                 subject=decision_subject("promotion", about))
    tampered = {**promotion_decision(), "signature": base64.b64encode(b"\x02" * 64).decode()}

    assert verify_service_decision(promoted(by_requester), keyring, cause="adapter.promoted").reason == "missing_role"
    assert verify_service_decision(promoted(tampered), keyring, cause="adapter.promoted").reason == "bad_signature"


def rollback_decision(operator: str = "dave", adapter: str = ADAPTER) -> dict:
    target = {"channel": "production", "adapter_sha256": adapter}
    return decide("rollback", operator, request_id="rb-1", extra=target,
                  subject=decision_subject("rollback", target))


def test_a_rollback_an_admin_signed_for_this_adapter_is_served(keyring):
    payload = profile_updated(rollback_decision(), cause="adapter.rolled_back")

    assert verify_service_decision(payload, keyring, cause="adapter.rolled_back").ok


@pytest.mark.parametrize("decision, reason", [
    (rollback_decision(adapter=OTHER), "subject_mismatch"),
    (rollback_decision(operator="alice"), "missing_role"),       # approvers promote, admins roll back
    (decide("grant", "dave", request_id="rb-1", extra={"channel": "production", "adapter_sha256": ADAPTER}),
     "not_a_rollback"),                                          # a grant is no rollback
])
def test_a_rollback_without_an_admins_decision_for_this_adapter_is_not_served(keyring, decision, reason):
    payload = profile_updated(decision, cause="adapter.rolled_back")

    assert verify_service_decision(payload, keyring, cause="adapter.rolled_back").reason == reason

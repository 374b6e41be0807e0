"""With the trainer's configuration, a training.requested trains only on the signed grant of exactly
that cycle and configuration; without one (the pure tests), the domain decides as before."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.trainer.domain import TrainerConfig, decide, initial_state
from shared.bus import signed_values
from shared.contracts import schemas
from shared.contracts.envelope import Envelope, NewEvent, Producer, iso, seal
from shared.contracts.signing import Signer, TrustState
from shared.contracts.trust import Keyring, decision_subject, public_key_b64, sign_decision

T0 = datetime(2025, 3, 4, 14, 3, tzinfo=timezone.utc)
ALICE = Ed25519PrivateKey.from_private_bytes(bytes([51]) * 32)
APPROVAL = Signer("service:approval", Ed25519PrivateKey.from_private_bytes(bytes([52]) * 32))
CONFIG = {"steps": 10, "learning_rate": 1e-3, "batch_size": 8}
SUBJECT = {"cycle_id": "cycle-1", "training_kind": "mntp", "model": "tiny", "dataset_id": "ds-1",
           "energy_estimate_wh": 120.0, "config": CONFIG, "warm_start": None}


@dataclass(frozen=True)
class Event:
    type: str
    aggregate_id: str
    payload: dict[str, Any] = field(default_factory=dict)


def trainer_config() -> TrainerConfig:
    keyring = Keyring()
    keyring.add("alice", public_key_b64(ALICE), ["approver"], created_at=T0 - timedelta(days=1))
    return TrainerConfig(trust=TrustState.from_anchors({"services": {"approval": {"public_key": APPROVAL.public_key}}}),
                         keyring=keyring)


def grant(signed_subject: dict) -> dict:
    """The approval service's signed approval.granted, on alice's decision signing ``signed_subject``."""
    decision = sign_decision("apr-cycle-cycle-1", "grant", "alice", ALICE, T0 - timedelta(minutes=1),
                             T0 + timedelta(minutes=9), subject=signed_subject)
    event = seal(NewEvent("approval.granted", "apr-cycle-cycle-1", {
        "request_id": "apr-cycle-cycle-1", "kind": "cycle", "subject_id": "cycle-1", "subject": SUBJECT,
        "cycle_id": "cycle-1", "requested_by": "evolution", "actor": "operator:alice", "policy": None,
        "decision": decision, "granted_at": iso(T0)}), sequence=2, producer=Producer(service="approval", node="n"),
        correlation_id="cycle-1", causation_id=None, schema_version=1, occurred_at=T0)
    return Envelope.from_json(signed_values(APPROVAL, [event], [None])[0]).to_dict()


def requested(grant: dict | None) -> Event:
    return Event("training.requested", "job-1", {
        "job_id": "job-1", "cycle_id": "cycle-1", "kind": "mntp", "model": "tiny",
        "dataset": {"dataset_id": "ds-1", "sha256": "a" * 64, "uri": "file:///data/ds-1.jsonl"},
        "config": dict(CONFIG), "warm_start": None, "hardware_plan": None, "requested_by": "evolution",
        "grant": grant})


def test_a_request_on_the_grant_of_this_cycle_and_configuration_starts_the_job():
    request = requested(grant(decision_subject("cycle", SUBJECT)))
    schemas.validate_payload(request.type, schemas.current_version(request.type), request.payload)

    events = decide(request, initial_state(), trainer_config())

    assert [e.type for e in events] == ["training.started"]


def test_a_request_without_a_grant_fails_at_the_approval_stage():
    [failed] = decide(requested(None), initial_state(), trainer_config())

    assert failed.type == "training.failed"
    assert failed.payload["stage"] == "approval" and failed.payload["error"].startswith("no_grant")


def test_a_request_on_a_grant_whose_operator_signed_another_configuration_fails():
    elsewhere = decision_subject("cycle", {**SUBJECT, "config": {**CONFIG, "steps": 100_000}})

    [failed] = decide(requested(grant(elsewhere)), initial_state(), trainer_config())

    assert failed.type == "training.failed"
    assert failed.payload["stage"] == "approval" and failed.payload["error"].startswith("subject_mismatch")


def test_without_a_configuration_the_domain_decides_as_before():
    assert [e.type for e in decide(requested(None), initial_state())] == ["training.started"]

"""Fixtures for the approval domain: a clock, operators with keys, events as plain values."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.approval import domain
from shared.contracts.policies import default_policies, proposal_subject
from shared.contracts import schemas
from shared.contracts.trust import Keyring, decision_subject, public_key_b64, sign_decision

NOW = datetime(2025, 3, 4, 14, 3, tzinfo=timezone.utc)


@dataclass(frozen=True)
class ConsumedEvent:
    type: str
    aggregate_id: str
    payload: dict[str, Any]
    occurred_at: datetime = NOW
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    correlation_id: str | None = None


@pytest.fixture
def now() -> datetime:
    return NOW


@pytest.fixture
def keys() -> dict[str, Ed25519PrivateKey]:
    # Fixed seeds: the same keys on every run, so failures reproduce.
    return {name: Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32)
            for i, name in enumerate(("alice", "bob", "carol", "dave", "mallory"))}


@pytest.fixture
def keyring(keys) -> Keyring:
    ring = Keyring()
    ring.add("alice", public_key_b64(keys["alice"]), ["approver"], created_at=NOW)
    ring.add("bob", public_key_b64(keys["bob"]), ["approver", "requester"], created_at=NOW)
    ring.add("carol", public_key_b64(keys["carol"]), ["requester"], created_at=NOW)
    ring.add("dave", public_key_b64(keys["dave"]), ["admin"], created_at=NOW)
    return ring  # mallory has a key but is not in the keyring


@pytest.fixture
def config(keyring) -> domain.ApprovalConfig:
    return domain.ApprovalConfig(keyring=keyring, policies=default_policies(), request_ttl=timedelta(hours=24))


def proposal_payload(cycle_id: str = "cyc-1", *, energy_wh: float = 120.0, kind: str = "mntp",
                     requested_by: str = "evolution", occurred_at: datetime = NOW) -> dict[str, Any]:
    """A ``cycle.proposed`` (``research.proposed`` for ``kind="rl"``) payload."""
    return {
        "cycle_id": cycle_id,
        "kind": kind,
        "model": "smollm2",
        "dataset": {"dataset_id": "ds-1", "sha256": "a" * 64, "uri": "file:///data/ds-1.jsonl"},
        "config": {"learning_rate": 2e-4, "lora_rank": 8, "lora_alpha": 16, "mask_ratio": 0.2,
                   "steps": 200, "batch_size": 8},
        "warm_start": None if kind == "mntp" else "b" * 64,
        "energy_estimate_wh": energy_wh,
        "requested_by": requested_by,
        "proposed_at": occurred_at.isoformat(),
    }


ADAPTER = "c" * 64  # the adapter every validation_completed passes


def subject_of(request_id: str) -> dict[str, Any]:
    """What a decision on ``request_id`` must sign, for the requests the fixtures below open
    (``apr-cycle-<cycle>``, ``apr-research-<cycle>``, ``apr-promotion-<validation>``)."""
    _, kind, subject_id = request_id.split("-", 2)
    if kind in ("cycle", "research"):
        payload = proposal_payload(subject_id, kind="mntp" if kind == "cycle" else "rl")
        return decision_subject(kind, proposal_subject(payload))
    return decision_subject(kind, {"adapter_sha256": ADAPTER, "validation_id": subject_id})


@pytest.fixture
def sign(keys):
    def _sign(request_id: str, decision: str = "grant", operator: str = "alice", *, key: str | None = None,
              issued_at: datetime | None = None, ttl: timedelta = timedelta(minutes=10),
              nonce: str | None = None, reason: str | None = None, subject: dict | None = None) -> dict:
        """A decision on ``request_id`` signing the request's subject (``subject_of``) unless ``subject`` is given."""
        issued = issued_at or NOW + timedelta(minutes=1)
        return sign_decision(request_id, decision, operator, keys[key or operator], issued, issued + ttl,
                             nonce=nonce, reason=reason,
                             subject=subject_of(request_id) if subject is None else subject)
    return _sign


@pytest.fixture
def cycle_proposed():
    def _event(cycle_id: str = "cyc-1", *, energy_wh: float = 120.0, kind: str = "mntp",
               requested_by: str = "evolution", occurred_at: datetime = NOW) -> ConsumedEvent:
        event_type = "cycle.proposed" if kind == "mntp" else "research.proposed"
        payload = proposal_payload(cycle_id, energy_wh=energy_wh, kind=kind, requested_by=requested_by,
                                   occurred_at=occurred_at)
        return ConsumedEvent(event_type, cycle_id, payload, occurred_at)
    return _event


@pytest.fixture
def validation_completed():
    def _event(validation_id: str = "val-1", *, verdict: str = "pass", purpose: str = "candidate",
               cycle_id: str | None = "cyc-1", occurred_at: datetime = NOW) -> ConsumedEvent:
        payload = {
            "validation_id": validation_id,
            "adapter_sha256": ADAPTER,
            "adapter_uri": "file:///var/artefacts/c.safetensors",
            "baseline": {"kind": "production", "adapter_sha256": "b" * 64},
            "kind": "mntp",
            "purpose": purpose,
            "cycle_id": cycle_id,
            "verdict": verdict,
            "explanation": f"{verdict}: 3 of 3 soak cycles",
            "score": 0.9,
            "raw_data_uri": "file:///var/validation/val-1.json",
            "sample_sizes": {"candidate": {"latency_ms": 300}, "baseline": {"latency_ms": 300}},
            "thresholds": {},
        }
        return ConsumedEvent("validation.completed", validation_id, payload, occurred_at)
    return _event


@pytest.fixture
def event():
    def _event(type: str, aggregate_id: str, payload: dict, occurred_at: datetime = NOW) -> ConsumedEvent:
        return ConsumedEvent(type, aggregate_id, payload, occurred_at)
    return _event


@pytest.fixture
def requested(config, cycle_proposed):
    """The state after one cycle proposal that needs a human approver (120 Wh > 50 Wh)."""
    state, events = domain.handle(cycle_proposed("cyc-1"), domain.initial_state(), config)
    assert [e.type for e in events] == ["approval.requested"]
    return state


@pytest.fixture
def assert_valid():
    def _check(events) -> None:
        for e in events:
            schemas.validate_payload(e.type, 1, e.payload)
    return _check

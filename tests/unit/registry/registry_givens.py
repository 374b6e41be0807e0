"""Givens for the registry's domain: operators with fixed keys, events as plain values."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.registry import domain
from shared.contracts import schemas
from shared.contracts.trust import Keyring, decision_subject, public_key_b64, sign_decision

NOW = datetime(2025, 3, 4, 14, 3, tzinfo=timezone.utc)
SHA_A = "a" * 64
SHA_B = "b" * 64


@dataclass(frozen=True)
class Ev:
    type: str
    aggregate_id: str
    payload: dict[str, Any]
    occurred_at: datetime = NOW
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@pytest.fixture
def keys() -> dict[str, Ed25519PrivateKey]:
    return {name: Ed25519PrivateKey.from_private_bytes(bytes([i + 11]) * 32)
            for i, name in enumerate(("alice", "carol", "dave", "mallory"))}


@pytest.fixture
def config(keys) -> domain.RegistryConfig:
    ring = Keyring()
    ring.add("alice", public_key_b64(keys["alice"]), ["approver"], created_at=NOW)
    ring.add("carol", public_key_b64(keys["carol"]), ["requester"], created_at=NOW)
    ring.add("dave", public_key_b64(keys["dave"]), ["admin"], created_at=NOW)
    return domain.RegistryConfig(keyring=ring)  # mallory has a key, not a place in the keyring


def promotion_request_id(sha: str) -> str:
    return f"apr-promotion-val-{sha[:16]}"


# The givens' adapters are one hex digit repeated (SHA_A, SHA_B, "c" * 64...): a promotion request id names
# its adapter, so a decision on it can sign the adapter without the test repeating it.
_ADAPTERS = {promotion_request_id(digit * 64): digit * 64 for digit in "0123456789abcdef"}


def subject_of(request_id: str, decision: str = "grant", extra: dict | None = None) -> dict:
    """What a ``decision`` on ``request_id`` signs (``decision_subject``): for a grant, the promotion
    request's adapter and validation (``requested``) and the channel its ``extra`` names; for a rollback,
    the channel and adapter its ``extra`` names."""
    extra = extra or {}
    if decision == "rollback":
        return decision_subject("rollback", extra)
    sha = _ADAPTERS.get(request_id)
    subject = dict(requested(sha).payload["subject"]) if sha else {"validation_id": request_id.removeprefix("apr-promotion-")}
    return decision_subject("promotion", {**subject, "channel": extra.get("channel")})


@pytest.fixture
def sign(keys):
    def _sign(request_id: str, decision: str = "grant", operator: str = "alice", *, key: str | None = None,
              at: datetime = NOW, extra: dict | None = None, nonce: str | None = None,
              subject: dict | None = None) -> dict:
        """A decision signing ``subject``, by default what it is about (``subject_of``)."""
        return sign_decision(request_id, decision, operator, keys[key or operator], issued_at=at - timedelta(minutes=1),
                             expires_at=at + timedelta(minutes=9), nonce=nonce, extra=extra,
                             subject=subject_of(request_id, decision, extra) if subject is None else subject)

    return _sign


def valid(event: Ev) -> Ev:
    """Every given and every decided event must satisfy the contract."""
    schemas.validate_payload(event.type, schemas.current_version(event.type), event.payload)
    return event


def validated(sha: str, verdict: str = "pass", uri: str | None = None, purpose: str = "candidate") -> Ev:
    sizes = {"candidate": {"latency_ms": 30}, "baseline": {"latency_ms": 30}}
    thresholds = {"metrics": {}, "groups": {}, "pass_score": 0.6, "marginal_score": 0.4,
                  "consecutive_failures": 2, "min_samples": 5}
    return valid(Ev("validation.completed", f"val-{sha[:16]}", {
        "validation_id": f"val-{sha[:16]}", "adapter_sha256": sha, "adapter_uri": uri or f"file:///artefacts/{sha}",
        "baseline": {"kind": "base", "adapter_sha256": None}, "kind": "mntp", "purpose": purpose,
        "cycle_id": f"cyc-{sha[:4]}", "verdict": verdict, "explanation": f"soak {verdict}", "score": 0.8,
        "raw_data_uri": None, "sample_sizes": sizes, "thresholds": thresholds}))


def trained(sha: str, status: str = "trained") -> Ev:
    # training.completed's schema is the trainer's; the registry reads it defensively
    return Ev("training.completed", f"job-{sha[:6]}", {
        "job_id": f"job-{sha[:6]}", "cycle_id": f"cyc-{sha[:4]}", "adapter_uri": f"file:///artefacts/{sha}",
        "adapter_sha256": sha, "status": status, "kind": "mntp", "metrics": {"loss_before": 3.0, "loss_after": 2.0}})


def requested(sha: str, requested_by: str = "validator") -> Ev:
    request_id = f"apr-promotion-val-{sha[:16]}"
    return valid(Ev("approval.requested", request_id, {
        "request_id": request_id, "kind": "promotion", "subject_id": f"val-{sha[:16]}",
        "subject": {"validation_id": f"val-{sha[:16]}", "adapter_sha256": sha, "cycle_id": f"cyc-{sha[:4]}",
                    "verdict": "pass", "summary": {}},
        "cycle_id": f"cyc-{sha[:4]}", "evidence": [{"type": "adapter", "id": sha, "sha256": sha}],
        "policy": {"name": "promotion-needs-approver", "auto_approve": False, "rule": {}},
        "requested_by": requested_by, "requested_at": NOW.isoformat(), "expires_at": (NOW + timedelta(days=1)).isoformat()}))


def granted(sha: str, signed: dict | None, operator: str | None = "alice", at: datetime = NOW) -> Ev:
    request_id = f"apr-promotion-val-{sha[:16]}"
    payload = {
        "request_id": request_id, "kind": "promotion", "subject_id": f"val-{sha[:16]}",
        "subject": {"validation_id": f"val-{sha[:16]}", "adapter_sha256": sha}, "cycle_id": f"cyc-{sha[:4]}",
        "requested_by": "validator", "actor": f"operator:{operator}" if signed else "policy:auto",
        "decision": signed, "policy": None if signed else {"name": "auto", "rule": {}},
        "granted_at": at.isoformat(),
    }
    if signed and operator:
        payload["operator_id"] = operator
    return valid(Ev("approval.granted", request_id, payload, occurred_at=at))


def profile_create(profile_id: str, channel: str = "production") -> Ev:
    return valid(Ev("profile.create_requested", f"pcmd-{uuid.uuid4().hex[:8]}", {
        "profile_id": profile_id, "traits": {"tone": "warm"}, "interaction_style": "concise",
        "context_preferences": {"history_turns": 8}, "channel": channel, "requested_by": "alice"}))


def profile_update(profile_id: str, expected: int, **changes) -> Ev:
    return valid(Ev("profile.update_requested", f"pcmd-{uuid.uuid4().hex[:8]}", {
        "profile_id": profile_id, "expected_version": expected, "changes": changes, "requested_by": "alice"}))


def given(*events: Ev, config: domain.RegistryConfig) -> domain.RegistryState:
    """The state after the registry handled ``events`` (folding its own decisions too)."""
    state = domain.initial_state()
    for event in events:
        state, _ = domain.handle(event, state, config)
    return state


def when(event: Ev, state: domain.RegistryState, config: domain.RegistryConfig):
    state, decided = domain.handle(event, state, config)
    for new in decided:
        valid(Ev(new.type, new.aggregate_id, new.payload))
    # a round trip through JSON, as the service stores it, changes nothing
    assert domain.RegistryState.from_dict(state.to_dict()) == state
    return state, decided

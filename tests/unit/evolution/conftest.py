"""Fixtures for the evolution domain: a clock, operators, facts from other services as plain values."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.contracts.policies import default_policies
from services.evolution import domain
from shared.contracts import schemas
from shared.contracts.envelope import iso
from shared.contracts.trust import Keyring, public_key_b64

NOW = datetime(2025, 3, 4, 14, 3, tzinfo=timezone.utc)
ADAPTER = "c" * 64


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
    return {name: Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32)
            for i, name in enumerate(("alice", "bob", "carol", "mallory"))}


@pytest.fixture
def keyring(keys) -> Keyring:
    ring = Keyring()
    ring.add("alice", public_key_b64(keys["alice"]), ["approver"], created_at=NOW)
    ring.add("bob", public_key_b64(keys["bob"]), ["approver", "requester"], created_at=NOW)
    ring.add("carol", public_key_b64(keys["carol"]), ["requester"], created_at=NOW)
    return ring


@pytest.fixture
def config(keyring) -> domain.EvolutionConfig:
    return domain.EvolutionConfig(keyring=keyring, policies=default_policies(), schedule_interval=None)


@pytest.fixture
def event():
    def _event(type: str, aggregate_id: str, payload: dict, occurred_at: datetime = NOW) -> ConsumedEvent:
        return ConsumedEvent(type, aggregate_id, payload, occurred_at)
    return _event


@pytest.fixture
def dataset_registered(event):
    def _dataset(dataset_id: str = "ds-1", *, quarantined: bool = False, sha: str = "a" * 64,
                 occurred_at: datetime = NOW) -> ConsumedEvent:
        return event("dataset.registered", dataset_id, {
            "dataset_id": dataset_id, "name": dataset_id, "sha256": sha, "uri": f"file:///data/{dataset_id}.jsonl",
            "record_count": 100, "quarantined": quarantined,
            "quarantine_reason": "pii found" if quarantined else None}, occurred_at)
    return _dataset


@pytest.fixture
def facts(event):
    """Builders for what other services publish, shaped like their schemas."""

    class Facts:
        @staticmethod
        def energy_reported(wh: float, ended_at: datetime, carbon: float = 200.0, job: str | None = None):
            job = job or f"job-{uuid.uuid4().hex[:8]}"
            return event("energy.reported", job, {
                "job_id": job, "job_kind": "training", "cycle_id": None, "joules": wh * 3600, "wh": wh,
                "gco2e": wh / 1000 * carbon, "pue": 1.0, "carbon_intensity": carbon, "method": "rapl",
                "methods": {"cpu": "rapl"}, "reason": None,
                "window": {"started_at": None, "ended_at": iso(ended_at)}}, ended_at)

        @staticmethod
        def budget_exceeded(until: datetime, at: datetime = NOW):
            return event("energy.budget_exceeded", "budget-24h", {
                "window": "24h", "window_s": 86400.0, "budget_wh": 500.0, "used_wh": 510.0,
                "crossed_at": iso(at), "until": iso(until)}, at)

        @staticmethod
        def hardware(load_1m: float, cores: int = 4, available_gib: float = 8.0, at: datetime = NOW):
            return event("hardware.profiled", "node-1", {
                "cores": cores, "memory_total_bytes": 16 * 2**30,
                "memory_available_bytes": int(available_gib * 2**30), "gpus": [],
                "load_avg": [load_1m, load_1m, load_1m], "cpu_model": "test"}, at)

        @staticmethod
        def scaling(at: datetime = NOW):
            return event("scaling.recommended", "node-1", {
                "node": "node-1", "model_params": 135_000_000, "device": "cpu", "micro_batch": 4,
                "gradient_accumulation": 2, "trainer_replicas": 1, "validator_replicas": 2,
                "reasons": {"micro_batch": [], "gradient_accumulation": [], "trainer_replicas": [],
                            "validator_replicas": []}}, at)

        @staticmethod
        def approval_requested(request_id: str, kind: str = "promotion", at: datetime = NOW):
            return event("approval.requested", request_id, {
                "request_id": request_id, "kind": kind, "subject_id": request_id, "subject": {},
                "cycle_id": None, "evidence": [], "policy": {}, "requested_by": "validator",
                "requested_at": iso(at), "expires_at": iso(at + timedelta(hours=24))}, at)

        @staticmethod
        def approval_expired(request_id: str, kind: str = "promotion", at: datetime = NOW):
            return event("approval.expired", request_id, {
                "request_id": request_id, "kind": kind, "subject_id": request_id, "cycle_id": None,
                "expires_at": iso(at), "expired_at": iso(at)}, at)

        @staticmethod
        def training_completed(cycle_id: str, *, loss_before=3.0, loss_after=2.5, joules=36_000.0,
                               status="trained", at: datetime = NOW):
            return event("training.completed", f"job-{cycle_id}", {
                "job_id": f"job-{cycle_id}", "cycle_id": cycle_id, "kind": "mntp", "status": status,
                "fallback": status != "trained", "adapter_sha256": ADAPTER,
                "adapter_uri": "file:///var/artefacts/adapter",
                "metrics": {"loss_before": loss_before, "loss_after": loss_after},
                "energy": {"joules": joules, "method": "rapl"}}, at)

        @staticmethod
        def training_failed(cycle_id: str, at: datetime = NOW):
            return event("training.failed", f"job-{cycle_id}", {
                "job_id": f"job-{cycle_id}", "cycle_id": cycle_id, "error": "CUDA out of memory"}, at)

        @staticmethod
        def validation_completed(cycle_id: str | None, verdict: str = "pass", purpose: str = "candidate",
                                 adapter: str = ADAPTER, at: datetime = NOW):
            validation_id = f"val-{adapter[:8]}-{purpose}-{verdict}"
            return event("validation.completed", validation_id, {
                "validation_id": validation_id, "adapter_sha256": adapter, "adapter_uri": "file:///a",
                "baseline": {"kind": "base", "adapter_sha256": None}, "kind": "mntp", "purpose": purpose,
                "cycle_id": cycle_id, "verdict": verdict, "explanation": verdict, "score": 0.8,
                "raw_data_uri": None, "sample_sizes": {"candidate": {}, "baseline": {}}, "thresholds": {}}, at)

        @staticmethod
        def adapter_promoted(adapter: str = ADAPTER, at: datetime = NOW):
            return event("adapter.promoted", adapter[:12], {
                "adapter_sha256": adapter, "kind": "mntp", "adapter_uri": "file:///a"}, at)

    return Facts


@pytest.fixture
def assert_valid():
    def _check(events) -> None:
        for e in events:
            if e.type in schemas.event_types():
                schemas.validate_payload(e.type, schemas.current_version(e.type), e.payload)
    return _check


@pytest.fixture
def run():
    """Feed messages through ``handle`` in order; return the state and every event emitted."""
    def _run(config, messages, state=None):
        state = state if state is not None else domain.initial_state()
        emitted = []
        for message in messages:
            state, events = domain.handle(message, state, config)
            emitted += events
        return state, emitted
    return _run


@pytest.fixture
def consumed():
    """A decided event as another service consumes it: sealed, with its time."""
    def _consumed(new_event, occurred_at: datetime = NOW) -> ConsumedEvent:
        return ConsumedEvent(new_event.type, new_event.aggregate_id, dict(new_event.payload), occurred_at)
    return _consumed

"""Events as the services publish them, built for the benchmarks: a registered dataset, one
self-training cycle told end to end, and the events a promotion rests on.

Each envelope names its rightful producer, the one the contract allows
(``x-producers``): a service (``trainer``, ``validator``, ...) or an operator
(``operator:<id>``) for operators' commands. ``signed`` signs a list of them,
each with the key of the producer it names, as those producers would.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

from shared.contracts import schemas
from shared.contracts.envelope import Envelope, NewEvent, Producer, iso, seal, utcnow
from shared.contracts.signing import Signer
from shared.contracts.trust import decision_subject, sign_decision
from shared.keys import load_private_key, operator_signer, require_service_signer

THRESHOLDS = {"metrics": {}, "groups": {}, "pass_score": 0.6, "marginal_score": 0.4, "consecutive_failures": 2,
              "min_samples": 5}


BENCH_OPERATOR = "bench"  # the operator the benches' operator commands come from unless told otherwise


def rightful_producer(event_type: str, operator: str = BENCH_OPERATOR) -> str:
    """The producer the contract allows for ``event_type``: its first service, else ``operator:<operator>``."""
    allowed = schemas.producers()[event_type]
    services = [entry.split(":", 1)[1] for entry in allowed if entry.startswith("service:")]
    return services[0] if services else f"operator:{operator}"


def make_event(event_type: str, aggregate_id: str, payload: dict[str, Any], *, sequence: int = 1,
               correlation_id: str = "bench", service: str | None = None) -> Envelope:
    """An unsigned envelope from ``service`` (a service name or ``operator:<id>``; by default the
    contract's producer of ``event_type``, see ``rightful_producer``)."""
    return seal(NewEvent(event_type, aggregate_id, payload), sequence=sequence,
                producer=Producer(service=service or rightful_producer(event_type), node="bench-node"),
                correlation_id=correlation_id, causation_id=None,
                schema_version=schemas.current_version(event_type))


def signer_of(settings, producer: str) -> Signer:
    """The key the producer an envelope names signs with: a service's, or an operator's (``operator:<id>``)."""
    if producer.startswith("operator:"):
        return operator_signer(settings, producer.split(":", 1)[1])
    return require_service_signer(settings, producer)


def signed(settings, envelopes: Sequence[Envelope]) -> list[bytes]:
    """Each envelope's bytes as its producer publishes them: signed with the key of the producer it names,
    in Merkle batches per producer (``shared.bus.signed_values``), in the order given."""
    from shared.bus import signed_values

    values: list[bytes | None] = [None] * len(envelopes)
    by_producer: dict[str, list[int]] = defaultdict(list)
    for index, envelope in enumerate(envelopes):
        by_producer[envelope.producer.service].append(index)
    for producer, indexes in by_producer.items():
        group = [envelopes[i] for i in indexes]
        for index, value in zip(indexes, signed_values(signer_of(settings, producer), group, [None] * len(group))):
            values[index] = value
    return values  # type: ignore[return-value]  # every index was filled


def signed_envelopes(settings, envelopes: Sequence[Envelope]) -> list[Envelope]:
    """``signed``, as envelopes carrying their signature block (a publisher sends them as they are)."""
    return [Envelope.from_json(value) for value in signed(settings, envelopes)]


def sha_of(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def dataset_registered(index: int, operator: str = BENCH_OPERATOR) -> Envelope:
    """An operator's registration of a dataset (``neurons data add``), from ``operator:<operator>``."""
    dataset_id = f"ds-bench-{index:06d}"
    return make_event("dataset.registered", dataset_id, {
        "dataset_id": dataset_id, "name": f"bench corpus {index}", "sha256": sha_of(dataset_id),
        "uri": f"file:///data/{dataset_id}.jsonl", "record_count": 1000 + index, "quarantined": False,
        "source": "bench", "registered_by": operator}, service=f"operator:{operator}")


def cycle_events(label: str) -> list[Envelope]:
    """One cycle as the other services tell it: proposal, training with progress, soak, energy,
    and the promotion request (15 events of 10 types)."""
    sha, dataset_sha = sha_of(label), sha_of(f"dataset-{label}")
    cycle, job, validation = f"cyc-{sha[:12]}", f"job-{sha[:12]}", f"val-{sha[:16]}"
    dataset = {"dataset_id": f"ds-{label}", "sha256": dataset_sha, "uri": f"file:///data/ds-{label}.jsonl"}
    config = {"learning_rate": 0.0002, "lora_rank": 8, "steps": 4}
    now = utcnow()

    def event(event_type: str, aggregate_id: str, payload: dict, sequence: int = 1, service: str | None = None) -> Envelope:
        return make_event(event_type, aggregate_id, payload, sequence=sequence, service=service, correlation_id=cycle)

    replica = {"replica_id": "c-1", "side": "candidate", "episodes": 10, "rss_mb": 200.0, "cpu_percent": 40.0,
               "latency_ms": 30.0, "incident": None}
    return [
        event("cycle.proposed", cycle, {
            "cycle_id": cycle, "kind": "mntp", "model": "tiny", "dataset": dataset, "config": config,
            "warm_start": None, "energy_estimate_wh": 1.5, "generation": 0,
            "individual": {"individual_id": f"ind-{label}", "generation": 0, "parents": []},
            "requested_by": "evolution", "proposed_at": iso(now)}, service="evolution"),
        event("training.requested", job, {
            "job_id": job, "cycle_id": cycle, "kind": "mntp", "model": "tiny", "dataset": dataset,
            "config": config, "warm_start": None, "hardware_plan": None, "requested_by": "evolution"},
            service="evolution"),
        event("training.started", job, {
            "job_id": job, "cycle_id": cycle, "kind": "mntp", "model": "tiny", "dataset_sha256": dataset_sha,
            "config": config, "resumed_from_step": None}, sequence=2, service="trainer"),
        *[event("training.progressed", job, {
            "job_id": job, "cycle_id": cycle, "step": step, "total_steps": 4, "loss": 5.0 - step,
            "reward_mean": None, "learning_rate": 1e-4, "tokens_per_s": 100.0, "energy_j": 10.0 * step},
            sequence=2 + step, service="trainer") for step in (1, 2, 3, 4)],
        training_completed(sha, cycle, job, dataset_sha, config),
        event("validation.started", validation, {
            "validation_id": validation, "cycle_id": cycle, "adapter_sha256": sha,
            "adapter_uri": f"artefact://sha256/{sha}", "baseline": {"kind": "base", "adapter_sha256": None},
            "replicas": 2, "cycles": 2, "episodes": 10, "kind": "mntp", "purpose": "candidate"}, service="validator"),
        *[event("validation.cycle_completed", validation, {
            "validation_id": validation, "cycle": n, "outcome": outcome, "score": 0.7, "metrics": {}, "vetoes": [],
            "reason": "", "incidents": [], "failing_streak": 0, "stop_early": False, "replicas": [replica]},
            sequence=1 + n, service="validator") for n, outcome in ((1, "pass"), (2, "marginal"))],
        validation_completed(sha, cycle),
        *[event("energy.reported", job_id, {
            "job_id": job_id, "job_kind": kind, "cycle_id": cycle, "joules": wh * 3600, "wh": wh,
            "gco2e": wh * 0.4, "pue": 1.2, "carbon_intensity": 400.0, "method": "model", "methods": {},
            "reason": None, "window": {"started_at": iso(now), "ended_at": iso(now)}}, service="energy")
          for job_id, kind, wh in ((job, "training", 1.0), (validation, "validation", 0.5))],
        promotion_requested(sha, cycle),
    ]


def training_completed(sha: str, cycle: str, job: str | None = None, dataset_sha: str | None = None,
                       config: dict | None = None) -> Envelope:
    job = job or f"job-{sha[:12]}"
    return make_event("training.completed", job, {
        "job_id": job, "cycle_id": cycle, "adapter_uri": f"artefact://sha256/{sha}", "adapter_sha256": sha,
        "status": "trained", "fallback_reason": None, "kind": "mntp",
        "metrics": {"before": {"loss": 4.0}, "after": {"loss": 1.0}, "loss_before": 4.0, "loss_after": 1.0},
        "duration_s": 12.0, "energy": {"joules": 3600.0, "wh": 1.0}, "base_model": "tiny",
        "base_model_checksum": "c" * 64, "dataset_sha256": dataset_sha or "d" * 64,
        "config": config or {"steps": 4}}, sequence=7, service="trainer", correlation_id=cycle)


def validation_completed(sha: str, cycle: str) -> Envelope:
    validation = f"val-{sha[:16]}"
    return make_event("validation.completed", validation, {
        "validation_id": validation, "adapter_sha256": sha, "adapter_uri": f"artefact://sha256/{sha}",
        "baseline": {"kind": "base", "adapter_sha256": None}, "kind": "mntp", "purpose": "candidate",
        "cycle_id": cycle, "verdict": "pass", "explanation": "better on latency", "score": 0.75,
        "raw_data_uri": None, "sample_sizes": {"candidate": {"latency_ms": 40}, "baseline": {"latency_ms": 40}},
        "thresholds": THRESHOLDS}, sequence=4, service="validator", correlation_id=cycle)


def promotion_request_id(sha: str) -> str:
    return f"apr-promotion-val-{sha[:16]}"


def promotion_requested(sha: str, cycle: str) -> Envelope:
    request_id, validation, now = promotion_request_id(sha), f"val-{sha[:16]}", utcnow()
    return make_event("approval.requested", request_id, {
        "request_id": request_id, "kind": "promotion", "subject_id": validation,
        "subject": {"validation_id": validation, "adapter_sha256": sha, "cycle_id": cycle, "verdict": "pass"},
        "cycle_id": cycle, "evidence": [{"type": "validation.completed", "id": validation},
                                        {"type": "adapter", "id": sha, "sha256": sha}],
        "policy": {"name": "promotion-needs-approver", "auto_approve": False, "rule": {}},
        "requested_by": "validator", "requested_at": iso(now), "expires_at": iso(now + timedelta(days=1))},
        service="approval", correlation_id=cycle)


def promotion_granted(sha: str, cycle: str, operator: str, key_dir: Path, channel: str = "production") -> Envelope:
    """The approval service's grant carrying the decision an operator signed with their own key, bound to
    the adapter, the validation that passed it and the channel; the registry checks it against the
    operators the log enrolled."""
    request_id, validation, now = promotion_request_id(sha), f"val-{sha[:16]}", utcnow()
    subject = decision_subject("promotion", {"adapter_sha256": sha, "validation_id": validation, "channel": channel})
    decision = sign_decision(request_id, "grant", operator, load_private_key(key_dir / f"{operator}.pem"),
                             issued_at=now, expires_at=now + timedelta(minutes=10), subject=subject)
    return make_event("approval.granted", request_id, {
        "request_id": request_id, "kind": "promotion", "subject_id": validation,
        "subject": {"validation_id": validation, "adapter_sha256": sha}, "cycle_id": cycle,
        "requested_by": "validator", "actor": f"operator:{operator}", "operator_id": operator, "policy": None,
        "decision": decision, "granted_at": iso(now)}, sequence=2, service="approval", correlation_id=cycle)


def profile_create_requested(profile_id: str, channel: str, operator: str = BENCH_OPERATOR) -> Envelope:
    """An enrolled operator's command to create a profile (``neurons profiles create``)."""
    return make_event("profile.create_requested", f"pcmd-{profile_id}", {
        "profile_id": profile_id, "traits": {"tone": "warm"}, "interaction_style": "concise",
        "context_preferences": {}, "channel": channel, "requested_by": operator},
        service=f"operator:{operator}", correlation_id=f"profile-{profile_id}")

"""The registry's real handler and runtime transaction, without a broker: what it emits is fed back in,
as the log would deliver it.

Every event travels signed, as on the platform: the services' keys, an admin anchored in the trust
file and the operators the admin enrols (``operator.enrolled``, fed like any event) all live under the
test's tmp folder; each event fed is signed by the key of the producer its envelope names, admitted by
the registry's trust view and archived. The adapters are real files: ``adapter_sha(n)`` names one, and
when its ``training.completed`` is fed it is in the registry's artefact store, signed with the anchored
adapter-signing key, as the trainer leaves it."""

from __future__ import annotations

import hashlib
import json
import tempfile
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from sqlmodel import Session, select

from services.registry import app
from shared.adapter_signing import sign_adapter
from shared.artefacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ArtefactStore
from shared.bus import MalformedEvent, decode, signed_values
from shared.contracts.envelope import Envelope, iso, utcnow
from shared.contracts.signing import Refused
from shared.contracts.trust import decision_subject, sign_decision
from shared.keys import ensure_service_keys, init_admin, load_private_key, model_signing_key_path, new_operator_key
from shared.service import Service
from shared.settings import Settings
from shared.store import OutboxEvent
from shared.topics import AGGREGATE_TYPES
from tests.support import ADMIN, make_event, signer_of

_WEIGHTS: dict[str, bytes] = {}  # the test adapters' weights, by their sha256


def adapter_sha(n: int) -> str:
    """The sha256 of test adapter ``n``: the digest of its weights, as the artefact store names it."""
    weights = f"lora weights of test adapter {n}\n".encode() * 16
    sha = hashlib.sha256(weights).hexdigest()
    _WEIGHTS[sha] = weights
    return sha


class Registry:
    def __init__(self, var_dir: Path, database_url: str | None = None) -> None:
        base = Settings.from_env()
        keys = var_dir / "keys"
        self.settings = base.with_(var_dir=var_dir, database_url=database_url, trust_path=keys / "trust.json",
                                   service_key_dir=keys / "services", service_key=None,
                                   operator_key_dir=keys / "operators", trace_file=None, otlp_endpoint=None)
        ensure_service_keys(self.settings)  # the services' keys and the adapter-signing key, anchored
        init_admin(self.settings, ADMIN, "registry harness admin")
        self.service = Service("registry", reads=AGGREGATE_TYPES, settings=self.settings)
        self.service.handles("*")(app.on_event)
        self.emitted: list[Envelope] = []

    def operator(self, name: str, *roles: str) -> None:
        """Make ``name``'s key pair and feed its enrolment with ``roles``, signed by the admin."""
        signer = new_operator_key(self.settings, name)
        self.feed(make_event("operator.enrolled", name, {
            "operator_id": name, "public_key": signer.public_key, "key_id": signer.key_id, "roles": list(roles),
            "label": None}, service=f"operator:{ADMIN}", correlation_id=name))

    def store_adapter(self, sha: str) -> None:
        """Test adapter ``sha`` (``adapter_sha``) in the registry's artefact store, signed as the trainer signs."""
        with tempfile.TemporaryDirectory(prefix="adapter-") as scratch:
            folder = Path(scratch)
            (folder / ADAPTER_WEIGHTS).write_bytes(_WEIGHTS[sha])
            (folder / ADAPTER_CONFIG).write_text(json.dumps({"r": 8, "lora_alpha": 16}))
            stored = ArtefactStore(self.settings.artefact_dir).put_adapter(
                folder, sign=lambda f: sign_adapter(f, model_signing_key_path(self.settings)))
        assert stored.sha256 == sha

    def signed(self, envelope: Envelope) -> bytes:
        """The record as its producer publishes it: signed with the key of the producer it names."""
        if envelope.signature is not None:
            return envelope.to_json()
        return signed_values(signer_of(self.settings, envelope.producer.service), [envelope], [None])[0]

    @contextmanager
    def _trusting(self):
        """The handler reads the operators of the registry module's service: this registry's, while it runs."""
        held = app.service.trust
        app.service.trust = self.service.trust
        try:
            yield
        finally:
            app.service.trust = held

    def feed(self, *events: Envelope) -> list[Envelope]:
        """Handle ``events``, then everything the registry emitted in answer; returns what it emitted.

        Each event is signed by its producer and decoded and admitted as the consumer would
        (``Service.process``): one the contract does not know, or whose signature or producer the
        registry refuses, is left out, as the dead-letter topic would take it; an operator's enrolment
        is folded into the registry's trust view."""
        queue, emitted = list(events), []
        while queue:
            try:
                event = decode(self.signed(queue.pop(0)), admit=self.service.trust.admit)
            except (MalformedEvent, Refused):
                continue
            if event.aggregate_type == "operator":
                self.service.trust.fold(event)
            if event.type == "training.completed" and event.payload.get("adapter_sha256") in _WEIGHTS:
                self.store_adapter(event.payload["adapter_sha256"])  # the trainer stores it, then says so
            with self._trusting():
                self.service._apply(event)
            with Session(self.service.engine) as session:
                rows = session.exec(select(OutboxEvent).where(OutboxEvent.published_at.is_(None))
                                    .order_by(OutboxEvent.id)).all()
                for row in rows:
                    row.published_at = utcnow()
                    session.add(row)
                    out = Envelope.from_json(row.envelope_json)
                    emitted.append(out)
                    queue.append(out)
                session.commit()
        self.emitted += emitted
        return emitted

    def session(self) -> Session:
        return Session(self.service.engine)

    def grant(self, sha: str, operator: str, channel: str | None = None) -> Envelope:
        """An operator's grant of ``sha``'s promotion request (``cycle_events``), signing that adapter, its
        validation and the channel."""
        request_id, now = f"apr-promotion-val-{sha[:16]}", utcnow()
        subject = decision_subject("promotion", {"adapter_sha256": sha, "validation_id": f"val-{sha[:16]}",
                                                 "channel": channel})
        signed = sign_decision(request_id, "grant", operator,
                               load_private_key(self.settings.operator_key_dir / f"{operator}.pem"),
                               issued_at=now, expires_at=now + timedelta(minutes=10),
                               extra={"channel": channel} if channel else None, subject=subject)
        return make_event("approval.granted", request_id, {
            "request_id": request_id, "kind": "promotion", "subject_id": f"val-{sha[:16]}",
            "subject": {"validation_id": f"val-{sha[:16]}", "adapter_sha256": sha}, "cycle_id": f"cyc-{sha[:4]}",
            "requested_by": "validator", "actor": f"operator:{operator}", "operator_id": operator, "policy": None,
            "decision": signed, "granted_at": iso(now)}, sequence=2, service="approval")


def trainer_event(event_type: str, aggregate_id: str, payload: dict, sequence: int = 1) -> Envelope:
    return make_event(event_type, aggregate_id, payload, sequence=sequence, service="trainer")


def cycle_events(sha: str, dataset_sha: str = "d" * 64) -> list[Envelope]:
    """One cycle as the other services tell it: proposal, training with progress, soak, energy, a promotion request."""
    cycle, job, validation = f"cyc-{sha[:4]}", f"job-{sha[:4]}", f"val-{sha[:16]}"
    now = utcnow()
    thresholds = {"metrics": {}, "groups": {}, "pass_score": 0.6, "marginal_score": 0.4, "consecutive_failures": 2,
                  "min_samples": 5}
    events = [
        make_event("cycle.proposed", cycle, {
            "cycle_id": cycle, "kind": "mntp", "model": "tiny",
            "dataset": {"dataset_id": "ds-1", "sha256": dataset_sha, "uri": "file:///data/ds-1.jsonl"},
            "config": {"learning_rate": 0.0002, "lora_rank": 8, "steps": 4}, "warm_start": None,
            "energy_estimate_wh": 1.5, "generation": 0,
            "individual": {"individual_id": "ind-1", "generation": 0, "parents": []},
            "requested_by": "evolution", "proposed_at": iso(now)}, service="evolution", correlation_id=cycle),
        trainer_event("training.requested", job, {"job_id": job, "cycle_id": cycle, "kind": "mntp", "model": "tiny",
                                                  "dataset": {"dataset_id": "ds-1", "sha256": dataset_sha,
                                                              "uri": "file:///data/ds-1.jsonl"},
                                                  "config": {"steps": 4}, "warm_start": None,
                                                  "hardware_plan": None, "requested_by": "evolution"}),
        trainer_event("training.started", job, {"job_id": job, "cycle_id": cycle, "kind": "mntp", "model": "tiny",
                                                "dataset_sha256": dataset_sha, "config": {"steps": 4},
                                                "resumed_from_step": None}, sequence=2),
        *[trainer_event("training.progressed", job, {"job_id": job, "cycle_id": cycle, "step": step, "total_steps": 4,
                                                     "loss": 5.0 - step, "reward_mean": None, "learning_rate": 1e-4,
                                                     "tokens_per_s": 100.0, "energy_j": None},
                        sequence=2 + step) for step in (1, 2, 3, 4)],
        trainer_event("training.completed", job, {
            "job_id": job, "cycle_id": cycle, "adapter_uri": f"artefact://sha256/{sha}", "adapter_sha256": sha,
            "status": "trained", "fallback_reason": None, "kind": "mntp",
            "metrics": {"before": {"loss": 4.0}, "after": {"loss": 1.0}, "loss_before": 4.0, "loss_after": 1.0},
            "duration_s": 12.0,
            "energy": {"joules": 3600.0, "wh": 1.0}, "base_model": "tiny", "base_model_checksum": "c" * 64,
            "dataset_sha256": dataset_sha, "config": {"learning_rate": 0.0002, "lora_rank": 8, "steps": 4}},
            sequence=7),
        make_event("validation.started", validation, {
            "validation_id": validation, "cycle_id": cycle, "adapter_sha256": sha, "adapter_uri": f"artefact://sha256/{sha}",
            "baseline": {"kind": "base", "adapter_sha256": None}, "replicas": 2, "cycles": 2, "episodes": 10,
            "kind": "mntp", "purpose": "candidate"}, service="validator"),
        *[make_event("validation.cycle_completed", validation, {
            "validation_id": validation, "cycle": n, "outcome": outcome, "score": 0.7, "metrics": {}, "vetoes": [],
            "reason": "", "incidents": [] if n == 1 else [{"cycle": 2, "replica_id": "c-1", "side": "candidate",
                                                            "reason": "oom"}],
            "failing_streak": 0, "stop_early": False,
            "replicas": [{"replica_id": "c-1", "side": "candidate", "episodes": 10, "rss_mb": 200.0,
                          "cpu_percent": 40.0, "latency_ms": 30.0, "incident": None}]},
            sequence=1 + n, service="validator") for n, outcome in ((1, "pass"), (2, "marginal"))],
        make_event("validation.completed", validation, {
            "validation_id": validation, "adapter_sha256": sha, "adapter_uri": f"artefact://sha256/{sha}",
            "baseline": {"kind": "base", "adapter_sha256": None}, "kind": "mntp", "purpose": "candidate",
            "cycle_id": cycle, "verdict": "pass", "explanation": "better on latency", "score": 0.75,
            "raw_data_uri": None, "sample_sizes": {"candidate": {}, "baseline": {}}, "thresholds": thresholds},
            sequence=4, service="validator"),
        *[make_event("energy.reported", job_id, {
            "job_id": job_id, "job_kind": kind, "cycle_id": cycle, "joules": wh * 3600, "wh": wh, "gco2e": wh * 0.4,
            "pue": 1.2, "carbon_intensity": 400.0, "method": "rapl", "methods": {}, "reason": None,
            "window": {"started_at": iso(now), "ended_at": iso(now)}}, service="energy")
          for job_id, kind, wh in ((job, "training", 1.0), (validation, "validation", 0.5))],
        make_event("approval.requested", f"apr-promotion-{validation}", {
            "request_id": f"apr-promotion-{validation}", "kind": "promotion", "subject_id": validation,
            "subject": {"validation_id": validation, "adapter_sha256": sha, "cycle_id": cycle, "verdict": "pass"},
            "cycle_id": cycle, "evidence": [{"type": "validation.completed", "id": validation},
                                            {"type": "adapter", "id": sha, "sha256": sha}],
            "policy": {"name": "promotion-needs-approver", "auto_approve": False, "rule": {}},
            "requested_by": "validator", "requested_at": iso(now), "expires_at": iso(now + timedelta(days=1))},
            service="approval"),
    ]
    return events

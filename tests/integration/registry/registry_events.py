"""Events as the other services publish them, for driving a real registry in tests."""

from __future__ import annotations

import hashlib
from datetime import timedelta

from tests.support import SigningPublisher
from shared.contracts.envelope import Envelope, iso, utcnow
from shared.contracts.trust import decision_subject, sign_decision
from shared.keys import load_private_key
from tests.support import await_until, make_event, store_signed_adapter

THRESHOLDS = {"metrics": {}, "groups": {}, "pass_score": 0.6, "marginal_score": 0.4, "consecutive_failures": 2,
              "min_samples": 5}


_WEIGHTS: dict[str, bytes] = {}  # the test adapters' weights, by their sha256


def sha_of(label: str) -> str:
    """The sha256 of the test adapter ``label``: the digest of its weights, as the artefact store names it."""
    weights = f"lora weights of {label}\n".encode() * 16
    sha = hashlib.sha256(weights).hexdigest()
    _WEIGHTS[sha] = weights
    return sha


def store_adapter(settings, sha: str) -> None:
    """Adapter ``sha`` (``sha_of``) in the platform's artefact store, signed as the trainer signs it:
    the registry verifies the files before it acts on a promotion grant."""
    if sha in _WEIGHTS:
        store_signed_adapter(settings, _WEIGHTS[sha])


def request_id_for(sha: str) -> str:
    return f"apr-promotion-val-{sha[:16]}"


def validation_completed(sha: str, verdict: str = "pass", uri: str | None = None, cycle_id: str | None = None,
                         kind: str = "mntp") -> Envelope:
    validation_id = f"val-{sha[:16]}"
    return make_event("validation.completed", validation_id, {
        "validation_id": validation_id, "adapter_sha256": sha, "adapter_uri": uri or f"artefact://sha256/{sha}",
        "baseline": {"kind": "base", "adapter_sha256": None}, "kind": kind, "purpose": "candidate",
        "cycle_id": cycle_id or f"cyc-{sha[:8]}", "verdict": verdict, "explanation": f"soak verdict {verdict}",
        "score": 0.82, "raw_data_uri": None, "sample_sizes": {"candidate": {"latency_ms": 40}, "baseline": {"latency_ms": 40}},
        "thresholds": THRESHOLDS}, sequence=3, service="validator", correlation_id=cycle_id or f"cyc-{sha[:8]}")


def approval_requested(sha: str, cycle_id: str | None = None) -> Envelope:
    request_id, now = request_id_for(sha), utcnow()
    cycle_id = cycle_id or f"cyc-{sha[:8]}"
    return make_event("approval.requested", request_id, {
        "request_id": request_id, "kind": "promotion", "subject_id": f"val-{sha[:16]}",
        "subject": {"validation_id": f"val-{sha[:16]}", "adapter_sha256": sha, "cycle_id": cycle_id,
                    "verdict": "pass", "summary": {}},
        "cycle_id": cycle_id,
        "evidence": [{"type": "validation.completed", "id": f"val-{sha[:16]}", "event_id": None},
                     {"type": "adapter", "id": sha, "sha256": sha}],
        "policy": {"name": "promotion-needs-approver", "auto_approve": False, "rule": {}},
        "requested_by": "validator", "requested_at": iso(now), "expires_at": iso(now + timedelta(days=1))},
        sequence=1, service="approval", correlation_id=cycle_id)


def approval_granted(settings, sha: str, operator: str = "alice", channel: str | None = None,
                     key=None, cycle_id: str | None = None) -> Envelope:
    request_id, now = request_id_for(sha), utcnow()
    store_adapter(settings, sha)
    subject = decision_subject("promotion", {"adapter_sha256": sha, "validation_id": f"val-{sha[:16]}",
                                             "channel": channel or "production"})
    signed = sign_decision(request_id, "grant", operator, key or load_private_key(settings.operator_key_dir / f"{operator}.pem"),
                           issued_at=now, expires_at=now + timedelta(minutes=10),
                           extra={"channel": channel} if channel else None, subject=subject)
    return make_event("approval.granted", request_id, {
        "request_id": request_id, "kind": "promotion", "subject_id": f"val-{sha[:16]}",
        "subject": {"validation_id": f"val-{sha[:16]}", "adapter_sha256": sha},
        "cycle_id": cycle_id or f"cyc-{sha[:8]}", "requested_by": "validator", "actor": f"operator:{operator}",
        "operator_id": operator, "policy": None, "decision": signed, "granted_at": iso(now)},
        sequence=2, service="approval", correlation_id=cycle_id or f"cyc-{sha[:8]}")


async def publish(settings, *events: Envelope) -> None:
    async with SigningPublisher(settings) as publisher:
        await publisher.publish_many(list(events))


async def promote(plat, sha: str, operator: str = "alice", channel: str | None = None, uri: str | None = None,
                  wait: bool = True, kind: str = "mntp") -> dict | None:
    """Validation passed, promotion requested, granted by ``operator``: what the other services would publish
    (``kind``: the adapter's, mntp or rl, as the validation names it)."""
    await publish(plat.settings, validation_completed(sha, uri=uri, kind=kind), approval_requested(sha),
                  approval_granted(plat.settings, sha, operator, channel))
    if wait:
        return await await_until(lambda: promoted(plat, sha, channel or "production"), 60,
                                 message=f"adapter.promoted for {sha[:12]}")
    return None


def promoted(plat, sha: str, channel: str = "production") -> dict | None:
    return next((e for e in plat.archived("adapter.promoted")
                 if e["payload"]["adapter_sha256"] == sha and e["payload"]["channel"] == channel), None)

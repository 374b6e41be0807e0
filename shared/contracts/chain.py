"""The chain of trust behind consequential events, checked by whoever acts on them, with no I/O.

A signed envelope proves who published an event; it does not prove that the
publisher was allowed to do it *this time*. So the events that start work or
put an adapter in service carry what authorised them, and their consumers
check it themselves:

- ``training.requested`` carries ``grant``: the ``approval.granted`` envelope,
  signed by the approval service, for this cycle and this configuration (its
  digest). If an operator granted it, the operator's decision inside must be
  an approver's signature over the cycle and the configuration digest. The
  trainer checks it (``verify_training_grant``) before it trains.
- ``adapter.promoted`` and ``profile.adapter_updated`` carry ``decision``: the
  operator's signed grant over the adapter, the validation and the channel
  (an admin's signed rollback for a rollback). The registry checked it before
  promoting; the serving runtime checks it again before loading
  (``verify_service_decision``). A stolen service key alone cannot put an
  unapproved adapter in service.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Mapping

from pydantic import ValidationError

from shared.contracts.envelope import Envelope
from shared.contracts.signing import Refused, TrustState, check_envelope
from shared.contracts.trust import (Keyring, VerificationResult, check_binding, config_digest, decision_subject,
                                    parse_time, verify_decision)

TRAINING_KINDS = {"mntp": "cycle", "rl": "research"}


def _refuse(reason: str, detail: str) -> VerificationResult:
    return VerificationResult(False, reason, detail)


def verify_training_grant(payload: Mapping[str, Any], trust: TrustState, keyring: Keyring) -> VerificationResult:
    """Whether a ``training.requested`` payload rests on a grant for exactly this cycle and configuration."""
    grant = payload.get("grant")
    if not isinstance(grant, Mapping):
        return _refuse("no_grant", "training.requested carries no signed approval.granted")
    try:
        envelope = Envelope.model_validate(dict(grant))
    except ValidationError as exc:
        return _refuse("malformed_grant", f"the grant is no envelope: {exc.errors()[0]['msg']}")
    if envelope.type != "approval.granted":
        return _refuse("malformed_grant", f"the grant is a {envelope.type}, not an approval.granted")
    try:
        check_envelope(envelope, trust)
    except Refused as refused:
        return _refuse(f"grant_{refused.reason}", refused.detail)
    granted = envelope.payload
    subject = granted.get("subject") or {}
    if granted.get("kind") not in ("cycle", "research") or subject.get("cycle_id") != payload.get("cycle_id"):
        return _refuse("grant_mismatch", f"the grant is for {granted.get('kind')} {subject.get('cycle_id')!r}, "
                                         f"not cycle {payload.get('cycle_id')!r}")
    if config_digest(subject.get("config")) != config_digest(payload.get("config")):
        return _refuse("config_mismatch", "the configuration to train is not the one that was granted")
    decision = granted.get("decision")
    if decision is None:
        return VerificationResult(True)  # a policy grant: the approval service's signature vouches for it
    return _verify(decision, keyring, at=granted.get("granted_at"), role="approver", decisions="grant",
                   subject=decision_subject(granted["kind"], subject))


def verify_service_decision(payload: Mapping[str, Any], keyring: Keyring, *,
                            cause: str) -> VerificationResult:
    """Whether the adapter an ``adapter.promoted``/``adapter.rolled_back``/``profile.adapter_updated`` puts in
    service on its channel was approved by an operator's signed decision (``cause``: what put it there)."""
    decision = payload.get("decision")
    if not isinstance(decision, Mapping):
        return _refuse("no_decision", "the event carries no operator's signed decision")
    target = {"channel": payload.get("channel"), "adapter_sha256": payload.get("adapter_sha256")}
    if cause == "adapter.rolled_back":
        extra = decision.get("extra") or {}
        if {"channel": extra.get("channel"), "adapter_sha256": extra.get("adapter_sha256")} != target:
            return _refuse("subject_mismatch", "the rollback decision names another channel or adapter")
        return _verify(decision, keyring, at=decision.get("issued_at"), role="admin", decisions="rollback")
    subject = decision.get("subject") or {}
    if subject.get("adapter_sha256") != target["adapter_sha256"] or subject.get("channel") != target["channel"]:
        return _refuse("subject_mismatch", f"the decision signed adapter {subject.get('adapter_sha256')} on "
                                           f"{subject.get('channel')!r}, not this one")
    if payload.get("validation_id") and subject.get("validation_id") != payload["validation_id"]:
        return _refuse("subject_mismatch", "the decision signed another validation")
    return _verify(decision, keyring, at=decision.get("issued_at"), role="approver", decisions="grant")


def _verify(decision: Any, keyring: Keyring, *, at: Any, role: str, decisions: str,
            subject: Mapping[str, Any] | None = None) -> VerificationResult:
    try:
        when: datetime = parse_time(at)
    except (TypeError, ValueError):
        return _refuse("malformed", "the decision carries no time it was made at")
    verified = verify_decision(decision, keyring, now=when, required_role=role)
    if not verified:
        return verified
    return check_binding(decision, decisions=decisions, subject=subject)

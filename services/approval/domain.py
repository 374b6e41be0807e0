"""Approval requests and the decisions on them.

One aggregate per request (``aggregate_id`` = request id). A request is opened
by a proposal (``cycle.proposed``, ``research.proposed``) or by a passing
validation (``validation.completed``, kind ``promotion``); its id is derived
from the subject, so a proposal delivered twice opens one request.

A request is decided by a policy (``approval.granted`` with actor
``policy:<name>``) or by an operator's signed decision (``SubmitDecision``).
A decision that fails any check is recorded as ``approval.refused`` and changes
nothing: the audit log shows every attempt, the state only the valid ones.

Use ``handle(message, state, config) -> (state, events)``; it folds an incoming
event into the state, decides, and folds the decided events too. ``decide``
and ``evolve`` are the two halves for callers that persist differently.

Times are all UTC. ``decide`` reads "now" from the message: ``occurred_at`` of
an event, ``received_at`` of ``SubmitDecision``, ``now`` of ``Tick``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Iterable, Mapping, Protocol

from shared.contracts.policies import (
    PolicySet,
    default_policies,
    evaluate,
    proposal_subject,
    request_view,
)
from shared.contracts.envelope import NewEvent, iso
from shared.contracts.facts import SERVICE_REQUESTER, occurred_at as _occurred_at, validation_facts
from shared.contracts.trust import (
    PRODUCTION_CHANNEL,
    Keyring,
    check_binding,
    decision_subject,
    parse_time,
    promotion_channel,
    verify_decision,
)

PENDING, GRANTED, REJECTED, EXPIRED = "pending", "granted", "rejected", "expired"
DECISIONS = {"grant": GRANTED, "reject": REJECTED}
VALIDATOR_REQUESTER = "validator"


class Event(Protocol):
    type: str
    aggregate_id: str
    payload: Mapping[str, Any]


# --- commands -------------------------------------------------------------------


@dataclass(frozen=True)
class SubmitDecision:
    """An operator's signed decision (``shared.contracts.trust.sign_decision``) arriving at ``received_at``.

    ``request_id`` is what the operator asked to decide (the CLI argument); when
    given it must match the request id inside the signed decision.
    """

    signed: Mapping[str, Any]
    received_at: datetime
    request_id: str | None = None


@dataclass(frozen=True)
class Tick:
    """The clock: expire pending requests whose ``expires_at`` is before ``now``."""

    now: datetime


# --- state ------------------------------------------------------------------------


@dataclass(frozen=True)
class ApprovalRequest:
    request_id: str
    kind: str  # cycle | research | promotion
    subject_id: str
    subject: Mapping[str, Any]
    cycle_id: str | None
    requested_by: str
    requested_at: datetime
    expires_at: datetime
    policy: Mapping[str, Any]
    status: str = PENDING
    decided_by: str | None = None  # "policy:<name>" or "operator:<id>"
    decided_at: datetime | None = None

    @property
    def correlation_id(self) -> str:
        return self.cycle_id or self.request_id

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id, "kind": self.kind, "subject_id": self.subject_id,
            "subject": dict(self.subject), "cycle_id": self.cycle_id, "requested_by": self.requested_by,
            "requested_at": iso(self.requested_at), "expires_at": iso(self.expires_at),
            "policy": dict(self.policy), "status": self.status, "decided_by": self.decided_by,
            "decided_at": iso(self.decided_at) if self.decided_at else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ApprovalRequest":
        return cls(
            request_id=data["request_id"], kind=data["kind"], subject_id=data["subject_id"],
            subject=dict(data.get("subject") or {}), cycle_id=data.get("cycle_id"),
            requested_by=data["requested_by"], requested_at=parse_time(data["requested_at"]),
            expires_at=parse_time(data["expires_at"]), policy=dict(data.get("policy") or {}),
            status=data.get("status", PENDING), decided_by=data.get("decided_by"),
            decided_at=parse_time(data["decided_at"]) if data.get("decided_at") else None,
        )


@dataclass(frozen=True)
class ApprovalState:
    """Every request by id, and every nonce an accepted decision has used."""

    requests: Mapping[str, ApprovalRequest] = field(default_factory=dict)
    used_nonces: frozenset[str] = frozenset()

    def pending(self) -> list[ApprovalRequest]:
        return [r for r in self.requests.values() if r.status == PENDING]

    def to_dict(self) -> dict[str, Any]:
        return {"requests": {rid: r.to_dict() for rid, r in sorted(self.requests.items())},
                "used_nonces": sorted(self.used_nonces)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ApprovalState":
        return cls(
            requests={rid: ApprovalRequest.from_dict(r) for rid, r in (data.get("requests") or {}).items()},
            used_nonces=frozenset(data.get("used_nonces") or ()),
        )

    def to_rows(self) -> dict[str, dict[str, Any]]:
        """One row per request and one per used nonce."""
        rows = {f"request:{rid}": r.to_dict() for rid, r in self.requests.items()}
        rows.update({f"nonce:{nonce}": {"nonce": nonce} for nonce in self.used_nonces})
        return rows

    @classmethod
    def from_rows(cls, rows: Mapping[str, Mapping[str, Any]]) -> "ApprovalState":
        return cls(
            requests={r["request_id"]: ApprovalRequest.from_dict(r) for k, r in rows.items() if k.startswith("request:")},
            used_nonces=frozenset(r["nonce"] for k, r in rows.items() if k.startswith("nonce:")),
        )


def initial_state() -> ApprovalState:
    return ApprovalState()


@dataclass(frozen=True)
class ApprovalConfig:
    keyring: Keyring = field(default_factory=Keyring)
    policies: PolicySet = field(default_factory=default_policies)
    request_ttl: timedelta = timedelta(hours=24)
    approver_role: str = "approver"


# --- decide ------------------------------------------------------------------------


def request_id_for(kind: str, subject_id: str) -> str:
    return f"apr-{kind}-{subject_id}"


def decide(message: Any, state: ApprovalState, config: ApprovalConfig) -> list[NewEvent]:
    """The events that ``message`` (a command or a consumed event) leads to."""
    if isinstance(message, SubmitDecision):
        return _decide_submission(message, state, config)
    if isinstance(message, Tick):
        return _decide_expiry(message.now, state)
    event_type = getattr(message, "type", None)
    if event_type in ("cycle.proposed", "research.proposed"):
        return _on_proposal(message, state, config)
    if event_type == "validation.completed":
        return _on_validation(message, state, config)
    return []


def _on_proposal(event: Any, state: ApprovalState, config: ApprovalConfig) -> list[NewEvent]:
    kind = event.type.split(".", 1)[0]  # cycle | research
    payload = event.payload
    subject = proposal_subject(payload)
    cycle_id = subject["cycle_id"]
    evidence = [{"type": event.type, "id": cycle_id, "event_id": _event_id(event)}]
    dataset = payload.get("dataset")
    if isinstance(dataset, Mapping) and dataset.get("dataset_id"):
        evidence.append({"type": "dataset", "id": dataset["dataset_id"], "sha256": dataset.get("sha256")})
    if payload.get("warm_start"):
        evidence.append({"type": "adapter", "id": payload["warm_start"], "sha256": payload["warm_start"]})
    requested_by = payload.get("requested_by") or SERVICE_REQUESTER
    return _open_request(kind, cycle_id, subject, evidence, cycle_id, requested_by,
                         _occurred_at(event), state, config)


def _on_validation(event: Any, state: ApprovalState, config: ApprovalConfig) -> list[NewEvent]:
    facts = validation_facts(event)
    # Only a candidate that passed is up for promotion; a drift soak judges
    # what is already in production.
    if facts["verdict"] != "pass" or facts["purpose"] != "candidate":
        return []
    if not facts["adapter_sha256"]:
        raise ValueError(f"validation.completed {facts['validation_id']} passed without an adapter sha256")
    subject = {
        "validation_id": facts["validation_id"],
        "adapter_sha256": facts["adapter_sha256"],
        "adapter_uri": facts["adapter_uri"],
        "training_kind": facts["kind"],
        "cycle_id": facts["cycle_id"],
        "verdict": "pass",
        "summary": facts["summary"],
    }
    from_research = request_id_for("research", facts["cycle_id"] or "") in state.requests
    channel = promotion_channel(facts["kind"], from_research)
    if channel != PRODUCTION_CHANNEL:  # no channel named means production, as promotions always have
        subject["channel"] = channel
    evidence = [
        {"type": "validation.completed", "id": facts["validation_id"], "event_id": _event_id(event)},
        {"type": "adapter", "id": facts["adapter_sha256"], "sha256": facts["adapter_sha256"]},
    ]
    return _open_request("promotion", facts["validation_id"], subject, evidence, facts["cycle_id"],
                         _promotion_requester(facts, state), _occurred_at(event), state, config)


def _promotion_requester(facts: Mapping[str, Any], state: ApprovalState) -> str:
    # Whoever asked for the cycle also "asks" for its promotion, so the
    # operator who requested a training run cannot approve shipping its result.
    if facts["requested_by"]:
        return facts["requested_by"]
    for kind in ("cycle", "research"):
        origin = state.requests.get(request_id_for(kind, facts["cycle_id"] or ""))
        if origin is not None:
            return origin.requested_by
    return VALIDATOR_REQUESTER


def _open_request(kind: str, subject_id: str, subject: Mapping[str, Any], evidence: list[dict],
                  cycle_id: str | None, requested_by: str, now: datetime, state: ApprovalState,
                  config: ApprovalConfig) -> list[NewEvent]:
    request_id = request_id_for(kind, subject_id)
    if request_id in state.requests:
        return []  # the same proposal delivered again
    policy = evaluate(config.policies, request_view(kind, subject, requested_by))
    requested = NewEvent("approval.requested", request_id, {
        "request_id": request_id,
        "kind": kind,
        "subject_id": subject_id,
        "subject": dict(subject),
        "cycle_id": cycle_id,
        "evidence": evidence,
        "policy": policy.to_dict(),
        "requested_by": requested_by,
        "requested_at": iso(now),
        "expires_at": iso(now + config.request_ttl),
    })
    if not policy.auto_approve:
        return [requested]
    granted = NewEvent("approval.granted", request_id, {
        "request_id": request_id,
        "kind": kind,
        "subject_id": subject_id,
        "subject": dict(subject),
        "cycle_id": cycle_id,
        "requested_by": requested_by,
        "actor": f"policy:{policy.policy_name}",
        "policy": {"name": policy.policy_name, "rule": policy.rule},
        "decision": None,
        "granted_at": iso(now),
    })
    return [requested, granted]


def _refused(request_id: str | None, reason: str, detail: str, operator_id: str | None,
             signed: Any, now: datetime, correlation_id: str | None) -> list[NewEvent]:
    payload = {
        "request_id": request_id,
        "reason": reason,
        "detail": detail,
        "operator_id": operator_id,
        "decision": dict(signed) if isinstance(signed, Mapping) else None,
        "refused_at": iso(now),
    }
    return [NewEvent("approval.refused", request_id or "apr-unknown", payload,
                     correlation_id=correlation_id or request_id)]


def _decide_submission(cmd: SubmitDecision, state: ApprovalState, config: ApprovalConfig) -> list[NewEvent]:
    signed, now = cmd.signed, parse_time(cmd.received_at)
    claimed = signed.get("request_id") if isinstance(signed, Mapping) else None
    request_id = claimed if isinstance(claimed, str) and claimed else cmd.request_id
    request = state.requests.get(request_id) if request_id else None
    correlation = request.correlation_id if request else None

    def refuse(reason: str, detail: str, operator_id: str | None) -> list[NewEvent]:
        return _refused(request_id, reason, detail, operator_id, signed, now, correlation)

    # Authenticity first: nothing about the request is considered for a
    # decision that is not provably from a known approver.
    verified = verify_decision(signed, config.keyring, now=now, required_role=config.approver_role)
    if not verified:
        return refuse(verified.reason, verified.detail, verified.operator_id)
    operator_id = verified.operator_id
    # What the decision is and which request it names, before anything about that request is considered.
    named = check_binding(signed, decisions=tuple(DECISIONS), request_id=cmd.request_id)
    if not named:
        return refuse(named.reason, named.detail, operator_id)
    if request is None:
        return refuse("unknown_request", f"no approval request {request_id!r}", operator_id)
    if request.status != PENDING:
        return refuse("not_pending", f"the request is already {request.status}", operator_id)
    if now > request.expires_at:
        return refuse("request_expired", f"the request expired at {iso(request.expires_at)}", operator_id)
    bound = check_binding(signed, decisions=tuple(DECISIONS), requested_by=request.requested_by,
                          used_nonces=state.used_nonces, subject=decision_subject(request.kind, request.subject))
    if not bound:
        return refuse(bound.reason, bound.detail, operator_id)

    common = {
        "request_id": request.request_id,
        "kind": request.kind,
        "subject_id": request.subject_id,
        "subject": dict(request.subject),
        "cycle_id": request.cycle_id,
        "requested_by": request.requested_by,
        "actor": f"operator:{operator_id}",
        "operator_id": operator_id,
        "decision": dict(signed),
    }
    if signed["decision"] == "grant":
        payload = {**common, "policy": None, "granted_at": iso(now)}
        return [NewEvent("approval.granted", request.request_id, payload, correlation_id=request.correlation_id)]
    payload = {**common, "reason": signed.get("reason"), "rejected_at": iso(now)}
    return [NewEvent("approval.rejected", request.request_id, payload, correlation_id=request.correlation_id)]


def _decide_expiry(now: datetime, state: ApprovalState) -> list[NewEvent]:
    now = parse_time(now)
    return [
        NewEvent("approval.expired", r.request_id, {
            "request_id": r.request_id,
            "kind": r.kind,
            "subject_id": r.subject_id,
            "cycle_id": r.cycle_id,
            "expires_at": iso(r.expires_at),
            "expired_at": iso(now),
        }, correlation_id=r.correlation_id)
        for r in sorted(state.pending(), key=lambda r: (r.expires_at, r.request_id))
        if now > r.expires_at
    ]


# --- evolve ------------------------------------------------------------------------


def evolve(state: ApprovalState, event: Event) -> ApprovalState:
    """Fold one approval event into the state; other events leave it as it is."""
    payload = event.payload
    if event.type == "approval.requested":
        if payload["request_id"] in state.requests:
            return state
        request = ApprovalRequest(
            request_id=payload["request_id"], kind=payload["kind"], subject_id=payload["subject_id"],
            subject=dict(payload.get("subject") or {}), cycle_id=payload.get("cycle_id"),
            requested_by=payload["requested_by"], requested_at=parse_time(payload["requested_at"]),
            expires_at=parse_time(payload["expires_at"]), policy=dict(payload.get("policy") or {}),
        )
        return replace(state, requests={**state.requests, request.request_id: request})
    if event.type in ("approval.granted", "approval.rejected", "approval.expired"):
        request = state.requests.get(payload["request_id"])
        if request is None or request.status != PENDING:
            return state
        status = {"approval.granted": GRANTED, "approval.rejected": REJECTED, "approval.expired": EXPIRED}[event.type]
        at = payload.get("granted_at") or payload.get("rejected_at") or payload.get("expired_at")
        decided = replace(request, status=status, decided_by=payload.get("actor"),
                          decided_at=parse_time(at) if at else None)
        nonces = state.used_nonces
        decision = payload.get("decision")
        if isinstance(decision, Mapping) and decision.get("nonce"):
            nonces = nonces | {decision["nonce"]}
        return replace(state, requests={**state.requests, request.request_id: decided}, used_nonces=nonces)
    return state  # approval.refused is audit only


def handle(message: Any, state: ApprovalState, config: ApprovalConfig) -> tuple[ApprovalState, list[NewEvent]]:
    """Fold ``message`` (if it is an event), decide, and fold what was decided."""
    if hasattr(message, "type"):
        state = evolve(state, message)
    events = decide(message, state, config)
    for event in events:
        state = evolve(state, event)
    return state, events


def replay(events: Iterable[Event], state: ApprovalState | None = None) -> ApprovalState:
    """The state after ``events`` (the approval.* stream, in order)."""
    state = state if state is not None else initial_state()
    for event in events:
        state = evolve(state, event)
    return state


def _event_id(event: Any) -> str | None:
    return getattr(event, "event_id", None)

"""Approval requests as an operator sees them: evidence, policy, state, who decided, and what came of it."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, Session, SQLModel

from services.registry.rows import dumps, get_or_new, json_field, json_value, set_json, utc
from shared.archive import Projection
from shared.contracts.envelope import Envelope


class ApprovalRecord(SQLModel, table=True):
    __tablename__ = "registry_approvals"
    request_id: str = Field(primary_key=True)
    kind: str | None = Field(default=None, index=True)
    subject_id: str | None = None
    subject_json: str = json_field()
    cycle_id: str | None = Field(default=None, index=True)
    adapter_sha256: str | None = Field(default=None, index=True)
    evidence_json: str = json_field("[]")
    policy_json: str = json_field()
    requested_by: str | None = None
    requested_at: datetime | None = None
    expires_at: datetime | None = None
    status: str = Field(default="pending", index=True)  # pending | granted | rejected | expired
    actor: str | None = None  # policy:<name> or operator:<id>
    operator_id: str | None = None
    decided_at: datetime | None = None
    reason: str | None = None
    decision_json: str = json_field("null")
    refusals_json: str = json_field("[]")  # decisions that failed a check, in order
    outcome: str | None = None  # what the registry did with a granted promotion
    grant_event_id: str | None = None


def apply_approvals(session: Session, event: Envelope) -> None:
    p, etype = event.payload, event.type
    if etype == "approval.requested":
        row, _ = get_or_new(session, ApprovalRecord, {"request_id": p["request_id"]})
        subject = p.get("subject") or {}
        row.kind, row.subject_id, row.subject_json = p.get("kind"), p.get("subject_id"), dumps(subject)
        row.cycle_id = p.get("cycle_id")
        row.adapter_sha256 = subject.get("adapter_sha256")
        row.evidence_json, row.policy_json = dumps(p.get("evidence") or []), dumps(p.get("policy") or {})
        row.requested_by = p.get("requested_by")
        row.requested_at, row.expires_at = utc(p.get("requested_at")), utc(p.get("expires_at"))
        session.add(row)
    elif etype in ("approval.granted", "approval.rejected", "approval.expired"):
        row, _ = get_or_new(session, ApprovalRecord, {"request_id": p["request_id"]})
        row.kind = row.kind or p.get("kind")
        row.subject_id = row.subject_id or p.get("subject_id")
        row.cycle_id = row.cycle_id or p.get("cycle_id")
        row.status = etype.split(".", 1)[1]
        row.actor = p.get("actor")
        row.operator_id = p.get("operator_id")
        row.decided_at = utc(p.get("granted_at") or p.get("rejected_at") or p.get("expired_at") or event.occurred_at)
        row.reason = p.get("reason")
        if p.get("decision") is not None:
            row.decision_json = dumps(p["decision"])
        if etype == "approval.granted":
            row.grant_event_id = event.event_id
        session.add(row)
    elif etype == "approval.refused" and p.get("request_id"):
        row = session.get(ApprovalRecord, p["request_id"])
        if row is None:
            return
        refusals = json_value(session, row, "refusals_json", [])
        refusals.append({"reason": p.get("reason"), "detail": p.get("detail"), "operator_id": p.get("operator_id"),
                         "at": p.get("refused_at")})
        set_json(session, row, "refusals_json", refusals)
        session.add(row)
    elif etype == "adapter.promoted":
        row = session.get(ApprovalRecord, p["approval_request_id"])
        if row is not None:
            row.outcome = f"promoted to {p['channel']}"
            session.add(row)
    elif etype == "adapter.promotion_refused":
        row = session.get(ApprovalRecord, p["approval_request_id"])
        if row is not None and not (row.outcome or "").startswith("promoted"):
            row.outcome = f"not promoted: {p['reason']}"
            session.add(row)


APPROVALS = Projection("approvals", [ApprovalRecord], apply_approvals)

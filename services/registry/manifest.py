"""The adapter manifest: every adapter with its lineage, what serves each channel, and since when.

``registry_adapters`` holds one row per adapter (by sha256): where its
artefact is, what it was trained from (base model and checksum, dataset,
configuration), its metrics and energy, and its validation verdicts.
``registry_channels`` names the adapter serving each channel now;
``registry_channel_events`` keeps every promotion, rollback and refusal, so
the channel's history (and who approved each step) reads straight from it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Mapping

from sqlmodel import Field, Session, SQLModel

from services.registry.rows import dumps, get_or_new, json_field, utc
from shared.archive import Projection, new_row
from shared.contracts.envelope import Envelope


class AdapterRecord(SQLModel, table=True):
    __tablename__ = "registry_adapters"
    adapter_sha256: str = Field(primary_key=True)
    adapter_uri: str | None = None
    kind: str | None = None
    cycle_id: str | None = Field(default=None, index=True)
    job_id: str | None = None
    status: str | None = None  # trained | fallback (from training.completed)
    base_model: str | None = None
    base_model_sha256: str | None = None
    dataset_id: str | None = None
    dataset_sha256: str | None = None
    config_json: str = json_field()
    metrics_json: str = json_field()
    energy_json: str = json_field()
    trained_at: datetime | None = None
    validation_id: str | None = None
    verdict: str | None = None
    verdict_explanation: str | None = None
    verdict_score: float | None = None
    raw_data_uri: str | None = None
    validated_at: datetime | None = None
    drift_validation_id: str | None = None
    drift_verdict: str | None = None
    drift_validated_at: datetime | None = None
    first_served_at: datetime | None = None
    first_seen_at: datetime | None = None


class ChannelHead(SQLModel, table=True):
    __tablename__ = "registry_channels"
    channel: str = Field(primary_key=True)
    adapter_sha256: str | None = None
    adapter_uri: str | None = None
    kind: str | None = None
    since: datetime | None = None
    via: str | None = None  # promoted | rolled_back
    event_id: str | None = None
    approval_request_id: str | None = None
    approver: str | None = None
    operator_id: str | None = None
    previous_adapter_sha256: str | None = None


class ChannelEvent(SQLModel, table=True):
    __tablename__ = "registry_channel_events"
    event_id: str = Field(primary_key=True)
    channel: str = Field(index=True)
    action: str  # promoted | rolled_back | promotion_refused | rollback_refused
    at: datetime = Field(index=True)
    adapter_sha256: str | None = Field(default=None, index=True)
    adapter_uri: str | None = None
    previous_adapter_sha256: str | None = None
    approval_request_id: str | None = None
    operator_id: str | None = None
    reason: str | None = None
    detail: str | None = None
    correlation_id: str | None = None


def _adapter(session: Session, sha: str, at: datetime | None) -> AdapterRecord:
    row, new = get_or_new(session, AdapterRecord, {"adapter_sha256": sha})
    if new:
        row.first_seen_at = utc(at)
    return row


def base_model_of(payload: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(name, checksum) of the base model, whether the trainer sends a name or an object."""
    model = payload.get("base_model") or payload.get("model")
    if isinstance(model, dict):
        name = model.get("name") or model.get("id") or model.get("path") or model.get("spec")
        checksum = model.get("sha256") or model.get("checksum") or model.get("weights_sha256")
        return (str(name) if name else None), checksum
    return (str(model) if model else None), payload.get("base_model_sha256") or payload.get("base_model_checksum")


def _dataset_of(payload: Mapping[str, Any]) -> tuple[str | None, str | None]:
    dataset = payload.get("dataset")
    if isinstance(dataset, dict):
        return dataset.get("dataset_id"), dataset.get("sha256")
    return payload.get("dataset_id"), payload.get("dataset_sha256")


def apply_manifest(session: Session, event: Envelope) -> None:
    p, etype, at = event.payload, event.type, event.occurred_at
    if etype == "training.completed" and p.get("adapter_sha256"):
        row = _adapter(session, p["adapter_sha256"], at)
        row.adapter_uri = p.get("adapter_uri") or row.adapter_uri
        row.kind = p.get("kind") or row.kind
        row.cycle_id = p.get("cycle_id") or row.cycle_id
        row.job_id = p.get("job_id")
        row.status = "fallback" if (p.get("status") != "trained" or p.get("fallback")) else "trained"
        row.base_model, row.base_model_sha256 = base_model_of(p)
        dataset_id, dataset_sha = _dataset_of(p)
        row.dataset_id, row.dataset_sha256 = dataset_id or row.dataset_id, dataset_sha or row.dataset_sha256
        row.config_json = dumps(p.get("config") or {})
        row.metrics_json = dumps(p.get("metrics") or {})
        energy = p.get("energy") if isinstance(p.get("energy"), dict) else (
            {"wh": p["energy_wh"]} if p.get("energy_wh") is not None else {})
        row.energy_json = dumps(energy)
        row.trained_at = utc(at)
        session.add(row)
    elif etype == "validation.completed" and p.get("adapter_sha256"):
        row = _adapter(session, p["adapter_sha256"], at)
        row.adapter_uri = row.adapter_uri or p.get("adapter_uri")
        row.kind = row.kind or p.get("kind")
        row.cycle_id = row.cycle_id or p.get("cycle_id")
        if p.get("purpose", "candidate") == "candidate":
            row.validation_id = p.get("validation_id")
            row.verdict = p.get("verdict")
            row.verdict_explanation = p.get("explanation")
            row.verdict_score = p.get("score")
            row.raw_data_uri = p.get("raw_data_uri")
            row.validated_at = utc(at)
        else:
            row.drift_validation_id = p.get("validation_id")
            row.drift_verdict = p.get("verdict")
            row.drift_validated_at = utc(at)
        session.add(row)
    elif etype in ("adapter.promoted", "adapter.rolled_back"):
        action = "promoted" if etype == "adapter.promoted" else "rolled_back"
        head, _ = get_or_new(session, ChannelHead, {"channel": p["channel"]})
        head.adapter_sha256, head.adapter_uri, head.kind = p["adapter_sha256"], p["adapter_uri"], p.get("kind")
        head.since, head.via, head.event_id = utc(at), action, event.event_id
        head.approval_request_id = p.get("approval_request_id")
        head.approver = p.get("approver")
        head.operator_id = p.get("operator_id") or p.get("approver")
        head.previous_adapter_sha256 = p.get("previous_adapter_sha256")
        session.add(head)
        adapter = _adapter(session, p["adapter_sha256"], at)
        adapter.adapter_uri = adapter.adapter_uri or p["adapter_uri"]
        adapter.kind = adapter.kind or p.get("kind")
        adapter.first_served_at = adapter.first_served_at or utc(at)
        session.add(adapter)
        _channel_event(session, event, action)
    elif etype in ("adapter.promotion_refused", "adapter.rollback_refused"):
        _channel_event(session, event, etype.split(".", 1)[1])


def _channel_event(session: Session, event: Envelope, action: str) -> None:
    p = event.payload
    if session.get(ChannelEvent, event.event_id) is not None:
        return
    session.add(new_row(
        session, ChannelEvent,
        event_id=event.event_id, channel=p["channel"], action=action, at=utc(event.occurred_at),
        adapter_sha256=p.get("adapter_sha256"), adapter_uri=p.get("adapter_uri"),
        previous_adapter_sha256=p.get("previous_adapter_sha256"),
        approval_request_id=p.get("approval_request_id") or p.get("request_id"),
        operator_id=p.get("approver") or p.get("operator_id"), reason=p.get("reason"), detail=p.get("detail"),
        correlation_id=event.correlation_id,
    ))


MANIFEST = Projection("manifest", [AdapterRecord, ChannelHead, ChannelEvent], apply_manifest)

"""Questions asked of the read models, answered as plain JSON-ready dicts.

The HTTP API, the dashboard, the command line and ``neurons audit at`` all
read through here, so an answer is the same wherever it is asked.
"""

from __future__ import annotations

from typing import Any, Iterable

from sqlmodel import Session, col, select

from services.registry.approvals import ApprovalRecord
from services.registry.manifest import AdapterRecord, ChannelEvent, ChannelHead
from services.registry.observability import CycleRecord, EnergyReport, TrainingRun, ValidationSnapshot
from services.registry.profiles import PersonalityProfile
from services.registry.rows import iso_z, loads
from shared.archive import ArchivedEvent
from shared.db import engine_at_head
from shared.settings import Settings


def registry_session(settings: Settings) -> Session:
    return Session(engine_at_head(settings.db_url("registry")))


# --- approvals ------------------------------------------------------------------


def approval_view(row: ApprovalRecord) -> dict[str, Any]:
    return {
        "request_id": row.request_id, "kind": row.kind, "status": row.status, "subject_id": row.subject_id,
        "subject": loads(row.subject_json, {}), "cycle_id": row.cycle_id, "adapter_sha256": row.adapter_sha256,
        "evidence": loads(row.evidence_json, []), "policy": loads(row.policy_json, {}),
        "requested_by": row.requested_by, "requested_at": iso_z(row.requested_at), "expires_at": iso_z(row.expires_at),
        "actor": row.actor, "operator_id": row.operator_id, "decided_at": iso_z(row.decided_at),
        "reason": row.reason, "decision": loads(row.decision_json), "refusals": loads(row.refusals_json, []),
        "outcome": row.outcome,
    }


def approvals(session: Session, pending_only: bool = False, kind: str | None = None) -> list[dict[str, Any]]:
    query = select(ApprovalRecord)
    if pending_only:
        query = query.where(ApprovalRecord.status == "pending")
    if kind:
        query = query.where(ApprovalRecord.kind == kind)
    rows = session.exec(query.order_by(col(ApprovalRecord.requested_at).desc(), ApprovalRecord.request_id)).all()
    return [approval_view(r) for r in rows]


def approval_requests(settings: Settings, pending_only: bool = False) -> list[dict[str, Any]]:
    """For `neurons approvals list`: every request with its evidence and state, newest first."""
    with registry_session(settings) as session:
        return approvals(session, pending_only=pending_only)


# --- energy -----------------------------------------------------------------------


def energy_view(row: EnergyReport) -> dict[str, Any]:
    return {
        "job_kind": row.job_kind, "job_id": row.job_id, "cycle_id": row.cycle_id, "joules": row.joules,
        "wh": row.wh, "facility_wh": row.facility_wh, "gco2e": row.gco2e, "pue": row.pue,
        "carbon_intensity": row.carbon_intensity, "method": row.method, "reason": row.reason,
        "duration_s": row.duration_s, "started_at": iso_z(row.started_at), "ended_at": iso_z(row.ended_at),
        "reported_at": iso_z(row.reported_at),
    }


def _sum(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known), 6) if known else None


def energy_totals(reports: list[EnergyReport]) -> dict[str, Any]:
    """Measured totals; a job whose energy could not be measured stays visible in ``unmeasured``."""
    return {
        "joules": _sum(r.joules for r in reports), "wh": _sum(r.wh for r in reports),
        "gco2e": _sum(r.gco2e for r in reports),
        "training_wh": _sum(r.wh for r in reports if r.job_kind == "training"),
        "validation_wh": _sum(r.wh for r in reports if r.job_kind == "validation"),
        "reports": len(reports), "unmeasured": [r.job_id for r in reports if r.joules is None],
    }


def energy(session: Session) -> dict[str, Any]:
    reports = session.exec(select(EnergyReport).order_by(col(EnergyReport.reported_at).desc())).all()
    per_cycle: dict[str, list[EnergyReport]] = {}
    for report in reports:
        per_cycle.setdefault(report.cycle_id or "(no cycle)", []).append(report)
    cycles = []
    for cycle_id, rows in per_cycle.items():
        first = min((r.reported_at for r in rows if r.reported_at), default=None)
        cycles.append({"cycle_id": cycle_id, "first_reported_at": iso_z(first), **energy_totals(rows)})
    cycles.sort(key=lambda c: c["first_reported_at"] or "", reverse=True)
    return {"totals": energy_totals(list(reports)), "per_cycle": cycles, "reports": [energy_view(r) for r in reports]}


def _energy_of_cycle(session: Session, cycle_id: str | None) -> dict[str, Any] | None:
    if not cycle_id:
        return None
    rows = session.exec(select(EnergyReport).where(EnergyReport.cycle_id == cycle_id)).all()
    return {**energy_totals(list(rows)), "jobs": [energy_view(r) for r in rows]} if rows else None


# --- adapters and channels ----------------------------------------------------------------


def adapter_view(session: Session, sha: str) -> dict[str, Any] | None:
    row = session.get(AdapterRecord, sha)
    if row is None:
        return None
    cycle = session.get(CycleRecord, row.cycle_id) if row.cycle_id else None
    run = session.get(TrainingRun, row.job_id) if row.job_id else None
    config = loads(row.config_json, {}) or (loads(run.config_json, {}) if run else {}) or (
        loads(cycle.config_json, {}) if cycle else {})
    lineage = {
        "base_model": row.base_model or (run.base_model if run else None) or (cycle.model if cycle else None),
        "base_model_sha256": row.base_model_sha256 or (run.base_model_sha256 if run else None),
        "dataset_id": row.dataset_id or (cycle.dataset_id if cycle else None),
        "dataset_sha256": row.dataset_sha256 or (run.dataset_sha256 if run else None)
        or (cycle.dataset_sha256 if cycle else None),
        "warm_start": cycle.warm_start if cycle else None,
        "config": config,
        "cycle_id": row.cycle_id, "job_id": row.job_id,
    }
    promotion_approvals = session.exec(
        select(ApprovalRecord).where(ApprovalRecord.adapter_sha256 == sha).order_by(ApprovalRecord.requested_at)).all()
    cycle_approvals = session.exec(
        select(ApprovalRecord).where(ApprovalRecord.cycle_id == row.cycle_id,
                                     col(ApprovalRecord.kind).in_(("cycle", "research")))).all() if row.cycle_id else []
    served = session.exec(select(ChannelEvent).where(ChannelEvent.adapter_sha256 == sha)
                          .order_by(ChannelEvent.at, ChannelEvent.event_id)).all()
    return {
        "adapter_sha256": row.adapter_sha256, "adapter_uri": row.adapter_uri, "kind": row.kind,
        "status": row.status, "lineage": lineage, "metrics": loads(row.metrics_json, {}),
        "training_energy": loads(row.energy_json, {}),
        "energy": _energy_of_cycle(session, row.cycle_id),
        "validation": {"validation_id": row.validation_id, "verdict": row.verdict,
                       "explanation": row.verdict_explanation, "score": row.verdict_score,
                       "raw_data_uri": row.raw_data_uri, "validated_at": iso_z(row.validated_at)},
        "drift": {"validation_id": row.drift_validation_id, "verdict": row.drift_verdict,
                  "validated_at": iso_z(row.drift_validated_at)} if row.drift_validation_id else None,
        "approvals": [approval_view(a) for a in [*cycle_approvals, *promotion_approvals]],
        "channel_events": [channel_event_view(e) for e in served],
        "trained_at": iso_z(row.trained_at), "first_served_at": iso_z(row.first_served_at),
        "first_seen_at": iso_z(row.first_seen_at),
    }


def channel_event_view(row: ChannelEvent) -> dict[str, Any]:
    return {
        "event_id": row.event_id, "channel": row.channel, "action": row.action, "at": iso_z(row.at),
        "adapter_sha256": row.adapter_sha256, "adapter_uri": row.adapter_uri,
        "previous_adapter_sha256": row.previous_adapter_sha256, "approval_request_id": row.approval_request_id,
        "operator_id": row.operator_id, "reason": row.reason, "detail": row.detail,
        "correlation_id": row.correlation_id,
    }


def channel_view(session: Session, head: ChannelHead, lineage: bool = True) -> dict[str, Any]:
    return {
        "channel": head.channel, "adapter_sha256": head.adapter_sha256, "adapter_uri": head.adapter_uri,
        "kind": head.kind, "since": iso_z(head.since), "via": head.via, "event_id": head.event_id,
        "approval_request_id": head.approval_request_id, "approver": head.approver,
        "operator_id": head.operator_id, "previous_adapter_sha256": head.previous_adapter_sha256,
        "adapter": adapter_view(session, head.adapter_sha256) if lineage else None,
    }


def channels(session: Session, lineage: bool = True) -> list[dict[str, Any]]:
    heads = session.exec(select(ChannelHead).order_by(ChannelHead.channel)).all()
    return [channel_view(session, h, lineage) for h in heads]


def channel_history(session: Session, channel: str, include_refusals: bool = True) -> list[dict[str, Any]]:
    query = select(ChannelEvent).where(ChannelEvent.channel == channel)
    if not include_refusals:
        query = query.where(col(ChannelEvent.action).in_(("promoted", "rolled_back")))
    return [channel_event_view(e) for e in session.exec(query.order_by(ChannelEvent.at, ChannelEvent.event_id)).all()]


def manifest(session: Session) -> dict[str, Any]:
    """What serves each channel and every adapter the platform knows, with lineage and approvals."""
    rows = session.exec(select(AdapterRecord).order_by(AdapterRecord.first_seen_at, AdapterRecord.adapter_sha256)).all()
    return {
        "channels": {c["channel"]: c for c in channels(session)},
        "adapters": [adapter_view(session, r.adapter_sha256) for r in rows],
    }


def resolve_adapter(session: Session, prefix: str) -> str | None:
    """The full sha256 of the one known adapter starting with ``prefix``; None when none or several."""
    rows = session.exec(select(AdapterRecord.adapter_sha256)
                        .where(col(AdapterRecord.adapter_sha256).startswith(prefix.lower())).limit(2)).all()
    return rows[0] if len(rows) == 1 else None


# --- training, cycles, soak runs --------------------------------------------------------------


def reward_curve(curve: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An RL run's curve: reward mean and spread, KL to the starting policy, share of distinct answers."""
    figures = ("reward_mean", "reward_spread", "kl", "distinct_share")
    return [{"step": p.get("step"), **{k: p.get(k) for k in figures}} for p in curve if p.get("reward_mean") is not None]


def training_view(row: TrainingRun) -> dict[str, Any]:
    curve = loads(row.loss_curve_json, [])
    return {
        "job_id": row.job_id, "cycle_id": row.cycle_id, "kind": row.kind, "status": row.status,
        "base_model": row.base_model, "base_model_sha256": row.base_model_sha256,
        "dataset_sha256": row.dataset_sha256, "config": loads(row.config_json, {}),
        "loss_curve": curve, "reward_curve": reward_curve(curve), "metrics": loads(row.metrics_json, {}),
        "adapter_sha256": row.adapter_sha256, "adapter_uri": row.adapter_uri, "error": row.error,
        "requested_at": iso_z(row.requested_at), "started_at": iso_z(row.started_at),
        "finished_at": iso_z(row.finished_at),
    }


def training_runs(session: Session, limit: int = 20) -> list[dict[str, Any]]:
    rows = session.exec(select(TrainingRun)).all()
    rows = sorted(rows, key=lambda r: (iso_z(r.started_at or r.requested_at or r.finished_at) or "", r.job_id),
                  reverse=True)
    return [training_view(r) for r in rows[:limit]]


def cycle_view(row: CycleRecord) -> dict[str, Any]:
    return {
        "cycle_id": row.cycle_id, "kind": row.kind, "status": row.status, "model": row.model,
        "dataset_id": row.dataset_id, "dataset_sha256": row.dataset_sha256, "config": loads(row.config_json, {}),
        "warm_start": row.warm_start, "energy_estimate_wh": row.energy_estimate_wh,
        "requested_by": row.requested_by, "proposed_at": iso_z(row.proposed_at),
        "deferred_gate": row.deferred_gate, "deferred_reason": row.deferred_reason, "retry_at": iso_z(row.retry_at),
        "job_id": row.job_id, "adapter_sha256": row.adapter_sha256, "verdict": row.verdict,
        "fitness": row.fitness, "loss_before": row.loss_before, "loss_after": row.loss_after,
        "outcome": row.outcome, "completed_at": iso_z(row.completed_at), "last_event_at": iso_z(row.last_event_at),
    }


def cycles(session: Session, limit: int = 50) -> list[dict[str, Any]]:
    rows = session.exec(select(CycleRecord).order_by(col(CycleRecord.last_event_at).desc()).limit(limit)).all()
    return [cycle_view(r) for r in rows]


def snapshot_view(session: Session, row: ValidationSnapshot) -> dict[str, Any]:
    reports = session.exec(select(EnergyReport).where(EnergyReport.job_kind == "validation",
                                                      EnergyReport.job_id == row.validation_id)).all()
    approval = session.exec(select(ApprovalRecord).where(ApprovalRecord.kind == "promotion",
                                                         ApprovalRecord.subject_id == row.validation_id)).first()
    pending = session.exec(select(ApprovalRecord.request_id).where(ApprovalRecord.status == "pending")
                           .order_by(ApprovalRecord.request_id)).all()
    incidents = loads(row.incidents_json, [])
    measured = _verdict_evidence(session, row)
    return {
        "validation_id": row.validation_id, "adapter_sha256": row.adapter_sha256, "adapter_uri": row.adapter_uri,
        "cycle_id": row.cycle_id, "kind": row.kind, "purpose": row.purpose, "baseline": loads(row.baseline_json, {}),
        "status": row.status, "verdict": row.verdict, "explanation": row.explanation, "score": row.score,
        "raw_data_uri": row.raw_data_uri,
        "sized_by": ({"event_id": row.sized_by_event_id, "validator_replicas": row.advised_replicas}
                     if row.advised_replicas is not None else None),
        "totals": {"replicas": row.replicas_planned, "cycles_planned": row.cycles_planned,
                   "cycles_done": row.cycles_done, "cycles_passed": row.cycles_passed,
                   "cycles_failed": row.cycles_failed, "episodes": row.episodes_total,
                   "incidents": len(incidents), "failing_streak": row.failing_streak},
        "success_rate": row.success_rate,
        "cycles": loads(row.records_json, []),
        "replica_load": loads(row.load_json, []),
        "incidents": incidents,
        "retrieval": measured.get("retrieval"), "policy": measured.get("policy"),
        "reward_curve": _training_reward_curve(session, row.adapter_sha256),
        "energy": {**energy_totals(list(reports)), "jobs": [energy_view(r) for r in reports]} if reports else None,
        "promotion_approval": approval_view(approval) if approval else None,
        "pending_approvals": list(pending),
        "started_at": iso_z(row.started_at), "completed_at": iso_z(row.completed_at),
        "last_event_at": iso_z(row.last_event_at),
    }


def _verdict_evidence(session: Session, row: ValidationSnapshot) -> dict[str, Any]:
    """An encoder's retrieval and a policy's answers (mean per side) as the run's verdict carries them,
    read from the archived ``validation.completed``; {} while the run goes on or when it measured neither."""
    if row.status != "completed":
        return {}
    archived = session.exec(select(ArchivedEvent.envelope_json).where(
        ArchivedEvent.type == "validation.completed", ArchivedEvent.aggregate_id == row.validation_id)).first()
    payload = loads(archived, {}).get("payload") or {}
    return {key: payload[key] for key in ("retrieval", "policy") if isinstance(payload.get(key), dict)}


def _training_reward_curve(session: Session, sha: str | None) -> list[dict[str, Any]]:
    """The reward curve of the RL run that trained adapter ``sha`` (empty for any other run)."""
    run = session.exec(select(TrainingRun).where(TrainingRun.adapter_sha256 == sha)).first() if sha else None
    return reward_curve(loads(run.loss_curve_json, [])) if run else []


def snapshot(session: Session, validation_id: str) -> dict[str, Any] | None:
    row = session.get(ValidationSnapshot, validation_id)
    return snapshot_view(session, row) if row else None


def snapshots(session: Session, limit: int = 20) -> list[dict[str, Any]]:
    rows = session.exec(select(ValidationSnapshot).order_by(col(ValidationSnapshot.last_event_at).desc())
                        .limit(limit)).all()
    return [snapshot_view(session, r) for r in rows]


# --- profiles --------------------------------------------------------------------------------


def profile_view(row: PersonalityProfile) -> dict[str, Any]:
    return {
        "profile_id": row.profile_id, "traits": loads(row.traits_json, {}),
        "interaction_style": row.interaction_style, "context_preferences": loads(row.context_preferences_json, {}),
        "channel": row.channel, "active_adapter_sha256": row.active_adapter_sha256,
        "active_adapter_uri": row.active_adapter_uri, "version": row.version, "created_at": iso_z(row.created_at),
        "updated_at": iso_z(row.updated_at), "updated_by": row.updated_by,
        "adapter_updated_at": iso_z(row.adapter_updated_at),
    }


def profile(session: Session, profile_id: str) -> dict[str, Any] | None:
    row = session.get(PersonalityProfile, profile_id)
    return profile_view(row) if row else None


def profiles(session: Session, channel: str | None = None) -> list[dict[str, Any]]:
    query = select(PersonalityProfile)
    if channel:
        query = query.where(PersonalityProfile.channel == channel)
    return [profile_view(r) for r in session.exec(query.order_by(PersonalityProfile.profile_id)).all()]


# --- the dashboard -------------------------------------------------------------------------------


def dashboard(session: Session) -> dict[str, Any]:
    """Everything the dashboard page shows, in one answer."""
    return {
        "channels": channels(session, lineage=False),
        "training": training_runs(session, limit=8),
        "validations": [
            {k: s[k] for k in ("validation_id", "adapter_sha256", "cycle_id", "purpose", "status", "verdict",
                               "explanation", "score", "success_rate", "totals", "sized_by", "completed_at",
                               "retrieval", "policy")}
            for s in snapshots(session, limit=12)
        ],
        "energy_per_cycle": energy(session)["per_cycle"][:12],
        "pending_approvals": approvals(session, pending_only=True),
        "cycles": cycles(session, limit=12),
    }


# --- audit ---------------------------------------------------------------------------------------


def served_at(session: Session, *, profile: str | None = None, channel: str | None = None) -> dict[str, Any]:
    """Which adapter the read models say is serving (a profile, else a channel), who put it there
    and on what evidence. ``neurons audit at`` asks this of read models rebuilt up to a moment."""
    answer: dict[str, Any] = {"profile": None, "channel": channel, "adapter_sha256": None, "serving": None,
                              "put_in_service": None, "promotion": None, "approved_by": None, "evidence": []}
    if profile:
        row = session.get(PersonalityProfile, profile)
        if row is None:
            return {**answer, "why": f"profile {profile} did not exist yet"}
        answer["profile"] = profile_view(row)
        answer["channel"] = channel = row.channel
        sha = row.active_adapter_sha256
    else:
        answer["channel"] = channel = channel or "production"
        head = session.get(ChannelHead, channel)
        sha = head.adapter_sha256 if head else None
    if sha is None:
        return {**answer, "why": f"no adapter served {channel} yet (the base model answered)"}
    answer["adapter_sha256"] = sha
    answer["serving"] = adapter_view(session, sha)
    steps = session.exec(select(ChannelEvent).where(ChannelEvent.adapter_sha256 == sha,
                                                    col(ChannelEvent.action).in_(("promoted", "rolled_back")))
                         .order_by(col(ChannelEvent.at).desc(), ChannelEvent.event_id)).all()
    here = [s for s in steps if s.channel == channel]
    if here:
        answer["put_in_service"] = channel_event_view(here[0])
    promoted = next((s for s in here if s.action == "promoted"), None) or next(
        (s for s in steps if s.action == "promoted"), None)
    approval = session.get(ApprovalRecord, promoted.approval_request_id) if promoted and promoted.approval_request_id else None
    if approval is not None:
        answer["promotion"] = approval_view(approval)
        answer["approved_by"] = approval.operator_id
        answer["evidence"] = answer["promotion"]["evidence"]
    return answer

"""What an operator watches: cycles, training runs with their loss curves, soak runs, measured energy.

``registry_validation_snapshots`` is the observability snapshot of one soak
run: totals, success rate, a record per soak cycle (with the medians of the
reward and of an encoder's retrieval it measured), the replicas' load over
time and the incidents. A training run's curve carries, for an RL run, the
reward's mean and spread, the KL to the starting policy and the share of
distinct completions at every reported step. Its energy and its promotion request are joined in at
read time (``queries.snapshot``), because those events travel on other topics
and may be read before the run itself.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Mapping

from sqlmodel import Field, Session, SQLModel

from services.registry.manifest import base_model_of
from services.registry.rows import dumps, get_or_new, json_field, json_value, set_json, utc
from shared.archive import Projection
from shared.contracts.envelope import Envelope
from shared.contracts.values import number

# A loss curve longer than this keeps every other point of its first half,
# so a long run stays drawable and the stored row stays small.
MAX_CURVE_POINTS = 2000
# An RL run's progress, kept on its curve's points: the reward's mean and spread within a group,
# the KL to the policy it started from and the share of distinct completions (older names after).
REWARD_FIGURES = {"reward_mean": ("reward_mean",), "reward_spread": ("reward_spread", "reward_std"),
                  "kl": ("kl", "kl_to_start", "kl_divergence"), "distinct_share": ("distinct_share",)}
# What a soak cycle measured beyond its verdict, kept on the cycle's record: median per side.
MEASURED_METRICS = ("reward", "retrieval_recall_at_1", "retrieval_mrr")


class CycleRecord(SQLModel, table=True):
    __tablename__ = "registry_cycles"
    cycle_id: str = Field(primary_key=True)
    kind: str | None = None
    status: str | None = None  # proposed | deferred | approved | rejected | expired | evaluated | completed
    model: str | None = None
    dataset_id: str | None = None
    dataset_sha256: str | None = None
    config_json: str = json_field()
    warm_start: str | None = None
    energy_estimate_wh: float | None = None
    requested_by: str | None = None
    proposed_at: datetime | None = None
    deferred_gate: str | None = None
    deferred_reason: str | None = None
    retry_at: datetime | None = None
    job_id: str | None = None
    adapter_sha256: str | None = None
    verdict: str | None = None
    fitness: float | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    outcome: str | None = None
    completed_at: datetime | None = None
    last_event_at: datetime | None = None


class TrainingRun(SQLModel, table=True):
    __tablename__ = "registry_training_runs"
    job_id: str = Field(primary_key=True)
    cycle_id: str | None = Field(default=None, index=True)
    kind: str | None = None
    status: str = "requested"  # requested | started | completed | fallback | failed
    base_model: str | None = None
    base_model_sha256: str | None = None
    dataset_sha256: str | None = None
    config_json: str = json_field()
    loss_curve_json: str = json_field("[]")  # [{"step": n, "loss": x}, ...]
    metrics_json: str = json_field()
    adapter_sha256: str | None = None
    adapter_uri: str | None = None
    error: str | None = None
    requested_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class ValidationSnapshot(SQLModel, table=True):
    __tablename__ = "registry_validation_snapshots"
    validation_id: str = Field(primary_key=True)
    adapter_sha256: str | None = Field(default=None, index=True)
    adapter_uri: str | None = None
    cycle_id: str | None = Field(default=None, index=True)
    kind: str | None = None
    purpose: str | None = None
    baseline_json: str = json_field()
    status: str = "running"  # running | completed
    verdict: str | None = None
    explanation: str | None = None
    score: float | None = None
    raw_data_uri: str | None = None
    replicas_planned: int | None = None
    # the energy service's advice the soak was sized to (validation.started's sized_by), if any
    sized_by_event_id: str | None = None
    advised_replicas: int | None = None
    cycles_planned: int | None = None
    episodes_planned: int | None = None
    cycles_done: int = 0
    cycles_passed: int = 0
    cycles_failed: int = 0
    success_rate: float | None = None
    episodes_total: int = 0
    failing_streak: int = 0
    records_json: str = json_field("[]")
    load_json: str = json_field("[]")
    incidents_json: str = json_field("[]")
    started_at: datetime | None = None
    completed_at: datetime | None = None
    last_event_at: datetime | None = None


class EnergyReport(SQLModel, table=True):
    __tablename__ = "registry_energy_reports"
    job_kind: str = Field(primary_key=True)
    job_id: str = Field(primary_key=True)
    cycle_id: str | None = Field(default=None, index=True)
    joules: float | None = None
    wh: float | None = None
    facility_wh: float | None = None
    gco2e: float | None = None
    pue: float | None = None
    carbon_intensity: float | None = None
    method: str | None = None
    reason: str | None = None
    duration_s: float | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    reported_at: datetime | None = None




def _first(mapping: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        if mapping.get(name) is not None:
            return mapping[name]
    return None


def _apply_cycle(session: Session, event: Envelope) -> None:
    p, etype = event.payload, event.type
    cycle_id = p.get("cycle_id")
    if not cycle_id:
        return
    row, _ = get_or_new(session, CycleRecord, {"cycle_id": cycle_id})
    row.last_event_at = utc(event.occurred_at)
    if etype in ("cycle.proposed", "research.proposed"):
        dataset = p.get("dataset") if isinstance(p.get("dataset"), dict) else {}
        row.kind, row.status, row.model = p.get("kind"), "proposed", p.get("model")
        row.dataset_id, row.dataset_sha256 = dataset.get("dataset_id"), dataset.get("sha256")
        row.config_json, row.warm_start = dumps(p.get("config") or {}), p.get("warm_start")
        row.energy_estimate_wh, row.requested_by = number(p.get("energy_estimate_wh")), p.get("requested_by")
        row.proposed_at = utc(p.get("proposed_at") or event.occurred_at)
    elif etype == "cycle.deferred":
        row.kind = row.kind or p.get("kind")
        row.status, row.deferred_gate, row.deferred_reason = "deferred", p.get("gate"), p.get("reason")
        row.retry_at = utc(p.get("retry_at"))
    elif etype == "cycle.evaluated":
        row.status = "evaluated"
        row.verdict, row.fitness = p.get("verdict"), number(p.get("fitness"))
        row.loss_before, row.loss_after = number(p.get("loss_before")), number(p.get("loss_after"))
        row.adapter_sha256 = p.get("adapter_sha256") or row.adapter_sha256
    elif etype == "cycle.rescored":  # an energy report that came after the verdict
        row.fitness = number(p.get("fitness"))
    elif etype == "cycle.completed":
        row.status, row.outcome, row.fitness = "completed", p.get("outcome"), number(p.get("fitness"))
        row.adapter_sha256 = p.get("adapter_sha256") or row.adapter_sha256
        row.completed_at = utc(p.get("completed_at") or event.occurred_at)
    elif etype in ("approval.granted", "approval.rejected", "approval.expired") and p.get("kind") in ("cycle", "research"):
        if row.status in (None, "proposed", "deferred"):
            row.status = {"approval.granted": "approved"}.get(etype, etype.split(".", 1)[1])
    elif etype == "training.requested":
        row.job_id = p.get("job_id") or row.job_id
    elif etype == "training.completed":
        row.job_id = p.get("job_id") or row.job_id
        row.adapter_sha256 = p.get("adapter_sha256") or row.adapter_sha256
    session.add(row)


def _apply_training(session: Session, event: Envelope) -> None:
    p, etype = event.payload, event.type
    job_id = p.get("job_id")
    if not job_id:
        return
    row, _ = get_or_new(session, TrainingRun, {"job_id": job_id})
    row.cycle_id = p.get("cycle_id") or row.cycle_id
    row.kind = p.get("kind") or row.kind
    if etype == "training.requested":
        row.base_model, row.base_model_sha256 = base_model_of(p)
        dataset = p.get("dataset") if isinstance(p.get("dataset"), dict) else {}
        row.dataset_sha256 = p.get("dataset_sha256") or dataset.get("sha256")
        row.config_json = dumps(p.get("config") or {})
        row.requested_at = utc(event.occurred_at)
    elif etype == "training.started":
        row.status = "started"
        row.started_at = utc(p.get("started_at") or event.occurred_at)
    elif etype == "training.progressed":
        metrics = p.get("metrics") if isinstance(p.get("metrics"), dict) else {}
        loss = _first(p, ("loss", "train_loss"))
        loss = number(loss if loss is not None else _first(metrics, ("loss", "train_loss")))
        step = _first(p, ("step", "global_step"))
        if step is None:
            step = _first(metrics, ("step", "global_step"))
        figures = {key: number(_first(p, names)) for key, names in REWARD_FIGURES.items()}
        figures = {key: value for key, value in figures.items() if value is not None}
        if loss is not None or figures:
            curve = json_value(session, row, "loss_curve_json", [])
            point = {"step": int(step) if isinstance(step, (int, float)) else len(curve) + 1, "loss": loss, **figures}
            eval_loss = number(_first(p, ("eval_loss",)) or _first(metrics, ("eval_loss",)))
            if eval_loss is not None:
                point["eval_loss"] = eval_loss
            curve.append(point)
            if len(curve) > MAX_CURVE_POINTS:
                half = len(curve) // 2
                curve = curve[:half:2] + curve[half:]
            set_json(session, row, "loss_curve_json", curve)
        if row.status == "requested":
            row.status = "started"
    elif etype == "training.completed":
        row.status = "fallback" if (p.get("status") != "trained" or p.get("fallback")) else "completed"
        row.metrics_json = dumps(p.get("metrics") or {})
        row.adapter_sha256, row.adapter_uri = p.get("adapter_sha256"), p.get("adapter_uri")
        name, checksum = base_model_of(p)
        row.base_model, row.base_model_sha256 = name or row.base_model, checksum or row.base_model_sha256
        row.dataset_sha256 = p.get("dataset_sha256") or row.dataset_sha256
        if p.get("config"):
            row.config_json = dumps(p["config"])
        row.finished_at = utc(event.occurred_at)
    elif etype == "training.failed":
        row.status = "failed"
        row.error = p.get("error") or p.get("reason")
        row.finished_at = utc(event.occurred_at)
    session.add(row)


def _apply_validation(session: Session, event: Envelope) -> None:
    p, etype = event.payload, event.type
    validation_id = p.get("validation_id")
    if not validation_id:
        return
    row, _ = get_or_new(session, ValidationSnapshot, {"validation_id": validation_id})
    row.last_event_at = utc(event.occurred_at)
    if etype in ("validation.started", "validation.completed"):
        row.adapter_sha256 = p.get("adapter_sha256") or row.adapter_sha256
        row.adapter_uri = p.get("adapter_uri") or row.adapter_uri
        row.cycle_id = p.get("cycle_id") or row.cycle_id
        row.kind, row.purpose = p.get("kind") or row.kind, p.get("purpose") or row.purpose
        if p.get("baseline") is not None:
            row.baseline_json = dumps(p["baseline"])
    if etype == "validation.started":
        row.replicas_planned, row.cycles_planned = p.get("replicas"), p.get("cycles")
        sized_by = p.get("sized_by") or {}
        row.sized_by_event_id, row.advised_replicas = sized_by.get("event_id"), sized_by.get("validator_replicas")
        row.episodes_planned = p.get("episodes")
        row.started_at = utc(p.get("started_at") or event.occurred_at)
    elif etype == "validation.cycle_completed":
        records = json_value(session, row, "records_json", [])
        cycle = p.get("cycle")
        if any(r.get("cycle") == cycle for r in records):
            return  # a soak cycle reported twice counts once
        at = event.occurred_at.isoformat()
        record = {"cycle": cycle, "outcome": p.get("outcome"), "score": p.get("score"),
                  "vetoes": p.get("vetoes") or [], "reason": p.get("reason"), "at": at}
        measured = _measured(p.get("metrics"))
        if measured:  # a soak that measured no reward nor retrieval keeps the record it always had
            record["measured"] = measured
        records.append(record)
        set_json(session, row, "records_json", records)
        row.cycles_done = len(records)
        row.cycles_passed = sum(1 for r in records if r["outcome"] == "pass")
        row.cycles_failed = sum(1 for r in records if r["outcome"] == "fail")
        judged = sum(1 for r in records if r["outcome"] in ("pass", "marginal", "fail"))
        row.success_rate = round(row.cycles_passed / judged, 6) if judged else None
        row.failing_streak = int(p.get("failing_streak") or 0)
        load = json_value(session, row, "load_json", [])
        for replica in p.get("replicas") or []:
            load.append({"cycle": cycle, "at": at, **replica})
            row.episodes_total += int(replica.get("episodes") or 0)
        set_json(session, row, "load_json", load)
        incidents = json_value(session, row, "incidents_json", [])
        incidents += list(p.get("incidents") or [])
        set_json(session, row, "incidents_json", incidents)
    elif etype == "validation.completed":
        row.status = "completed"
        row.verdict, row.explanation, row.score = p.get("verdict"), p.get("explanation"), number(p.get("score"))
        row.raw_data_uri = p.get("raw_data_uri")
        row.completed_at = utc(event.occurred_at)
        if p.get("incidents") and not json_value(session, row, "incidents_json", []):
            set_json(session, row, "incidents_json", list(p["incidents"]))
    session.add(row)


def _measured(metrics: Any) -> dict[str, dict[str, float | None]]:
    """The medians of the cycle's reward and retrieval per side, from its judged metrics."""
    metrics = metrics if isinstance(metrics, dict) else {}
    return {name: {"candidate": number(m.get("candidate_median")), "baseline": number(m.get("baseline_median"))}
            for name, m in metrics.items() if name in MEASURED_METRICS and isinstance(m, dict)}


def _apply_energy(session: Session, event: Envelope) -> None:
    p = event.payload
    row, _ = get_or_new(session, EnergyReport, {"job_kind": p["job_kind"], "job_id": p["job_id"]})
    window = p.get("window") or {}
    row.cycle_id = p.get("cycle_id")
    row.joules, row.wh, row.facility_wh = number(p.get("joules")), number(p.get("wh")), number(p.get("facility_wh"))
    row.gco2e, row.pue = number(p.get("gco2e")), number(p.get("pue"))
    row.carbon_intensity, row.method, row.reason = number(p.get("carbon_intensity")), p.get("method"), p.get("reason")
    row.duration_s = number(p.get("duration_s"))
    row.started_at, row.ended_at = utc(window.get("started_at")), utc(window.get("ended_at"))
    row.reported_at = utc(event.occurred_at)
    session.add(row)


def apply_observability(session: Session, event: Envelope) -> None:
    family = event.aggregate_type
    if family in ("cycle", "research") or event.type in ("training.requested", "training.completed") or (
            family == "approval" and event.payload.get("kind") in ("cycle", "research")
            and event.type != "approval.requested"):
        _apply_cycle(session, event)
    if family == "training":
        _apply_training(session, event)
    if family == "validation":
        _apply_validation(session, event)
    if event.type == "energy.reported":
        _apply_energy(session, event)


OBSERVABILITY = Projection("observability", [CycleRecord, TrainingRun, ValidationSnapshot, EnergyReport],
                           apply_observability)

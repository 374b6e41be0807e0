"""Energy rules: what each job cost, rolling budgets, and sizing jobs to the hardware.

Pure: no clock, no files, no environment. Time comes from the events
(``occurred_at``) or from the command, so replaying the log gives the same
state and the same decisions.

- A finished training or validation job becomes one ``energy.reported`` with
  joules, Wh and gCO2e (joules -> kWh, times PUE, times grid intensity). A job
  whose meter gave nothing is reported with ``joules: null`` and the reason:
  an unknown cost is not a zero cost.
- Each rolling budget window (say 24h: 500 Wh) raises ``energy.budget_exceeded``
  when a report pushes its measured use over the budget, once per crossing:
  while the window stays over, further reports add nothing new.
- ``ProfileHardware`` records ``hardware.profiled`` and recommends micro-batch,
  gradient accumulation and replica counts (``scaling.recommended``) from the
  memory, cores and the energy budget left, and from what was observed: the
  soaks' replica memory, latency and incidents (``validation.cycle_completed``)
  and the training jobs' joules per step (``training.completed``), each with
  its reasons (the sizing rules are in ``services.energy.scaling``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Iterable, Mapping

from services.energy.scaling import Observed, ScalingConfig, observe, recommend_scaling
from shared.contracts.envelope import NewEvent
from shared.contracts.values import iso, number, time_or_none

TRAINING_COMPLETED = "training.completed"
VALIDATION_COMPLETED = "validation.completed"
ENERGY_REPORTED = "energy.reported"
BUDGET_EXCEEDED = "energy.budget_exceeded"
HARDWARE_PROFILED = "hardware.profiled"
SCALING_RECOMMENDED = "scaling.recommended"

METHODS = ("rapl", "nvml", "model")
JOB_KINDS = {TRAINING_COMPLETED: "training", VALIDATION_COMPLETED: "validation"}
JOULES_PER_KWH = 3.6e6
JOULES_PER_WH = 3600.0
# Measured energy per job kind kept for estimates: enough to smooth noise,
# few enough to follow a change of model or hardware.
RECENT_JOBS_KEPT = 20

_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# --------------------------------------------------------------------------- config


def parse_span(text: str) -> timedelta:
    """``"90m"``, ``"24h"``, ``"7d"`` (also ``s`` and ``w``) as a positive timedelta."""
    match = _SPAN.match(text or "")
    if not match:
        raise ValueError(
            f"expected a number and a unit (s, m, h, d or w), e.g. 90m, 24h or 7d; got {text!r}"
        )
    seconds = float(match[1]) * _UNIT_SECONDS[match[2]]
    if seconds <= 0:
        raise ValueError(f"a duration must be longer than zero; got {text!r}")
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class BudgetWindow:
    """At most ``budget_wh`` measured Wh in any rolling ``span``."""

    name: str
    span: timedelta
    budget_wh: float

    @classmethod
    def parse(cls, text: str) -> "BudgetWindow":
        """``"24h=500"``: a 24-hour window with a 500 Wh budget."""
        span_text, sep, wh_text = text.partition("=")
        if not sep:
            raise ValueError(f"a budget reads <window>=<Wh>, e.g. 24h=500; got {text!r}")
        span = parse_span(span_text)
        try:
            budget = float(wh_text)
        except ValueError:
            raise ValueError(f"budget Wh must be a number; got {wh_text!r} in {text!r}") from None
        if budget < 0 or not math.isfinite(budget):
            raise ValueError(f"budget Wh must be zero or more; got {text!r}")
        return cls(span_text.strip(), span, budget)


def parse_budgets(text: str | None) -> tuple[BudgetWindow, ...]:
    """``"12h=300,24h=500"`` -> two windows; empty or None -> no budgets."""
    if not text or not text.strip():
        return ()
    windows = tuple(BudgetWindow.parse(part) for part in text.split(",") if part.strip())
    names = [w.name for w in windows]
    if len(set(names)) != len(names):
        raise ValueError(f"each budget window may appear once; got {text!r}")
    return windows


@dataclass(frozen=True)
class EnergyConfig:
    carbon_intensity_g_per_kwh: float = 400.0
    pue: float = 1.2
    budgets: tuple[BudgetWindow, ...] = ()
    scaling: ScalingConfig = field(default_factory=ScalingConfig)


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class ProfileHardware:
    """Record a node's hardware profile and recommend how to size jobs on it."""

    node: str
    profile: Mapping[str, Any]
    at: datetime
    model_params: int | None = None


@dataclass(frozen=True)
class RecommendScaling:
    """Recommend again from the node's last profile, e.g. after the budget moved."""

    node: str
    at: datetime
    model_params: int | None = None


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Usage:
    at: datetime
    wh: float | None
    job_key: str


@dataclass(frozen=True)
class EnergyState:
    budgets: tuple[BudgetWindow, ...] = ()
    usage: tuple[Usage, ...] = ()
    reported: frozenset[str] = frozenset()
    recent_wh: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    crossings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    hardware: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    observed: Observed = field(default_factory=Observed)  # soak cycles and training jobs, for scaling

    @property
    def horizon(self) -> timedelta:
        # A day even without budgets, so ad-hoc budget_status queries see recent use.
        return max((w.span for w in self.budgets), default=timedelta(days=1))

    def to_rows(self) -> dict[str, dict[str, Any]]:
        """One row per job still inside a budget window, per job ever reported, per job kind's recent
        use, per window over budget and per node profiled. The budgets are configuration: not kept."""
        rows: dict[str, dict[str, Any]] = {
            f"usage:{u.job_key}": {"at": iso(u.at), "wh": u.wh, "job_key": u.job_key} for u in self.usage}
        rows.update({f"reported:{key}": {} for key in self.reported})
        rows.update({f"recent:{kind}": {"wh": list(values)} for kind, values in self.recent_wh.items()})
        rows.update({f"crossing:{window}": dict(payload) for window, payload in self.crossings.items()})
        rows.update({f"hardware:{node}": dict(profile) for node, profile in self.hardware.items()})
        if self.observed != Observed():
            rows["observed:node"] = self.observed.to_dict()
        return rows

    @classmethod
    def from_rows(cls, rows: Mapping[str, Mapping[str, Any]], budgets: tuple["BudgetWindow", ...] = ()) -> "EnergyState":
        parts: dict[str, dict[str, Mapping[str, Any]]] = {}
        for key, record in rows.items():
            prefix, _, name = key.partition(":")
            parts.setdefault(prefix, {})[name] = record
        usage = sorted((Usage(time_or_none(u["at"]), u["wh"], u["job_key"]) for u in parts.get("usage", {}).values()),
                       key=_usage_order)
        return cls(budgets=budgets, usage=tuple(usage), reported=frozenset(parts.get("reported", {})),
                   recent_wh={kind: tuple(r["wh"]) for kind, r in parts.get("recent", {}).items()},
                   crossings={window: dict(r) for window, r in parts.get("crossing", {}).items()},
                   hardware={node: dict(r) for node, r in parts.get("hardware", {}).items()},
                   observed=Observed.from_dict(parts.get("observed", {}).get("node")))


def initial_state(config: EnergyConfig | None = None) -> EnergyState:
    return EnergyState(budgets=(config or EnergyConfig()).budgets)


def evolve(state: EnergyState, event: Any) -> EnergyState:
    payload = event.payload
    if event.type == ENERGY_REPORTED:
        kind = payload["job_kind"]
        key = _job_key(kind, payload["job_id"])
        wh = payload.get("wh")
        at = _accounting_time(payload, event.occurred_at)
        usage = _prune(tuple(sorted(state.usage + (Usage(at, wh, key),), key=_usage_order)), at, state.horizon)
        recent = dict(state.recent_wh)
        if wh is not None:
            recent[kind] = (recent.get(kind, ()) + (float(wh),))[-RECENT_JOBS_KEPT:]
        return replace(state, usage=usage, reported=state.reported | {key}, recent_wh=recent)
    if event.type == BUDGET_EXCEEDED:
        return replace(state, crossings={**state.crossings, payload["window"]: dict(payload)})
    if event.type == HARDWARE_PROFILED:
        return replace(state, hardware={**state.hardware, event.aggregate_id: dict(payload)})
    observed = observe(state.observed, event)  # a soak cycle's replicas, a training job's joules per step
    return state if observed is state.observed else replace(state, observed=observed)


def _usage_order(usage: Usage) -> tuple[datetime, str]:
    """Usage is kept by time, then job: the same order whether it was folded live or read back from rows."""
    return usage.at, usage.job_key


def _prune(usage: tuple[Usage, ...], now: datetime, horizon: timedelta) -> tuple[Usage, ...]:
    # Only budget windows look back; nothing older than the longest one matters.
    return tuple(u for u in usage if u.at > now - horizon)


# --------------------------------------------------------------------------- decide


def decide(message: Any, state: EnergyState, config: EnergyConfig) -> list[NewEvent]:
    if isinstance(message, ProfileHardware):
        return _profile_hardware(message, state, config)
    if isinstance(message, RecommendScaling):
        profile = state.hardware.get(message.node)
        if profile is None:
            return []
        return [_scaling_event(message.node, profile, message.at, message.model_params, state, config)]
    if getattr(message, "type", None) in JOB_KINDS:
        return _report_job(message, state, config)
    return []


def _report_job(event: Any, state: EnergyState, config: EnergyConfig) -> list[NewEvent]:
    payload = event.payload or {}
    kind = JOB_KINDS[event.type]
    job_id = str(
        payload.get("job_id") or payload.get(f"{kind}_id") or payload.get("run_id") or event.aggregate_id
    )
    key = _job_key(kind, job_id)
    if key in state.reported:
        return []
    report = energy_report(
        job_id=job_id,
        job_kind=kind,
        cycle_id=payload.get("cycle_id"),
        reading=payload.get("energy"),
        reading_present="energy" in payload,
        completed_at=event.occurred_at,
        config=config,
    )
    events = [NewEvent(ENERGY_REPORTED, job_id, report)]
    if report["wh"] is not None:
        at = _accounting_time(report, event.occurred_at)
        events.extend(_budget_crossings(state, config.budgets, at, report["wh"], job_id))
    return events


def energy_report(
    *,
    job_id: str,
    job_kind: str,
    cycle_id: str | None,
    reading: Mapping[str, Any] | None,
    completed_at: datetime,
    config: EnergyConfig,
    reading_present: bool = True,
) -> dict[str, Any]:
    """The ``energy.reported`` payload for one job's meter reading (a dict, or None)."""
    reading = reading or {}
    joules, reason = _joules(reading, reading_present)
    duration_s = number(reading.get("duration_s"))
    ended = time_or_none(reading.get("ended_at")) or completed_at
    started = time_or_none(reading.get("started_at"))
    if started is None and duration_s is not None:
        started = ended - timedelta(seconds=duration_s)
    components = [
        {"name": str(c.get("name")), "joules": number(c.get("joules")), "method": str(c.get("method"))}
        | ({"reason": c["reason"]} if c.get("reason") else {})
        for c in reading.get("components") or ()
        if isinstance(c, Mapping)
    ]
    wh = None if joules is None else joules / JOULES_PER_WH
    gco2e = (
        None
        if joules is None
        else joules / JOULES_PER_KWH * config.pue * config.carbon_intensity_g_per_kwh
    )
    return {
        "job_id": job_id,
        "job_kind": job_kind,
        "cycle_id": cycle_id,
        "joules": joules,
        "wh": wh,
        "facility_wh": None if wh is None else wh * config.pue,
        "gco2e": gco2e,
        "pue": config.pue,
        "carbon_intensity": config.carbon_intensity_g_per_kwh,
        "method": reading.get("method") if reading.get("method") in METHODS else None,
        "methods": {c["name"]: c["method"] for c in components},
        "components": components,
        "duration_s": duration_s,
        "cpu_s": number(reading.get("cpu_s")),
        "reason": reason,
        "window": {"started_at": iso(started) if started else None, "ended_at": iso(ended)},
    }


def _joules(reading: Mapping[str, Any], present: bool) -> tuple[float | None, str | None]:
    if not present:
        return None, "the job reported no energy reading"
    if not reading:
        return None, "the job's energy meter gave no reading"
    raw = reading.get("joules")
    given_reason = reading.get("reason")
    if raw is None:
        return None, given_reason or "the job's energy meter gave no reading"
    value = number(raw)
    if value is None or value < 0:
        return None, f"rejected an impossible reading of {raw!r} J"
    # A measured reading keeps the meter's note (e.g. why it is modelled).
    return value, given_reason


def _budget_crossings(
    state: EnergyState, budgets: Iterable[BudgetWindow], at: datetime, wh: float, job_id: str
) -> list[NewEvent]:
    events = []
    for window in budgets:
        inside = [u for u in state.usage if at - window.span < u.at <= at and u.wh is not None]
        before = sum(u.wh for u in inside)
        after = before + wh
        # Only the report that takes the window from within budget to over it
        # is a crossing; reports while it is already over are the same episode.
        if before <= window.budget_wh < after:
            until = _back_under_at(inside + [Usage(at, wh, "")], window)
            events.append(
                NewEvent(
                    BUDGET_EXCEEDED,
                    f"budget-{window.name}",
                    {
                        "window": window.name,
                        "window_s": window.span.total_seconds(),
                        "budget_wh": window.budget_wh,
                        "used_wh": after,
                        "crossed_at": iso(at),
                        "until": iso(until),
                        "job_id": job_id,
                    },
                )
            )
    return events


def _back_under_at(inside: list[Usage], window: BudgetWindow) -> datetime:
    """When the window's use falls back within budget if nothing else runs."""
    remaining = sum(u.wh for u in inside if u.wh is not None)
    ordered = sorted(inside, key=lambda u: u.at)
    for usage in ordered:
        remaining -= usage.wh or 0.0
        if remaining <= window.budget_wh:
            return usage.at + window.span
    return ordered[-1].at + window.span


def budget_status(
    state: EnergyState, now: datetime, budgets: Iterable[BudgetWindow] | None = None
) -> dict[str, dict[str, Any]]:
    """Per window: measured use, budget, what is left, and whether it is over."""
    status: dict[str, dict[str, Any]] = {}
    for window in state.budgets if budgets is None else budgets:
        inside = [u for u in state.usage if now - window.span < u.at <= now]
        used = sum(u.wh for u in inside if u.wh is not None)
        exceeded = used > window.budget_wh
        status[window.name] = {
            "used_wh": used,
            "budget_wh": window.budget_wh,
            "remaining_wh": max(0.0, window.budget_wh - used),
            "exceeded": exceeded,
            "until": iso(_back_under_at(inside, window)) if exceeded else None,
            # Jobs whose energy is unknown: the use above is a lower bound.
            "unmeasured_jobs": sum(1 for u in inside if u.wh is None),
            "window_s": window.span.total_seconds(),
        }
    return status


# --------------------------------------------------------------------------- scaling


def _profile_hardware(command: ProfileHardware, state: EnergyState, config: EnergyConfig) -> list[NewEvent]:
    profile = dict(command.profile)
    profile.setdefault("profiled_at", iso(command.at))
    recorded = replace(state, hardware={**state.hardware, command.node: profile})
    return [
        NewEvent(HARDWARE_PROFILED, command.node, profile),
        _scaling_event(command.node, profile, command.at, command.model_params, recorded, config),
    ]


def _scaling_event(
    node: str,
    profile: Mapping[str, Any],
    at: datetime,
    model_params: int | None,
    state: EnergyState,
    config: EnergyConfig,
) -> NewEvent:
    remaining, binding = _remaining_budget(budget_status(state, at, config.budgets))
    payload = recommend_scaling(
        profile,
        model_params=model_params or config.scaling.default_model_params,
        remaining_wh=remaining,
        binding_window=binding,
        wh_per_training=_mean(state.recent_wh.get("training")),
        wh_per_validation=_mean(state.recent_wh.get("validation")),
        config=config.scaling,
        observed=state.observed,
    )
    payload["node"] = node
    payload["recommended_at"] = iso(at)
    return NewEvent(SCALING_RECOMMENDED, node, payload)


def _remaining_budget(status: Mapping[str, Mapping[str, Any]]) -> tuple[float | None, str | None]:
    if not status:
        return None, None
    name = min(status, key=lambda n: (status[n]["remaining_wh"], n))
    return status[name]["remaining_wh"], name


# --------------------------------------------------------------------------- small pure helpers


def _job_key(kind: str, job_id: str) -> str:
    return f"{kind}:{job_id}"


def _accounting_time(report: Mapping[str, Any], fallback: datetime) -> datetime:
    # Energy counts against a budget when the job's work ended, which replays identically.
    window = report.get("window") or {}
    return time_or_none(window.get("ended_at")) or fallback


def _mean(values: Iterable[float] | None) -> float | None:
    values = list(values or ())
    return sum(values) / len(values) if values else None

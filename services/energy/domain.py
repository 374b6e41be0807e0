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
  memory, cores and the energy budget left, each with its reasons.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Iterable, Mapping

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
class ScalingConfig:
    """The rules of thumb behind ``scaling.recommended``; every figure is in its reasons."""

    target_batch: int = 32
    max_micro_batch: int = 64
    seq_len: int = 256
    # Share of memory left free for the OS, the tokenizer, the data pipeline.
    memory_headroom: float = 0.2
    # Weights: fp32 on CPU, bf16 on GPU.
    cpu_bytes_per_param: int = 4
    gpu_bytes_per_param: int = 2
    # LoRA trains ~1% of the weights; each trained weight holds fp32 weight,
    # gradient and two Adam moments (16 bytes).
    lora_fraction: float = 0.01
    # Activation bytes per token per model parameter at 2 bytes per value,
    # fitted on SmolLM2-135M with MNTP logits; scaled by bytes per value.
    activation_bytes_per_token_per_param: float = 0.005
    # Inference keeps no activations for backward: about a third of training.
    inference_activation_share: float = 1 / 3
    cores_per_trainer: int = 4
    cores_per_validator: int = 1
    max_trainer_replicas: int = 8
    max_validator_replicas: int = 8
    default_model_params: int = 135_000_000


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

    @property
    def horizon(self) -> timedelta:
        # A day even without budgets, so ad-hoc budget_status queries see recent use.
        return max((w.span for w in self.budgets), default=timedelta(days=1))


def initial_state(config: EnergyConfig | None = None) -> EnergyState:
    return EnergyState(budgets=(config or EnergyConfig()).budgets)


def evolve(state: EnergyState, event: Any) -> EnergyState:
    payload = event.payload
    if event.type == ENERGY_REPORTED:
        kind = payload["job_kind"]
        key = _job_key(kind, payload["job_id"])
        wh = payload.get("wh")
        at = _accounting_time(payload, event.occurred_at)
        usage = _prune(state.usage + (Usage(at, wh, key),), at, state.horizon)
        recent = dict(state.recent_wh)
        if wh is not None:
            recent[kind] = (recent.get(kind, ()) + (float(wh),))[-RECENT_JOBS_KEPT:]
        return replace(state, usage=usage, reported=state.reported | {key}, recent_wh=recent)
    if event.type == BUDGET_EXCEEDED:
        return replace(state, crossings={**state.crossings, payload["window"]: dict(payload)})
    if event.type == HARDWARE_PROFILED:
        return replace(state, hardware={**state.hardware, event.aggregate_id: dict(payload)})
    return state


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
    )
    payload["node"] = node
    payload["recommended_at"] = iso(at)
    return NewEvent(SCALING_RECOMMENDED, node, payload)


def _remaining_budget(status: Mapping[str, Mapping[str, Any]]) -> tuple[float | None, str | None]:
    if not status:
        return None, None
    name = min(status, key=lambda n: (status[n]["remaining_wh"], n))
    return status[name]["remaining_wh"], name


def recommend_scaling(
    profile: Mapping[str, Any],
    *,
    model_params: int,
    remaining_wh: float | None = None,
    binding_window: str | None = None,
    wh_per_training: float | None = None,
    wh_per_validation: float | None = None,
    config: ScalingConfig = ScalingConfig(),
) -> dict[str, Any]:
    """Micro-batch, gradient accumulation and replica counts for one node, with reasons."""
    cores = int(profile.get("cores") or 1)
    load_1m = float((profile.get("load_avg") or [0.0])[0])
    # Cores already busy with other work are not ours; keep one so work can run at all.
    free_cores = max(1, cores - math.floor(load_1m))
    gpus = [g for g in profile.get("gpus") or () if g.get("memory_total_bytes")]
    on_gpu = bool(gpus)
    bpp = config.gpu_bytes_per_param if on_gpu else config.cpu_bytes_per_param
    weights = model_params * bpp
    fixed = weights + model_params * config.lora_fraction * 16
    per_sample = config.seq_len * model_params * config.activation_bytes_per_token_per_param * bpp / 2
    per_validator = weights + per_sample * config.inference_activation_share

    reasons: dict[str, list[str]] = {
        "micro_batch": [],
        "gradient_accumulation": [],
        "trainer_replicas": [],
        "validator_replicas": [],
    }
    core_note = f"{cores} cores, 1-min load {load_1m:.2f} -> {free_cores} free"

    # Energy: how many more jobs the tightest budget window still pays for.
    def energy_cap(per_job: float | None, what: str, key: str) -> int | None:
        if remaining_wh is None:
            reasons[key].append("no energy budget configured")
            return None
        if remaining_wh <= 0:
            reasons[key].append(f"energy budget {binding_window} is used up")
            return 0
        if per_job is None or per_job <= 0:
            reasons[key].append(
                f"{remaining_wh:.1f} Wh left in budget {binding_window}; no measured {what} yet to size against"
            )
            return None
        cap = math.floor(remaining_wh / per_job)
        reasons[key].append(
            f"{remaining_wh:.1f} Wh left in budget {binding_window} / {per_job:.2f} Wh per {what} -> {cap}"
        )
        return cap

    # Trainer replicas.
    if on_gpu:
        usable = [_gpu_free(g) * (1 - config.memory_headroom) for g in gpus]
        fitting = sum(1 for u in usable if u >= fixed + per_sample)
        by_hardware = fitting
        reasons["trainer_replicas"].append(
            f"{fitting} of {len(gpus)} GPUs fit the model ({_gib(fixed + per_sample)} for weights, "
            f"LoRA state and one sample); one trainer per GPU"
        )
        by_cores = free_cores
        reasons["trainer_replicas"].append(f"{core_note}; one core drives each GPU")
        device_memory = max(usable) if usable else 0.0
    else:
        usable_total = float(profile.get("memory_available_bytes") or 0) * (1 - config.memory_headroom)
        by_hardware = math.floor(usable_total / (fixed + per_sample)) if fixed + per_sample else 0
        reasons["trainer_replicas"].append(
            f"{_gib(usable_total)} usable RAM ({config.memory_headroom:.0%} headroom) / "
            f"{_gib(fixed + per_sample)} per trainer at micro-batch 1 -> {by_hardware}"
        )
        by_cores = max(1, free_cores // config.cores_per_trainer)
        reasons["trainer_replicas"].append(
            f"{core_note}; {config.cores_per_trainer} cores per trainer -> {by_cores}"
        )
        device_memory = usable_total
    caps = [by_hardware, by_cores, config.max_trainer_replicas]
    cap = energy_cap(wh_per_training, "training", "trainer_replicas")
    if cap is not None:
        caps.append(cap)
    trainers = max(0, min(caps))
    if trainers == config.max_trainer_replicas:
        reasons["trainer_replicas"].append(f"capped at {config.max_trainer_replicas}")

    # Micro-batch from the memory one trainer gets; the rest of the batch by accumulation.
    share = device_memory if on_gpu else device_memory / max(1, trainers)
    fits = math.floor((share - fixed) / per_sample) if per_sample else config.max_micro_batch
    limit = min(config.max_micro_batch, config.target_batch)
    if fits < 1:
        micro_batch = 1
        reasons["micro_batch"].append(
            f"memory is tight: {_gib(share)} per trainer, {_gib(fixed + per_sample)} needed for one sample; "
            "trying micro-batch 1"
        )
    else:
        micro_batch = _floor_pow2(min(fits, limit))
        reasons["micro_batch"].append(
            f"{model_params / 1e6:.0f}M params x {bpp} B = {_gib(weights)} weights; "
            f"{_gib(per_sample)} activations per sample at {config.seq_len} tokens; "
            f"{_gib(share)} per trainer fits {fits} samples"
        )
        if fits > limit:
            reasons["micro_batch"].append(f"capped at {limit} (target batch / max micro-batch)")
        reasons["micro_batch"].append(f"rounded down to a power of two: {micro_batch}")
    accumulation = max(1, math.ceil(config.target_batch / micro_batch))
    reasons["gradient_accumulation"].append(
        f"target batch {config.target_batch} / micro-batch {micro_batch} -> {accumulation} accumulation step(s)"
    )

    # Validator replicas: inference only, so lighter than a trainer.
    if on_gpu:
        per_gpu = [math.floor(_gpu_free(g) * (1 - config.memory_headroom) / per_validator) for g in gpus]
        by_memory = sum(per_gpu)
        reasons["validator_replicas"].append(
            f"{_gib(per_validator)} per replica (weights + inference activations); "
            f"fits {by_memory} across {len(gpus)} GPUs"
        )
    else:
        usable_total = float(profile.get("memory_available_bytes") or 0) * (1 - config.memory_headroom)
        by_memory = math.floor(usable_total / per_validator) if per_validator else 0
        reasons["validator_replicas"].append(
            f"{_gib(usable_total)} usable RAM / {_gib(per_validator)} per replica -> {by_memory}"
        )
    by_cores_v = max(1, free_cores // config.cores_per_validator)
    reasons["validator_replicas"].append(
        f"{core_note}; {config.cores_per_validator} core(s) per replica -> {by_cores_v}"
    )
    caps_v = [by_memory, by_cores_v, config.max_validator_replicas]
    cap_v = energy_cap(wh_per_validation, "validation", "validator_replicas")
    if cap_v is not None:
        caps_v.append(cap_v)
    validators = max(0, min(caps_v))
    if validators == config.max_validator_replicas:
        reasons["validator_replicas"].append(f"capped at {config.max_validator_replicas}")

    return {
        "model_params": int(model_params),
        "device": "cuda" if on_gpu else "cpu",
        "micro_batch": micro_batch,
        "gradient_accumulation": accumulation,
        "effective_batch": micro_batch * accumulation,
        "trainer_replicas": trainers,
        "validator_replicas": validators,
        "reasons": reasons,
        "inputs": {
            "cores": cores,
            "free_cores": free_cores,
            "memory_available_bytes": int(profile.get("memory_available_bytes") or 0),
            "gpu_count": len(gpus),
            "remaining_wh": remaining_wh,
            "binding_window": binding_window,
            "wh_per_training": wh_per_training,
            "wh_per_validation": wh_per_validation,
        },
    }


# --------------------------------------------------------------------------- small pure helpers


def _job_key(kind: str, job_id: str) -> str:
    return f"{kind}:{job_id}"


def _accounting_time(report: Mapping[str, Any], fallback: datetime) -> datetime:
    # Energy counts against a budget when the job's work ended, which replays identically.
    window = report.get("window") or {}
    return time_or_none(window.get("ended_at")) or fallback


def _gpu_free(gpu: Mapping[str, Any]) -> float:
    free = gpu.get("memory_free_bytes")
    return float(gpu["memory_total_bytes"] if free is None else free)


def _floor_pow2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _mean(values: Iterable[float] | None) -> float | None:
    values = list(values or ())
    return sum(values) / len(values) if values else None


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"






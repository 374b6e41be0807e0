"""The validator's aggregate: validation runs, from start to verdict. No I/O.

``initial_state``/``evolve``/``decide`` start a run on a usable
``training.completed`` or a ``StartDriftSoak`` command, record each cycle
(``CycleFinished``) and close the run (``RunFinished`` or ``AbandonRun``).
A run is sized by the ``SoakPlan`` and a drift run waits out a live one
(``soak_plan``); cycle and run verdicts come from ``judgement``, on the
replicas' raw data (``samples``). ``app`` wires the aggregate to the bus and
``soak`` runs the replicas.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

from services.validator.judgement import current_failing_streak, judge_cycle, rejudge
from services.validator.samples import CycleSamples, ReplicaResult
from services.validator.soak_plan import SoakPlan, blocking_drift_run
from services.validator.thresholds import KINDS, Thresholds
from shared.contracts.envelope import NewEvent, iso
from shared.contracts.values import parse_time


@dataclass(frozen=True)
class Baseline:
    kind: str = "base"  # production | base | parent (the adapter a candidate was warm-started from)
    adapter_sha256: str | None = None
    adapter_uri: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "adapter_sha256": self.adapter_sha256, "adapter_uri": self.adapter_uri}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Baseline":
        return cls(data.get("kind", "base"), data.get("adapter_sha256"), data.get("adapter_uri"))


@dataclass(frozen=True)
class ValidationRun:
    validation_id: str
    adapter_sha256: str
    adapter_uri: str
    baseline: Baseline
    kind: str
    purpose: str  # candidate | drift
    cycle_id: str | None
    replicas: int
    cycles: int
    episodes: int
    started_at: datetime | None = None
    status: str = "running"  # running | completed
    cycle_outcomes: Mapping[int, str] = field(default_factory=dict)
    verdict: str | None = None

    @property
    def active(self) -> bool:
        return self.status == "running"


@dataclass(frozen=True)
class ValidatorState:
    runs: Mapping[str, ValidationRun] = field(default_factory=dict)
    production: Mapping[str, Baseline] = field(default_factory=dict)  # adapter kind -> adapter in production
    plan: SoakPlan = field(default_factory=SoakPlan)
    thresholds: Thresholds = field(default_factory=Thresholds)

    def to_rows(self) -> dict[str, dict[str, Any]]:
        """One row per run and per kind's adapter in production, and one for the advice the plan was sized
        to; the plan as configured and the thresholds are configuration: not kept."""
        rows: dict[str, dict[str, Any]] = {
            f"run:{run_id}": {**{f.name: getattr(run, f.name) for f in fields(run)}, "baseline": run.baseline.to_dict(),
                              "started_at": iso(run.started_at) if run.started_at else None,
                              "cycle_outcomes": {str(c): o for c, o in run.cycle_outcomes.items()}}
            for run_id, run in self.runs.items()}
        rows.update({f"production:{kind}": baseline.to_dict() for kind, baseline in self.production.items()})
        if self.plan.sizing() is not None:
            rows["plan"] = self.plan.sizing()
        return rows

    @classmethod
    def from_rows(cls, rows: Mapping[str, Mapping[str, Any]], plan: SoakPlan | None = None,
                  thresholds: Thresholds | None = None) -> "ValidatorState":
        """The state kept in ``rows``, on the configured ``plan`` (sized again to the advice kept) and ``thresholds``."""
        state = initial_state(plan, thresholds)
        runs, production = {}, {}
        for key, record in rows.items():
            prefix, _, name = key.partition(":")
            if prefix == "run":
                runs[name] = ValidationRun(**{
                    **record, "baseline": Baseline.from_dict(record["baseline"]),
                    "started_at": parse_time(record["started_at"]) if record.get("started_at") else None,
                    "cycle_outcomes": {int(c): o for c, o in record["cycle_outcomes"].items()}})
            elif prefix == "production":
                production[name] = Baseline.from_dict(record)
        sized = rows.get("plan")
        if sized is not None:
            state = replace(state, plan=state.plan.fitted(sized["validator_replicas"], state.thresholds.min_samples,
                                                          sized["event_id"]))
        return replace(state, runs=runs, production=production)


@dataclass(frozen=True)
class StartDriftSoak:
    """Soak the adapter in production again, to catch drift over time."""

    adapter_sha256: str
    adapter_uri: str
    kind: str
    requested_at: datetime
    baseline: Baseline = field(default_factory=Baseline)
    validation_id: str | None = None
    cycle_id: str | None = None


@dataclass(frozen=True)
class CycleFinished:
    validation_id: str
    cycle: int
    replicas: Sequence[ReplicaResult | Mapping[str, Any]]


@dataclass(frozen=True)
class RunFinished:
    validation_id: str
    raw_data: Mapping[str, Any]
    raw_data_uri: str


@dataclass(frozen=True)
class AbandonRun:
    """The runner lost the run (node gone, replicas unrecoverable)."""

    validation_id: str
    reason: str


def initial_state(plan: SoakPlan | None = None, thresholds: Thresholds | None = None) -> ValidatorState:
    return ValidatorState(plan=plan or SoakPlan(), thresholds=thresholds or Thresholds())


def evolve(state: ValidatorState, event: Any) -> ValidatorState:
    """Folds the validator's own events, and ``adapter.promoted`` to know the
    baseline of the next candidate run (the adapter in production per kind)."""
    payload = event.payload
    if event.type == "validation.started":
        started = payload.get("started_at")
        run = ValidationRun(
            validation_id=payload["validation_id"],
            adapter_sha256=payload["adapter_sha256"],
            adapter_uri=payload["adapter_uri"],
            baseline=Baseline.from_dict(payload["baseline"]),
            kind=payload["kind"],
            purpose=payload["purpose"],
            cycle_id=payload.get("cycle_id"),
            replicas=payload["replicas"],
            cycles=payload["cycles"],
            episodes=payload["episodes"],
            started_at=parse_time(started) if started else getattr(event, "occurred_at", None),
        )
        return replace(state, runs={**state.runs, run.validation_id: run})
    if event.type == "validation.cycle_completed":
        run = state.runs.get(payload["validation_id"])
        if run is None:
            return state
        outcomes = {**run.cycle_outcomes, int(payload["cycle"]): payload["outcome"]}
        return replace(state, runs={**state.runs, run.validation_id: replace(run, cycle_outcomes=outcomes)})
    if event.type == "validation.completed":
        run = state.runs.get(payload["validation_id"])
        if run is None:
            return state
        closed = replace(run, status="completed", verdict=payload["verdict"])
        return replace(state, runs={**state.runs, run.validation_id: closed})
    if event.type == "adapter.promoted":
        kind = payload.get("kind", "mntp")
        promoted = Baseline("production", payload["adapter_sha256"], payload.get("adapter_uri"))
        return replace(state, production={**state.production, kind: promoted})
    return state


def decide(command_or_event: Any, state: ValidatorState, config: Any = None) -> list[NewEvent]:
    """The events a command or a consumed event leads to; the plan and thresholds are in the state, so
    ``config`` is None."""
    if isinstance(command_or_event, StartDriftSoak):
        return _start_drift_soak(command_or_event, state)
    if isinstance(command_or_event, CycleFinished):
        return _finish_cycle(command_or_event, state)
    if isinstance(command_or_event, RunFinished):
        return _finish_run(command_or_event, state)
    if isinstance(command_or_event, AbandonRun):
        run = _known_run(state, command_or_event.validation_id)
        return [_abandoned(run, command_or_event.reason, state.thresholds)] if run.active else []
    if getattr(command_or_event, "type", None) == "training.completed":
        return _on_training_completed(command_or_event, state)
    return []


def _on_training_completed(event: Any, state: ValidatorState) -> list[NewEvent]:
    payload = event.payload
    # A fallback artefact proves the pipeline ran, not that an adapter learned
    # anything: soaking it would only measure the base model twice.
    if payload.get("status") != "trained" or payload.get("fallback"):
        return []
    sha = payload.get("adapter_sha256")
    uri = payload.get("adapter_uri")
    if not sha or not uri:
        raise ValueError("training.completed with status trained lacks adapter_sha256 or adapter_uri")
    kind = payload.get("kind", "mntp")
    if kind not in KINDS:
        raise ValueError(f"training.completed kind must be one of {KINDS}, not {kind!r}")
    if any(r.adapter_sha256 == sha and r.purpose == "candidate" for r in state.runs.values()):
        return []
    occurred = getattr(event, "occurred_at", None)
    return [
        _started(
            validation_id=f"val-{sha[:16]}",
            adapter_sha256=sha,
            adapter_uri=uri,
            baseline=candidate_baseline(payload, kind, state),
            kind=kind,
            purpose="candidate",
            cycle_id=payload.get("cycle_id"),
            started_at=occurred,
            plan=state.plan,
            evaluation=evaluation_settings({"prompt_set": payload.get("prompt_set"), **(payload.get("config") or {})},
                                           kind),
        )
    ]


# What an RL run trained with, and so what its soak samples and scores with.
RL_EVALUATION_KEYS = ("reward", "reward_params", "temperature", "max_new_tokens", "group_size", "prompts",
                      "prompt_set")


def candidate_baseline(payload: Mapping[str, Any], kind: str, state: ValidatorState) -> Baseline:
    """What a candidate is soaked against: an RL adapter against the adapter it started from (its
    warm start, wherever that serves, if anywhere), so the soak measures what this run learned;
    anything else against the adapter of its kind in production, else the base model."""
    parent = payload.get("warm_start")
    if kind == "rl" and parent:
        return Baseline("parent", parent, f"artefact://sha256/{parent}")
    return state.production.get(kind, Baseline("base"))


def evaluation_settings(config: Mapping[str, Any] | None, kind: str) -> dict[str, Any] | None:
    """The settings a soak evaluates with, from the run's training configuration: for an RL run its
    reward (and the reward's parameters), sampling temperature, completion length, group size and
    prompts (or the name of the reward's prompt set it trained on), as far as the configuration names them (the trainer's defaults fill the rest); None for
    MNTP, whose soak settings are the validator's own."""
    if kind != "rl":
        return None
    config = config or {}
    return {key: config[key] for key in RL_EVALUATION_KEYS if config.get(key) is not None}


def _start_drift_soak(cmd: StartDriftSoak, state: ValidatorState) -> list[NewEvent]:
    if cmd.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {cmd.kind!r}")
    validation_id = cmd.validation_id or (
        f"drift-{cmd.adapter_sha256[:12]}-{cmd.requested_at.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}"
    )
    if validation_id in state.runs or blocking_drift_run(state, cmd.adapter_sha256, cmd.requested_at):
        return []
    events: list[NewEvent] = []
    for run in state.runs.values():
        if run.purpose == "drift" and run.adapter_sha256 == cmd.adapter_sha256 and run.active:
            silent = (
                f"no result {(cmd.requested_at - run.started_at).total_seconds():.0f} s after start"
                if run.started_at else "no start time recorded"
            )
            events.append(_abandoned(run, f"{silent}; superseded by {validation_id}", state.thresholds))
    events.append(
        _started(
            validation_id=validation_id,
            adapter_sha256=cmd.adapter_sha256,
            adapter_uri=cmd.adapter_uri,
            baseline=cmd.baseline,
            kind=cmd.kind,
            purpose="drift",
            cycle_id=cmd.cycle_id,
            started_at=cmd.requested_at,
            plan=state.plan,
        )
    )
    return events


def _finish_cycle(cmd: CycleFinished, state: ValidatorState) -> list[NewEvent]:
    run = _known_run(state, cmd.validation_id)
    if not run.active or cmd.cycle in run.cycle_outcomes:
        return []
    replicas = tuple(r if isinstance(r, ReplicaResult) else ReplicaResult.from_dict(r) for r in cmd.replicas)
    samples = CycleSamples(cmd.cycle, replicas)
    verdict = judge_cycle(samples.by_metric(), state.thresholds, kind=run.kind, cycle=cmd.cycle)
    outcomes = {**run.cycle_outcomes, cmd.cycle: verdict.outcome}
    streak = current_failing_streak([outcomes[c] for c in sorted(outcomes)])
    limit = state.thresholds.consecutive_failures
    payload = {
        "validation_id": run.validation_id,
        "cycle": cmd.cycle,
        "outcome": verdict.outcome,
        "score": verdict.score,
        "group_scores": dict(verdict.group_scores),
        "metrics": {name: mv.to_dict() for name, mv in verdict.metrics.items()},
        "vetoes": list(verdict.vetoes),
        "reason": verdict.reason,
        "replicas": [r.load_summary() for r in replicas],
        "incidents": [i.to_dict() for i in samples.incidents],
        "failing_streak": streak,
        # the run's fate is sealed; the runner may stop and send RunFinished
        "stop_early": run.cycles >= limit and streak >= limit,
    }
    return [NewEvent("validation.cycle_completed", run.validation_id, payload)]


def _finish_run(cmd: RunFinished, state: ValidatorState) -> list[NewEvent]:
    run = _known_run(state, cmd.validation_id)
    if not run.active:
        return []
    raw = cmd.raw_data
    if raw.get("validation_id") != run.validation_id:
        raise ValueError(f"raw data belongs to {raw.get('validation_id')!r}, not {run.validation_id!r}")
    if raw.get("adapter_sha256") != run.adapter_sha256:
        raise ValueError("raw data measured another adapter than the run's candidate")
    verdict = rejudge({**raw, "kind": raw.get("kind", run.kind)}, state.thresholds)
    payload = {**_run_identity(run), "raw_data_uri": cmd.raw_data_uri, **verdict.to_payload()}
    return [NewEvent("validation.completed", run.validation_id, payload)]


def _abandoned(run: ValidationRun, reason: str, thresholds: Thresholds) -> NewEvent:
    payload = {
        **_run_identity(run),
        "raw_data_uri": None,
        "verdict": "inconclusive",
        "explanation": f"inconclusive: abandoned, {reason}",
        "score": None,
        "sample_sizes": {"candidate": {}, "baseline": {}},
        "thresholds": thresholds.to_dict(),
    }
    return NewEvent("validation.completed", run.validation_id, payload)


def _run_identity(run: ValidationRun) -> dict[str, Any]:
    return {
        "validation_id": run.validation_id,
        "adapter_sha256": run.adapter_sha256,
        "adapter_uri": run.adapter_uri,
        "baseline": run.baseline.to_dict(),
        "kind": run.kind,
        "purpose": run.purpose,
        "cycle_id": run.cycle_id,
    }


def _started(
    *,
    validation_id: str,
    adapter_sha256: str,
    adapter_uri: str,
    baseline: Baseline,
    kind: str,
    purpose: str,
    cycle_id: str | None,
    started_at: datetime | None,
    plan: SoakPlan,
    evaluation: Mapping[str, Any] | None = None,
) -> NewEvent:
    payload = {
        "validation_id": validation_id,
        "cycle_id": cycle_id,
        "adapter_sha256": adapter_sha256,
        "adapter_uri": adapter_uri,
        "baseline": baseline.to_dict(),
        "replicas": plan.replicas,
        "cycles": plan.cycles,
        "episodes": plan.episodes,
        "kind": kind,
        "purpose": purpose,
        "started_at": iso(started_at) if started_at else None,
        "sized_by": plan.sizing(),
    }
    if evaluation is not None:
        payload["evaluation"] = dict(evaluation)
    return NewEvent("validation.started", validation_id, payload)


def _known_run(state: ValidatorState, validation_id: str) -> ValidationRun:
    run = state.runs.get(validation_id)
    if run is None:
        raise ValueError(f"unknown validation run {validation_id!r}")
    return run

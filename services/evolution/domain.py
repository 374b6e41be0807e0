"""The evolution orchestrator: its commands, its state (``Cycle``, ``EvolutionState``), ``decide`` and ``evolve``.

Triggers: the jittered schedule (``Tick``), a new dataset that is not
quarantined (``dataset.registered``), and operators (``RequestCycle``,
``RequestResearch``). Each trigger becomes a ``Cycle`` with a deterministic
id, which then passes the gates (``gates.gate_cycle``): it is deferred,
proposed, or abandoned when its dataset is gone. An approved cycle is followed
through ``training.completed`` and ``validation.completed`` (``cycle.evaluated``
carries its fitness into the population of ``search``; each later
``energy.reported`` of its jobs re-scores it, ``cycle.rescored``: see
``results``) to its end: ``cycle.completed`` with the outcome.

``decide`` looks a command up in ``_COMMANDS`` and an event in
``_REACTIONS``; ``evolve`` looks an event up in ``_FOLDS``. A type in none of
them changes nothing. ``evolve`` ignores ``approval.granted`` altogether, so an
unverified grant changes nothing either. The reactions and folds of the gates
(``approval.granted``, energy, hardware, approvals, datasets…) and the
configuration, ``EvolutionConfig``, live in ``gates``.

Use ``handle(message, state, config) -> (state, events)``; ``decide`` assumes
that an incoming event has already been folded in by ``evolve``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Callable, Iterable, Mapping

from services.evolution.gates import (
    EvolutionConfig,
    fold_approval_closed,
    fold_approval_requested,
    fold_budget_exceeded,
    fold_dataset,
    fold_drift_verdict,
    fold_hardware_profile,
    fold_promoted,
    fold_scaling,
    gate_cycle,
    request_training,
    retries_due,
    schedule_slot_due,
)
from services.evolution.results import evaluation, fold_energy_report, fold_rescored, rescore_on_energy
from services.evolution.requests import forced_gate_problem, setting_problems
from services.evolution.search import Population, research_individual_id, reward_facts
from shared.contracts.envelope import NewEvent, iso
from shared.contracts.facts import (
    SERVICE_REQUESTER,
    adapter_sha as _adapter_sha,
    occurred_at as _occurred_at,
    training_facts,
    verdict_facts as validation_facts,
)
from shared.contracts.trust import PRODUCTION_CHANNEL, parse_time

DEFERRED, PROPOSED, APPROVED, EVALUATED, COMPLETED = "deferred", "proposed", "approved", "evaluated", "completed"


class CommandRejected(ValueError):
    """An operator command that cannot be carried out; the message says why."""


# --- commands -------------------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """The clock: retry deferred cycles that are due and run the schedule.

    ``started_at``: when the service started; the schedule's first cycle waits one interval after it."""

    now: datetime
    started_at: datetime | None = None


@dataclass(frozen=True)
class RequestCycle:
    """An operator asks for an MNTP cycle now (still subject to the gates).

    ``config`` sets searched settings exactly (the search varies only the
    others; ``requests`` refuses a value it cannot run as given);
    ``dataset_id`` defaults to the latest usable dataset, ``warm_start`` to
    the latest promoted adapter. ``force_gates`` names gates an admin lets
    this cycle pass (``gates.FORCEABLE_GATES``). ``command_id`` makes a retried command
    idempotent (default: operator + time).
    """

    operator_id: str
    requested_at: datetime
    dataset_id: str | None = None
    config: Mapping[str, Any] | None = None
    warm_start: str | None = None
    command_id: str | None = None
    force_gates: tuple[str, ...] = ()


@dataclass(frozen=True)
class RequestResearch:
    """An operator asks for an RL research loop on an adapter (default: the latest promoted)."""

    operator_id: str
    requested_at: datetime
    adapter_sha256: str | None = None
    dataset_id: str | None = None
    config: Mapping[str, Any] | None = None
    command_id: str | None = None


# --- state ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cycle:
    cycle_id: str
    kind: str  # mntp | rl
    status: str
    trigger: Mapping[str, Any]
    requested_by: str
    proposal: Mapping[str, Any] | None = None  # the cycle.proposed / research.proposed payload
    gate: str | None = None
    retry_at: datetime | None = None
    attempts: int = 0
    job_id: str | None = None
    training: Mapping[str, Any] | None = None  # facts read from training.completed / failed
    validation: Mapping[str, Any] | None = None  # facts read from validation.completed
    fitness: float | None = None
    outcome: str | None = None
    energy_reports: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # by job id (energy.reported)

    @property
    def request_id(self) -> str:
        return f"apr-{'research' if self.kind == 'rl' else 'cycle'}-{self.cycle_id}"

    @property
    def awaiting_approval(self) -> bool:
        """Proposed, and neither approved nor ended yet."""
        return self.status == PROPOSED

    @property
    def awaiting_retry(self) -> bool:
        """Deferred by a closed gate until ``retry_at``."""
        return self.status == DEFERRED and self.retry_at is not None

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["retry_at"] = iso(self.retry_at) if self.retry_at else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Cycle":
        data = dict(data)
        data["retry_at"] = parse_time(data["retry_at"]) if data.get("retry_at") else None
        return cls(**data)


@dataclass(frozen=True)
class EvolutionState:
    cycles: Mapping[str, Cycle] = field(default_factory=dict)
    datasets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    latest_dataset_id: str | None = None
    promoted_adapter: str | None = None
    hardware: Mapping[str, Any] | None = None  # latest hardware.profiled payload
    scaling: Mapping[str, Any] | None = None  # latest scaling.recommended payload
    energy_samples: tuple[tuple[datetime, float], ...] = ()
    budget: Mapping[str, Any] | None = None  # {used_wh, budget_wh, at, exceeded, until}
    carbon: Mapping[str, Any] | None = None  # {g_per_kwh, at}
    pending_approvals: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    open_incidents: frozenset[str] = frozenset()
    last_schedule_slot: int | None = None
    population: Population = field(default_factory=Population)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cycles": {cid: c.to_dict() for cid, c in sorted(self.cycles.items())},
            "datasets": dict(self.datasets),
            "latest_dataset_id": self.latest_dataset_id,
            "promoted_adapter": self.promoted_adapter,
            "hardware": self.hardware,
            "scaling": self.scaling,
            "energy_samples": [[iso(at), wh] for at, wh in self.energy_samples],
            "budget": _budget_to_dict(self.budget),
            "carbon": self.carbon,
            "pending_approvals": dict(self.pending_approvals),
            "open_incidents": sorted(self.open_incidents),
            "last_schedule_slot": self.last_schedule_slot,
            "population": self.population.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvolutionState":
        budget = data.get("budget")
        if budget:
            budget = {**budget, "at": parse_time(budget["at"]),
                      "until": parse_time(budget["until"]) if budget.get("until") else None}
        return cls(
            cycles={cid: Cycle.from_dict(c) for cid, c in (data.get("cycles") or {}).items()},
            datasets=dict(data.get("datasets") or {}),
            latest_dataset_id=data.get("latest_dataset_id"),
            promoted_adapter=data.get("promoted_adapter"),
            hardware=data.get("hardware"),
            scaling=data.get("scaling"),
            energy_samples=tuple((parse_time(at), float(wh)) for at, wh in data.get("energy_samples") or ()),
            budget=budget,
            carbon=data.get("carbon"),
            pending_approvals=dict(data.get("pending_approvals") or {}),
            open_incidents=frozenset(data.get("open_incidents") or ()),
            last_schedule_slot=data.get("last_schedule_slot"),
            population=Population.from_dict(data.get("population") or {}),
        )

    def to_rows(self) -> dict[str, dict[str, Any]]:
        """One row per cycle, dataset, pending approval, open incident, energy sample and configuration
        tried, and one for the latest facts read from other services."""
        data = self.to_dict()
        rows: dict[str, dict[str, Any]] = {"facts": {name: data[name] for name in _FACTS}}
        for prefix, group in (("cycle", "cycles"), ("dataset", "datasets"), ("pending", "pending_approvals")):
            rows.update({f"{prefix}:{key}": record for key, record in data[group].items()})
        rows.update({f"incident:{incident}": {} for incident in self.open_incidents})
        same_time: dict[str, int] = {}
        for at, wh in data["energy_samples"]:
            same_time[at] = same_time.get(at, -1) + 1
            rows[f"energy:{at}#{same_time[at]}"] = {"at": at, "wh": wh}
        rows.update({f"individual:{n:06d}": individual
                     for n, individual in enumerate(data["population"]["individuals"])})
        return rows

    @classmethod
    def from_rows(cls, rows: Mapping[str, Mapping[str, Any]]) -> "EvolutionState":
        groups = {"cycle": "cycles", "dataset": "datasets", "pending": "pending_approvals"}
        data: dict[str, Any] = {**(rows.get("facts") or {}), **{group: {} for group in groups.values()},
                                "open_incidents": [], "energy_samples": [], "population": {"individuals": []}}
        for key, record in sorted(rows.items()):
            prefix, _, name = key.partition(":")
            if prefix in groups:
                data[groups[prefix]][name] = record
            elif prefix == "incident":
                data["open_incidents"].append(name)
            elif prefix == "energy":
                data["energy_samples"].append((record["at"], record["wh"]))
            elif prefix == "individual":
                data["population"]["individuals"].append(record)
        state = cls.from_dict(data)
        return replace(state, energy_samples=tuple(sorted(state.energy_samples)))


# the parts of the state that are the latest word of another service, kept together in one row
_FACTS = ("latest_dataset_id", "promoted_adapter", "hardware", "scaling", "budget", "carbon", "last_schedule_slot")


def _budget_to_dict(budget: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not budget:
        return None
    return {**budget, "at": iso(budget["at"]), "until": iso(budget["until"]) if budget.get("until") else None}


def initial_state() -> EvolutionState:
    return EvolutionState()


# --- decide: triggers -----------------------------------------------------------------


def _new_cycle(kind: str, trigger: Mapping[str, Any], requested_by: str, key: str) -> Cycle:
    """A cycle not yet gated; its id is a digest of what triggered it, so a trigger makes one cycle."""
    prefix = "res" if kind == "rl" else "cyc"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Cycle(f"{prefix}-{digest}", kind, DEFERRED, dict(trigger), requested_by)


def _on_tick(tick: Tick, state: EvolutionState, config: EvolutionConfig) -> list[NewEvent]:
    now = parse_time(tick.now)
    events: list[NewEvent] = []
    for cycle in retries_due(state, now):
        # Fold each outcome before the next: a proposal counts against the approvals gate of those after it.
        new = _attempt(state.cycles[cycle.cycle_id], state, config, now)
        state = _fold_all(state, new)
        events += new
    started_at = parse_time(tick.started_at) if tick.started_at is not None else None
    slot = schedule_slot_due(state, config, now, started_at)
    if slot is not None and state.latest_dataset_id is not None:
        trigger = {"type": "schedule", "slot": slot}
        cycle = _new_cycle("mntp", trigger, SERVICE_REQUESTER, f"schedule:{slot}")
        if cycle.cycle_id not in state.cycles:
            events += _attempt(cycle, state, config, now)
    return events


def _on_dataset(event: Any, state: EvolutionState, config: EvolutionConfig) -> list[NewEvent]:
    dataset = state.datasets.get(event.payload.get("dataset_id"))
    if dataset is None or dataset.get("quarantined"):
        return []
    trigger = {"type": "dataset", "dataset_id": dataset["dataset_id"], "sha256": dataset["sha256"]}
    cycle = _new_cycle("mntp", trigger, SERVICE_REQUESTER, f"dataset:{dataset['dataset_id']}:{dataset['sha256']}")
    if cycle.cycle_id in state.cycles:
        return []
    return _attempt(cycle, state, config, _occurred_at(event))


def _usable_dataset(state: EvolutionState, dataset_id: str | None) -> Mapping[str, Any] | None:
    dataset = state.datasets.get(dataset_id or state.latest_dataset_id or "")
    return None if dataset is None or dataset.get("quarantined") else dataset


def _on_request_cycle(cmd: RequestCycle, state: EvolutionState, config: EvolutionConfig) -> list[NewEvent]:
    if _command_cycle_id("mntp", "operator", cmd) in state.cycles:
        return []  # carried out already: a redelivered command is neither run nor refused again
    if cmd.dataset_id is not None and _usable_dataset(state, cmd.dataset_id) is None:
        raise CommandRejected(f"dataset {cmd.dataset_id!r} is unknown or quarantined")
    if _usable_dataset(state, cmd.dataset_id) is None:
        raise CommandRejected("no usable dataset has been registered")
    unknown = set(cmd.config or {}) - set(config.search.space.names())
    if unknown:
        raise CommandRejected(f"unknown settings {sorted(unknown)}; searchable: {config.search.space.names()}")
    problem = "; ".join(setting_problems(config.search.space, cmd.config or {})) or \
        forced_gate_problem(cmd.force_gates, cmd.operator_id, config.keyring)
    if problem:
        raise CommandRejected(problem)
    return _operator_cycle("mntp", "operator", cmd, cmd.warm_start, state, config)


def _on_request_research(cmd: RequestResearch, state: EvolutionState, config: EvolutionConfig) -> list[NewEvent]:
    adapter = cmd.adapter_sha256 or state.promoted_adapter
    if adapter is None:
        raise CommandRejected("research needs an adapter: none given and none promoted yet")
    if cmd.dataset_id is not None and _usable_dataset(state, cmd.dataset_id) is None:
        raise CommandRejected(f"dataset {cmd.dataset_id!r} is unknown or quarantined")
    return _operator_cycle("rl", "research", cmd, adapter, state, config)


def _operator_cycle(kind: str, key: str, cmd: RequestCycle | RequestResearch, warm_start: str | None,
                    state: EvolutionState, config: EvolutionConfig) -> list[NewEvent]:
    """The cycle an operator's command asks for, once (a retried command finds it already there)."""
    command_id = _command_id(cmd)
    trigger = {"type": "operator", "command_id": command_id, "dataset_id": cmd.dataset_id,
               "config": dict(cmd.config or {}), "warm_start": warm_start}
    if getattr(cmd, "force_gates", ()):
        trigger["force_gates"] = sorted(cmd.force_gates)  # what the admin let pass travels with the cycle
    cycle = _new_cycle(kind, trigger, cmd.operator_id, f"{key}:{command_id}")
    if cycle.cycle_id in state.cycles:
        return []
    return _attempt(cycle, state, config, parse_time(cmd.requested_at))


def _command_id(cmd: RequestCycle | RequestResearch) -> str:
    return cmd.command_id or f"{cmd.operator_id}:{iso(parse_time(cmd.requested_at))}"


def _command_cycle_id(kind: str, key: str, cmd: RequestCycle | RequestResearch) -> str:
    return _new_cycle(kind, {}, cmd.operator_id, f"{key}:{_command_id(cmd)}").cycle_id


def _attempt(cycle: Cycle, state: EvolutionState, config: EvolutionConfig, now: datetime) -> list[NewEvent]:
    """Gate ``cycle`` at ``now``: propose it, defer it, or abandon it when its dataset is gone."""
    dataset = _usable_dataset(state, cycle.trigger.get("dataset_id"))
    if dataset is None and (cycle.kind == "mntp" or cycle.trigger.get("dataset_id")):
        return [_completed(cycle, "abandoned", now, reason="its dataset is unknown or quarantined")]
    return [gate_cycle(cycle, dataset, state, config, now)]


# --- decide: refusals, results and the end of a cycle ---------------------------------


def _on_not_approved(event: Any, state: EvolutionState, config: EvolutionConfig) -> list[NewEvent]:
    # Rejections and expiries only ever stop work, so they are taken as they come.
    payload = event.payload
    outcome = "rejected" if event.type == "approval.rejected" else "expired"
    cycle_id = payload.get("cycle_id") or ""
    cycle = state.cycles.get(cycle_id)
    if cycle is None or cycle.status == COMPLETED:
        return []
    if payload.get("kind") in ("cycle", "research") and cycle.status == PROPOSED \
            and payload.get("request_id") == cycle.request_id:
        return [_completed(cycle, outcome, _occurred_at(event))]
    if payload.get("kind") == "promotion" and cycle.status == EVALUATED:
        return [_completed(cycle, "not_promoted", _occurred_at(event), reason=f"promotion {outcome}")]
    return []


def _on_result(event: Any, state: EvolutionState, config: EvolutionConfig) -> list[NewEvent]:
    """A training result or a verdict: the cycle is scored once it has both."""
    if event.type == "validation.completed" and validation_facts(event)["purpose"] != "candidate":
        return []  # a drift soak of production is no cycle's result
    cycle = _cycle_for(state, event)
    return _evaluate_if_ready(cycle, _occurred_at(event)) if cycle else []


def _on_promoted(event: Any, state: EvolutionState, config: EvolutionConfig) -> list[NewEvent]:
    sha = _adapter_sha(event.payload)
    cycle = state.cycles.get(event.payload.get("cycle_id") or "") or next(
        (c for c in state.cycles.values() if sha and (c.training or {}).get("adapter_sha256") == sha), None)
    if cycle is None or cycle.status != EVALUATED:
        return []
    return [_completed(cycle, "promoted", _occurred_at(event))]


def _evaluate_if_ready(cycle: Cycle, now: datetime) -> list[NewEvent]:
    """Once training and validation are both known, score the cycle (once)."""
    if cycle.status not in (APPROVED,) or cycle.training is None:
        return []
    training = cycle.training
    if training.get("failed"):
        verdict = "training_failed"
    elif training.get("fallback"):
        # No adapter was learnt (the ML stack is missing): nothing to say about the config.
        return [_completed(cycle, "fallback", now, reason="the trainer produced a fallback artefact")]
    elif cycle.validation is None:
        return []
    elif cycle.validation.get("verdict") not in ("pass", "fail"):
        return [_completed(cycle, "inconclusive", now,
                           reason=f"validation {cycle.validation.get('validation_id')} was inconclusive")]
    else:
        verdict = cycle.validation["verdict"]
    # scored from the verdict and every energy report of the cycle so far (MNTP and RL alike)
    evaluated = evaluation(cycle, verdict, research_individual_id(cycle.cycle_id) if cycle.kind == "rl" else None,
                           now)
    if verdict == "pass":
        return [evaluated]  # the promotion decides how it ends
    scored = replace(cycle, fitness=evaluated.payload["fitness"])
    outcome = "training_failed" if verdict == "training_failed" else "failed"
    return [evaluated, _completed(scored, outcome, now)]


def _completed(cycle: Cycle, outcome: str, now: datetime, *, reason: str | None = None) -> NewEvent:
    return NewEvent("cycle.completed", cycle.cycle_id, {
        "cycle_id": cycle.cycle_id,
        "kind": cycle.kind,
        "outcome": outcome,
        "adapter_sha256": (cycle.training or {}).get("adapter_sha256"),
        "fitness": cycle.fitness,
        "individual_id": ((cycle.proposal or {}).get("individual") or {}).get("individual_id"),
        "reason": reason,
        "completed_at": iso(now),
    }, correlation_id=cycle.cycle_id)


# --- decide ---------------------------------------------------------------------------


Reaction = Callable[[Any, EvolutionState, EvolutionConfig], list[NewEvent]]

_COMMANDS: Mapping[type, Reaction] = {
    Tick: _on_tick,
    RequestCycle: _on_request_cycle,
    RequestResearch: _on_request_research,
}

_REACTIONS: Mapping[str, Reaction] = {
    "dataset.registered": _on_dataset,
    "approval.granted": request_training,
    "approval.rejected": _on_not_approved,
    "approval.expired": _on_not_approved,
    "training.completed": _on_result,
    "training.failed": _on_result,
    "validation.completed": _on_result,
    "adapter.promoted": _on_promoted,
    "energy.reported": rescore_on_energy,
}


def decide(message: Any, state: EvolutionState, config: EvolutionConfig) -> list[NewEvent]:
    """The events ``message`` leads to; an incoming event must already be folded into ``state``."""
    react = _COMMANDS.get(type(message)) or _REACTIONS.get(getattr(message, "type", None))
    return react(message, state, config) if react else []


# --- evolve: evolution's own events ---------------------------------------------------


def _fold_gated(state: EvolutionState, event: Any) -> EvolutionState:
    """``cycle.deferred``, ``cycle.proposed`` or ``research.proposed``: the gates' answer for a cycle."""
    payload = event.payload
    cycle = state.cycles.get(payload["cycle_id"])
    if cycle is not None and cycle.status != DEFERRED:
        return state
    if cycle is None:
        cycle = Cycle(payload["cycle_id"], payload["kind"], DEFERRED, dict(payload.get("trigger") or {}),
                      payload.get("requested_by") or SERVICE_REQUESTER)
    if event.type == "cycle.deferred":
        attempt = int(payload.get("attempt", cycle.attempts + 1))
        if attempt <= cycle.attempts and cycle.retry_at is not None:
            return state  # an earlier deferral read late: the later one already holds
        cycle = replace(cycle, gate=payload["gate"], retry_at=parse_time(payload["retry_at"]), attempts=attempt)
    else:
        cycle = replace(cycle, status=PROPOSED, proposal=dict(payload), retry_at=None)
        state = replace(state, population=state.population.apply(event))
    trigger = payload.get("trigger") or {}
    if trigger.get("type") == "schedule" and trigger.get("slot") is not None:
        state = replace(state, last_schedule_slot=max(int(trigger["slot"]), state.last_schedule_slot or -1))
    return _put(state, cycle)


def _fold_training_requested(state: EvolutionState, event: Any) -> EvolutionState:
    cycle = state.cycles.get(event.payload.get("cycle_id") or "")
    if cycle is None or cycle.status != PROPOSED:
        return state
    pending = {k: v for k, v in state.pending_approvals.items() if k != cycle.request_id}
    return _put(replace(state, pending_approvals=pending),
                replace(cycle, status=APPROVED, job_id=event.payload["job_id"]))


def _fold_evaluated(state: EvolutionState, event: Any) -> EvolutionState:
    cycle = state.cycles.get(event.payload["cycle_id"])
    state = replace(state, population=state.population.apply(event))
    if cycle is None or cycle.fitness is not None:
        return state
    return _put(state, replace(cycle, status=EVALUATED, fitness=event.payload["fitness"]))


def _fold_completed(state: EvolutionState, event: Any) -> EvolutionState:
    payload = event.payload
    cycle = state.cycles.get(payload["cycle_id"])
    state = replace(state, population=state.population.apply(event))
    if cycle is None or cycle.status == COMPLETED:
        return state
    return _put(state, replace(cycle, status=COMPLETED, outcome=payload["outcome"],
                               fitness=payload.get("fitness", cycle.fitness)))


# --- evolve: facts from other services ------------------------------------------------


def _fold_training_result(state: EvolutionState, event: Any) -> EvolutionState:
    cycle = _cycle_for(state, event)
    if cycle is None or cycle.training is not None:
        return state
    return _put(state, replace(cycle, training={**training_facts(event), **reward_facts(event.payload)}))


def _fold_verdict(state: EvolutionState, event: Any) -> EvolutionState:
    facts = validation_facts(event)
    if facts["purpose"] == "drift":
        return fold_drift_verdict(state, facts)
    cycle = _cycle_for(state, event)
    if cycle is None or cycle.validation is not None:
        return state
    return _put(state, replace(cycle, validation=facts))


def _cycle_for(state: EvolutionState, event: Any) -> Cycle | None:
    """The cycle an event from the trainer or validator is about: by cycle id, job id or adapter."""
    payload = event.payload
    cycle = state.cycles.get(payload.get("cycle_id") or "")
    if cycle is not None:
        return cycle
    job_id = payload.get("job_id")
    sha = _adapter_sha(payload)
    for candidate in state.cycles.values():
        if job_id and candidate.job_id == job_id:
            return candidate
        if sha and (candidate.training or {}).get("adapter_sha256") == sha:
            return candidate
    return None


def _put(state: EvolutionState, cycle: Cycle) -> EvolutionState:
    return replace(state, cycles={**state.cycles, cycle.cycle_id: cycle})


# --- evolve ---------------------------------------------------------------------------


Fold = Callable[[EvolutionState, Any], EvolutionState]


def _fold_promoted_on_channel(state: EvolutionState, event: Any) -> EvolutionState:
    """A promotion; only production's adapter becomes the default warm start, so a research loop's
    adapter promoted to its own channel leaves the platform's next cycles where they were."""
    folded = fold_promoted(state, event)
    if (event.payload.get("channel") or PRODUCTION_CHANNEL) != PRODUCTION_CHANNEL:
        return replace(folded, promoted_adapter=state.promoted_adapter)
    return folded


_FOLDS: Mapping[str, Fold] = {
    "cycle.deferred": _fold_gated,
    "cycle.proposed": _fold_gated,
    "research.proposed": _fold_gated,
    "training.requested": _fold_training_requested,
    "cycle.evaluated": _fold_evaluated,
    "cycle.completed": _fold_completed,
    "training.completed": _fold_training_result,
    "training.failed": _fold_training_result,
    "validation.completed": _fold_verdict,
    "approval.requested": fold_approval_requested,
    "approval.rejected": fold_approval_closed,
    "approval.expired": fold_approval_closed,
    "adapter.promoted": _fold_promoted_on_channel,
    "dataset.registered": fold_dataset,
    "hardware.profiled": fold_hardware_profile,
    "scaling.recommended": fold_scaling,
    "energy.reported": fold_energy_report,
    "cycle.rescored": fold_rescored,
    "energy.budget_exceeded": fold_budget_exceeded,
}


def evolve(state: EvolutionState, event: Any) -> EvolutionState:
    """Fold one event (evolution's own, or a fact from another service) into the state; others change nothing."""
    fold = _FOLDS.get(event.type)
    return fold(state, event) if fold else state


def _fold_all(state: EvolutionState, events: Iterable[Any]) -> EvolutionState:
    for event in events:
        state = evolve(state, event)
    return state


def handle(message: Any, state: EvolutionState, config: EvolutionConfig) -> tuple[EvolutionState, list[NewEvent]]:
    """Fold ``message`` (if it is an event), decide, and fold what was decided."""
    if hasattr(message, "type"):
        state = evolve(state, message)
    events = decide(message, state, config)
    return _fold_all(state, events), events


def replay(events: Iterable[Any], state: EvolutionState | None = None) -> EvolutionState:
    """The state after ``events`` in log order (evolution's own and the facts it reads)."""
    return _fold_all(state if state is not None else initial_state(), events)

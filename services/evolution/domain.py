"""The evolution orchestrator: when to train, with which settings, and what came of it.

Triggers: the jittered schedule (``Tick``), a new dataset that is not
quarantined (``dataset.registered``), and operators (``RequestCycle``,
``RequestResearch``). Each trigger becomes a cycle with a deterministic id.

Before a cycle is proposed it passes the gates, in this order:

  incidents  open incidents above ``max_open_incidents``
  approvals  pending approvals at ``max_pending_approvals`` or more
  energy     energy used in the rolling window plus this cycle's estimate above
             the budget, or a standing ``energy.budget_exceeded``
  carbon     grid intensity at or above the pause threshold (at or above the
             caution threshold the cycle runs with fewer steps instead)
  hardware   load average per core above the limit, or too little free memory

A closed gate emits ``cycle.deferred`` with a ``retry_at``; a ``Tick`` at or
after it evaluates the gates again. An open gate emits ``cycle.proposed``
(MNTP, configuration from ``search``) or ``research.proposed`` (RL).

Approval is trusted only when it verifies here (``verify_grant``): an
operator grant must carry a decision signed by an approver in the keyring, a
policy grant must name the policy that really auto-approves this proposal.
Only then is ``training.requested`` emitted. ``evolve`` ignores
``approval.granted`` altogether, so an unverified grant changes nothing.

The cycle is then followed through ``training.completed`` and
``validation.completed`` (``cycle.evaluated`` carries its fitness into the
population) to its end: ``cycle.completed`` with the outcome.

Use ``handle(message, state, config) -> (state, events)``; ``decide`` assumes
that an incoming event has already been folded in by ``evolve``.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Mapping

from shared.contracts.policies import PolicySet, authorises, default_policies, proposal_subject, request_view
from services.evolution.search import (
    FAIL_FITNESS,
    Individual,
    Population,
    SearchSettings,
    estimate_energy_wh,
    fitness,
    next_individual,
)
from shared.contracts.envelope import NewEvent, iso
from shared.contracts.facts import (
    SERVICE_REQUESTER,
    adapter_sha as _adapter_sha,
    energy_wh as _energy_wh,
    occurred_at as _occurred_at,
    training_facts,
    verdict_facts as validation_facts,
)
from shared.contracts.trust import Keyring, VerificationResult, check_binding, parse_time, verify_decision
from shared.contracts.values import number as _number

DEFERRED, PROPOSED, APPROVED, EVALUATED, COMPLETED = "deferred", "proposed", "approved", "evaluated", "completed"
GATES = ("incidents", "approvals", "energy", "carbon", "hardware")
# Energy samples older than this are dropped from the state whatever the window.
ENERGY_HISTORY = timedelta(days=8)


class CommandRejected(ValueError):
    """An operator command that cannot be carried out; the message says why."""


# --- commands -------------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """The clock: retry deferred cycles that are due and run the schedule."""

    now: datetime


@dataclass(frozen=True)
class RequestCycle:
    """An operator asks for an MNTP cycle now (still subject to the gates).

    ``config`` overrides searched settings; ``dataset_id`` defaults to the
    latest usable dataset, ``warm_start`` to the latest promoted adapter.
    ``command_id`` makes a retried command idempotent (default: operator + time).
    """

    operator_id: str
    requested_at: datetime
    dataset_id: str | None = None
    config: Mapping[str, Any] | None = None
    warm_start: str | None = None
    command_id: str | None = None


@dataclass(frozen=True)
class RequestResearch:
    """An operator asks for an RL research loop on an adapter (default: the latest promoted)."""

    operator_id: str
    requested_at: datetime
    adapter_sha256: str | None = None
    dataset_id: str | None = None
    config: Mapping[str, Any] | None = None
    command_id: str | None = None


# --- configuration ---------------------------------------------------------------


@dataclass(frozen=True)
class EvolutionConfig:
    model: str = "smollm2"
    search: SearchSettings = field(default_factory=SearchSettings)
    keyring: Keyring = field(default_factory=Keyring)
    policies: PolicySet = field(default_factory=default_policies)
    schedule_interval: timedelta | None = timedelta(hours=6)  # None: no scheduled cycles
    schedule_jitter: timedelta = timedelta(minutes=30)
    energy_window: timedelta = timedelta(hours=24)
    energy_budget_wh: float | None = None  # None: the budget from the energy service's status
    default_wh_per_sample_step: float = 0.005  # until a cycle has been measured
    carbon_intensity_g_per_kwh: float | None = None  # when no energy event has reported one
    carbon_caution_g_per_kwh: float = 300.0
    carbon_pause_g_per_kwh: float = 500.0
    caution_steps_factor: float = 0.5
    max_pending_approvals: int = 3
    max_open_incidents: int = 0
    max_load_per_core: float = 0.85
    min_memory_available_gb: float = 2.0
    retry_after: timedelta = timedelta(minutes=30)
    research_config: Mapping[str, Any] = field(default_factory=lambda: {
        "learning_rate": 1e-5, "lora_rank": 8, "lora_alpha": 16, "steps": 100, "batch_size": 4})


# --- state ------------------------------------------------------------------------


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

    @property
    def request_id(self) -> str:
        return f"apr-{'research' if self.kind == 'rl' else 'cycle'}-{self.cycle_id}"

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


def _budget_to_dict(budget: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not budget:
        return None
    return {**budget, "at": iso(budget["at"]), "until": iso(budget["until"]) if budget.get("until") else None}


def initial_state() -> EvolutionState:
    return EvolutionState()


# --- gates --------------------------------------------------------------------------


@dataclass(frozen=True)
class GateResult:
    open: bool
    gate: str | None = None
    reason: str = ""
    retry_at: datetime | None = None
    carbon_mode: str = "normal"  # normal | caution


def energy_used_wh(state: EvolutionState, now: datetime, window: timedelta) -> float:
    """Measured energy (``energy.reported``) of jobs that ended in ``(now - window, now]``."""
    return sum(wh for at, wh in state.energy_samples if now - window < at <= now)


def carbon_intensity(state: EvolutionState, config: EvolutionConfig) -> float | None:
    if state.carbon and state.carbon.get("g_per_kwh") is not None:
        return float(state.carbon["g_per_kwh"])
    return config.carbon_intensity_g_per_kwh


def evaluate_gates(state: EvolutionState, config: EvolutionConfig, now: datetime,
                   estimate_wh: float) -> GateResult:
    """Whether a cycle estimated at ``estimate_wh`` may be proposed at ``now``."""
    later = now + config.retry_after

    incidents = len(state.open_incidents)
    if incidents > config.max_open_incidents:
        return GateResult(False, "incidents", f"{incidents} open incidents (limit {config.max_open_incidents})",
                          later)

    pending = pending_approvals(state)
    if len(pending) >= config.max_pending_approvals:
        return GateResult(False, "approvals",
                          f"{len(pending)} approvals pending (limit {config.max_pending_approvals})", later)

    budget = state.budget or {}
    if budget.get("exceeded") and (budget.get("until") is None or now < budget["until"]):
        until = budget.get("until") or later
        return GateResult(False, "energy", "the energy budget is exceeded (energy.budget_exceeded)", until)
    budget_wh, window = energy_budget(state, config)
    if budget_wh is not None:
        used = energy_used_wh(state, now, window)
        if used + estimate_wh > budget_wh:
            hours = window.total_seconds() / 3600
            return GateResult(False, "energy",
                              f"{used:.2f} Wh used in the last {hours:g} h + {estimate_wh:.2f} Wh estimated "
                              f"exceeds the budget of {budget_wh:.2f} Wh",
                              _energy_retry_at(state, now, window, budget_wh, estimate_wh, config.retry_after))

    intensity = carbon_intensity(state, config)
    mode = "normal"
    if intensity is not None:
        if intensity >= config.carbon_pause_g_per_kwh:
            return GateResult(False, "carbon",
                              f"grid carbon intensity {intensity:g} gCO2e/kWh is at or above the pause "
                              f"threshold {config.carbon_pause_g_per_kwh:g}", later)
        if intensity >= config.carbon_caution_g_per_kwh:
            mode = "caution"

    load, memory_gb = hardware_load(state.hardware)
    if load is not None and load > config.max_load_per_core:
        return GateResult(False, "hardware",
                          f"load average per core {load:.2f} is above {config.max_load_per_core:g}", later)
    if memory_gb is not None and memory_gb < config.min_memory_available_gb:
        return GateResult(False, "hardware",
                          f"{memory_gb:.2f} GiB memory available, below {config.min_memory_available_gb:g} GiB",
                          later)
    return GateResult(True, carbon_mode=mode)


def energy_budget(state: EvolutionState, config: EvolutionConfig) -> tuple[float | None, timedelta]:
    """The budget (Wh) and its rolling window: configured here, else the energy service's."""
    if config.energy_budget_wh is not None:
        return float(config.energy_budget_wh), config.energy_window
    budget = state.budget or {}
    if budget.get("budget_wh") is None:
        return None, config.energy_window
    window = timedelta(seconds=budget["window_s"]) if budget.get("window_s") else config.energy_window
    return float(budget["budget_wh"]), window


def _energy_retry_at(state: EvolutionState, now: datetime, window: timedelta, budget_wh: float,
                     estimate_wh: float, retry_after: timedelta) -> datetime:
    # The earliest moment enough measured energy has left the window for this
    # cycle to fit; when even an empty window would not fit it, check again
    # later (the budget or the estimate may change).
    samples = sorted((at, wh) for at, wh in state.energy_samples if now - window < at <= now)
    used = sum(wh for _, wh in samples)
    if estimate_wh > budget_wh:
        return now + retry_after
    for at, wh in samples:
        used -= wh
        if used + estimate_wh <= budget_wh:
            return at + window + timedelta(seconds=1)
    return now + retry_after


def pending_approvals(state: EvolutionState) -> set[str]:
    """Approval requests still waiting, including proposals approval has not seen yet."""
    own = {c.request_id for c in state.cycles.values() if c.status == PROPOSED}
    return set(state.pending_approvals) | own


def hardware_load(profile: Mapping[str, Any] | None) -> tuple[float | None, float | None]:
    """``(load average per core, memory available in GiB)`` from a ``hardware.profiled`` payload.

    Reads the 1-minute ``load_avg[0]`` over ``cores`` (the energy service's
    profile), or ``load_per_core`` when given; memory from
    ``memory_available_bytes`` (or ``memory_available_gb``).
    """
    if not profile:
        return None, None
    load = _number(profile.get("load_per_core"))
    if load is None:
        raw = profile.get("load_avg", profile.get("load_avg_1m"))
        if isinstance(raw, (list, tuple)) and raw:
            raw = raw[0]
        cores = next((_number(profile.get(k)) for k in ("cores", "cpu_count_logical", "cpu_count")
                      if _number(profile.get(k))), None)
        if _number(raw) is not None and cores:
            load = _number(raw) / cores
    memory = _number(profile.get("memory_available_gb"))
    if memory is None:
        raw_bytes = _number(profile.get("memory_available_bytes"))
        memory = raw_bytes / 2**30 if raw_bytes is not None else None
    return load, memory


# --- verifying approvals ------------------------------------------------------------


def verify_grant(payload: Mapping[str, Any], cycle: Cycle, *, keyring: Keyring,
                 policies: PolicySet, used_nonces: Iterable[str] = ()) -> VerificationResult:
    """Whether an ``approval.granted`` payload really approves ``cycle``'s proposal.

    Operator grants: the signed decision verifies against ``keyring`` with the
    approver role at the grant's time, it is a "grant" for this cycle's request,
    its operator is the actor, and not the requester. Policy grants: the named
    policy exists in ``policies`` and is the one that auto-approves this
    proposal.
    """

    def refuse(reason: str, detail: str) -> VerificationResult:
        return VerificationResult(False, reason, detail)

    if payload.get("request_id") != cycle.request_id:
        return refuse("request_mismatch", f"the grant is for {payload.get('request_id')!r}")
    if cycle.proposal is None:
        return refuse("not_proposed", "the cycle has not been proposed")
    actor = payload.get("actor") or ""
    if actor.startswith("policy:"):
        name = actor.removeprefix("policy:")
        if policies.get(name) is None:
            return refuse("unknown_policy", f"no policy named {name!r}")
        kind = "research" if cycle.kind == "rl" else "cycle"
        request = request_view(kind, proposal_subject(cycle.proposal), cycle.requested_by)
        if not authorises(policies, name, request):
            return refuse("policy_does_not_apply", f"policy {name!r} does not auto-approve this proposal")
        return VerificationResult(True)
    if actor.startswith("operator:"):
        signed = payload.get("decision")
        try:
            at = parse_time(payload.get("granted_at") or "")
        except (TypeError, ValueError):
            return refuse("malformed", "the grant carries no granted_at")
        verified = verify_decision(signed, keyring, now=at, required_role="approver")
        if not verified:
            return verified
        bound = check_binding(signed, decisions="grant", request_id=cycle.request_id,
                              requested_by=cycle.requested_by, used_nonces=used_nonces)
        if not bound:
            return bound
        if actor != f"operator:{signed['operator_id']}":
            return refuse("actor_mismatch", f"{actor!r} did not sign this decision")
        return verified
    return refuse("unknown_actor", f"{actor!r} is neither a policy nor an operator")


# --- decide ------------------------------------------------------------------------


def decide(message: Any, state: EvolutionState, config: EvolutionConfig) -> list[NewEvent]:
    """The events ``message`` leads to; an incoming event must already be folded into ``state``."""
    if isinstance(message, Tick):
        return _on_tick(parse_time(message.now), state, config)
    if isinstance(message, RequestCycle):
        return _on_request_cycle(message, state, config)
    if isinstance(message, RequestResearch):
        return _on_request_research(message, state, config)
    event_type = getattr(message, "type", None)
    if event_type == "dataset.registered":
        return _on_dataset(message, state, config)
    if event_type == "approval.granted":
        return _on_granted(message, state, config)
    if event_type in ("approval.rejected", "approval.expired"):
        return _on_not_approved(message, state)
    if event_type in ("training.completed", "training.failed", "validation.completed"):
        if event_type == "validation.completed" and validation_facts(message)["purpose"] != "candidate":
            return []  # a drift soak of production is no cycle's result
        cycle = _cycle_for(state, message)
        return _evaluate_if_ready(cycle, _occurred_at(message)) if cycle else []
    if event_type == "adapter.promoted":
        return _on_promoted(message, state)
    return []


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _new_cycle(kind: str, trigger: Mapping[str, Any], requested_by: str, key: str) -> Cycle:
    prefix = "res" if kind == "rl" else "cyc"
    return Cycle(f"{prefix}-{_digest(key)}", kind, DEFERRED, dict(trigger), requested_by)


def _on_tick(now: datetime, state: EvolutionState, config: EvolutionConfig) -> list[NewEvent]:
    events: list[NewEvent] = []
    due = sorted((c for c in state.cycles.values() if c.status == DEFERRED and c.retry_at and c.retry_at <= now),
                 key=lambda c: (c.retry_at, c.cycle_id))
    for cycle in due:
        # Fold each outcome before the next: a proposal counts against the approvals gate of those after it.
        new = _attempt(state.cycles[cycle.cycle_id], state, config, now)
        state = _fold(state, new)
        events += new
    slot = schedule_slot_due(state, config, now)
    if slot is not None and state.latest_dataset_id is not None:
        trigger = {"type": "schedule", "slot": slot}
        cycle = _new_cycle("mntp", trigger, SERVICE_REQUESTER, f"schedule:{slot}")
        if cycle.cycle_id not in state.cycles:
            events += _attempt(cycle, state, config, now)
    return events


def schedule_due_at(slot: int, config: EvolutionConfig) -> datetime:
    """When the schedule's ``slot`` fires: the slot's start plus a jitter fixed by the seed."""
    interval = config.schedule_interval.total_seconds()
    jitter = random.Random(f"{config.search.seed}:schedule:{slot}").uniform(
        0.0, config.schedule_jitter.total_seconds())
    return datetime.fromtimestamp(slot * interval + jitter, tz=timezone.utc)


def schedule_slot_due(state: EvolutionState, config: EvolutionConfig, now: datetime) -> int | None:
    """The schedule slot that should fire at ``now``, if any. Missed slots are not caught up."""
    if config.schedule_interval is None:
        return None
    slot = math.floor(now.timestamp() / config.schedule_interval.total_seconds())
    if state.last_schedule_slot is not None and state.last_schedule_slot >= slot:
        return None
    return slot if now >= schedule_due_at(slot, config) else None


def next_due(state: EvolutionState, config: EvolutionConfig, now: datetime) -> datetime | None:
    """When a ``Tick`` has something to do next: a deferred retry or the schedule."""
    times = [c.retry_at for c in state.cycles.values() if c.status == DEFERRED and c.retry_at]
    if config.schedule_interval is not None:
        slot = math.floor(now.timestamp() / config.schedule_interval.total_seconds())
        if state.last_schedule_slot is not None and state.last_schedule_slot >= slot:
            slot += 1
        times.append(schedule_due_at(slot, config))
    return min(times, default=None)


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
    if cmd.dataset_id is not None and _usable_dataset(state, cmd.dataset_id) is None:
        raise CommandRejected(f"dataset {cmd.dataset_id!r} is unknown or quarantined")
    if _usable_dataset(state, cmd.dataset_id) is None:
        raise CommandRejected("no usable dataset has been registered")
    unknown = set(cmd.config or {}) - set(config.search.space.names())
    if unknown:
        raise CommandRejected(f"unknown settings {sorted(unknown)}; searchable: {config.search.space.names()}")
    command_id = cmd.command_id or f"{cmd.operator_id}:{iso(parse_time(cmd.requested_at))}"
    trigger = {"type": "operator", "command_id": command_id, "dataset_id": cmd.dataset_id,
               "config": dict(cmd.config or {}), "warm_start": cmd.warm_start}
    cycle = _new_cycle("mntp", trigger, cmd.operator_id, f"operator:{command_id}")
    if cycle.cycle_id in state.cycles:
        return []
    return _attempt(cycle, state, config, parse_time(cmd.requested_at))


def _on_request_research(cmd: RequestResearch, state: EvolutionState, config: EvolutionConfig) -> list[NewEvent]:
    adapter = cmd.adapter_sha256 or state.promoted_adapter
    if adapter is None:
        raise CommandRejected("research needs an adapter: none given and none promoted yet")
    if cmd.dataset_id is not None and _usable_dataset(state, cmd.dataset_id) is None:
        raise CommandRejected(f"dataset {cmd.dataset_id!r} is unknown or quarantined")
    command_id = cmd.command_id or f"{cmd.operator_id}:{iso(parse_time(cmd.requested_at))}"
    trigger = {"type": "operator", "command_id": command_id, "dataset_id": cmd.dataset_id,
               "config": dict(cmd.config or {}), "warm_start": adapter}
    cycle = _new_cycle("rl", trigger, cmd.operator_id, f"research:{command_id}")
    if cycle.cycle_id in state.cycles:
        return []
    return _attempt(cycle, state, config, parse_time(cmd.requested_at))


def _attempt(cycle: Cycle, state: EvolutionState, config: EvolutionConfig, now: datetime) -> list[NewEvent]:
    """Gate ``cycle`` at ``now``: propose it, defer it, or abandon it when its dataset is gone."""
    trigger = cycle.trigger
    dataset = _usable_dataset(state, trigger.get("dataset_id"))
    if dataset is None and (cycle.kind == "mntp" or trigger.get("dataset_id")):
        return [_completed(cycle, "abandoned", now, reason="its dataset is unknown or quarantined")]

    individual: Individual | None = None
    if cycle.kind == "mntp":
        individual = next_individual(state.population, config.search)
        settings = config.search.space.clamp({**individual.config, **(trigger.get("config") or {})})
    else:
        settings = {**config.research_config, **(trigger.get("config") or {})}
    estimate = estimate_energy_wh(settings, state.population, config.default_wh_per_sample_step)
    gate = evaluate_gates(state, config, now, estimate)
    if gate.open and gate.carbon_mode == "caution":
        # Fewer steps rather than no cycle: the grid is dirty, not forbidding.
        steps = max(1, int(settings.get("steps", 1) * config.caution_steps_factor))
        settings = config.search.space.clamp({**settings, "steps": steps}) if cycle.kind == "mntp" else \
            {**settings, "steps": steps}
        estimate = estimate_energy_wh(settings, state.population, config.default_wh_per_sample_step)
        gate = evaluate_gates(state, config, now, estimate)
    if not gate.open:
        return [NewEvent("cycle.deferred", cycle.cycle_id, {
            "cycle_id": cycle.cycle_id,
            "kind": cycle.kind,
            "gate": gate.gate,
            "reason": gate.reason,
            "retry_at": iso(gate.retry_at),
            "deferred_at": iso(now),
            "attempt": cycle.attempts + 1,
            "trigger": dict(trigger),
            "requested_by": cycle.requested_by,
        }, correlation_id=cycle.cycle_id)]

    load, memory_gb = hardware_load(state.hardware)
    payload = {
        "cycle_id": cycle.cycle_id,
        "kind": cycle.kind,
        "trigger": dict(trigger),
        "model": config.model,
        "dataset": ({"dataset_id": dataset["dataset_id"], "sha256": dataset["sha256"], "uri": dataset["uri"]}
                    if dataset else None),
        "config": settings,
        "warm_start": trigger.get("warm_start") or state.promoted_adapter,
        "energy_estimate_wh": estimate,
        "carbon_mode": gate.carbon_mode,
        "carbon_intensity_g_per_kwh": carbon_intensity(state, config),
        "hardware": {"load_per_core": load, "memory_available_gb": memory_gb},
        "requested_by": cycle.requested_by,
        "proposed_at": iso(now),
    }
    if cycle.kind == "mntp":
        payload["generation"] = individual.generation
        payload["individual"] = {"individual_id": individual.individual_id, "generation": individual.generation,
                                 "parents": list(individual.parents)}
        return [NewEvent("cycle.proposed", cycle.cycle_id, payload, correlation_id=cycle.cycle_id)]
    return [NewEvent("research.proposed", cycle.cycle_id, payload, correlation_id=cycle.cycle_id)]


def _on_granted(event: Any, state: EvolutionState, config: EvolutionConfig) -> list[NewEvent]:
    payload = event.payload
    if payload.get("kind") not in ("cycle", "research"):
        return []
    cycle = state.cycles.get(payload.get("cycle_id") or (payload.get("subject") or {}).get("cycle_id") or "")
    if cycle is None or cycle.status != PROPOSED:
        return []  # not ours, or already acted on (a redelivered grant)
    if not verify_grant(payload, cycle, keyring=config.keyring, policies=config.policies):
        return []
    proposal = cycle.proposal
    job_id = f"job-{cycle.cycle_id}"
    return [NewEvent("training.requested", job_id, {
        "job_id": job_id,
        "cycle_id": cycle.cycle_id,
        "kind": cycle.kind,
        "model": proposal["model"],
        "dataset": proposal.get("dataset"),
        "config": dict(proposal["config"]),
        "warm_start": proposal.get("warm_start"),
        "hardware_plan": dict(state.scaling) if state.scaling else None,
        "requested_by": cycle.requested_by,
        "approval": {"request_id": payload["request_id"], "actor": payload["actor"]},
        "energy_estimate_wh": proposal.get("energy_estimate_wh"),
    })]


def _on_not_approved(event: Any, state: EvolutionState) -> list[NewEvent]:
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


def _on_promoted(event: Any, state: EvolutionState) -> list[NewEvent]:
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
        score, verdict = FAIL_FITNESS, "training_failed"
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
        score = fitness(verdict, training.get("loss_before"), training.get("loss_after"),
                        training.get("energy_wh"))
    individual = (cycle.proposal or {}).get("individual") or {}
    evaluated = NewEvent("cycle.evaluated", cycle.cycle_id, {
        "cycle_id": cycle.cycle_id,
        "kind": cycle.kind,
        "individual_id": individual.get("individual_id"),
        "verdict": verdict,
        "fitness": score,
        "loss_before": training.get("loss_before"),
        "loss_after": training.get("loss_after"),
        "energy_wh": training.get("energy_wh"),
        "adapter_sha256": training.get("adapter_sha256"),
        "validation_id": (cycle.validation or {}).get("validation_id"),
        "evaluated_at": iso(now),
    }, correlation_id=cycle.cycle_id)
    if verdict == "pass":
        return [evaluated]  # the promotion decides how it ends
    scored = replace(cycle, fitness=score)
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


# --- evolve ---------------------------------------------------------------------------


def evolve(state: EvolutionState, event: Any) -> EvolutionState:
    """Fold one event (evolution's own, or a fact from another service) into the state."""
    etype, payload = event.type, event.payload
    if etype in ("cycle.deferred", "cycle.proposed", "research.proposed"):
        return _evolve_cycle_event(state, event)
    if etype == "training.requested":
        cycle = state.cycles.get(payload.get("cycle_id") or "")
        if cycle is None or cycle.status != PROPOSED:
            return state
        pending = {k: v for k, v in state.pending_approvals.items() if k != cycle.request_id}
        return _put(replace(state, pending_approvals=pending),
                    replace(cycle, status=APPROVED, job_id=payload["job_id"]))
    if etype == "cycle.evaluated":
        cycle = state.cycles.get(payload["cycle_id"])
        state = replace(state, population=state.population.apply(event))
        if cycle is None or cycle.fitness is not None:
            return state
        return _put(state, replace(cycle, status=EVALUATED, fitness=payload["fitness"]))
    if etype == "cycle.completed":
        cycle = state.cycles.get(payload["cycle_id"])
        state = replace(state, population=state.population.apply(event))
        if cycle is None or cycle.status == COMPLETED:
            return state
        return _put(state, replace(cycle, status=COMPLETED, outcome=payload["outcome"],
                                   fitness=payload.get("fitness", cycle.fitness)))
    if etype in ("training.completed", "training.failed"):
        cycle = _cycle_for(state, event)
        if cycle is None or cycle.training is not None:
            return state
        return _put(state, replace(cycle, training=training_facts(event)))
    if etype == "validation.completed":
        facts = validation_facts(event)
        if facts["purpose"] == "drift":
            # Production drifting is an incident: no new cycle until a drift soak passes again.
            incident = f"drift-{facts['adapter_sha256']}"
            if facts["verdict"] == "fail":
                return replace(state, open_incidents=state.open_incidents | {incident})
            if facts["verdict"] == "pass":
                return replace(state, open_incidents=state.open_incidents - {incident})
            return state
        cycle = _cycle_for(state, event)
        if cycle is None or cycle.validation is not None:
            return state
        return _put(state, replace(cycle, validation=validation_facts(event)))
    if etype == "approval.requested":
        entry = {"kind": payload.get("kind"), "cycle_id": payload.get("cycle_id"),
                 "adapter_sha256": (payload.get("subject") or {}).get("adapter_sha256")}
        done = state.cycles.get(payload.get("cycle_id") or "")
        if payload.get("kind") in ("cycle", "research") and done is not None and done.status not in (PROPOSED,):
            return state  # already acted on: it is no longer waiting for anyone
        return replace(state, pending_approvals={**state.pending_approvals, payload["request_id"]: entry})
    if etype in ("approval.rejected", "approval.expired"):
        pending = {k: v for k, v in state.pending_approvals.items() if k != payload.get("request_id")}
        return replace(state, pending_approvals=pending)
    if etype == "adapter.promoted":
        sha = _adapter_sha(payload)
        pending = {k: v for k, v in state.pending_approvals.items()
                   if not (v.get("kind") == "promotion" and sha and v.get("adapter_sha256") == sha)}
        return replace(state, promoted_adapter=sha or state.promoted_adapter, pending_approvals=pending)
    if etype == "dataset.registered":
        dataset = {"dataset_id": payload["dataset_id"], "sha256": payload["sha256"], "uri": payload["uri"],
                   "name": payload.get("name"), "quarantined": bool(payload.get("quarantined", False))}
        datasets = {**state.datasets, dataset["dataset_id"]: dataset}
        latest = state.latest_dataset_id
        if not dataset["quarantined"]:
            latest = dataset["dataset_id"]
        elif latest == dataset["dataset_id"]:
            latest = None  # quarantined after the fact: never train on it again
        return replace(state, datasets=datasets, latest_dataset_id=latest)
    if etype == "hardware.profiled":
        return replace(state, hardware=dict(payload))
    if etype == "scaling.recommended":
        return replace(state, scaling=dict(payload))
    if etype.startswith("energy."):
        return _evolve_energy(state, event)
    if etype.endswith("incident_opened") or etype == "incident.opened":
        return replace(state, open_incidents=state.open_incidents | {_incident_id(event)})
    if etype.endswith(("incident_resolved", "incident_closed")) or etype in ("incident.resolved", "incident.closed"):
        return replace(state, open_incidents=state.open_incidents - {_incident_id(event)})
    return state


def _evolve_cycle_event(state: EvolutionState, event: Any) -> EvolutionState:
    payload = event.payload
    cycle = state.cycles.get(payload["cycle_id"])
    if cycle is not None and cycle.status != DEFERRED:
        return state
    if cycle is None:
        cycle = Cycle(payload["cycle_id"], payload["kind"], DEFERRED, dict(payload.get("trigger") or {}),
                      payload.get("requested_by") or SERVICE_REQUESTER)
    if event.type == "cycle.deferred":
        cycle = replace(cycle, gate=payload["gate"], retry_at=parse_time(payload["retry_at"]),
                        attempts=int(payload.get("attempt", cycle.attempts + 1)))
    else:
        cycle = replace(cycle, status=PROPOSED, proposal=dict(payload), retry_at=None)
        state = replace(state, population=state.population.apply(event))
    trigger = payload.get("trigger") or {}
    if trigger.get("type") == "schedule" and trigger.get("slot") is not None:
        state = replace(state, last_schedule_slot=max(int(trigger["slot"]), state.last_schedule_slot or -1))
    return _put(state, cycle)


def _evolve_energy(state: EvolutionState, event: Any) -> EvolutionState:
    payload, at = event.payload, _occurred_at(event)
    if event.type == "energy.reported":
        # Counted when the job ended, as the energy service counts it.
        ended = (payload.get("window") or {}).get("ended_at")
        at = parse_time(ended) if ended else at
        wh = _energy_wh(payload)
        if wh is not None:
            samples = tuple(s for s in state.energy_samples if s[0] > at - ENERGY_HISTORY) + ((at, wh),)
            state = replace(state, energy_samples=tuple(sorted(samples)))
    if event.type == "energy.budget_exceeded":
        until = parse_time(payload["until"]) if payload.get("until") else None
        previous = state.budget or {}
        if previous.get("exceeded") and previous.get("until") and until and previous["until"] > until:
            until = previous["until"]  # another window stays over for longer
        state = replace(state, budget={**previous, "at": at, "exceeded": True, "until": until,
                                       **_budget_figures(payload)})
    elif payload.get("budget_wh") is not None and payload.get("used_wh") is not None:
        # A status under budget lifts a standing budget_exceeded.
        exceeded = float(payload["used_wh"]) > float(payload["budget_wh"])
        state = replace(state, budget={"at": at, "exceeded": exceeded, "until": None, **_budget_figures(payload)})
    for key in ("carbon_intensity", "carbon_intensity_g_per_kwh"):
        if _number(payload.get(key)) is not None:
            state = replace(state, carbon={"g_per_kwh": float(payload[key]), "at": iso(at)})
            break
    return state


def _budget_figures(payload: Mapping[str, Any]) -> dict[str, Any]:
    return {k: float(payload[k]) for k in ("used_wh", "budget_wh", "window_s") if _number(payload.get(k)) is not None}


def _put(state: EvolutionState, cycle: Cycle) -> EvolutionState:
    return replace(state, cycles={**state.cycles, cycle.cycle_id: cycle})


def _fold(state: EvolutionState, events: Iterable[Any]) -> EvolutionState:
    for event in events:
        state = evolve(state, event)
    return state


def handle(message: Any, state: EvolutionState, config: EvolutionConfig) -> tuple[EvolutionState, list[NewEvent]]:
    """Fold ``message`` (if it is an event), decide, and fold what was decided."""
    if hasattr(message, "type"):
        state = evolve(state, message)
    events = decide(message, state, config)
    return _fold(state, events), events


def replay(events: Iterable[Any], state: EvolutionState | None = None) -> EvolutionState:
    """The state after ``events`` in log order (evolution's own and the facts it reads)."""
    return _fold(state if state is not None else initial_state(), events)


# --- reading other services' events ----------------------------------------------------


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


def _incident_id(event: Any) -> str:
    return event.payload.get("incident_id") or event.aggregate_id

"""Evolution's gates: what a cycle must pass to be proposed and to be trained, and their settings.

``EvolutionConfig`` holds every setting of the orchestrator. Before a cycle
is proposed it passes the gates, in this order (``evaluate_gates``):

  incidents  open incidents (failed drift soaks of the adapter in production)
             above ``max_open_incidents``
  approvals  pending approvals at ``max_pending_approvals`` or more
  energy     energy used in the rolling window plus this cycle's estimate above
             the budget, or a standing ``energy.budget_exceeded``
  carbon     grid intensity at or above the pause threshold (at or above the
             caution threshold the cycle runs with fewer steps instead)
  hardware   load average per core above the limit, or too little free memory
             (an admin's request may force it: ``FORCEABLE_GATES``)

``gate_cycle`` turns their answer into ``cycle.deferred`` (the gate, why, and
a ``retry_at``) or the proposal: ``cycle.proposed`` (MNTP, settings from
``search``) or ``research.proposed`` (RL). A ``Tick`` tries a deferred cycle
again at or after its ``retry_at`` (``retries_due``) and fires the jittered
schedule (``schedule_slot_due``), never within one interval of start-up or
of the latest cycle (``schedule_rested_at``).

Before training, ``request_training`` answers ``approval.granted`` with
``training.requested`` only when the grant verifies (``verify_grant``): an
operator grant must carry a decision signed by an approver in the keyring, a
policy grant must name the policy that really auto-approves this proposal.

The ``fold_*`` functions keep what the gates and proposals read from other
services' events: energy used, budget, carbon intensity, hardware load,
pending approvals, drift incidents, datasets, the promoted adapter and the
hardware plan. ``domain`` puts them in its ``evolve`` table.

Pure, no I/O: it reads the ``EvolutionState`` and ``Cycle`` that ``domain``
defines.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from services.evolution.search import (
    Individual,
    SearchSettings,
    cycle_settings,
    estimate_energy_wh,
    with_fewer_steps,
)
from shared.contracts.envelope import NewEvent, iso
from shared.contracts.facts import adapter_sha, energy_wh, occurred_at
from shared.contracts.policies import PolicySet, authorises, default_policies, proposal_subject, request_view
from shared.contracts.trust import (Keyring, VerificationResult, check_binding, decision_subject, parse_time,
                                    verify_decision)
from shared.contracts.values import number

if TYPE_CHECKING:
    from services.evolution.domain import Cycle, EvolutionState

GATES = ("incidents", "approvals", "energy", "carbon", "hardware")
# Gates an admin may let an operator's cycle pass (``force_gates`` in ``cycle.requested``): the load of
# the machine is the admin's call; incidents, approvals, energy and carbon are not waived by anyone.
FORCEABLE_GATES = ("hardware",)
# Energy samples older than this are dropped from the state whatever the window.
ENERGY_HISTORY = timedelta(days=8)


@dataclass(frozen=True)
class EvolutionConfig:
    """Every setting of the orchestrator: the search, the schedule, the gates and the approval check."""

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
    # above the default grid figure (NEURONS_CARBON_INTENSITY, 400), so a site that sets none trains what it asks
    carbon_caution_g_per_kwh: float = 450.0
    carbon_pause_g_per_kwh: float = 500.0
    caution_steps_factor: float = 0.5
    max_pending_approvals: int = 3
    max_open_incidents: int = 0
    max_load_per_core: float = 0.85
    min_memory_available_gb: float = 2.0
    retry_after: timedelta = timedelta(minutes=30)
    # over search.RESEARCH_CONFIG (the measured RL defaults); the starting adapter decides rank, alpha, targets
    research_config: Mapping[str, Any] = field(default_factory=dict)


# --- the gates before a proposal ------------------------------------------------------


@dataclass(frozen=True)
class GateResult:
    open: bool
    gate: str | None = None
    reason: str = ""
    retry_at: datetime | None = None
    carbon_mode: str = "normal"  # normal | caution


def evaluate_gates(state: EvolutionState, config: EvolutionConfig, now: datetime,
                   estimate_wh: float, forced: Iterable[str] = ()) -> GateResult:
    """Whether a cycle estimated at ``estimate_wh`` may be proposed at ``now``: the first closed gate, if any.

    ``forced``: gates an admin let this cycle pass (only those in ``FORCEABLE_GATES`` count)."""
    later = now + config.retry_after
    forced = set(forced) & set(FORCEABLE_GATES)
    closed = (_incidents_gate(state, config, later)
              or _approvals_gate(state, config, later)
              or _energy_gate(state, config, now, estimate_wh)
              or _carbon_gate(state, config, later)
              or (None if "hardware" in forced else _hardware_gate(state, config, later)))
    if closed is not None:
        return closed
    intensity = carbon_intensity(state, config)
    caution = intensity is not None and intensity >= config.carbon_caution_g_per_kwh
    return GateResult(True, carbon_mode="caution" if caution else "normal")


def _incidents_gate(state: EvolutionState, config: EvolutionConfig, later: datetime) -> GateResult | None:
    incidents = len(state.open_incidents)
    if incidents > config.max_open_incidents:
        return GateResult(False, "incidents", f"{incidents} open incidents (limit {config.max_open_incidents})",
                          later)
    return None


def _approvals_gate(state: EvolutionState, config: EvolutionConfig, later: datetime) -> GateResult | None:
    pending = pending_approvals(state)
    if len(pending) >= config.max_pending_approvals:
        return GateResult(False, "approvals",
                          f"{len(pending)} approvals pending (limit {config.max_pending_approvals})", later)
    return None


def _energy_gate(state: EvolutionState, config: EvolutionConfig, now: datetime,
                 estimate_wh: float) -> GateResult | None:
    budget = state.budget or {}
    if budget.get("exceeded") and (budget.get("until") is None or now < budget["until"]):
        until = budget.get("until") or now + config.retry_after
        return GateResult(False, "energy", "the energy budget is exceeded (energy.budget_exceeded)", until)
    budget_wh, window = energy_budget(state, config)
    if budget_wh is None:
        return None
    used = energy_used_wh(state, now, window)
    if used + estimate_wh <= budget_wh:
        return None
    hours = window.total_seconds() / 3600
    return GateResult(False, "energy",
                      f"{used:.2f} Wh used in the last {hours:g} h + {estimate_wh:.2f} Wh estimated "
                      f"exceeds the budget of {budget_wh:.2f} Wh",
                      _energy_retry_at(state, now, window, budget_wh, estimate_wh, config.retry_after))


def _carbon_gate(state: EvolutionState, config: EvolutionConfig, later: datetime) -> GateResult | None:
    intensity = carbon_intensity(state, config)
    if intensity is not None and intensity >= config.carbon_pause_g_per_kwh:
        return GateResult(False, "carbon",
                          f"grid carbon intensity {intensity:g} gCO2e/kWh is at or above the pause "
                          f"threshold {config.carbon_pause_g_per_kwh:g}", later)
    return None


def _hardware_gate(state: EvolutionState, config: EvolutionConfig, later: datetime) -> GateResult | None:
    load, memory_gb = hardware_load(state.hardware)
    if load is not None and load > config.max_load_per_core:
        return GateResult(False, "hardware",
                          f"load average per core {load:.2f} is above {config.max_load_per_core:g}", later)
    if memory_gb is not None and memory_gb < config.min_memory_available_gb:
        return GateResult(False, "hardware",
                          f"{memory_gb:.2f} GiB memory available, below {config.min_memory_available_gb:g} GiB",
                          later)
    return None


# --- what the gates judge on ----------------------------------------------------------


def energy_used_wh(state: EvolutionState, now: datetime, window: timedelta) -> float:
    """Measured energy (``energy.reported``) of jobs that ended in ``(now - window, now]``."""
    return sum(wh for at, wh in state.energy_samples if now - window < at <= now)


def carbon_intensity(state: EvolutionState, config: EvolutionConfig) -> float | None:
    if state.carbon and state.carbon.get("g_per_kwh") is not None:
        return float(state.carbon["g_per_kwh"])
    return config.carbon_intensity_g_per_kwh


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
    own = {c.request_id for c in state.cycles.values() if c.awaiting_approval}
    return set(state.pending_approvals) | own


def hardware_load(profile: Mapping[str, Any] | None) -> tuple[float | None, float | None]:
    """``(load average per core, memory available in GiB)`` from a ``hardware.profiled`` payload.

    Reads the 1-minute ``load_avg[0]`` over ``cores`` (the energy service's
    profile), or ``load_per_core`` when given; memory from
    ``memory_available_bytes`` (or ``memory_available_gb``).
    """
    if not profile:
        return None, None
    load = number(profile.get("load_per_core"))
    if load is None:
        raw = profile.get("load_avg", profile.get("load_avg_1m"))
        if isinstance(raw, (list, tuple)) and raw:
            raw = raw[0]
        cores = next((number(profile.get(k)) for k in ("cores", "cpu_count_logical", "cpu_count")
                      if number(profile.get(k))), None)
        if number(raw) is not None and cores:
            load = number(raw) / cores
    memory = number(profile.get("memory_available_gb"))
    if memory is None:
        raw_bytes = number(profile.get("memory_available_bytes"))
        memory = raw_bytes / 2**30 if raw_bytes is not None else None
    return load, memory


# --- the gate step: deferred or proposed ----------------------------------------------


def gate_cycle(cycle: Cycle, dataset: Mapping[str, Any] | None, state: EvolutionState,
               config: EvolutionConfig, now: datetime) -> NewEvent:
    """``cycle`` through the gates at ``now``: ``cycle.deferred`` when one is closed, else its proposal.

    The settings come from the search (``cycle_settings``) with an
    operator's explicit settings on top, exactly as given (the request
    handling refused any the cycle could not run as given); in the carbon
    caution mode the cycle runs with fewer steps, unless the operator set
    them, and the gates judge that.
    """
    explicit = dict(cycle.trigger.get("config") or {})
    forced = cycle.trigger.get("force_gates") or ()
    individual, searched = cycle_settings(cycle.kind, None, state.population, config.search, config.research_config)
    settings = {**searched, **explicit}
    estimate = estimate_energy_wh(settings, state.population, config.default_wh_per_sample_step)
    gate = evaluate_gates(state, config, now, estimate, forced)
    if gate.open and gate.carbon_mode == "caution" and "steps" not in explicit:
        # Fewer steps rather than no cycle: the grid is dirty, not forbidding.
        shorter = with_fewer_steps(cycle.kind, settings, config.caution_steps_factor, config.search.space)
        settings = {**shorter, **explicit}
        estimate = estimate_energy_wh(settings, state.population, config.default_wh_per_sample_step)
        gate = evaluate_gates(state, config, now, estimate, forced)
    if not gate.open:
        return NewEvent("cycle.deferred", cycle.cycle_id, {
            "cycle_id": cycle.cycle_id,
            "kind": cycle.kind,
            "gate": gate.gate,
            "reason": gate.reason,
            "retry_at": iso(gate.retry_at),
            "deferred_at": iso(now),
            "attempt": cycle.attempts + 1,
            "trigger": dict(cycle.trigger),
            "requested_by": cycle.requested_by,
        }, correlation_id=cycle.cycle_id)
    return _proposal(cycle, dataset, individual, settings, estimate, gate.carbon_mode, state, config, now)


def _proposal(cycle: Cycle, dataset: Mapping[str, Any] | None, individual: Individual | None,
              settings: Mapping[str, Any], estimate: float, carbon_mode: str, state: EvolutionState,
              config: EvolutionConfig, now: datetime) -> NewEvent:
    """``cycle.proposed`` (MNTP, with the searched individual) or ``research.proposed`` (RL)."""
    load, memory_gb = hardware_load(state.hardware)
    payload = {
        "cycle_id": cycle.cycle_id,
        "kind": cycle.kind,
        "trigger": dict(cycle.trigger),
        "model": config.model,
        "dataset": ({"dataset_id": dataset["dataset_id"], "sha256": dataset["sha256"], "uri": dataset["uri"]}
                    if dataset else None),
        "config": settings,
        "warm_start": cycle.trigger.get("warm_start") or state.promoted_adapter,
        "energy_estimate_wh": estimate,
        "carbon_mode": carbon_mode,
        "carbon_intensity_g_per_kwh": carbon_intensity(state, config),
        "hardware": {"load_per_core": load, "memory_available_gb": memory_gb},
        "requested_by": cycle.requested_by,
        "proposed_at": iso(now),
    }
    if cycle.kind == "mntp":
        payload["generation"] = individual.generation
        payload["individual"] = {"individual_id": individual.individual_id, "generation": individual.generation,
                                 "parents": list(individual.parents)}
        if individual.rationale is not None:  # which past results chose these settings
            payload["rationale"] = dict(individual.rationale)
        return NewEvent("cycle.proposed", cycle.cycle_id, payload, correlation_id=cycle.cycle_id)
    return NewEvent("research.proposed", cycle.cycle_id, payload, correlation_id=cycle.cycle_id)


# --- the gate before training ---------------------------------------------------------


def request_training(event: Any, state: EvolutionState, config: EvolutionConfig) -> list[NewEvent]:
    """``approval.granted`` for a proposed cycle: ``training.requested`` when the grant verifies, else nothing."""
    payload = event.payload
    if payload.get("kind") not in ("cycle", "research"):
        return []
    cycle = state.cycles.get(payload.get("cycle_id") or (payload.get("subject") or {}).get("cycle_id") or "")
    if cycle is None or not cycle.awaiting_approval:
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
        # the signed grant itself: the trainer verifies the chain (shared.contracts.chain)
        "grant": event.to_dict() if getattr(event, "signature", None) else None,
    })]


def verify_grant(payload: Mapping[str, Any], cycle: Cycle, *, keyring: Keyring,
                 policies: PolicySet, used_nonces: Iterable[str] = ()) -> VerificationResult:
    """Whether an ``approval.granted`` payload really approves ``cycle``'s proposal.

    Operator grants: the signed decision verifies against ``keyring`` with the
    approver role at the grant's time, it is a "grant" for this cycle's request,
    its operator is the actor, and not the requester. Policy grants: the named
    policy exists in ``policies`` and is the one that auto-approves this
    proposal.
    """
    if payload.get("request_id") != cycle.request_id:
        return _refuse("request_mismatch", f"the grant is for {payload.get('request_id')!r}")
    if cycle.proposal is None:
        return _refuse("not_proposed", "the cycle has not been proposed")
    actor = payload.get("actor") or ""
    if actor.startswith("policy:"):
        return _verify_policy_grant(actor.removeprefix("policy:"), cycle, policies)
    if actor.startswith("operator:"):
        return _verify_operator_grant(payload, actor, cycle, keyring, used_nonces)
    return _refuse("unknown_actor", f"{actor!r} is neither a policy nor an operator")


def _verify_policy_grant(name: str, cycle: Cycle, policies: PolicySet) -> VerificationResult:
    if policies.get(name) is None:
        return _refuse("unknown_policy", f"no policy named {name!r}")
    kind = "research" if cycle.kind == "rl" else "cycle"
    request = request_view(kind, proposal_subject(cycle.proposal), cycle.requested_by)
    if not authorises(policies, name, request):
        return _refuse("policy_does_not_apply", f"policy {name!r} does not auto-approve this proposal")
    return VerificationResult(True)


def _verify_operator_grant(payload: Mapping[str, Any], actor: str, cycle: Cycle, keyring: Keyring,
                           used_nonces: Iterable[str]) -> VerificationResult:
    signed = payload.get("decision")
    try:
        at = parse_time(payload.get("granted_at") or "")
    except (TypeError, ValueError):
        return _refuse("malformed", "the grant carries no granted_at")
    verified = verify_decision(signed, keyring, now=at, required_role="approver")
    if not verified:
        return verified
    kind = "research" if cycle.kind == "rl" else "cycle"
    bound = check_binding(signed, decisions="grant", request_id=cycle.request_id,
                          requested_by=cycle.requested_by, used_nonces=used_nonces,
                          subject=decision_subject(kind, proposal_subject(cycle.proposal)))
    if not bound:
        return bound
    if actor != f"operator:{signed['operator_id']}":
        return _refuse("actor_mismatch", f"{actor!r} did not sign this decision")
    return verified


def _refuse(reason: str, detail: str) -> VerificationResult:
    return VerificationResult(False, reason, detail)


# --- when a Tick tries the gates ------------------------------------------------------


def retries_due(state: EvolutionState, now: datetime) -> list[Cycle]:
    """Deferred cycles whose ``retry_at`` has come, earliest first."""
    return sorted((c for c in state.cycles.values() if c.awaiting_retry and c.retry_at <= now),
                  key=lambda c: (c.retry_at, c.cycle_id))


def next_due(state: EvolutionState, config: EvolutionConfig, now: datetime,
             started_at: datetime | None = None) -> datetime | None:
    """When a ``Tick`` has something to do next: a deferred retry or the schedule."""
    times = [c.retry_at for c in state.cycles.values() if c.awaiting_retry]
    if config.schedule_interval is not None:
        slot = math.floor(now.timestamp() / config.schedule_interval.total_seconds())
        if state.last_schedule_slot is not None and state.last_schedule_slot >= slot:
            slot += 1
        rested = schedule_rested_at(state, config, started_at)
        times.append(max(schedule_due_at(slot, config), rested) if rested else schedule_due_at(slot, config))
    return min(times, default=None)


def schedule_rested_at(state: EvolutionState, config: EvolutionConfig,
                       started_at: datetime | None) -> datetime | None:
    """The schedule fires no sooner than one interval after the service started and after the latest
    cycle proposed (whatever started it), so it never competes with a start-up or an operator's cycle."""
    proposed = [parse_time(c.proposal["proposed_at"]) for c in state.cycles.values()
                if c.proposal and c.proposal.get("proposed_at")]
    marks = proposed + ([started_at] if started_at is not None else [])
    return max(marks) + config.schedule_interval if marks and config.schedule_interval else None


def schedule_due_at(slot: int, config: EvolutionConfig) -> datetime:
    """When the schedule's ``slot`` fires: the slot's start plus a jitter fixed by the seed."""
    interval = config.schedule_interval.total_seconds()
    jitter = random.Random(f"{config.search.seed}:schedule:{slot}").uniform(
        0.0, config.schedule_jitter.total_seconds())
    return datetime.fromtimestamp(slot * interval + jitter, tz=timezone.utc)


def schedule_slot_due(state: EvolutionState, config: EvolutionConfig, now: datetime,
                      started_at: datetime | None = None) -> int | None:
    """The schedule slot that should fire at ``now``, if any. Missed slots are not caught up; none fires
    within one interval of ``started_at`` or of the latest cycle (``schedule_rested_at``)."""
    if config.schedule_interval is None:
        return None
    rested = schedule_rested_at(state, config, started_at)
    if rested is not None and now < rested:
        return None
    slot = math.floor(now.timestamp() / config.schedule_interval.total_seconds())
    if state.last_schedule_slot is not None and state.last_schedule_slot >= slot:
        return None
    return slot if now >= schedule_due_at(slot, config) else None


# --- the facts from other services, as the gates read them ----------------------------


def fold_energy_reported(state: EvolutionState, event: Any) -> EvolutionState:
    """A job's measured energy, counted when the job ended, as the energy service counts it."""
    payload = event.payload
    at, ended = occurred_at(event), (payload.get("window") or {}).get("ended_at")
    at = parse_time(ended) if ended else at
    wh = energy_wh(payload)
    if wh is not None:
        samples = tuple(s for s in state.energy_samples if s[0] > at - ENERGY_HISTORY) + ((at, wh),)
        state = replace(state, energy_samples=tuple(sorted(samples)))
    if payload.get("budget_wh") is not None and payload.get("used_wh") is not None:
        # A status under budget lifts a standing budget_exceeded.
        exceeded = float(payload["used_wh"]) > float(payload["budget_wh"])
        state = replace(state, budget={"at": at, "exceeded": exceeded, "until": None, **_budget_figures(payload)})
    return _with_carbon(state, payload, at)


def fold_budget_exceeded(state: EvolutionState, event: Any) -> EvolutionState:
    """The energy budget is over until ``until``; the longest of the windows over wins."""
    payload, at = event.payload, occurred_at(event)
    until = parse_time(payload["until"]) if payload.get("until") else None
    previous = state.budget or {}
    if previous.get("exceeded") and previous.get("until") and until and previous["until"] > until:
        until = previous["until"]  # another window stays over for longer
    state = replace(state, budget={**previous, "at": at, "exceeded": True, "until": until,
                                   **_budget_figures(payload)})
    return _with_carbon(state, payload, at)


def fold_hardware_profile(state: EvolutionState, event: Any) -> EvolutionState:
    """The latest load and free memory of this node (``hardware.profiled``)."""
    return replace(state, hardware=dict(event.payload))


def fold_approval_requested(state: EvolutionState, event: Any) -> EvolutionState:
    """An approval request waits until granted, rejected or expired (a proposal's, until acted on)."""
    payload = event.payload
    entry = {"kind": payload.get("kind"), "cycle_id": payload.get("cycle_id"),
             "adapter_sha256": (payload.get("subject") or {}).get("adapter_sha256")}
    done = state.cycles.get(payload.get("cycle_id") or "")
    if payload.get("kind") in ("cycle", "research") and done is not None and not done.awaiting_approval:
        return state  # already acted on: it is no longer waiting for anyone
    return replace(state, pending_approvals={**state.pending_approvals, payload["request_id"]: entry})


def fold_approval_closed(state: EvolutionState, event: Any) -> EvolutionState:
    """``approval.rejected`` or ``approval.expired``: nobody is waiting for it any more."""
    pending = {k: v for k, v in state.pending_approvals.items() if k != event.payload.get("request_id")}
    return replace(state, pending_approvals=pending)


def fold_drift_verdict(state: EvolutionState, facts: Mapping[str, Any]) -> EvolutionState:
    """Production drifting is an incident: no new cycle until a drift soak of that adapter passes again."""
    incident = f"drift-{facts['adapter_sha256']}"
    if facts["verdict"] == "fail":
        return replace(state, open_incidents=state.open_incidents | {incident})
    if facts["verdict"] == "pass":
        return replace(state, open_incidents=state.open_incidents - {incident})
    return state


def fold_dataset(state: EvolutionState, event: Any) -> EvolutionState:
    """A dataset cycles may train on (the latest usable one by default), unless it is quarantined."""
    payload = event.payload
    dataset = {"dataset_id": payload["dataset_id"], "sha256": payload["sha256"], "uri": payload["uri"],
               "name": payload.get("name"), "quarantined": bool(payload.get("quarantined", False))}
    datasets = {**state.datasets, dataset["dataset_id"]: dataset}
    latest = state.latest_dataset_id
    if not dataset["quarantined"]:
        latest = dataset["dataset_id"]
    elif latest == dataset["dataset_id"]:
        latest = None  # quarantined after the fact: never train on it again
    return replace(state, datasets=datasets, latest_dataset_id=latest)


def fold_promoted(state: EvolutionState, event: Any) -> EvolutionState:
    """The adapter in production (the default warm start) and its promotion no longer pending."""
    sha = adapter_sha(event.payload)
    pending = {k: v for k, v in state.pending_approvals.items()
               if not (v.get("kind") == "promotion" and sha and v.get("adapter_sha256") == sha)}
    return replace(state, promoted_adapter=sha or state.promoted_adapter, pending_approvals=pending)


def fold_scaling(state: EvolutionState, event: Any) -> EvolutionState:
    """The energy service's hardware plan, which a training request carries."""
    return replace(state, scaling=dict(event.payload))


def _with_carbon(state: EvolutionState, payload: Mapping[str, Any], at: datetime) -> EvolutionState:
    for key in ("carbon_intensity", "carbon_intensity_g_per_kwh"):
        if number(payload.get(key)) is not None:
            return replace(state, carbon={"g_per_kwh": float(payload[key]), "at": iso(at)})
    return state


def _budget_figures(payload: Mapping[str, Any]) -> dict[str, Any]:
    return {k: float(payload[k]) for k in ("used_wh", "budget_wh", "window_s") if number(payload.get(k)) is not None}

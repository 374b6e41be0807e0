"""What a cycle's results teach the configuration search: its verdict and every energy report.

A cycle is scored once (``cycle.evaluated``) when its training result and its
verdict are both known, MNTP and RL alike. Its jobs' ``energy.reported``
(training, then the soak) keep arriving around that moment; each one that the
score did not count yet re-scores the cycle (``cycle.rescored``): the fitness
is the improvement per kWh of everything the cycle was measured to cost. The
population in ``search`` folds both, so the next proposal is bred from what
was really observed, and its ``rationale`` names these results.

Pure, no I/O: it reads the ``EvolutionState`` and ``Cycle`` that ``domain``
defines.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Mapping

from services.evolution.gates import EvolutionConfig, fold_energy_reported
from services.evolution.search import cycle_fitness
from shared.contracts.envelope import NewEvent, iso
from shared.contracts.facts import energy_wh, occurred_at

if TYPE_CHECKING:
    from services.evolution.domain import Cycle, EvolutionState


def fold_energy_report(state: EvolutionState, event: Any) -> EvolutionState:
    """The gates' energy use and budget, and the report kept on the cycle it belongs to."""
    state = fold_energy_reported(state, event)
    payload = event.payload
    cycle = state.cycles.get(payload.get("cycle_id") or "")
    job_id = payload.get("job_id")
    if cycle is None or not job_id or job_id in cycle.energy_reports:
        return state
    report = {"job_id": job_id, "job_kind": payload.get("job_kind"), "wh": energy_wh(payload)}
    updated = replace(cycle, energy_reports={**cycle.energy_reports, job_id: report})
    return replace(state, cycles={**state.cycles, cycle.cycle_id: updated})


def rescore_on_energy(event: Any, state: EvolutionState, config: EvolutionConfig) -> list[NewEvent]:
    """``cycle.rescored`` when a scored cycle has an energy report its fitness does not count yet."""
    cycle = state.cycles.get(event.payload.get("cycle_id") or "")
    individual = state.population.by_cycle(cycle.cycle_id) if cycle is not None else None
    if individual is None or individual.fitness is None or individual.verdict is None:
        return []  # not scored yet: the evaluation counts what has been reported by then
    counted = {r["job_id"] for r in individual.energy_reports}
    if set(cycle.energy_reports) <= counted:
        return []
    score, wh = cycle_fitness(cycle.kind, individual.verdict, cycle.training or {}, cycle.energy_reports.values())
    return [NewEvent("cycle.rescored", cycle.cycle_id, {
        "cycle_id": cycle.cycle_id,
        "kind": cycle.kind,
        "individual_id": individual.individual_id,
        "verdict": individual.verdict,
        "fitness": score,
        "previous_fitness": individual.fitness,
        "energy_wh": wh,
        "energy_reports": reports_of(cycle),
        "because": {"type": event.type, "job_id": event.payload.get("job_id")},
        "rescored_at": iso(occurred_at(event)),
    }, correlation_id=cycle.cycle_id)]


def fold_rescored(state: EvolutionState, event: Any) -> EvolutionState:
    """The search's fitness of the configuration, and the cycle's, follow the new score."""
    state = replace(state, population=state.population.apply(event))
    cycle = state.cycles.get(event.payload.get("cycle_id") or "")
    individual = state.population.by_cycle(cycle.cycle_id) if cycle is not None else None
    if individual is None or individual.fitness == cycle.fitness:
        return state
    return replace(state, cycles={**state.cycles, cycle.cycle_id: replace(cycle, fitness=individual.fitness)})


def evaluation(cycle: Cycle, verdict: str, individual_id: str | None, now: datetime) -> NewEvent:
    """``cycle.evaluated``: the cycle's first score, from its verdict and the energy reported so far.

    ``individual_id``: the configuration's in the search (an RL cycle's has no proposal of its own)."""
    training = cycle.training or {}
    score, wh = cycle_fitness(cycle.kind, verdict, training, cycle.energy_reports.values())
    individual = (cycle.proposal or {}).get("individual") or {}
    return NewEvent("cycle.evaluated", cycle.cycle_id, {
        "cycle_id": cycle.cycle_id,
        "kind": cycle.kind,
        "individual_id": individual.get("individual_id") or individual_id,
        "verdict": verdict,
        "fitness": score,
        "loss_before": training.get("loss_before"),
        "loss_after": training.get("loss_after"),
        "energy_wh": wh,
        "energy_reports": reports_of(cycle),
        "adapter_sha256": training.get("adapter_sha256"),
        "validation_id": (cycle.validation or {}).get("validation_id"),
        "evaluated_at": iso(now),
    }, correlation_id=cycle.cycle_id)


def reports_of(cycle: Cycle) -> list[Mapping[str, Any]]:
    return [dict(cycle.energy_reports[job]) for job in sorted(cycle.energy_reports)]

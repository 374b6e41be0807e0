"""Evolution wiring: triggers and gates propose cycles; verified grants start training.

The state is kept as rows; at start-up the configuration population is
rebuilt from this service's own events (cycle.proposed / evaluated / completed),
so what the search knows always comes from the log.
"""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import timedelta

from shared.policy_file import load_policies
from services.evolution import domain
from services.evolution.search import DEFAULT_CONFIG, DEFAULT_SPACE, Param, SearchSettings, SearchSpace, population_from_events
from shared.contracts.envelope import NewEvent
from shared.contracts.values import utcnow
from shared.decider import Decider, from_document
from shared.metrics import record_evolution
from shared.service import HandlerContext, Service

service = Service("evolution", reads=["dataset", "cycle", "research", "approval", "training", "validation",
                                      "energy", "hardware", "scaling", "adapter"])
policies = load_policies(service.settings.policies_path)


def _seconds(name: str, default: float | None) -> timedelta | None:
    raw = os.environ.get(name)
    value = float(raw) if raw not in (None, "") else default
    return timedelta(seconds=value) if value else None


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw not in (None, "") else default


def search_settings() -> SearchSettings:
    """The search space, with the steps bounded for this site (a laptop, a CI runner, a GPU node)."""
    low_steps = int(_float("NEURONS_MIN_STEPS", 20))
    high_steps = int(_float("NEURONS_MAX_STEPS", 2000))
    params = tuple(Param("steps", "int", low_steps, high_steps) if p.name == "steps" else p
                   for p in DEFAULT_SPACE.params)
    initial = {**DEFAULT_CONFIG, "steps": min(max(DEFAULT_CONFIG["steps"], low_steps), high_steps)}
    return SearchSettings(space=SearchSpace(params), initial_config=initial,
                          seed=int(_float("NEURONS_SEARCH_SEED", 0)))


def config() -> domain.EvolutionConfig:
    budget = os.environ.get("NEURONS_EVOLUTION_BUDGET_WH")
    return domain.EvolutionConfig(
        model=service.settings.model,
        search=search_settings(),
        keyring=service.trust.keyring(),
        policies=policies,
        schedule_interval=_seconds("NEURONS_SCHEDULE_INTERVAL_S", 6 * 3600),
        carbon_intensity_g_per_kwh=service.settings.carbon_intensity_g_per_kwh,
        energy_budget_wh=float(budget) if budget else None,
        max_load_per_core=_float("NEURONS_MAX_LOAD_PER_CORE", 0.85),
        carbon_caution_g_per_kwh=_float("NEURONS_CARBON_CAUTION_G_PER_KWH", 450.0),
        carbon_pause_g_per_kwh=_float("NEURONS_CARBON_PAUSE_G_PER_KWH", 500.0),
        max_pending_approvals=int(_float("NEURONS_MAX_PENDING_APPROVALS", 3)),
        retry_after=_seconds("NEURONS_GATE_RETRY_S", 1800) or timedelta(minutes=30),
    )


# one row per cycle, dataset, pending approval, energy sample and configuration tried, one for the latest
# facts; a database from before kept them all in one document
evolution = Decider(domain, from_rows=domain.EvolutionState.from_rows,
                    upgrade=from_document("evolution", "state", domain.EvolutionState.from_dict))


def _handle(ctx: HandlerContext, message, model: str | None = None) -> None:
    cfg = config()
    if model:
        cfg = replace(cfg, model=model)  # an operator may ask for another base model for this cycle
    sealed = evolution.run(ctx, message, cfg)
    ctx.committed(lambda: record_evolution(service.metrics, sealed))  # proposed, deferred, completed cycles


# the schedule's first cycle waits one interval after this (a fresh platform does not train at once)
STARTED_AT = utcnow()


@service.on_start
async def rebuild_population(svc: Service) -> None:
    population = population_from_events(svc.own_events())
    with svc.transaction() as ctx:
        evolution.save(ctx, replace(evolution.state(ctx), population=population))


@service.handles("*")
def on_event(event, ctx: HandlerContext):
    if event.type in ("cycle.requested", "research.requested"):
        kind = domain.RequestCycle if event.type == "cycle.requested" else domain.RequestResearch
        try:
            signer = event.producer.service.removeprefix("operator:")  # the runtime checked the signature is theirs
            if event.payload.get("operator_id") != signer:
                raise domain.CommandRejected(f"the request names {event.payload.get('operator_id')!r} as requester "
                                             f"but is signed by {signer!r}")
            _handle(ctx, _command(event, kind), model=event.payload.get("model"))
        except domain.CommandRejected as exc:
            # the operator hears why; the request stays in the log with its refusal
            refusal = [NewEvent(f"{event.aggregate_type}.request_refused", event.aggregate_id,
                                {"command_id": event.aggregate_id, "operator_id": event.payload.get("operator_id"),
                                 "reason": str(exc)})]
            ctx.committed(lambda: record_evolution(service.metrics, refusal))
            return refusal
        return
    if event.type == "dataset.registered" and event.payload.get("auto_cycle") is False:
        # registered for later cycles: known to evolution, but it starts none now
        evolution.fold(ctx, event)
        return
    _handle(ctx, event)


def _command(event, kind):
    payload = dict(event.payload)
    fields = {"operator_id": payload.pop("operator_id"), "requested_at": event.occurred_at,
              "command_id": event.aggregate_id}
    for name in ("dataset_id", "config", "warm_start", "adapter_sha256"):
        if payload.get(name) is not None and name in kind.__dataclass_fields__:
            fields[name] = payload[name]
    if payload.get("force_gates") and "force_gates" in kind.__dataclass_fields__:
        fields["force_gates"] = tuple(payload["force_gates"])
    return kind(**fields)


@service.every(_float("NEURONS_EVOLUTION_TICK_S", 5.0), jitter=1.0)
def tick(ctx: HandlerContext):
    _handle(ctx, domain.Tick(now=ctx.now, started_at=STARTED_AT))

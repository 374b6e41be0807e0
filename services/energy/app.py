"""Energy wiring: report every job's measured energy, keep budgets, profile the hardware, size jobs.

What the soaks and training jobs were seen to do (``validation.cycle_completed``,
``training.completed``) is folded into the state; each hardware profile's
scaling advice sizes on it.

The state is a fold of this service's own events (reports, crossings,
profiles), kept as rows; a database from before the rows has it rebuilt from
the outbox once.
"""

from __future__ import annotations

import os
from functools import reduce

from services.energy import domain
from services.energy.hardware import profile_hardware
from services.energy.meters import energy_config
from shared.decider import Decider
from shared.metrics import record_energy
from shared.service import HandlerContext, Service

PROFILE_EVERY_S = float(os.environ.get("NEURONS_HARDWARE_PROFILE_S") or 30)

service = Service("energy", reads=["training", "validation"])
config = energy_config()


def _from_own_events(ctx: HandlerContext) -> domain.EnergyState:
    # before the rows, the state was rebuilt from the outbox at every start
    return reduce(domain.evolve, ctx.service.own_events(), domain.initial_state(config))


# one row per job reported (and per job still inside a budget window), per window over budget, per node profiled
energy = Decider(domain, from_rows=lambda rows: domain.EnergyState.from_rows(rows, config.budgets),
                 upgrade=_from_own_events)


@service.on_start
async def profile_at_start(svc: Service) -> None:
    await svc.run_timer(profile_tick)  # a profile at start-up: evolution's hardware gate needs one


@service.handles("training.completed", "validation.completed")
def on_job_completed(event, ctx: HandlerContext):
    reported = energy.run(ctx, event, config)
    ctx.committed(lambda: record_energy(service.metrics, reported))  # joules, gCO2e, budgets crossed


@service.handles("validation.cycle_completed")
def on_soak_cycle(event, ctx: HandlerContext):
    energy.fold(ctx, event)  # the replicas' memory, latency and incidents: what the next scaling advice sizes on


@service.every(PROFILE_EVERY_S, jitter=PROFILE_EVERY_S * 0.1)
def profile_tick(ctx: HandlerContext):
    command = domain.ProfileHardware(node=service.settings.node, profile=profile_hardware(), at=ctx.now)
    energy.run(ctx, command, config, correlation_id=f"hw-{service.settings.node}")

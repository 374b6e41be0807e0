"""Energy wiring: report every job's measured energy, keep budgets, profile the hardware.

The state is a fold of this service's own events (reports, crossings,
profiles), rebuilt from its outbox at start-up.
"""

from __future__ import annotations

import os
from functools import reduce

from services.energy import domain
from services.energy.hardware import profile_hardware
from services.energy.meters import energy_config
from shared.service import HandlerContext, Service

PROFILE_EVERY_S = float(os.environ.get("NEURONS_HARDWARE_PROFILE_S") or 30)

service = Service("energy", reads=["training", "validation"])
config = energy_config()
state = domain.initial_state(config)


def _fold(current, events):
    return reduce(domain.evolve, events, current)


@service.on_start
async def rebuild_state(svc: Service) -> None:
    global state
    state = _fold(domain.initial_state(config), svc.own_events())
    await svc.run_timer(profile_tick)  # a profile at start-up: evolution's hardware gate needs one


@service.handles("training.completed", "validation.completed")
def on_job_completed(event, ctx: HandlerContext):
    _stage(ctx, domain.decide(event, state, config))
    return []


def _stage(ctx: HandlerContext, events, **kw) -> None:
    sealed = service.stage(ctx, events, **kw)

    def apply() -> None:
        global state
        state = _fold(state, sealed)

    ctx.committed(apply)


@service.every(PROFILE_EVERY_S, jitter=PROFILE_EVERY_S * 0.1)
def profile_tick(ctx: HandlerContext):
    command = domain.ProfileHardware(node=service.settings.node, profile=profile_hardware(), at=ctx.now)
    _stage(ctx, domain.decide(command, state, config), correlation_id=f"hw-{service.settings.node}")
    return []

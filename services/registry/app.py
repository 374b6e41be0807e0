"""Registry wiring: archive every event once, then project it into the read models."""

from __future__ import annotations

from shared.archive import archive
from shared.service import HandlerContext, Service
from shared.topics import AGGREGATE_TYPES
from services.registry.projections import all_projections

service = Service("registry", reads=AGGREGATE_TYPES)
PROJECTIONS = all_projections()


@service.handles("*")
def on_event(event, ctx: HandlerContext):
    if archive(ctx.session, event):
        for projection in PROJECTIONS:
            projection.apply(ctx.session, event)
    return []

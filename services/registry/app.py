"""Registry wiring: archive every event once, project it into the read models, decide, serve the API.

The decisions (promotion, rollback, profiles) fold a state of their own kept in
the service's state store; the registry's own events are folded when they are
decided, not again when they come back from the log.
"""

from __future__ import annotations

from services.registry import domain
from services.registry.projections import all_projections
from shared.archive import archive
from shared.decider import Decider, from_document
from shared.service import HandlerContext, Service
from shared.contracts.trust import Keyring, KeyringError
from shared.topics import AGGREGATE_TYPES
from shared.keys import load_keyring

service = Service("registry", reads=AGGREGATE_TYPES)
PROJECTIONS = all_projections()
# one row per adapter, channel, profile and promotion request; a database from before kept one document
decisions = Decider(domain, from_rows=domain.RegistryState.from_rows,
                    upgrade=from_document("decisions", "registry", domain.RegistryState.from_dict))


@service.handles("*")
def on_event(event, ctx: HandlerContext):
    if not archive(ctx.session, event):
        return
    for projection in PROJECTIONS:
        projection.apply(ctx.session, event)
    if event.type in domain.RELEVANT and event.producer.service != service.name:
        decisions.run(ctx, event, domain.RegistryConfig(keyring=_keyring(ctx)))


def _keyring(ctx: HandlerContext) -> Keyring:
    # Read on every decision: an operator added to the keyring counts without a restart.
    try:
        return load_keyring(ctx.settings.keyring_path)
    except KeyringError as exc:
        # An unreadable keyring verifies nobody: grants are refused (and recorded), while the
        # event itself is still archived and projected rather than lost to the dead-letter topic.
        service.log.error("keyring %s unusable: %s", ctx.settings.keyring_path, exc)
        return Keyring()


@service.on_start
async def serve_api(svc: Service) -> None:
    from services.registry.api import serve

    await serve(svc)

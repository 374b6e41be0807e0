"""Registry wiring: archive every event once, project it into the read models, decide, serve the API.

The decisions (promotion, rollback, profiles) fold a state of their own kept in
the service's state store; the registry's own events are folded when they are
decided, not again when they come back from the log.
"""

from __future__ import annotations

from services.registry import domain
from services.registry.projections import all_projections
from shared.archive import archive
from shared.contracts.envelope import NewEvent, iso
from shared.decider import Decider, from_document
from shared.metrics import record_channel_change
from shared.service import HandlerContext, Service
from shared.topics import AGGREGATE_TYPES

service = Service("registry", reads=AGGREGATE_TYPES)
PROJECTIONS = all_projections()
# one row per adapter, channel, profile and promotion request; a database from before kept one document
decisions = Decider(domain, from_rows=domain.RegistryState.from_rows,
                    upgrade=from_document("decisions", "registry", domain.RegistryState.from_dict))


@service.handles("*")
def on_event(event, ctx: HandlerContext):
    if not archive(ctx.session, event, raw=ctx.raw):  # as published: its signature covers those bytes
        return
    ctx.committed(lambda: record_channel_change(service.metrics, event))  # promotions, rollbacks per channel
    for projection in PROJECTIONS:
        projection.apply(ctx.session, event)
    if event.type in domain.RELEVANT and event.producer.service != service.name:
        refused = _unsigned_adapter(event, ctx)
        if refused:
            return refused
        # the operators the log has enrolled, as of this event: an enrolment counts without a restart
        decisions.run(ctx, event, domain.RegistryConfig(keyring=service.trust.keyring()))


def _unsigned_adapter(event, ctx: HandlerContext) -> list[NewEvent]:
    """Before a promotion grant is acted on, the adapter's files must verify against the trainer's
    signature (OpenSSF model-signing); a tampered, unsigned or missing adapter is refused, the file named."""
    if event.type != "approval.granted" or event.payload.get("kind") != "promotion":
        return []
    from shared.adapter_signing import AdapterSignatureError, verify_adapter_with
    from shared.artefacts import ArtefactError, SharedArtefacts

    p = event.payload
    subject = p.get("subject") or {}
    sha = subject.get("adapter_sha256")
    try:
        verify_adapter_with(SharedArtefacts.for_settings(ctx.settings).get(subject.get("adapter_uri") or sha),
                            ctx.settings)
        return []
    except (AdapterSignatureError, ArtefactError, OSError) as exc:
        channel = ((p.get("decision") or {}).get("subject") or {}).get("channel") or "production"
        return [NewEvent("adapter.promotion_refused", channel, {
            "channel": channel, "approval_request_id": p["request_id"], "adapter_sha256": sha,
            "reason": "adapter_not_verified", "detail": str(exc), "operator_id": (p.get("decision") or {}).get("operator_id"),
            "approval_event_id": event.event_id, "refused_at": iso(ctx.now),
        })]


@service.on_start
async def serve_api(svc: Service) -> None:
    from services.registry.api import serve

    await serve(svc)

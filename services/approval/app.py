"""Approval wiring: proposals and passing validations open requests; signed decisions close them.

The keyring is read again for every decision, so an operator added with
`neurons operator keygen` can approve without a restart.
"""

from __future__ import annotations

import os
from datetime import timedelta

from services.approval import domain
from shared.policy_file import load_policies
from opentelemetry import trace

from shared.decider import Decider, from_document
from shared.metrics import record_approval_waits
from shared.service import HandlerContext, Service
from shared.tracing import context_from_traceparent, current_traceparent

REQUEST_TTL_S = float(os.environ.get("NEURONS_APPROVAL_TTL_S") or 24 * 3600)

service = Service("approval", reads=["cycle", "research", "validation", "approval"])
policies = load_policies(service.settings.policies_path)


def _config() -> domain.ApprovalConfig:
    return domain.ApprovalConfig(keyring=service.trust.keyring(), policies=policies,
                                 request_ttl=timedelta(seconds=REQUEST_TTL_S))


# one row per request and per used nonce; a database from before kept them all in one document
approvals = Decider(domain, from_rows=domain.ApprovalState.from_rows,
                    upgrade=from_document("approvals", "all", domain.ApprovalState.from_dict))


@service.handles("cycle.proposed", "research.proposed", "validation.completed")
def on_subject(event, ctx: HandlerContext):
    decided = approvals.run(ctx, event, _config())
    _count_waits(ctx, decided)  # a policy may grant at once
    for new in decided:
        if new.type == "approval.requested":
            # the decision arrives later from an operator's tool; it continues this trace
            ctx.state.put("traces", new.aggregate_id, current_traceparent())


@service.handles("approval.decision_submitted")
def on_decision(event, ctx: HandlerContext):
    command = domain.SubmitDecision(signed=event.payload["signed"], received_at=ctx.now,
                                    request_id=event.payload["request_id"])
    traceparent = ctx.state.get("traces", event.payload["request_id"])
    if not traceparent:
        _count_waits(ctx, approvals.run(ctx, command, _config()))
        return
    with service.tracer.start_as_current_span(
            "approval decide", context=context_from_traceparent(traceparent),
            links=[trace.Link(trace.get_current_span().get_span_context())]):
        # staged in this span, so the events carry the request's trace
        _count_waits(ctx, approvals.run(ctx, command, _config()))


@service.every(5.0, jitter=1.0)
def expire_requests(ctx: HandlerContext):
    _count_waits(ctx, approvals.run(ctx, domain.Tick(now=ctx.now), _config()))


def _count_waits(ctx: HandlerContext, events) -> None:
    """Once committed, each granted, rejected or expired request records how long it waited (shared.metrics)."""
    requests = approvals.state(ctx).requests
    ctx.committed(lambda: record_approval_waits(service.metrics, events,
                                                lambda rid: getattr(requests.get(rid), "requested_at", None)))

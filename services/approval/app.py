"""Approval wiring: proposals and passing validations open requests; signed decisions close them.

The keyring is read again for every decision, so an operator added with
`neurons operator keygen` can approve without a restart.
"""

from __future__ import annotations

import os
from datetime import timedelta

from services.approval import domain
from services.approval.policies import load_policies
from shared.service import HandlerContext, Service
from shared.signing import Keyring

REQUEST_TTL_S = float(os.environ.get("NEURONS_APPROVAL_TTL_S") or 24 * 3600)

service = Service("approval", reads=["cycle", "research", "validation", "approval"])
policies = load_policies(service.settings.policies_path)


def _config() -> domain.ApprovalConfig:
    return domain.ApprovalConfig(keyring=Keyring.load(service.settings.keyring_path), policies=policies,
                                 request_ttl=timedelta(seconds=REQUEST_TTL_S))


def _handle(ctx: HandlerContext, message):
    state = domain.ApprovalState.from_dict(ctx.state.get("approvals", "all", {}))
    state, events = domain.handle(message, state, _config())
    ctx.state.put("approvals", "all", state.to_dict())
    return events


@service.handles("cycle.proposed", "research.proposed", "validation.completed")
def on_subject(event, ctx: HandlerContext):
    return _handle(ctx, event)


@service.handles("approval.decision_submitted")
def on_decision(event, ctx: HandlerContext):
    command = domain.SubmitDecision(signed=event.payload["signed"], received_at=ctx.now,
                                    request_id=event.payload["request_id"])
    return _handle(ctx, command)


@service.every(5.0, jitter=1.0)
def expire_requests(ctx: HandlerContext):
    return _handle(ctx, domain.Tick(now=ctx.now))

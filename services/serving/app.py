"""Serving wiring: follow the verified promotions and profiles, keep their adapters resident, answer the API.

The worker reads the adapter and profile topics; every record has passed the
runtime's checks (signature, producer, and for what changes the serving
adapter the operator's signed decision, ``shared.trust_view``) before it is
folded here (``domain.evolve``, state rows in the service's database).

Requests read ``live``: the state as it was when every adapter it names was
loaded. A new adapter is loaded in the background (``pool.ensure``, which
checks its digest and its OpenSSF signature); only then does ``live`` move to
it, in one assignment, so a request either started on the old adapter and
ends on it, or starts on the new one, and none waits for a load or fails.
Each swap is an event: ``serving.adapter_loaded`` with its latency from the
event that asked for it, or with ``loaded`` false and the reason when the
files are missing or tampered with (the previous adapter keeps serving).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from services.serving import domain
from shared.contracts.envelope import NewEvent, iso, utcnow
from shared.decider import Decider
from shared.service import HandlerContext, Service

log = logging.getLogger("neurons.serving")
service = Service("serving", reads=["adapter", "profile"])
serving = Decider(domain, from_rows=domain.ServingState.from_rows)


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


CAPACITY = _int("NEURONS_SERVING_ADAPTERS", 4)


class Live:
    """What requests read: the latest state whose adapters are all loaded, and the pool once it is up."""

    def __init__(self) -> None:
        self.state = domain.initial_state()
        self.pool = None
        self.ready = asyncio.Event()
        self.lock: asyncio.Lock | None = None


live = Live()


@service.handles(*sorted(domain.RELEVANT))
def on_event(event, ctx: HandlerContext):
    serving.run(ctx, event)
    folded = serving.state(ctx)
    ctx.later(lambda: _swap_to(folded, event.type, event.event_id, event.occurred_at))


async def _swap_to(folded: domain.ServingState, cause: str, cause_id: str, asked_at) -> None:
    """Load what ``folded`` serves that is not resident yet, then serve it; one swap at a time, in order."""
    await live.ready.wait()
    if live.lock is None:
        live.lock = asyncio.Lock()
    async with live.lock:
        state, events = folded, []
        serving_before = domain.adapters_in(live.state)
        for sha, adapter in sorted(domain.adapters_in(folded).items()):
            if sha in live.pool.resident():
                if sha not in serving_before:  # still resident, back in service (a rollback): a swap all the same
                    events.append(_loaded(sha, adapter, cause, cause_id, asked_at, 0.0, None))
                continue
            try:
                seconds = await asyncio.to_thread(live.pool.ensure, sha, adapter.uri)
            except Exception as exc:  # AdapterUnavailable, or anything that kept the files from loading
                reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
                log.error("adapter %s not loaded (%s): %s; what served keeps serving", sha[:12], cause, reason)
                state = domain.keep_serving(state, live.state, sha)
                events.append(_loaded(sha, adapter, cause, cause_id, asked_at, None, reason))
                continue
            events.append(_loaded(sha, adapter, cause, cause_id, asked_at, seconds, None))
        live.state = state  # one assignment: a request reads the old state or the new one, never a mix
    if events:
        await service.emit(events, correlation_id=cause_id)


def _loaded(sha: str, adapter: domain.Adapter, cause: str, cause_id: str, asked_at, load_s: float | None,
            reason: str | None) -> NewEvent:
    now = utcnow()
    return NewEvent("serving.adapter_loaded", f"{service.settings.node}-{sha[:16]}", {
        "node": service.settings.node, "adapter_sha256": sha, "adapter_uri": adapter.uri, "kind": adapter.kind,
        "loaded": reason is None, "reason": reason, "load_s": round(load_s, 4) if load_s is not None else None,
        "latency_s": round(max(0.0, (now - asked_at).total_seconds()), 4),
        "cause": cause, "cause_event_id": cause_id, "loaded_at": iso(now),
    })


@service.on_start
async def start_serving(svc: Service) -> None:
    """Load the base model once, serve what the stored state serves, then answer the API."""
    from services.serving.api import RequestLimits, ServingMetrics, create_app
    from services.serving.pool import AdapterPool
    from shared.http_server import bind, binding_problem, serve_in

    settings = svc.settings
    started = time.monotonic()
    live.pool = await asyncio.to_thread(AdapterPool.load, settings, None, CAPACITY)
    with svc.transaction() as ctx:
        stored = serving.state(ctx)
    live.ready.set()
    log.info("base model loaded in %.1f s; %d adapters to serve", time.monotonic() - started,
             len(domain.adapters_in(stored)))
    await _swap_to(stored, "start-up", "start-up", utcnow())
    host, port = settings.serving_host, settings.serving_port
    problem = binding_problem("serving API", host, settings.api_token, "NEURONS_SERVING_HOST")
    if problem:
        log.error(problem)
        return
    sock = bind("serving API", host, port, "NEURONS_SERVING_HOST", "NEURONS_SERVING_PORT")
    if sock is None:
        return
    limits = RequestLimits(max_tokens=_int("NEURONS_SERVING_MAX_TOKENS", 256),
                           timeout_s=float(_int("NEURONS_SERVING_TIMEOUT_S", 60)),
                           queue=_int("NEURONS_SERVING_QUEUE", 16))
    app = create_app(settings, lambda: live.state, live.pool, limits, ServingMetrics(svc.metrics), host=host)
    serve_in(svc, app, sock, host=host, address=settings.run_dir / "serving-api.json",
             token_required=bool(settings.api_token), what="serving API")

"""The registry's HTTP API and dashboard (FastAPI; OpenAPI at /openapi.json, docs at /docs).

Reads come from the read models. The one write is an operator's signed
decision on an approval request: it is published as
``approval.decision_submitted`` for the approval service to verify, exactly as
``neurons approve`` does; the API never decides anything itself.

The registry process serves it with uvicorn in the faust worker's event loop
(``serve``), on NEURONS_API_PORT (0 picks a free port); the address is written
to ``var/run/registry-api.json`` so tools and tests can find it.
"""

from __future__ import annotations

import json
import logging
import socket
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any, Awaitable, Callable

from fastapi import Body, FastAPI, HTTPException, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from services.registry import queries
from shared.contracts import schemas
from shared.contracts.envelope import Envelope, NewEvent, Producer, seal
from shared.settings import Settings

log = logging.getLogger("neurons.registry.api")
DASHBOARD = Path(__file__).resolve().parent / "dashboard"
Publish = Callable[[Envelope], Awaitable[None]]


OpenSession = Callable[[], Any]  # opens a read-model session (a context manager)


def create_app(settings: Settings, publish: Publish | None = None) -> FastAPI:
    app = FastAPI(title="neurons registry", version="1",
                  description="Adapters in service, their lineage and approvals, soak snapshots, energy, "
                              "personality profiles: read models of the neurons event log.")

    def session():
        return queries.registry_session(settings)

    _adapter_routes(app, settings, session)
    _observability_routes(app, session)
    _approval_routes(app, settings, session, publish)
    _profile_and_audit_routes(app, settings, session)
    _dashboard_routes(app, session)
    return app


def _found(value, what: str):
    if value is None:
        raise HTTPException(404, f"no {what}")
    return value


def _adapter_routes(app: FastAPI, settings: Settings, session: OpenSession) -> None:
    @app.get("/api/health", tags=["meta"])
    def health() -> dict:
        return {"ok": True, "node": settings.node}

    @app.get("/api/manifest", tags=["adapters"], summary="What serves each channel, every adapter with lineage")
    def manifest() -> dict:
        with session() as s:
            return queries.manifest(s)

    @app.get("/api/channels", tags=["adapters"], summary="The adapter in service on each channel")
    def channels() -> list:
        with session() as s:
            return queries.channels(s)

    @app.get("/api/channels/{channel}/history", tags=["adapters"],
             summary="Every promotion, rollback and refusal on a channel, oldest first")
    def history(channel: str, refusals: bool = True) -> list:
        with session() as s:
            return queries.channel_history(s, channel, include_refusals=refusals)

    @app.get("/api/adapters/{sha256}", tags=["adapters"], summary="One adapter: lineage, metrics, energy, approvals")
    def adapter(sha256: str) -> dict:
        with session() as s:
            full = queries.resolve_adapter(s, sha256) or sha256
            return _found(queries.adapter_view(s, full), f"adapter {sha256}")


def _observability_routes(app: FastAPI, session: OpenSession) -> None:
    @app.get("/api/snapshots", tags=["observability"], summary="Soak runs, most recent first")
    def snapshots(limit: int = Query(20, ge=1, le=500)) -> list:
        with session() as s:
            return queries.snapshots(s, limit)

    @app.get("/api/snapshots/{validation_id}", tags=["observability"],
             summary="The observability snapshot of one soak run")
    def snapshot(validation_id: str) -> dict:
        with session() as s:
            return _found(queries.snapshot(s, validation_id), f"validation {validation_id}")

    @app.get("/api/training", tags=["observability"], summary="Recent training runs with their loss curves")
    def training(limit: int = Query(20, ge=1, le=500)) -> list:
        with session() as s:
            return queries.training_runs(s, limit)

    @app.get("/api/cycles", tags=["observability"], summary="Recent cycles")
    def cycles(limit: int = Query(50, ge=1, le=500)) -> list:
        with session() as s:
            return queries.cycles(s, limit)

    @app.get("/api/energy", tags=["observability"], summary="Measured energy: totals, per cycle, per job")
    def energy() -> dict:
        with session() as s:
            return queries.energy(s)


def _approval_routes(app: FastAPI, settings: Settings, session: OpenSession, publish: Publish | None) -> None:
    @app.get("/api/approvals", tags=["approvals"], summary="Approval requests with evidence and state")
    def approvals(pending: bool = False, kind: str | None = None) -> list:
        with session() as s:
            return queries.approvals(s, pending_only=pending, kind=kind)

    @app.get("/api/approvals/{request_id}", tags=["approvals"])
    def approval(request_id: str) -> dict:
        from services.registry.approvals import ApprovalRecord

        with session() as s:
            row = _found(s.get(ApprovalRecord, request_id), f"approval request {request_id}")
            return queries.approval_view(row)

    @app.post("/api/approvals/{request_id}/decisions", tags=["approvals"], status_code=202,
              summary="Submit an operator's signed decision (shared.contracts.trust.sign_decision) for the approval "
                      "service to verify")
    async def submit_decision(request_id: str, signed: dict[str, Any] = Body(..., description="the signed decision")) -> dict:
        if publish is None:
            raise HTTPException(503, "this API instance cannot publish events")
        if signed.get("request_id") != request_id:
            raise HTTPException(422, f"the decision is signed for {signed.get('request_id')!r}, not {request_id!r}")
        event = NewEvent("approval.decision_submitted", f"sub-{signed.get('nonce') or request_id}",
                         {"request_id": request_id, "signed": signed, "submitted_via": "api"})
        try:
            envelope = seal(event, sequence=1, producer=Producer(service="api", node=settings.node),
                            correlation_id=request_id, causation_id=None,
                            schema_version=schemas.current_version(event.type))
            schemas.validate_payload(envelope.type, envelope.schema_version, envelope.payload)
        except (schemas.SchemaError, ValueError) as exc:
            raise HTTPException(422, str(exc)) from None
        await publish(envelope)
        return {"accepted": True, "event_id": envelope.event_id,
                "note": "the approval service answers with approval.granted, approval.rejected or approval.refused"}


def _profile_and_audit_routes(app: FastAPI, settings: Settings, session: OpenSession) -> None:
    @app.get("/api/profiles", tags=["profiles"])
    def profiles(channel: str | None = None) -> list:
        with session() as s:
            return queries.profiles(s, channel)

    @app.get("/api/profiles/{profile_id}", tags=["profiles"])
    def profile(profile_id: str) -> dict:
        with session() as s:
            return _found(queries.profile(s, profile_id), f"profile {profile_id}")

    @app.get("/api/audit/at", tags=["audit"],
             summary="Replay the archive up to a moment: which adapter served, who approved it, on what evidence")
    def audit_at(at: datetime, profile: str | None = None, channel: str | None = None) -> dict:
        from services.registry.audit import audit_at as replay_at

        try:
            return replay_at(settings, at, profile=profile, channel=channel)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None


def _dashboard_routes(app: FastAPI, session: OpenSession) -> None:
    @app.get("/api/dashboard", tags=["dashboard"], summary="Everything the dashboard shows, in one answer")
    def dashboard() -> dict:
        with session() as s:
            return queries.dashboard(s)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(DASHBOARD / "index.html", media_type="text/html")

    app.mount("/dashboard", StaticFiles(directory=DASHBOARD), name="dashboard")


def address_file(settings: Settings) -> Path:
    return settings.run_dir / "registry-api.json"


def _bind(port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        # every interface: in a container the published port must reach it
        sock.bind(("0.0.0.0", port))
    except OSError as exc:
        sock.close()
        log.error("registry API not served: port %s is taken (%s); set NEURONS_API_PORT", port, exc)
        return None
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve(service) -> None:
    """Start the API as a task of the running loop; a taken port costs the API, never the worker."""
    import uvicorn

    class Server(uvicorn.Server):
        # faust owns the process's signals; uvicorn must not take them over
        def capture_signals(self):
            return nullcontext()

    settings = service.settings
    sock = _bind(settings.api_port)
    if sock is None:
        return

    async def publish(envelope: Envelope) -> None:
        publisher = await service.publisher()
        await publisher.publish(envelope)

    config = uvicorn.Config(create_app(settings, publish), log_level="warning", access_log=False, lifespan="off")
    server = Server(config)
    port = sock.getsockname()[1]
    path = address_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"port": port, "url": f"http://127.0.0.1:{port}"}))
    service.spawn(_run(server, sock))
    log.info("registry API on port %s (dashboard at /)", port)


async def _run(server, sock: socket.socket) -> None:
    try:
        await server.serve(sockets=[sock])
    except SystemExit:  # uvicorn exits on a failed start-up; the worker goes on without the API
        log.error("registry API stopped on start-up")

"""The registry's HTTP API and dashboard (FastAPI; OpenAPI at /openapi.json, docs at /docs).

Reads come from the read models. The one write is an operator's decision on
an approval request, and the API only passes it on: the body is a complete
``approval.decision_submitted`` envelope that the operator signed with their
own key (what ``neurons approve`` publishes). The API checks the signature
against the trust anchors and the operators the log enrolled, that the type
and request id are the endpoint's, and publishes the envelope as it is (a
publisher with no signer of its own): the API never signs an operator's
command, and never decides anything itself.

The registry process serves it with uvicorn in the faust worker's event loop
(``serve``), on NEURONS_API_HOST (127.0.0.1 by default) and NEURONS_API_PORT
(0 picks a free port); the address is written to ``var/run/registry-api.json``
so tools and tests can find it. Any address but loopback needs
NEURONS_API_TOKEN, and when a token is set every request carries
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from pathlib import Path
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from services.registry import queries
from shared.bus import validate
from shared.contracts import schemas
from shared.contracts.envelope import Envelope
from shared.contracts.signing import Refused
from shared.http_server import binding_problem as http_binding_problem
from shared.http_server import bind, is_loopback, require_bearer, serve_in  # noqa: F401  (is_loopback: the API's rule)
from shared.settings import Settings
from shared.trust_view import TrustView, check_envelope

log = logging.getLogger("neurons.registry.api")
DASHBOARD = Path(__file__).resolve().parent / "dashboard"
Publish = Callable[[Envelope], Awaitable[None]]


OpenSession = Callable[[], Any]  # opens a read-model session (a context manager)
DECISION = "approval.decision_submitted"


class Refusal(Exception):
    """A request the API turns down: the HTTP status, and the reason its JSON body names as ``error``."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"{error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


def binding_problem(settings: Settings) -> str | None:
    """Why the API must not be served as configured (an address off loopback with no token), or None."""
    return http_binding_problem("registry API", settings.api_host, settings.api_token, "NEURONS_API_HOST")


def _unauthorised(detail: str) -> JSONResponse:
    return JSONResponse({"error": "unauthorised", "detail": detail}, status_code=401,
                        headers={"WWW-Authenticate": 'Bearer realm="neurons"'})


class OperatorCommands:
    """What every mutating endpoint accepts: one complete envelope an operator signed with their own key.

    ``admit`` reads the body, checks that it is the endpoint's type, that its
    signature is an enrolled, unrevoked operator's key allowed to publish that
    type (``check_envelope``; an unknown key makes the view read the
    operators' enrolments again, once) and that the payload fits its schema.
    The envelope is then published as it is: never re-sealed, never signed
    with a service's key.
    """

    def __init__(self, trust: TrustView) -> None:
        self.trust = trust
        self._catching_up: asyncio.Lock | None = None

    async def admit(self, body: bytes, expected_type: str) -> tuple[Envelope, str]:
        envelope = self.parse(body)
        if envelope.type != expected_type:
            raise Refusal(422, "wrong_type", f"this endpoint takes {expected_type}, not {envelope.type}")
        return envelope, await self.check(envelope)

    @staticmethod
    def parse(body: bytes) -> Envelope:
        try:
            envelope = Envelope.from_json(body)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError too
            raise Refusal(400, "bad_envelope", "the body must be one complete signed envelope (Envelope.to_json, "
                                               f"with its signature block): {str(exc).splitlines()[0]}") from None
        return envelope

    async def check(self, envelope: Envelope) -> str:
        try:
            try:
                principal = check_envelope(envelope, self.trust.state, cache=self.trust.cache)
            except Refused as refused:
                if refused.reason != "unknown_key" or not await self._catch_up():
                    raise
                principal = check_envelope(envelope, self.trust.state, cache=self.trust.cache)
        except Refused as refused:
            raise Refusal(403, refused.reason, refused.detail) from None
        if not principal.startswith("operator:"):  # the contracts already say so; never relay a service's command
            raise Refusal(403, "unauthorised_producer", f"{envelope.type} is an operator's command, "
                                                        f"not {principal}'s")
        try:
            validate(envelope, from_json=True)
        except schemas.SchemaError as exc:
            raise Refusal(422, "schema_violation", str(exc)) from None
        return principal

    async def _catch_up(self) -> bool:
        if self._catching_up is None:
            self._catching_up = asyncio.Lock()
        async with self._catching_up:
            try:
                return await self.trust.catch_up()
            except Exception as exc:  # no broker: the key stays unknown, and is refused as such
                log.warning("could not read the operators' enrolments: %r", exc)
                return False


def create_app(settings: Settings, publish: Publish | None = None, trust: TrustView | None = None) -> FastAPI:
    """The API over ``settings``; ``publish`` sends an envelope as it is (None: this instance writes nothing);
    ``trust`` is the view operators' signatures are checked against (default: a new one over ``settings``)."""
    problem = binding_problem(settings)
    if problem:
        raise ValueError(problem)
    app = FastAPI(title="neurons registry", version="1",
                  description="Adapters in service, their lineage and approvals, soak snapshots, energy, "
                              "personality profiles: read models of the neurons event log.")

    @app.exception_handler(Refusal)
    async def refused(request: Request, exc: Refusal) -> JSONResponse:
        return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status)

    if settings.api_token:
        require_bearer(app, settings.api_token, _unauthorised)

    def session():
        return queries.registry_session(settings)

    commands = OperatorCommands(trust or TrustView(settings))
    _adapter_routes(app, settings, session)
    _observability_routes(app, session)
    _approval_routes(app, session, publish, commands)
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


def _approval_routes(app: FastAPI, session: OpenSession, publish: Publish | None,
                     commands: OperatorCommands) -> None:
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
              summary="Relay an operator-signed approval.decision_submitted envelope, as it is, to the approval service",
              responses={400: {"description": "bad_envelope: the body is no envelope"},
                         403: {"description": "unsigned, bad_signature, unknown_key, revoked_key, "
                                              "unauthorised_producer or wrong_operator"},
                         422: {"description": "wrong_type, wrong_path or schema_violation"}},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "type": "object", "required": ["event_id", "type", "producer", "payload", "signature"],
                  "description": "one approval.decision_submitted envelope as Envelope.to_json writes it, "
                                 "signed by the operator (producer operator:<id>, its signature block)"}}}}})
    async def submit_decision(request_id: str, request: Request) -> dict:
        """The body is the envelope ``neurons approve`` would publish, complete with its ``signature`` block.

        A client builds it with the operator's key::

            from cli.bus_client import command_event
            from shared.bus import signed_values
            from shared.contracts.envelope import NewEvent
            from shared.contracts.trust import decision_subject, sign_decision
            from shared.keys import operator_signer

            signer = operator_signer(settings, "bob")
            signed = sign_decision(request_id, "grant", "bob", signer.private_key, issued_at=now,
                                   expires_at=now + timedelta(minutes=10), nonce=secrets.token_hex(16),
                                   subject=decision_subject(request["kind"], request["subject"]))
            envelope = command_event(NewEvent("approval.decision_submitted", f"sub-{signed['nonce']}",
                                              {"request_id": request_id, "signed": dict(signed),
                                               "submitted_via": "api"}),
                                     correlation_id=request_id, operator="bob")
            body = signed_values(signer, [envelope], [None])[0]   # the bytes to POST

        The API checks the signature (an enrolled operator's key, unrevoked,
        with a role that may decide), that the type is
        ``approval.decision_submitted``, that the request id in the payload and
        in the signed decision is the one in the path, and that the decision
        is signed by the operator who signed the envelope; then it publishes
        the envelope unchanged, same event id and signature. The approval
        service verifies the decision and answers ``approval.granted``,
        ``approval.rejected`` or ``approval.refused``.
        """
        if publish is None:
            raise Refusal(503, "cannot_publish", "this API instance cannot publish events")
        envelope, principal = await commands.admit(await request.body(), DECISION)
        payload = envelope.payload
        signed = payload.get("signed")
        named = {payload.get("request_id"), signed.get("request_id") if isinstance(signed, dict) else None}
        if named != {request_id}:
            raise Refusal(422, "wrong_path", f"the decision is for {payload.get('request_id')!r}, "
                                             f"not {request_id!r} as the path says")
        operator = principal.split(":", 1)[1]
        if signed.get("operator_id") != operator:
            raise Refusal(403, "wrong_operator", f"the decision is signed as {signed.get('operator_id')!r} but "
                                                 f"the envelope by {principal}")
        await publish(envelope)
        return {"accepted": True, "event_id": envelope.event_id, "operator": operator,
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


async def serve(service) -> None:
    """Start the API as a task of the running loop; a taken port costs the API, never the worker."""
    from shared.bus import Publisher

    settings = service.settings
    problem = binding_problem(settings)
    if problem:  # off loopback with no token: not served at all, the worker goes on
        log.error(problem)
        return
    sock = bind("registry API", settings.api_host, settings.api_port, "NEURONS_API_HOST", "NEURONS_API_PORT")
    if sock is None:
        return

    # Operators' envelopes go out as they were signed: this publisher has no key, so it can never
    # sign one with the registry's (the service's own publisher would sign anything left unsigned).
    relay: list[Publisher] = []
    relay_lock = asyncio.Lock()

    async def publish(envelope: Envelope) -> None:
        if envelope.signature is None:
            raise Refusal(403, "unsigned", f"{envelope.type} carries no signature")
        async with relay_lock:
            if not relay:
                publisher = Publisher(settings, f"{service.name}-api", service.tracer_provider, signer=None)
                await publisher.start()
                relay.append(publisher)
        await relay[0].publish(envelope)

    # the service's own view of who is trusted: enrolments and revocations fold in as the registry reads them
    app = create_app(settings, publish, trust=service.trust)
    serve_in(service, app, sock, host=settings.api_host, address=address_file(settings),
             token_required=bool(settings.api_token), what="registry API (dashboard at /)")

"""The serving API: OpenAI's embeddings, completions, chat completions and models, for profiles and channels.

Any OpenAI client works unchanged: the ``model`` it names is a profile id
(answered by the profile's adapter, with a system prompt made from the
profile) or ``channel:<name>`` (the channel's adapter, no persona). Every
answer names what served it, in its body (``neurons``: adapter sha256,
profile, profile version, channel) and in headers
(``x-neurons-adapter-sha256``, ``x-neurons-profile-version``).

The route is resolved once, when a request starts (``domain.route`` over the
state ``state_source`` gives at that moment), and serves the request to its
end: a promotion that lands meanwhile serves the next request.

Bounds (``RequestLimits``): ``max_tokens`` is capped, ``concurrency``
requests use the model at once and ``queue`` more may wait; beyond that the
answer is 429 at once. Each request has ``timeout_s`` from start to its last
byte (504 past it). Model work runs in a thread, so the event loop keeps
accepting; a request that times out keeps its slot until its thread ends, so
the model is never asked for more than ``concurrency`` things at once.

Every refusal is an OpenAI error body ``{"error": {"message", "type",
"param", "code"}}``: 4xx for what the client can fix, 503 when the adapter
cannot be loaded (with the reason), never a 500 for a client's mistake. Like
the registry's API it binds loopback unless a token is set; with a token every
request carries ``Authorization: Bearer <token>`` (an OpenAI client's key).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import threading
import time
import uuid
from collections import defaultdict
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.serving.domain import (CHAT, COMPLETIONS, EMBEDDINGS, Checked, RequestLimits, Route, ServingError,
                                     ServingState, check_kind, check_request, error_body, models, route as route_for)
from services.serving.pool import AdapterUnavailable, Generation
from shared.http_server import binding_problem as http_binding_problem
from shared.http_server import require_bearer
from shared.metrics import Metrics
from shared.settings import Settings

log = logging.getLogger("neurons.serving.api")


# --- what the API asks of the model ---------------------------------------------------


class Pool(Protocol):
    """The adapters on the base model (``services.serving.pool.AdapterPool``); ``sha`` None is the base model."""

    def ensure(self, sha: str, uri: str) -> float: ...  # seconds it took to load; raises AdapterUnavailable
    def kind_of(self, sha: str) -> str | None: ...
    def generate(self, sha: str | None, prompt: str, *, max_tokens: int, temperature: float = 0.0,
                 stop: Sequence[str] | None = None) -> Generation: ...
    # the pieces of the text; the Generation is ``.generation`` of what it returns once they are exhausted
    def stream(self, sha: str | None, prompt: str, *, max_tokens: int, temperature: float = 0.0,
               stop: Sequence[str] | None = None) -> Iterator[str]: ...
    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> str: ...
    def embed(self, sha: str | None, texts: Sequence[str]) -> tuple[Sequence[Sequence[float]], int]: ...
    def status(self) -> Mapping[str, Any]: ...


# --- binding and the token ---------------------------------------------------------------


def binding_problem(host: str, token: str | None) -> str | None:
    """Why the API must not be served on ``host`` (off loopback with no token), or None."""
    return http_binding_problem("serving API", host, token, "NEURONS_SERVING_HOST")


def _unauthorised(detail: str) -> Response:
    return _error(ServingError(401, "invalid_api_key", f"{detail} (the API key of an OpenAI client)"),
                  headers={"WWW-Authenticate": 'Bearer realm="neurons"'})


# --- metrics ------------------------------------------------------------------------------


class ServingMetrics:
    """Requests, errors, tokens and latency per profile and adapter: OpenTelemetry instruments of the service.

    They are the serving service's ``Metrics`` (``shared.metrics``), so ``GET /metrics`` here and the
    service's metrics port show the same values, in the Prometheus text format.
    """

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics("serving")

    @staticmethod
    def labels(route: Route | None, endpoint: str) -> dict[str, str]:
        if route is None:  # refused before a route: the model asked for is the client's text, not a label
            return {"profile": "", "channel": "", "adapter": "", "endpoint": endpoint}
        return {"profile": route.profile_id or "", "channel": route.channel,
                "adapter": route.adapter_sha256 or "base", "endpoint": endpoint}

    def answered(self, labels: Mapping[str, str], status: int, code: str | None = None,
                 seconds: float | None = None) -> None:
        self.metrics.add("neurons_serving_requests_total", **labels, status=status)
        if code is not None:
            self.metrics.add("neurons_serving_errors_total", **labels, code=code)
        if seconds is not None:
            self.metrics.record("neurons_serving_request_duration_seconds", seconds, **labels, status=status)

    def generated(self, labels: Mapping[str, str], prompt_tokens: int, completion_tokens: int, seconds: float,
                  first_token_s: float | None) -> None:
        self.metrics.add("neurons_serving_prompt_tokens_total", prompt_tokens, **labels)
        self.metrics.add("neurons_serving_completion_tokens_total", completion_tokens, **labels)
        self.metrics.add("neurons_serving_generation_seconds_total", seconds, **labels)
        if seconds > 0:
            self.metrics.set("neurons_serving_tokens_per_second", completion_tokens / seconds, **labels)
        if first_token_s is not None:
            self.metrics.record("neurons_serving_time_to_first_token_seconds", first_token_s, **labels)

    def read(self, labels: Mapping[str, str] | None = None) -> dict[str, float]:
        """Each sample's total (``_count`` and ``_sum`` of a histogram apart) over the series that include ``labels``."""
        totals: dict[str, float] = defaultdict(float)
        wanted = set((labels or {}).items())
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                if family.name.startswith("neurons_serving_") and wanted <= set(sample.labels.items()):
                    totals[sample.name] += sample.value
        return dict(totals)

    def render(self) -> bytes:
        return self.metrics.render()


# --- admission: concurrency, queue, deadline ------------------------------------------------


class Admission:
    """``concurrency`` model jobs at once, ``queue`` more waiting, the rest refused with 429 at once."""

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        self.slots = asyncio.Semaphore(max(1, limits.concurrency))
        self.running = 0
        self.waiting = 0

    async def start(self, work: Callable[[], Any], deadline: float) -> asyncio.Future:
        """Wait for a slot until ``deadline`` (loop time), then run ``work`` in a thread that holds it to its end."""
        if self.slots.locked() and self.waiting >= self.limits.queue:
            raise ServingError(429, "queue_full", f"{self.running} requests are using the model and {self.waiting} "
                                                  "are waiting, the most this server queues; try again shortly")
        self.waiting += 1
        try:
            async with asyncio.timeout_at(deadline):
                await self.slots.acquire()
        except TimeoutError:
            raise ServingError(504, "timeout", f"no turn at the model within {self.limits.timeout_s:g} s") from None
        finally:
            self.waiting -= 1
        self.running += 1
        job = asyncio.ensure_future(asyncio.to_thread(work))
        job.add_done_callback(self._leave)
        return job

    async def run(self, work: Callable[[], Any], deadline: float) -> Any:
        """``work``'s result, or 504 at ``deadline`` (the thread then ends on its own, still holding its slot)."""
        job = await self.start(work, deadline)
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(job)
        except TimeoutError:
            if job.done():
                raise  # the work itself raised it
            raise ServingError(504, "timeout", f"the model did not answer within {self.limits.timeout_s:g} s") \
                from None

    def _leave(self, job: asyncio.Future) -> None:
        self.running -= 1
        self.slots.release()
        if not job.cancelled():
            job.exception()  # retrieved here too: a request that timed out no longer awaits it


class _Feed:
    """What a streaming model thread hands the request's coroutine, in order: ready, pieces, then done or error."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: asyncio.Queue = asyncio.Queue()
        self.stop = threading.Event()  # set by the reader: the client left or the deadline passed

    def put(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody reads any more
            self.stop.set()

    async def get(self, deadline: float, timeout_s: float) -> tuple[str, Any]:
        try:
            async with asyncio.timeout_at(deadline):
                kind, value = await self.items.get()
        except TimeoutError:
            self.stop.set()
            raise ServingError(504, "timeout", f"the model did not finish within {timeout_s:g} s") from None
        if kind == "error":
            raise value
        return kind, value


# --- the app ---------------------------------------------------------------------------------


def create_app(settings: Settings, state_source: Callable[[], ServingState], pool: Pool,
               limits: RequestLimits | None = None, metrics: ServingMetrics | None = None, *,
               host: str | None = None) -> FastAPI:
    """The API over ``pool``; ``state_source()`` gives the serving state now (called once per request);
    ``host``: the address it will be bound to (default ``settings.api_host``), refused off loopback with no token."""
    problem = binding_problem(host or settings.serving_host, settings.api_token)
    if problem:
        raise ValueError(problem)
    app = FastAPI(title="neurons serving", version="1",
                  description="OpenAI-compatible: each personality profile answered by the adapter it follows.")
    served = _Serving(state_source, pool, limits or RequestLimits(), metrics or ServingMetrics())
    app.state.serving = served

    @app.exception_handler(ServingError)
    async def refused(request: Request, exc: ServingError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(ServingError(exc.status_code, code, str(exc.detail)))

    if settings.api_token:
        require_bearer(app, settings.api_token, _unauthorised)
    _routes(app, served)
    return app


def _routes(app: FastAPI, served: "_Serving") -> None:
    @app.post("/v1/embeddings", tags=["openai"])
    async def embeddings(request: Request) -> Response:
        return await served.answer(request, EMBEDDINGS)

    @app.post("/v1/completions", tags=["openai"])
    async def completions(request: Request) -> Response:
        return await served.answer(request, COMPLETIONS)

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(request: Request) -> Response:
        return await served.answer(request, CHAT)

    @app.get("/v1/models", tags=["openai"])
    def list_models() -> dict:
        return {"object": "list", "data": models(served.state_source())}

    @app.get("/v1/models/{model:path}", tags=["openai"])
    def retrieve_model(model: str) -> dict:
        for entry in models(served.state_source()):
            if entry["id"] == model:
                return entry
        raise ServingError(404, "model_not_found", f"the model {model!r} does not exist", "model")

    @app.get("/metrics", tags=["meta"], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(served.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/status", tags=["meta"])
    def status() -> dict:
        admission = served.admission
        return {"running": admission.running, "waiting": admission.waiting, "limits": vars(served.limits),
                "pool": dict(served.pool.status())}


class _Serving:
    """One request from body to answer: check, route once, admit, run the model in a thread, answer."""

    def __init__(self, state_source: Callable[[], ServingState], pool: Pool, limits: RequestLimits,
                 metrics: ServingMetrics) -> None:
        self.state_source = state_source
        self.pool = pool
        self.limits = limits
        self.metrics = metrics
        self.admission = Admission(limits)

    async def answer(self, request: Request, endpoint: str) -> Response:
        route: Route | None = None
        started = time.perf_counter()
        try:
            checked = check_request(endpoint, await self._body(request), self.limits)
            route = route_for(self.state_source(), checked.model)  # once: this route serves to the end
            if route.base or route.kind is not None:
                check_kind(route, endpoint)  # refused before it waits for the model
            deadline = asyncio.get_running_loop().time() + self.limits.timeout_s
            if endpoint == EMBEDDINGS:
                return await self._embeddings(checked, route, deadline)
            if checked.stream:
                return await self._stream(checked, route, endpoint, deadline)
            return await self._generate(checked, route, endpoint, deadline)
        except Exception as exc:
            error = _as_error(exc, endpoint)
            self.metrics.answered(self.metrics.labels(route, endpoint), error.status, error.code,
                                  time.perf_counter() - started)
            return _error(error, _headers(route) if route else None)

    async def _body(self, request: Request) -> Any:
        declared = request.headers.get("content-length", "")
        if (declared.isdigit() and int(declared) > self.limits.max_body_bytes) or \
                len(raw := await request.body()) > self.limits.max_body_bytes:
            raise ServingError(413, "body_too_large", f"the body is over {self.limits.max_body_bytes} bytes")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ServingError(400, "invalid_json", "the body must be JSON (Content-Type: application/json)") \
                from None

    def _ready(self, route: Route, endpoint: str) -> Route:
        """In the model's thread: the adapter loaded (and verified by the pool), its kind known and right."""
        if route.base:
            return route
        self.pool.ensure(route.adapter_sha256, route.adapter_uri)
        if route.kind is None:
            route = route.with_kind(self.pool.kind_of(route.adapter_sha256))
            check_kind(route, endpoint)
        return route

    def _prompt(self, checked: Checked, route: Route) -> str:
        if checked.prompt is not None:
            return checked.prompt  # a completion continues the client's text as it is
        persona = [{"role": "system", "content": route.system_prompt}] if route.system_prompt else []
        return self.pool.chat_prompt([*persona, *checked.messages])

    async def _embeddings(self, checked: Checked, route: Route, deadline: float) -> Response:
        def work():
            ready = self._ready(route, EMBEDDINGS)
            try:
                return ready, self.pool.embed(ready.adapter_sha256, list(checked.texts))
            except ValueError as exc:  # the pool's word for a text that tokenizes to nothing
                raise ServingError(400, "invalid_input", str(exc), "input") from None

        started = time.perf_counter()
        route, (vectors, tokens) = await self.admission.run(work, deadline)
        vectors = [[float(x) for x in vector] for vector in vectors]
        if checked.dimensions is not None and vectors and len(vectors[0]) != checked.dimensions:
            raise ServingError(400, "dimensions_unsupported", f"this model embeds in {len(vectors[0])} "
                                                              "dimensions and cannot shorten them", "dimensions")
        labels = self.metrics.labels(route, EMBEDDINGS)
        self.metrics.generated(labels, int(tokens), 0, time.perf_counter() - started, None)
        self.metrics.answered(labels, 200, seconds=time.perf_counter() - started)
        data = [{"object": "embedding", "index": i, "embedding": _encoded(vector, checked.encoding_format)}
                for i, vector in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": checked.model,
                             "usage": {"prompt_tokens": int(tokens), "total_tokens": int(tokens)},
                             "neurons": _served(route)}, headers=_headers(route))

    async def _generate(self, checked: Checked, route: Route, endpoint: str, deadline: float) -> Response:
        def work():
            ready = self._ready(route, endpoint)
            return ready, self.pool.generate(ready.adapter_sha256, self._prompt(checked, ready),
                                             max_tokens=checked.max_tokens, temperature=checked.temperature,
                                             stop=list(checked.stop) or None)

        started = time.perf_counter()
        route, generation = await self.admission.run(work, deadline)
        self._count(route, endpoint, generation, started=started)
        shape = _Shape(endpoint, checked, route)
        return JSONResponse(shape.whole(generation), headers=_headers(route))

    def _count(self, route: Route, endpoint: str, generation: Generation, first_token_s: float | None = None, *,
               started: float) -> None:
        labels = self.metrics.labels(route, endpoint)
        first = generation.first_token_s if generation.first_token_s is not None else first_token_s
        self.metrics.generated(labels, generation.prompt_tokens, generation.completion_tokens, generation.seconds,
                               first)
        self.metrics.answered(labels, 200, seconds=time.perf_counter() - started)

    async def _stream(self, checked: Checked, route: Route, endpoint: str, deadline: float) -> Response:
        feed = _Feed(asyncio.get_running_loop())

        def work():
            try:
                ready = self._ready(route, endpoint)
                feed.put("ready", ready)
                feed.put("done", self._pieces(feed, ready, checked))
            except BaseException as exc:  # handed to the reader, who answers with it
                feed.put("error", exc)

        started = time.perf_counter()
        await self.admission.start(work, deadline)
        _, route = await feed.get(deadline, self.limits.timeout_s)  # errors before the first byte: a plain answer
        events = self._events(feed, _Shape(endpoint, checked, route), deadline, started)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={**_headers(route), "cache-control": "no-cache", "x-accel-buffering": "no"})

    def _pieces(self, feed: _Feed, route: Route, checked: Checked) -> Generation:
        """In the model's thread: hand each piece on until the end, or until the reader stops listening."""
        pieces = self.pool.stream(route.adapter_sha256, self._prompt(checked, route), max_tokens=checked.max_tokens,
                                  temperature=checked.temperature, stop=list(checked.stop) or None)
        iterator = iter(pieces)
        try:
            while not feed.stop.is_set():
                try:
                    feed.put("piece", next(iterator))
                except StopIteration as end:
                    if end.value is not None:
                        return end.value
                    break
        finally:
            if feed.stop.is_set() and hasattr(iterator, "close"):
                iterator.close()
        generation = getattr(pieces, "generation", None) or getattr(pieces, "result", None)
        if generation is None and not feed.stop.is_set():
            raise RuntimeError("the pool's stream ended without its Generation")
        return generation

    async def _events(self, feed: _Feed, shape: "_Shape", deadline: float, started: float):
        first_token_s = None
        try:
            yield _sse(shape.opening())
            while True:
                kind, value = await feed.get(deadline, self.limits.timeout_s)
                if kind == "done":
                    break
                first_token_s = first_token_s if first_token_s is not None else time.perf_counter() - started
                yield _sse(shape.piece(value))
            yield _sse(shape.closing(value.finish_reason))
            if shape.checked.include_usage:
                yield _sse(shape.usage(value))
            yield "data: [DONE]\n\n"
            self._count(shape.route, shape.endpoint, value, first_token_s, started=started)
        except Exception as exc:  # the status went out with the first byte: the error is the last event
            error = _as_error(exc, shape.endpoint)
            self.metrics.answered(self.metrics.labels(shape.route, shape.endpoint), error.status, error.code,
                                  time.perf_counter() - started)
            yield _sse(error_body(error))
        finally:
            feed.stop.set()


# --- answers as OpenAI writes them ----------------------------------------------------------


class _Shape:
    """The body of one answer, whole or as stream chunks, for the endpoint asked."""

    def __init__(self, endpoint: str, checked: Checked, route: Route) -> None:
        self.endpoint, self.checked, self.route = endpoint, checked, route
        self.chat = endpoint == CHAT
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _frame(self, obj: str, choices: list, **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.checked.model,
                "system_fingerprint": _fingerprint(self.route), "choices": choices, **extra,
                "neurons": _served(self.route)}

    def whole(self, generation: Generation) -> dict[str, Any]:
        usage = _usage(generation)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": generation.text},
                      "logprobs": None, "finish_reason": generation.finish_reason}
            return self._frame("chat.completion", [choice], usage=usage)
        choice = {"index": 0, "text": generation.text, "logprobs": None, "finish_reason": generation.finish_reason}
        return self._frame("text_completion", [choice], usage=usage)

    def _chunk(self, delta: dict[str, Any] | None, text: str, finish_reason: str | None) -> dict[str, Any]:
        extra = {"usage": None} if self.checked.include_usage else {}
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._frame("chat.completion.chunk", [choice], **extra)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._frame("text_completion", [choice], **extra)

    def opening(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, "", None)

    def piece(self, text: str) -> dict[str, Any]:
        return self._chunk({"content": text}, text, None)

    def closing(self, finish_reason: str) -> dict[str, Any]:
        return self._chunk({}, "", finish_reason)

    def usage(self, generation: Generation) -> dict[str, Any]:
        return self._frame("chat.completion.chunk" if self.chat else "text_completion", [],
                           usage=_usage(generation))


def _usage(generation: Generation) -> dict[str, int]:
    return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens}


def _served(route: Route) -> dict[str, Any]:
    return {"adapter_sha256": route.adapter_sha256, "adapter_kind": route.kind, "profile": route.profile_id,
            "profile_version": route.profile_version, "channel": route.channel}


def _fingerprint(route: Route) -> str:
    return f"neurons-{route.adapter_sha256[:16]}" if route.adapter_sha256 else "neurons-base"


def _headers(route: Route) -> dict[str, str]:
    headers = {"x-neurons-adapter-sha256": route.adapter_sha256 or "base", "x-neurons-channel": route.channel}
    if route.profile_id is not None:
        headers["x-neurons-profile"] = route.profile_id
        headers["x-neurons-profile-version"] = str(route.profile_version)
    return headers


def _encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def _sse(body: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _as_error(exc: BaseException, endpoint: str) -> ServingError:
    """The answer a failure gets: itself, 503 for an adapter that cannot be loaded, else a 500 (logged)."""
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, AdapterUnavailable):
        return ServingError(503, "adapter_unavailable", f"the adapter cannot be served now: {exc.reason}")
    log.error("%s failed", endpoint, exc_info=exc)  # a fault of the server, not of the request
    return ServingError(500, "server_error", f"the model failed ({type(exc).__name__}); see the serving log")


def _error(error: ServingError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if error.status in (429, 503):
        headers.setdefault("retry-after", "1")
    return JSONResponse(error_body(error), status_code=error.status, headers=headers)

"""The runtime every service is wired on: a faust worker with idempotent handlers.

A service declares the aggregate types it reads and the handlers it runs::

    service = Service("approval", reads=["cycle", "research", "validation"])
    approvals = Decider(domain, from_rows=domain.ApprovalState.from_rows)  # shared.decider

    @service.handles("cycle.proposed")
    def on_proposed(event, ctx):
        approvals.run(ctx, event, config)  # decides, stages the events, saves the state's rows

Each record is decoded and its signature and producer checked against the
contract of who may write what (``shared.trust_view``); a malformed or
unauthorised one goes to ``neurons.dlq`` with its reason and the worker keeps
consuming. Then its handler runs inside one SQL
transaction that also records (consumer, event_id), stores the emitted
events in the outbox (those the handler returns, or those its decider staged)
and the state they lead to. After the commit the outbox is published. A handler that
keeps failing dead-letters the event. A span around each handler continues
the trace carried in the record's headers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Awaitable, Callable, Iterable, Iterator

import faust
from aiokafka.errors import KafkaError
from opentelemetry import trace
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from shared.contracts import schemas
from shared.bus import MalformedEvent, Publisher, decode, validate
from shared.db import engine_for
from shared.metrics import Metrics, metrics_address
from shared.contracts.envelope import Envelope, NewEvent, Producer, seal, utcnow
from shared.contracts.signing import Refused
from shared.trust_view import TrustView
from shared.settings import Settings
from shared.store import (
    OutboxEvent,
    StateStore,
    already_processed,
    mark_processed,
    next_sequence,
    observe_sequence,
    outbox_depth,
)
from shared.topics import TopicKeeper, group_id, topic_for
from shared.tracing import context_from_traceparent, continued, current_traceparent, extract_context, setup_tracing

def _short_fetch_wait(wait_ms: int) -> None:
    """faust asks the broker to hold every fetch up to 1.5 s; an event then waits that long.

    Brokers that hold a fetch for its whole wait even when records arrive (the
    embedded one does) would add that to every hop of a cycle, so the worker's
    consumer asks for ``wait_ms`` instead.
    """
    import types

    import aiokafka
    import faust.transport.drivers.aiokafka as driver

    class ShortWaitConsumer(aiokafka.AIOKafkaConsumer):
        def __init__(self, *args, **kwargs):
            kwargs["fetch_max_wait_ms"] = wait_ms
            super().__init__(*args, **kwargs)

    shim = types.SimpleNamespace(**vars(aiokafka))
    shim.AIOKafkaConsumer = ShortWaitConsumer
    driver.aiokafka = shim


def _faust_credentials(security: dict):
    """The same login as every other client of this process, in faust's terms (None: no login)."""
    if "sasl_mechanism" in security:
        return faust.SASLCredentials(username=security["sasl_plain_username"], password=security["sasl_plain_password"],
                                     mechanism=security["sasl_mechanism"], ssl_context=security.get("ssl_context"))
    if "ssl_context" in security:
        return faust.SSLCredentials(security["ssl_context"])
    return None


Handler = Callable[[Envelope, "HandlerContext"], Iterable[NewEvent] | None]
TimerFn = Callable[["HandlerContext"], Iterable[NewEvent] | None]


@dataclass
class HandlerContext:
    """What a handler may touch: its transaction, its state, the clock."""

    service: "Service"
    session: Session
    event: Envelope | None
    now: datetime
    after_commit: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_commit: list[Callable[[], None]] = field(default_factory=list)
    # what each decider (shared.decider) saved in this transaction, until the commit makes it the state
    staged: dict[Any, Any] = field(default_factory=dict)
    # the record's value as it was published (and signed), before any upcasting; None outside a record
    raw: bytes | None = None

    @property
    def state(self) -> StateStore:
        return StateStore(self.session, self.service.name)

    @property
    def settings(self) -> Settings:
        return self.service.settings

    def later(self, coro_fn: Callable[[], Awaitable[None]]) -> None:
        """Start ``coro_fn`` as a background task once the transaction has committed (a job, a soak)."""
        self.after_commit.append(coro_fn)

    def committed(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` right after the commit, before anything else runs: in-memory state follows the database."""
        self.on_commit.append(fn)


class Service:
    def __init__(
        self,
        name: str,
        reads: Iterable[str],
        *,
        settings: Settings | None = None,
        tracer_provider=None,
    ) -> None:
        self.name = name
        # every service follows the operators' enrolments: they decide whose signatures count
        self.reads = list(dict.fromkeys([*reads, "operator"]))
        self.settings = settings or Settings.from_env()
        self.trust = TrustView(self.settings)
        self.consumer = group_id(name)
        self.log = logging.getLogger(f"neurons.{name}")
        self._handlers: dict[str, Handler] = {}
        self._any_handler: Handler | None = None
        self._timers: list[tuple[float, float, TimerFn]] = []
        self._startup: list[Callable[["Service"], Awaitable[None]]] = []
        self._engine: Engine | None = None
        self._publisher: Publisher | None = None
        self._publisher_lock: asyncio.Lock | None = None
        self._flush_lock: asyncio.Lock | None = None
        self._relay_waiting = False  # the last relay found the broker away
        self.tracer_provider = tracer_provider or setup_tracing(name, self.settings)
        self.tracer = self.tracer_provider.get_tracer(f"neurons.{name}")
        self.metrics = Metrics(name, self.settings)  # shared.metrics: what /metrics shows
        self._lag: dict[tuple[str, int], int] = {}
        self._outbox_depth: int | None = None
        self.metrics.observe("neurons_consumer_lag", lambda: [
            (lag, {"topic": topic, "partition": partition}) for (topic, partition), lag in sorted(self._lag.items())])
        self.metrics.observe("neurons_outbox_depth",
                             lambda: [] if self._outbox_depth is None else [(self._outbox_depth, {})])
        self.producer_info = Producer(service=name, node=self.settings.node)
        self.background: set[asyncio.Task] = set()

    # --- declaration -------------------------------------------------------
    def handles(self, *event_types: str) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            for event_type in event_types:
                if event_type == "*":
                    self._any_handler = fn
                else:
                    self._handlers[event_type] = fn
            return fn

        return register

    def every(self, seconds: float, jitter: float = 0.0) -> Callable[[TimerFn], TimerFn]:
        def register(fn: TimerFn) -> TimerFn:
            self._timers.append((seconds, jitter, fn))
            return fn

        return register

    def on_start(self, fn: Callable[["Service"], Awaitable[None]]):
        self._startup.append(fn)
        return fn

    # --- resources ---------------------------------------------------------
    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = engine_for(self.settings.db_url(self.name))
        return self._engine

    async def publisher(self) -> Publisher:
        if self._publisher_lock is None:
            self._publisher_lock = asyncio.Lock()
        async with self._publisher_lock:
            if self._publisher is None:
                from shared.keys import require_service_signer

                publisher = Publisher(self.settings, self.name, self.tracer_provider,
                                      signer=require_service_signer(self.settings, self.name), metrics=self.metrics)
                await publisher.start()
                self._publisher = publisher
        return self._publisher

    async def close(self) -> None:
        for task in list(self.background):
            task.cancel()
        if self._publisher is not None:
            await self._publisher.stop()
            self._publisher = None
        await self.trust.close()
        self.tracer_provider.force_flush()

    # --- transactions ------------------------------------------------------
    @contextmanager
    def transaction(self, event: Envelope | None = None) -> Iterator[HandlerContext]:
        with Session(self.engine, expire_on_commit=False) as session:
            ctx = HandlerContext(self, session, event, utcnow())
            yield ctx
            session.commit()
        for fn in ctx.on_commit:
            fn()

    def stage(self, ctx: HandlerContext, events: Iterable[NewEvent] | None, *,
              correlation_id: str | None = None, causation_id: str | None = None) -> list[Envelope]:
        """Seal events into envelopes and put them in the outbox of ``ctx``'s transaction."""
        sealed = []
        parent = ctx.event
        traceparent = current_traceparent()
        for new in events or ():
            if not isinstance(new, NewEvent):  # an Envelope is already sealed and staged (Decider.run returns those)
                raise TypeError(f"a handler returns NewEvents to stage, not {type(new).__name__}")
            corr = new.correlation_id or correlation_id or (parent.correlation_id if parent else new.aggregate_id)
            envelope = seal(
                new,
                sequence=next_sequence(ctx.session, self.name, new.aggregate_type, new.aggregate_id),
                producer=self.producer_info,
                correlation_id=corr,
                causation_id=causation_id or (parent.event_id if parent else None),
                schema_version=schemas.current_version(new.type),
            )
            validate(envelope)  # refuse to stage what the contract rejects; publishing trusts the outbox
            ctx.session.add(
                OutboxEvent(
                    service=self.name,
                    event_id=envelope.event_id,
                    aggregate_type=envelope.aggregate_type,
                    aggregate_id=envelope.aggregate_id,
                    sequence=envelope.sequence,
                    envelope_json=envelope.to_json().decode(),
                    traceparent=traceparent,
                )
            )
            sealed.append(envelope)
        return sealed

    async def emit(self, events: Iterable[NewEvent], *, correlation_id: str | None = None,
                   causation_id: str | None = None, traceparent: str | None = None) -> list[Envelope]:
        """Emit events from outside a handler (a finished job, a timer)."""
        with continued(traceparent), self.transaction() as ctx:
            sealed = self.stage(ctx, events, correlation_id=correlation_id, causation_id=causation_id)
        await self.relay()
        return sealed

    async def flush_outbox(self) -> int:
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()
        async with self._flush_lock:
            with Session(self.engine, expire_on_commit=False) as session:
                rows = session.exec(
                    select(OutboxEvent)
                    .where(OutboxEvent.service == self.name, OutboxEvent.published_at.is_(None))
                    .order_by(OutboxEvent.id)
                ).all()
            if not rows:
                return 0
            publisher = await self.publisher()
            await publisher.publish_many([Envelope.from_json(row.envelope_json) for row in rows],
                                         contexts=[context_from_traceparent(row.traceparent) for row in rows],
                                         validated=True, values=[row.envelope_json.encode() for row in rows])
            with Session(self.engine) as session:
                now = utcnow()
                for row in rows:
                    row.published_at = now
                    session.add(row)
                session.commit()
            return len(rows)

    async def relay(self) -> int:
        """``flush_outbox``, but a broker that is away is no error: the events stay in the outbox and the
        relay timer publishes them when it is back (a restarted broker, a network cut)."""
        try:
            count = await self.flush_outbox()
        except (KafkaError, OSError, asyncio.TimeoutError) as exc:
            if not self._relay_waiting:
                self.log.warning("outbox not published, the broker did not take it (%r): the relay tries again "
                                 "every 2 s", exc)
            self._relay_waiting = True
            return 0
        if self._relay_waiting:
            self.log.info("outbox published again: the broker takes events")
            self._relay_waiting = False
        return count

    def own_events(self) -> list[Envelope]:
        """Every event this service has emitted, in order: its own event store.

        A service whose state is a fold of its own decisions rebuilds it from
        here at start-up instead of keeping a side file.
        """
        with Session(self.engine) as session:
            rows = session.exec(
                select(OutboxEvent).where(OutboxEvent.service == self.name).order_by(OutboxEvent.id)
            ).all()
        return [Envelope.from_json(row.envelope_json) for row in rows]

    # --- consuming ---------------------------------------------------------
    def _apply(self, envelope: Envelope, raw: bytes | None = None) -> list[Callable[[], Awaitable[None]]]:
        handler = self._handlers.get(envelope.type) or self._any_handler
        with self.transaction(envelope) as ctx:
            ctx.raw = raw
            if already_processed(ctx.session, self.consumer, envelope.event_id):
                return []
            observe_sequence(ctx.session, self.name, envelope)
            if handler is not None:
                self.stage(ctx, handler(envelope, ctx))
            mark_processed(ctx.session, self.consumer, envelope)
        return ctx.after_commit

    def _mark_dead(self, envelope: Envelope) -> None:
        with self.transaction(envelope) as ctx:
            if not already_processed(ctx.session, self.consumer, envelope.event_id):
                mark_processed(ctx.session, self.consumer, envelope, outcome="dead_lettered")

    async def process(self, value: bytes | None, key: bytes | None, headers, topic: str,
                      partition: int, offset: int) -> Envelope | None:
        """Handle one record; returns the event, or None when it was dead-lettered."""
        try:
            try:
                envelope = decode(value, admit=self.trust.admit)
            except Refused as refused:
                if refused.reason != "unknown_key" or not await self.trust.catch_up():
                    raise
                envelope = decode(value, admit=self.trust.admit)  # the log enrolled keys since: once more
        except (MalformedEvent, Refused) as exc:
            reason, kind = (exc.reason, exc.kind) if isinstance(exc, MalformedEvent) else (str(exc), exc.reason)
            publisher = await self.publisher()
            await publisher.dead_letter(value=value, key=key, headers=headers, source_topic=topic,
                                        partition=partition, offset=offset, reason=reason,
                                        kind=kind, consumer=self.consumer)
            return None
        if envelope.aggregate_type == "operator":
            self.trust.fold(envelope)
        self.metrics.add("neurons_events_consumed_total", type=envelope.type)
        if envelope.type not in self._handlers and self._any_handler is None:
            return envelope
        parent = extract_context(headers)
        started = time.perf_counter()
        with self.tracer.start_as_current_span(
            f"{self.name} handle {envelope.type}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={"neurons.event_id": envelope.event_id, "neurons.event_type": envelope.type,
                        "neurons.correlation_id": envelope.correlation_id},
        ) as span:
            error: Exception | None = None
            for attempt in range(self.settings.handler_retries):
                try:
                    callbacks = self._apply(envelope, value)
                    error = None
                    break
                except Exception as exc:  # a handler bug or a transient store error
                    error = exc
                    self.log.warning("handler for %s failed (attempt %d): %r", envelope.type, attempt + 1, exc)
                    await asyncio.sleep(0.2 * (attempt + 1))
            if error is not None:
                span.record_exception(error)
                self._mark_dead(envelope)
                publisher = await self.publisher()
                await publisher.dead_letter(value=value, key=key, headers=headers, source_topic=topic,
                                            partition=partition, offset=offset,
                                            reason=f"handler failed {self.settings.handler_retries} times: {error!r}",
                                            kind="handler_failed", consumer=self.consumer)
                return None
            await self.relay()
        self.metrics.record("neurons_handler_duration_seconds", time.perf_counter() - started, type=envelope.type)
        for callback in callbacks:
            self.spawn(callback())
        return envelope

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("background task failed: %r", task.exception(), exc_info=task.exception())

    async def run_timer(self, fn: TimerFn) -> None:
        with self.tracer.start_as_current_span(f"{self.name} timer {fn.__name__}"):
            with self.transaction() as ctx:
                self.stage(ctx, fn(ctx))
            await self.relay()
        for callback in ctx.after_commit:
            self.spawn(callback())

    # --- the faust worker -------------------------------------------------
    def build_app(self) -> faust.App:
        s = self.settings
        _short_fetch_wait(s.fetch_wait_ms)
        (s.var_dir / "faust" / self.name).mkdir(parents=True, exist_ok=True)
        bootstrap = ";".join(f"kafka://{b.strip()}" for b in s.bootstrap().split(","))
        app = faust.App(
            self.consumer,
            broker=bootstrap,
            value_serializer="raw",
            key_serializer="raw",
            web_enabled=False,
            topic_allow_declare=False,
            topic_disable_leader=True,
            store="memory://",
            datadir=str(s.var_dir / "faust" / self.name),
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=s.session_timeout_s,
            broker_heartbeat_interval=1.0,
            broker_rebalance_timeout=max(10.0, s.session_timeout_s * 2),
            broker_commit_interval=1.0,
            stream_wait_empty=False,
            producer_acks=-1,
            broker_credentials=_faust_credentials(s.kafka_security()),
        )
        channel = app.topic(*[topic_for(a) for a in self.reads], value_type=bytes, key_type=bytes,
                            value_serializer="raw", key_serializer="raw")

        async def consume(stream):
            async for event in stream.events():
                msg = event.message
                await self.process(event.value, msg.key, msg.headers, msg.topic, msg.partition, msg.offset)

        consume.__name__ = f"{self.name}_consume"
        app.agent(channel, name=f"{self.name}.consume")(consume)

        async def startup() -> None:
            try:
                await self.trust.catch_up()  # the operators the log has enrolled so far
            except Exception:  # an unknown key makes the service read the topic again
                self.log.exception("could not read the operators' enrolments at start-up")
            await self.relay()  # what a crash left unpublished
            for fn in self._startup:
                await fn(self)
            self.log.info("service %s ready (reads %s)", self.name, ", ".join(self.reads))

        app.task(startup)

        @app.on_rebalance_complete.connect
        async def ready(sender, **kwargs) -> None:
            # The group has handed out partitions: from here on this worker reads.
            marker = self.settings.run_dir / f"{self.name}.ready"
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(os.getpid()))
            self.log.info("service %s joined group %s", self.name, self.consumer)

        for seconds, jitter, fn in self._timers:
            app.task(self._timer_loop(seconds, jitter, fn))

        @app.timer(2.0)
        async def relay_outbox() -> None:
            await self.relay()

        topics = TopicKeeper(s)

        @app.timer(5.0)
        async def keep_topics() -> None:
            await topics.check()  # a broker that came back empty gets the topics again

        @app.timer(5.0)
        async def measure_backlog() -> None:
            await self.measure_backlog()

        self.app = app
        return app

    async def measure_backlog(self) -> None:
        """Refresh what the backlog gauges show: the outbox's depth and the consumer's lag per partition."""
        with Session(self.engine) as session:
            self._outbox_depth = outbox_depth(session, self.name)
        app = getattr(self, "app", None)
        try:
            consumer = app.consumer if app is not None else None
            assigned = sorted(consumer.assignment()) if consumer is not None else []
            if not assigned:
                return
            ends = await asyncio.wait_for(consumer.highwaters(*assigned), timeout=5.0)
            lag = {}
            for tp in assigned:
                position = await asyncio.wait_for(consumer.position(tp), timeout=5.0)
                if ends.get(tp) is not None and position is not None:
                    lag[(tp.topic, tp.partition)] = max(0, ends[tp] - position)
            self._lag = lag
        except Exception as exc:  # not started yet, or rebalancing: the last values stand
            self.log.debug("consumer lag not measured: %r", exc)

    def serve_metrics(self) -> str:
        """Answer GET /metrics (NEURONS_METRICS_HOST:NEURONS_METRICS_PORT) and write its URL where status reads it."""
        url = self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port,
                                 metrics_address(self.settings, self.name))
        self.log.info("metrics at %s", url)
        return url

    def _timer_loop(self, seconds: float, jitter: float, fn: TimerFn):
        async def loop() -> None:
            rng = random.Random()
            while True:
                await asyncio.sleep(seconds + rng.uniform(0, jitter))
                try:
                    await self.run_timer(fn)
                except Exception:
                    self.log.exception("timer %s failed", fn.__name__)

        loop.__name__ = f"{self.name}_{fn.__name__}_loop"
        return loop

    def main(self) -> None:
        """Run the worker until SIGTERM; ``python -m services.<name>`` calls this."""
        from shared.db import require_head
        from shared.topics import ensure_topics

        require_head(self.settings.db_url(self.name), self.name)  # else one line: run neurons db upgrade
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
        asyncio.run(ensure_topics(self.settings))
        self.serve_metrics()
        app = self.build_app()
        sys.argv = [f"neurons-{self.name}", "worker", "--loglevel", "info", "--without-web"]
        app.main()

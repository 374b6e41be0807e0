"""Publishing and reading events on Kafka.

The publisher validates every payload against its schema, keys the record by
aggregate_id (order holds per aggregate), and sets the headers tools route on:
``traceparent``/``tracestate`` (W3C), ``event_type``, ``schema_version`` and
``event_id``. ``decode`` is the consuming side: anything that is not a valid
event raises ``MalformedEvent`` with the reason that goes to the dead-letter
topic.
"""

from __future__ import annotations

import json
import logging
from typing import Sequence

from aiokafka import AIOKafkaProducer
from opentelemetry import trace
from pydantic import ValidationError

from shared import schemas
from shared.envelope import Envelope
from shared.settings import Settings
from shared.topics import dlq_topic, topic_for
from shared.tracing import inject_headers

log = logging.getLogger("neurons.bus")
Headers = Sequence[tuple[str, bytes]]


class MalformedEvent(ValueError):
    """A record that is not a valid event; ``reason`` says why."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # bad_json | bad_envelope | unknown_type | schema_violation


def validate(envelope: Envelope) -> None:
    if envelope.type.split(".", 1)[0] != envelope.aggregate_type:
        raise schemas.SchemaError(
            f"type {envelope.type} does not belong to aggregate type {envelope.aggregate_type}"
        )
    schemas.validate_payload(envelope.type, envelope.schema_version, envelope.payload)


def decode(raw: bytes | None) -> Envelope:
    """Parse, validate and upcast one record value."""
    if raw is None:
        raise MalformedEvent("empty record value", "bad_json")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedEvent(f"not JSON: {exc}", "bad_json") from None
    if not isinstance(data, dict):
        raise MalformedEvent("not a JSON object", "bad_envelope")
    try:
        envelope = Envelope.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "envelope"
        raise MalformedEvent(f"bad envelope: {where}: {first['msg']}", "bad_envelope") from None
    try:
        if envelope.type not in schemas.event_types():
            raise MalformedEvent(f"unknown event type {envelope.type!r}", "unknown_type")
        validate(envelope)
        version, payload = schemas.upcast(envelope.type, envelope.schema_version, envelope.payload)
    except schemas.SchemaError as exc:
        raise MalformedEvent(str(exc), "schema_violation") from None
    if version != envelope.schema_version:
        envelope = envelope.with_payload(payload, version)
    return envelope


def decode_batch(batch) -> list[Envelope]:
    """The valid events of one consumer poll (``getmany``); tools that only read skip the rest."""
    events = []
    for records in batch.values():
        for record in records:
            try:
                events.append(decode(record.value))
            except MalformedEvent:
                continue
    return events


def event_headers(envelope: Envelope, traceparent_headers: Headers | None = None) -> list[tuple[str, bytes]]:
    headers = list(traceparent_headers if traceparent_headers is not None else inject_headers())
    headers += [
        ("event_type", envelope.type.encode()),
        ("schema_version", str(envelope.schema_version).encode()),
        ("event_id", envelope.event_id.encode()),
    ]
    return headers


class Publisher:
    """An aiokafka producer that only ever writes valid, traced events."""

    def __init__(self, settings: Settings, service: str, tracer_provider=None) -> None:
        self.settings = settings
        self.service = service
        self._producer: AIOKafkaProducer | None = None
        if tracer_provider is None:
            from shared.tracing import setup_tracing

            # every event carries a traceparent, even from a tool that set up no tracing
            tracer_provider = setup_tracing(service, settings)
        self._tracer = tracer_provider.get_tracer("neurons.bus")

    async def start(self) -> None:
        # acks=all with no idempotence: at-least-once, and consumers de-duplicate
        # on event_id (the embedded broker has no idempotent producer).
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.bootstrap(),
            client_id=f"neurons-{self.service}",
            acks="all",
            enable_idempotence=False,
            linger_ms=0,
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def __aenter__(self) -> "Publisher":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("publisher not started")
        return self._producer

    async def publish(self, envelope: Envelope, *, wait: bool = True, context=None, validated: bool = False) -> None:
        """Send one event; ``validated`` is for envelopes checked when they were staged in an outbox."""
        if not validated:
            validate(envelope)
        topic = topic_for(envelope.aggregate_type)
        with self._tracer.start_as_current_span(
            f"publish {envelope.type}",
            context=context,
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": topic,
                "neurons.event_type": envelope.type,
                "neurons.event_id": envelope.event_id,
                "neurons.aggregate_id": envelope.aggregate_id,
                "neurons.correlation_id": envelope.correlation_id,
            },
        ):
            future = await self.producer.send(
                topic,
                value=envelope.to_json(),
                key=envelope.aggregate_id.encode(),
                headers=event_headers(envelope),
            )
        if wait:
            await future

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        for envelope in envelopes:
            await self.publish(envelope, wait=False)
        await self.producer.flush()

    async def send_raw(self, topic: str, value: bytes | None, key: bytes | None = None,
                       headers: Headers | None = None) -> None:
        await (await self.producer.send(topic, value=value, key=key, headers=list(headers or [])))

    async def dead_letter(
        self,
        *,
        value: bytes | None,
        key: bytes | None,
        headers: Headers | None,
        source_topic: str,
        partition: int,
        offset: int,
        reason: str,
        kind: str,
        consumer: str,
    ) -> None:
        """Park a record on neurons.dlq with why, where it came from and who refused it."""
        dlq_headers = [(k, v) for k, v in (headers or []) if not k.startswith("dlq_")]
        dlq_headers += [
            ("dlq_reason", reason.encode()[:4000]),
            ("dlq_kind", kind.encode()),
            ("dlq_consumer", consumer.encode()),
            ("dlq_source_topic", source_topic.encode()),
            ("dlq_source_partition", str(partition).encode()),
            ("dlq_source_offset", str(offset).encode()),
        ]
        log.warning("dead-lettered %s[%s]@%s by %s: %s", source_topic, partition, offset, consumer, reason)
        await self.send_raw(dlq_topic(), value, key, dlq_headers)

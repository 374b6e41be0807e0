"""Publishing and reading events on Kafka.

The publisher validates every payload against its schema, keys the record by
aggregate_id (order holds per aggregate), and sets the headers tools route on:
``traceparent``/``tracestate`` (W3C), ``event_type``, ``schema_version`` and
``event_id``. ``decode`` is the consuming side: anything that is not a valid
event raises ``MalformedEvent`` with the reason that goes to the dead-letter
topic.

``publish`` hands one record to aiokafka's ``send``. ``publish_many`` (what the
outbox relay uses) fills record batches itself, one per topic and partition,
putting each record on the partition ``send`` would have chosen (aiokafka's
default partitioner: murmur2 of the key), with the same key, value and headers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from typing import Callable, Iterable, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode
from pydantic import ValidationError

from shared.contracts import schemas
from shared.contracts.envelope import Envelope, loads, orjson_compact, read_canonical
from shared.contracts.signing import MAX_BATCH, Signer, sign_batch
from shared.settings import Settings
from shared.topics import dlq_topic, topic_for
from shared.tracing import inject_headers, span_headers

log = logging.getLogger("neurons.bus")
Headers = Sequence[tuple[str, bytes]]
MAX_REQUEST_SIZE = 1048576  # aiokafka's default, set explicitly: publish_many enforces it as send does


class MalformedEvent(ValueError):
    """A record that is not a valid event; ``reason`` says why."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # bad_json | bad_envelope | unknown_type | schema_violation


def validate(envelope: Envelope, *, from_json: bool = False) -> None:
    """Raise SchemaError unless the type belongs to the aggregate type and the payload fits its
    schema (``from_json``: the envelope was just read from JSON text, see ``validate_payload``)."""
    if envelope.type.split(".", 1)[0] != envelope.aggregate_type:
        raise schemas.SchemaError(
            f"type {envelope.type} does not belong to aggregate type {envelope.aggregate_type}"
        )
    schemas.validate_payload(envelope.type, envelope.schema_version, envelope.payload, from_json=from_json)


def decode(raw: bytes | None, admit: Callable[[Envelope], None] | None = None) -> Envelope:
    """Parse, validate and upcast one record value.

    ``admit`` (a consumer's trust check) sees the envelope as it was signed,
    before its payload is checked or upcast, and raises to refuse it.
    """
    if raw is None:
        raise MalformedEvent("empty record value", "bad_json")
    envelope = read_canonical(raw)  # an envelope as services publish them, read in one pass
    if envelope is None:
        envelope = _read_envelope(raw)
    try:
        if envelope.type not in schemas.current_versions():
            raise MalformedEvent(f"unknown event type {envelope.type!r}", "unknown_type")
        if admit is not None:
            admit(envelope)
        validate(envelope, from_json=True)
        version, payload = schemas.upcast(envelope.type, envelope.schema_version, envelope.payload)
        if version != envelope.schema_version:
            schemas.validate_payload(envelope.type, version, payload)
    except schemas.SchemaError as exc:
        raise MalformedEvent(str(exc), "schema_violation") from None
    if version != envelope.schema_version:
        envelope = envelope.with_payload(payload, version)
    return envelope


def _read_envelope(raw: bytes) -> Envelope:
    """The envelope in ``raw``, in any form the model accepts; MalformedEvent saying why when none."""
    try:
        data = loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedEvent(f"not JSON: {exc}", "bad_json") from None
    if not isinstance(data, dict):
        raise MalformedEvent("not a JSON object", "bad_envelope")
    try:
        return Envelope.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "envelope"
        raise MalformedEvent(f"bad envelope: {where}: {first['msg']}", "bad_envelope") from None


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


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 of a record key (equal to ``aiokafka.partitioner.murmur2``)."""
    length = len(data)
    h = 0x9747B28C ^ length
    whole = length & ~3
    for (k,) in struct.iter_unpack("<I", data[:whole]):
        k = (k * 0x5BD1E995) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * 0x5BD1E995) & 0xFFFFFFFF
        h = ((h * 0x5BD1E995) & 0xFFFFFFFF) ^ k
    extra = length & 3
    if extra == 3:
        h ^= data[whole + 2] << 16
    if extra >= 2:
        h ^= data[whole + 1] << 8
    if extra >= 1:
        h = ((h ^ data[whole]) * 0x5BD1E995) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0x5BD1E995) & 0xFFFFFFFF
    return h ^ (h >> 15)


def partition_for(key: bytes, partitions: Iterable[int]) -> int:
    """The partition aiokafka's default partitioner picks for ``key`` among the topic's ``partitions``."""
    all_partitions = list(partitions)
    return all_partitions[(murmur2(key) & 0x7FFFFFFF) % len(all_partitions)]


def _type_of(value: bytes | None) -> str:
    """The event type a record names, or "unknown" when it names none (a dead letter's label)."""
    try:
        kind = json.loads(value or b"").get("type")
    except (ValueError, AttributeError):
        return "unknown"
    return kind if isinstance(kind, str) and 0 < len(kind) <= 100 else "unknown"


def _failed(span: trace.Span, exc: Exception) -> None:
    # what start_as_current_span records when its block raises
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


class _SpanGroup:
    """The events of one ``publish_many`` call that share a parent context, a type and a version, and their span."""

    __slots__ = ("span", "headers", "envelopes")

    def __init__(self, span: trace.Span, first: Envelope) -> None:
        self.span = span
        # what event_headers writes, but the event id: the same for every event of the group
        self.headers = event_headers(first, span_headers(span))[:-1]
        self.envelopes: list[Envelope] = []

    def end(self) -> None:
        if len(self.envelopes) > 1:
            correlations = sorted({e.correlation_id for e in self.envelopes})
            self.span.set_attributes({
                "messaging.batch.message_count": len(self.envelopes),
                "neurons.event_ids": [e.event_id for e in self.envelopes],
                # one correlation is the common case (one handler's events): say it as publish does
                **({"neurons.correlation_id": correlations[0]} if len(correlations) == 1
                   else {"neurons.correlation_ids": correlations}),
            })
        elif self.envelopes:
            only = self.envelopes[0]
            self.span.set_attributes({"neurons.event_id": only.event_id, "neurons.aggregate_id": only.aggregate_id,
                                      "neurons.correlation_id": only.correlation_id})
        self.span.end()


_SIGNATURE_AT = b',"type":"'  # the signature block's key sorts just before the last key, "type"


def with_signature(value: bytes, block: dict) -> bytes:
    """``value`` (an unsigned envelope as ``to_json`` writes it) with ``block`` as its signature,
    byte for byte what ``to_json`` writes for the signed envelope."""
    at = value.rfind(_SIGNATURE_AT) + 1
    return value[:at] + b'"signature":' + (orjson_compact(block) or json.dumps(block, sort_keys=True, separators=(",", ":")).encode()) + b"," + value[at:]


def signed_values(signer: Signer | None, envelopes: Sequence[Envelope],
                  values: Sequence[bytes | None]) -> list[bytes]:
    """Each envelope's bytes as published: those already signed as they are, the others signed by
    ``signer`` in Merkle batches of up to ``MAX_BATCH`` (unsigned when there is no signer)."""
    out = [value if value is not None else envelope.to_json() for envelope, value in zip(envelopes, values, strict=True)]
    if signer is None:
        return out
    pending = [i for i, envelope in enumerate(envelopes) if envelope.signature is None]
    for start in range(0, len(pending), MAX_BATCH):
        chunk = pending[start:start + MAX_BATCH]
        for i, block in zip(chunk, sign_batch(signer, [out[i] for i in chunk])):
            out[i] = with_signature(out[i], block)
    return out


_OWN_KEY = object()


class Publisher:
    """An aiokafka producer that only ever writes valid, traced, signed events.

    ``signer`` signs every envelope that is not signed yet; by default it is
    the key of the service named ``service`` (``shared.keys.service_signer``),
    and with no key at all events go out unsigned, which every consumer refuses.
    """

    def __init__(self, settings: Settings, service: str, tracer_provider=None, signer: Signer | None | object = _OWN_KEY,
                 metrics=None) -> None:
        self.settings = settings
        self.service = service
        self.metrics = metrics  # shared.metrics.Metrics: counts what is published and dead-lettered
        if signer is _OWN_KEY:
            from shared.keys import service_signer

            signer = service_signer(settings, service)
        self.signer: Signer | None = signer
        self._producer: AIOKafkaProducer | None = None
        if tracer_provider is None:
            from shared.tracing import setup_tracing

            # every event carries a traceparent, even from a tool that set up no tracing
            tracer_provider = setup_tracing(service, settings)
        self._tracer = tracer_provider.get_tracer("neurons.bus")

    async def start(self) -> None:
        # acks=all, idempotent where the broker hands out producer ids (Apache Kafka); the
        # embedded broker does not, and consumers de-duplicate on event_id either way
        from shared.broker_features import probe, producer_config

        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.bootstrap(),
            client_id=f"neurons-{self.service}",
            **producer_config(await probe(self.settings)),
            linger_ms=0,
            max_request_size=MAX_REQUEST_SIZE,
            **self.settings.kafka_security(),
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

    def _span(self, envelope: Envelope, topic: str, context: Context | None, *, one_event: bool = True) -> trace.Span:
        # A span that is not made current: its own context goes into the headers directly.
        attributes = {
            "messaging.system": "kafka",
            "messaging.destination.name": topic,
            "neurons.event_type": envelope.type,
        }
        if one_event:
            attributes["neurons.event_id"] = envelope.event_id
            attributes["neurons.aggregate_id"] = envelope.aggregate_id
            attributes["neurons.correlation_id"] = envelope.correlation_id
        return self._tracer.start_span(f"publish {envelope.type}", context=context, kind=trace.SpanKind.PRODUCER,
                                       attributes=attributes)

    async def publish(self, envelope: Envelope, *, wait: bool = True, context: Context | None = None,
                      validated: bool = False) -> None:
        """Send one event; ``validated`` is for envelopes checked when they were staged in an outbox."""
        if not validated:
            validate(envelope)
        topic = topic_for(envelope.aggregate_type)
        span = self._span(envelope, topic, context)
        try:
            future = await self.producer.send(
                topic,
                value=signed_values(self.signer, [envelope], [None])[0],
                key=envelope.aggregate_id.encode(),
                headers=event_headers(envelope, span_headers(span)),
            )
        except Exception as exc:
            _failed(span, exc)
            raise
        finally:
            span.end()
        if wait:
            await future
        self._count_published([envelope])

    async def publish_reliably(self, envelope: Envelope, *, attempts: int = 3, pause_s: float = 0.5) -> None:
        """``publish``, sent again after a broker error, up to ``attempts`` times (a broker that has just
        restarted can refuse the first write to an empty partition). A second copy is harmless: every
        consumer drops an event id it has processed. A command line that sends one event uses this."""
        validate(envelope)
        for attempt in range(1, attempts + 1):
            try:
                await self.publish(envelope, validated=True)
                return
            except (KafkaError, asyncio.TimeoutError) as exc:
                if attempt == attempts:
                    raise
                log.warning("publishing %s failed (%r), sending it again (%d of %d)", envelope.type, exc,
                            attempt + 1, attempts)
                await asyncio.sleep(pause_s * attempt)

    async def publish_many(self, envelopes: Sequence[Envelope], *, contexts: Sequence[Context | None] | None = None,
                           validated: bool = False, values: Sequence[bytes] | None = None) -> None:
        """Send events in order and wait until the broker has them all.

        Each event is validated and serialised as ``publish`` does. Tracing
        follows OpenTelemetry's batch publishing: the events that share a parent
        context (``contexts``, one per event), a type and a version get one producer span,
        ``publish <type>``, which every one of them names as its parent in its
        ``traceparent`` header; a group of one event carries the attributes
        ``publish`` sets, a larger one its size (``messaging.batch.message_count``),
        its event ids and its correlation ids.
        Records are appended to one open batch per topic and partition; a full
        batch is handed to the producer and a new one opened, so the order per
        partition, and so per aggregate, is the order given. If an event is
        refused, the ones before it are still sent and the error is raised.
        ``values`` are the envelopes' ``to_json`` bytes where the caller holds
        them already (an outbox stores them), so they are not made again.
        """
        producer = self.producer
        if contexts is None:
            contexts = [None] * len(envelopes)
        values = signed_values(self.signer, envelopes, values if values is not None else [None] * len(envelopes))
        topics: dict[str, str] = {}
        partitions: dict[str, list[int]] = {}
        batches: dict[tuple[str, int], BatchBuilder] = {}
        delivered: list = []  # each batch's delivery future: a batch the broker never took raises here
        groups: dict[tuple, _SpanGroup] = {}
        group: _SpanGroup | None = None
        last_context: Context | None = None
        parent: trace.SpanContext | None = None
        try:
            for envelope, context, value in zip(envelopes, contexts, values, strict=True):
                group = None
                if not validated:
                    validate(envelope)
                topic = topics.get(envelope.aggregate_type)
                if topic is None:
                    topic = topics[envelope.aggregate_type] = topic_for(envelope.aggregate_type)
                    partitions[topic] = sorted(await producer.partitions_for(topic))  # waits for metadata, as send does
                if context is not last_context or parent is None:
                    parent = trace.get_current_span(context).get_span_context()
                    last_context = context
                group_key = (parent.trace_id, parent.span_id, envelope.type, envelope.schema_version)
                group = groups.get(group_key)
                if group is None:
                    group = groups[group_key] = _SpanGroup(self._span(envelope, topic, context, one_event=False), envelope)
                group.envelopes.append(envelope)
                key = envelope.aggregate_id.encode()
                headers = [*group.headers, ("event_id", envelope.event_id.encode())]  # as event_headers
                # headers are a few hundred bytes: only a large value can take a record past the limit
                if len(value) + len(key) > MAX_REQUEST_SIZE // 2 and (
                        size := DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)) > MAX_REQUEST_SIZE:
                    raise MessageSizeTooLargeError(
                        f"The message is {size} bytes when serialized which is larger than the maximum "
                        "request size you have configured with the max_request_size configuration")
                where = (topic, partition_for(key, partitions[topic]))
                batch = batches.get(where)
                if batch is None:
                    batch = batches[where] = producer.create_batch()
                if batch.append(timestamp=None, key=key, value=value, headers=headers) is None:
                    del batches[where]
                    delivered.append(await producer.send_batch(batch, topic, partition=where[1]))
                    batch = batches[where] = producer.create_batch()  # takes any first record
                    batch.append(timestamp=None, key=key, value=value, headers=headers)
        except Exception as exc:
            if group is not None:  # the span of the event that was refused
                _failed(group.span, exc)
            raise
        finally:
            try:
                for (topic, partition), batch in batches.items():
                    delivered.append(await producer.send_batch(batch, topic, partition=partition))
            finally:
                for group in groups.values():
                    group.end()
        await producer.flush()
        for delivery in delivered:  # flush waits for every batch, failed or not: a failure raises here
            await delivery
        self._count_published(envelopes)

    def _count_published(self, envelopes: Sequence[Envelope]) -> None:
        if self.metrics is not None:
            for envelope in envelopes:
                self.metrics.add("neurons_events_published_total", type=envelope.type)

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
        if self.metrics is not None:
            self.metrics.add("neurons_events_dead_lettered_total", type=_type_of(value), reason=kind)

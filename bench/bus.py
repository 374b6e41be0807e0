"""Events/s through the platform's signing publisher against raw aiokafka on the same broker.

The platform side is ``Publisher.publish_many(envelopes)``, the path the
services' outbox relay takes, with a ``Signer`` (a fresh Ed25519 key of
``service:registry``): for every event it validates the payload against its
schema, serialises the envelope, signs the events in Merkle batches of up to
``MAX_BATCH`` (one Ed25519 signature per batch, each event's bytes carrying
its ``signature`` block and inclusion proof), sets the routing and trace
headers (the producer span is one per batch of events with the same parent
context and type, as OpenTelemetry's messaging conventions describe batch
publishing: here, one per round, since every event is a dataset.registered
from the same context), then appends the record to a batch of its partition
(the partition aiokafka's ``send`` would pick); batches go to the producer as
they fill, and it ends with one ``flush()``.

The raw side is bare aiokafka sending exactly the bytes the platform sends:
the signed values, made once before the rounds (a client that already holds
its bytes), the same key, no headers, through a producer configured like the
platform's (acks=all, no idempotence, linger 0). It is measured two ways in
the same run and the faster is the baseline: ``send`` per record then
``flush()``, and ``create_batch``/``append``/``send_batch`` per partition (the
partition picked per record with ``shared.bus.partition_for``, as the
platform does) then ``flush()``. Rounds rotate which side goes first, and
each side's figure is its median round.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from aiokafka import AIOKafkaProducer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.events import dataset_registered
from bench.figure import Figure, ratio
from shared.bus import Publisher, partition_for, signed_values
from shared.contracts.signing import Signer
from shared.settings import Settings
from shared.topics import topic_for

NAME = "bus"
TARGET = 0.4
PRINCIPAL = "service:registry"
RAW_WAYS = ("raw.send", "raw.send_batch")


def bench_signer() -> Signer:
    return Signer(PRINCIPAL, Ed25519PrivateKey.generate())


def measure(settings: Settings, events: int = 5000, rounds: int = 5) -> Figure:
    signer = bench_signer()
    rates = asyncio.run(_rounds(settings, signer, events, rounds))
    platform = statistics.median(rates["platform"])
    raw_medians = {way: statistics.median(rates[way]) for way in RAW_WAYS}
    fastest = max(raw_medians, key=raw_medians.__getitem__)
    raw = raw_medians[fastest]
    r = ratio(platform, raw)
    stages = stage_costs(settings, min(events, 2000), signer)
    return Figure(
        name=NAME, value=platform, unit="events/s", baseline=raw, ratio=r, target=f"ratio >= {TARGET}",
        passed=r is not None and r >= TARGET, samples=events * rounds,
        notes=(f"dataset.registered, {events} events x {rounds} rounds per side, median round; "
               f"platform: Publisher.publish_many (the outbox relay's path) signing as {PRINCIPAL} "
               "(fresh Ed25519 key): validate + serialise + sign (Merkle batches of 64, one Ed25519 "
               "signature each, the block and proof in every value) + headers + one producer span per "
               "parent context and type, records appended to per-partition batches, one flush; "
               "raw: the same signed bytes made before the rounds, same key, no headers, same producer "
               "settings, the faster of one AIOKafkaProducer.send per record + flush "
               f"({raw_medians['raw.send']:.0f}/s) and create_batch/append/send_batch per partition "
               f"(partition_for) + flush ({raw_medians['raw.send_batch']:.0f}/s): {fastest}; "
               "platform per event: " + ", ".join(f"{k} {v:.0f} us" for k, v in stages.items())),
        extra={"rounds": {side: [round(x, 1) for x in values] for side, values in rates.items()},
               "raw_median": {way: round(v, 1) for way, v in raw_medians.items()}, "baseline_way": fastest,
               "platform_us_per_event": {k: round(v, 1) for k, v in stages.items()}},
    )


def stage_costs(settings: Settings, events: int, signer: Signer | None = None) -> dict[str, float]:
    """Microseconds per event of each thing ``publish_many`` does before appending the record to a batch."""
    from shared.bus import event_headers, validate
    from shared.tracing import span_headers

    envelopes = [dataset_registered(i) for i in range(events)]
    topic = topic_for("dataset")
    publisher = Publisher(settings, "bench", signer=signer)
    partitions = range(settings.topic_partitions)
    span = publisher._span(envelopes[0], topic, None)
    span.end()

    from opentelemetry import trace

    headers = span_headers(span)

    def span_group(e) -> tuple:
        parent = trace.get_current_span(None).get_span_context()
        return (parent.trace_id, parent.span_id, e.type)

    stages = {
        "schema validation": validate,
        "serialise": lambda e: e.to_json(),
        "span group": span_group,
        "headers": lambda e: event_headers(e, headers),
        "partition": lambda e: partition_for(e.aggregate_id.encode(), partitions),
        "a span of its own": lambda e: publisher._span(e, topic, None).end(),
    }
    costs = {}
    for name, fn in stages.items():
        started = time.perf_counter()
        for envelope in envelopes:
            fn(envelope)
        costs[name] = (time.perf_counter() - started) / events * 1e6
    if signer is not None:
        # what signed_values adds to serialised bytes: Merkle batches of 64, a signature and a block each
        values = [e.to_json() for e in envelopes]
        started = time.perf_counter()
        signed_values(signer, envelopes, values)
        costs["sign (batches of 64)"] = (time.perf_counter() - started) / events * 1e6
    return costs


async def _rounds(settings: Settings, signer: Signer, events: int, rounds: int) -> dict[str, list[float]]:
    envelopes = [dataset_registered(i) for i in range(events)]
    topic = topic_for("dataset")
    # the bytes the platform sends (signing is deterministic: Ed25519, the same events every round)
    serialised = [(value, e.aggregate_id.encode())
                  for e, value in zip(envelopes, signed_values(signer, envelopes, [None] * events))]
    publisher = Publisher(settings, "bench", signer=signer)
    await publisher.start()
    raw = AIOKafkaProducer(bootstrap_servers=settings.bootstrap(), client_id="neurons-bench-raw", acks="all",
                           enable_idempotence=False, linger_ms=0)
    await raw.start()
    try:
        partitions = sorted(await raw.partitions_for(topic))
        sides = {"platform": (publisher.publish_many, envelopes),
                 "raw.send": (lambda batch: _raw_send(raw, topic, batch), serialised),
                 "raw.send_batch": (lambda batch: _raw_send_batch(raw, topic, partitions, batch), serialised)}
        # Warm-up: connections, metadata and the schema validator's first compile.
        for send, batch in sides.values():
            await send(batch[:50])
        rates: dict[str, list[float]] = {side: [] for side in sides}
        order = list(sides)
        for index in range(rounds):
            for side in order[index % len(order):] + order[:index % len(order)]:
                send, batch = sides[side]
                started = time.perf_counter()
                await send(batch)
                rates[side].append(events / (time.perf_counter() - started))
        return rates
    finally:
        await raw.stop()
        await publisher.stop()


async def _raw_send(producer: AIOKafkaProducer, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    for value, key in records:
        await producer.send(topic, value=value, key=key)
    await producer.flush()


async def _raw_send_batch(producer: AIOKafkaProducer, topic: str, partitions: list[int],
                          records: list[tuple[bytes, bytes]]) -> None:
    """One open batch per partition, handed over as it fills, the rest at the end; then flush."""
    batches = {}
    for value, key in records:
        partition = partition_for(key, partitions)
        batch = batches.get(partition)
        if batch is None:
            batch = batches[partition] = producer.create_batch()
        if batch.append(timestamp=None, key=key, value=value, headers=[]) is None:
            await producer.send_batch(batch, topic, partition=partition)
            batch = batches[partition] = producer.create_batch()
            batch.append(timestamp=None, key=key, value=value, headers=[])
    for partition, batch in batches.items():
        await producer.send_batch(batch, topic, partition=partition)
    await producer.flush()

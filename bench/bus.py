"""Events/s through the platform's publisher against raw aiokafka on the same broker.

The platform side is ``Publisher.publish_many(envelopes)``, the path the
services' outbox relay takes: for every event it validates the payload against
its schema, serialises the envelope, sets the routing and trace headers (the
producer span is one per batch of events with the same parent context and
type, as OpenTelemetry's messaging conventions describe batch publishing: here,
one per round, since every event is a dataset.registered from the same
context), then appends the record to a batch of its partition (the
partition aiokafka's ``send`` would pick); batches go to the producer as they
fill, and it ends with one ``flush()``. The raw side sends the same envelopes,
serialised beforehand, with the same key and no headers, one
``AIOKafkaProducer.send`` per record and then ``flush()``, through a producer
configured like the platform's (acks=all, no idempotence, linger 0). Rounds
alternate which side goes first, and each side's figure is its median round.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from aiokafka import AIOKafkaProducer

from bench.events import dataset_registered
from bench.figure import Figure, ratio
from shared.bus import Publisher
from shared.settings import Settings
from shared.topics import topic_for

NAME = "bus"
TARGET = 0.7


def measure(settings: Settings, events: int = 5000, rounds: int = 5) -> Figure:
    rates = asyncio.run(_rounds(settings, events, rounds))
    platform = statistics.median(rates["platform"])
    raw = statistics.median(rates["raw"])
    r = ratio(platform, raw)
    stages = stage_costs(settings, min(events, 2000))
    return Figure(
        name=NAME, value=platform, unit="events/s", baseline=raw, ratio=r, target=f"ratio >= {TARGET}",
        passed=r is not None and r >= TARGET, samples=events * rounds,
        notes=(f"dataset.registered, {events} events x {rounds} rounds per side, median round; "
               "platform: Publisher.publish_many (the outbox relay's path): validate + serialise + headers + "
               "one producer span per parent context and type, "
               "records appended to per-partition batches; raw: one AIOKafkaProducer.send per record of the "
               "pre-serialised bytes, same key, no headers, same producer settings; platform per event: "
               + ", ".join(f"{k} {v:.0f} us" for k, v in stages.items())),
        extra={"rounds": {side: [round(x, 1) for x in values] for side, values in rates.items()},
               "platform_us_per_event": {k: round(v, 1) for k, v in stages.items()}},
    )


def stage_costs(settings: Settings, events: int) -> dict[str, float]:
    """Microseconds per event of each thing ``publish_many`` does before appending the record to a batch."""
    from shared.bus import event_headers, partition_for, validate
    from shared.tracing import span_headers

    envelopes = [dataset_registered(i) for i in range(events)]
    topic = topic_for("dataset")
    publisher = Publisher(settings, "bench")
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
    return costs


async def _rounds(settings: Settings, events: int, rounds: int) -> dict[str, list[float]]:
    envelopes = [dataset_registered(i) for i in range(events)]
    topic = topic_for("dataset")
    serialised = [(e.to_json(), e.aggregate_id.encode()) for e in envelopes]
    publisher = Publisher(settings, "bench")
    await publisher.start()
    raw = AIOKafkaProducer(bootstrap_servers=settings.bootstrap(), client_id="neurons-bench-raw", acks="all",
                           enable_idempotence=False, linger_ms=0)
    await raw.start()

    async def platform_side(batch) -> None:
        await publisher.publish_many(batch)

    async def raw_side(batch) -> None:
        for value, key in batch:
            await raw.send(topic, value=value, key=key)
        await raw.flush()

    try:
        # Warm-up: connections, metadata and the schema validator's first compile.
        await platform_side(envelopes[:50])
        await raw_side(serialised[:50])
        rates: dict[str, list[float]] = {"platform": [], "raw": []}
        for index in range(rounds):
            for side in ("platform", "raw") if index % 2 == 0 else ("raw", "platform"):
                started = time.perf_counter()
                if side == "platform":
                    await platform_side(envelopes)
                else:
                    await raw_side(serialised)
                rates[side].append(events / (time.perf_counter() - started))
        return rates
    finally:
        await raw.stop()
        await publisher.stop()

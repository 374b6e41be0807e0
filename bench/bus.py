"""Events/s through the platform's publisher against raw aiokafka on the same broker.

The platform side is ``Publisher.publish(envelope, wait=False)`` for every
event, then one ``flush()``: it validates each payload against its schema,
serialises the envelope, opens a producer span and sets the routing and trace
headers. The raw side sends the same envelopes, serialised beforehand, with
the same key through an ``AIOKafkaProducer`` configured like the platform's
(acks=all, no idempotence, linger 0). Rounds alternate which side goes first,
and each side's figure is its median round.
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
               "platform: validate + span + headers + serialise; raw: AIOKafkaProducer.send of the "
               "pre-serialised bytes, same key and producer settings; per event: "
               + ", ".join(f"{k} {v:.0f} us" for k, v in stages.items())),
        extra={"rounds": {side: [round(x, 1) for x in values] for side, values in rates.items()},
               "platform_us_per_event": {k: round(v, 1) for k, v in stages.items()}},
    )


def stage_costs(settings: Settings, events: int) -> dict[str, float]:
    """Microseconds per event of each thing ``publish`` does before handing the record to aiokafka."""
    from shared.bus import event_headers, validate
    from shared.tracing import setup_tracing

    envelopes = [dataset_registered(i) for i in range(events)]
    tracer = setup_tracing("bench", settings).get_tracer("neurons.bus")

    def span(envelope) -> None:
        with tracer.start_as_current_span(f"publish {envelope.type}", attributes={
                "neurons.event_id": envelope.event_id, "neurons.aggregate_id": envelope.aggregate_id}):
            pass

    stages = {"schema validation": validate, "serialise": lambda e: e.to_json(), "span": span,
              "headers": event_headers}
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
        for envelope in batch:
            await publisher.publish(envelope, wait=False)
        await publisher.producer.flush()

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

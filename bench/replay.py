"""Events/s rebuilding every registry projection, from the archive and from the log, against raw
consumption of the same events.

Set-up: ``cycles`` self-training cycles (15 events of 10 types each), each
event signed by its rightful producer's key (the scratch platform's service
keys, ``ensure_service_keys``), are published through the platform's
publisher, read back from the log, and
archived by the registry's own handler running in this process, exactly as
the registry worker would. Then, in alternating rounds:

- ``replay_from_archive``: every projection emptied and rebuilt from the SQL archive;
- ``replay_from_log``: the same from the Kafka log (read, decode, validate, upcast, rebuild);
- baseline: an aiokafka consumer (no group, from offset 0) reading every record of the same topics.

The baseline's time has a small fixed part (starting the consumer, asking the
broker for the partitions' end offsets: a few milliseconds) and a part per
record, most of it the broker assembling the fetch response. Both parts are
reported, as are the platform's own costs per event (reading, each
projection); the fixed part counts for less as the log grows, so the ratio
falls towards the raw cost per record over the platform's cost per event.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlmodel import Session, func, select

from bench.events import cycle_events, signed
from bench.figure import Figure, ratio
from shared.archive import ArchivedEvent
from shared.bus import Publisher
from shared.keys import ensure_service_keys
from shared.log_reader import FETCH_WAIT_MS, read_to_end
from shared.settings import Settings
from shared.topics import AGGREGATE_TYPES, topic_for

NAMES = ("replay.archive", "replay.log")
TARGET = 0.5


def measure(settings: Settings, cycles: int = 150, rounds: int = 7) -> list[Figure]:
    ensure_service_keys(settings)  # the keys the events' producers sign with, anchored
    events = [e for i in range(cycles) for e in cycle_events(f"replay-{i}")]
    asyncio.run(_publish(settings, events))
    archived = _archive_from_log(settings)
    if archived != len(events):
        raise RuntimeError(f"archived {archived} events, published {len(events)}")

    from services.registry import audit

    rates: dict[str, list[float]] = {"archive": [], "log": [], "raw": []}
    raw_phases: list[tuple[float, float]] = []  # seconds of each raw round: start and offsets, then the records
    counts: dict[str, int] = {}
    for index in range(rounds):
        sides = ("archive", "log", "raw")
        for side in sides if index % 2 == 0 else tuple(reversed(sides)):
            started = time.perf_counter()
            if side == "archive":
                count = audit.replay_from_archive(settings)
            elif side == "log":
                count, malformed = audit.replay_from_log(settings)
                if malformed:
                    raise RuntimeError(f"{malformed} malformed records in the log")
            else:
                count, setup, reading = asyncio.run(_consume_raw(settings))
                raw_phases.append((setup, reading))
            rates[side].append(count / (time.perf_counter() - started))
            counts[side] = count
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"the three paths saw different numbers of events: {counts}")

    raw = statistics.median(rates["raw"])
    setup_ms = statistics.median(setup for setup, _ in raw_phases) * 1e3
    per_record_us = statistics.median(reading for _, reading in raw_phases) / len(events) * 1e6
    breakdown = _breakdown(settings)
    projections = {k: v for k, v in breakdown.items() if k.startswith("projection ")}
    common = (f"{len(events)} events of {len({e.type for e in events})} types ({cycles} cycles) x {rounds} rounds, "
              "median round; baseline: raw aiokafka consumption from offset 0, no decoding "
              f"({setup_ms:.0f} ms to start and find the partitions, then {per_record_us:.1f} us per record, "
              "the broker's fetch and the settle period at the end included)")
    figures = []
    for name, side, read, what in (
            ("replay.archive", "archive", "archive read", "replay_from_archive: archive -> every projection"),
            ("replay.log", "log", "log read + decode",
             "replay_from_log: log -> decode, validate, upcast -> every projection")):
        value = statistics.median(rates[side])
        r = ratio(value, raw)
        stages = {read: breakdown[read], **projections}
        figures.append(Figure(
            name=name, value=value, unit="events/s", baseline=raw, ratio=r, target=f"ratio >= {TARGET}",
            passed=r is not None and r >= TARGET, samples=len(events) * rounds,
            notes=f"{what}; {common}; per event: " + ", ".join(f"{k} {v:.0f} us" for k, v in stages.items()),
            extra={"rounds": {"platform": [round(x, 1) for x in rates[side]],
                              "raw": [round(x, 1) for x in rates["raw"]]},
                   "raw_setup_ms": round(setup_ms, 1), "raw_us_per_record": round(per_record_us, 2),
                   "platform_us_per_event": {k: round(v, 1) for k, v in stages.items()}},
        ))
    return figures


def _breakdown(settings: Settings) -> dict[str, float]:
    """Microseconds per event of each stage: reading the archive or the log, and each projection."""
    import tempfile

    from services.registry.audit import read_log, registry_engine
    from services.registry.projections import all_projections
    from shared import db
    from shared.archive import iter_archive, paused_gc, rebuild

    costs: dict[str, float] = {}
    # each stage as the replays run it: with the cyclic collector held
    with paused_gc():
        started = time.perf_counter()
        with Session(registry_engine(settings)) as session:
            events = list(iter_archive(session))
        costs["archive read"] = (time.perf_counter() - started) / len(events) * 1e6
    with paused_gc():
        started = time.perf_counter()
        logged, _ = asyncio.run(read_log(settings))
        costs["log read + decode"] = (time.perf_counter() - started) / len(logged) * 1e6
    with tempfile.TemporaryDirectory(prefix="bench-projection-", dir=settings.var_dir) as tmp:
        url = f"sqlite:///{tmp}/projection.db"
        engine = db.engine_for(url, upgrade=True)
        try:
            for projection in all_projections():
                with paused_gc():
                    started = time.perf_counter()
                    rebuild(engine, [projection], events)
                    costs[f"projection {projection.name}"] = (time.perf_counter() - started) / len(events) * 1e6
        finally:
            db._ENGINES.pop(url, None)
            engine.dispose()
    return costs


async def _publish(settings: Settings, events) -> None:
    """Publish ``events``, each signed by the key of the producer it names (sent as they are)."""
    values = signed(settings, events)
    async with Publisher(settings, "bench", signer=None) as publisher:
        await publisher.publish_many(events, values=values)


def _archive_from_log(settings: Settings) -> int:
    """Archive the log through the registry's handler and its transaction, in this process."""
    # The registry module builds its service from the environment at import; the scratch
    # environment is in place by now. The handler runs in a service bound to these settings.
    from services.registry import app
    from services.registry.audit import read_log
    from shared.service import Service

    registry = Service("registry", reads=AGGREGATE_TYPES, settings=settings)
    registry.handles("*")(app.on_event)
    events, malformed = asyncio.run(read_log(settings))
    if malformed:
        raise RuntimeError(f"{malformed} malformed records in the log")
    for envelope in events:
        registry._apply(envelope)
    registry.tracer_provider.shutdown()
    with Session(registry.engine) as session:
        return session.exec(select(func.count()).select_from(ArchivedEvent)).one()


async def _consume_raw(settings: Settings) -> tuple[int, float, float]:
    """The count of records read, the seconds spent before reading (start, metadata) and the seconds
    spent reading to the end as ``read_log`` does (``shared.log_reader``: the end offsets, the fetches
    and the settle period that shows nothing more comes).
    """
    started = time.perf_counter()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap(), group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", client_id="neurons-bench-raw",
                                fetch_max_wait_ms=FETCH_WAIT_MS)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        partitions = [TopicPartition(topic_for(a), p) for a in AGGREGATE_TYPES
                      for p in consumer.partitions_for_topic(topic_for(a)) or ()]
        setup = time.perf_counter() - started
        count = 0
        # read to the end as read_log reads it (the settle period included): the same stopping rule
        async for records in read_to_end(consumer, partitions):
            count += len(records)
        return count, setup, time.perf_counter() - started - setup
    finally:
        await consumer.stop()

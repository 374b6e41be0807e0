"""How the command line talks to a running platform: publish one event, await its answer."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.contracts import schemas
from shared.bus import Publisher, decode_batch
from shared.contracts.envelope import Envelope, NewEvent, Producer, seal
from shared.settings import Settings
from shared.topics import ensure_topics, topic_for


def command_event(event: NewEvent, *, correlation_id: str | None = None, operator: str | None = None) -> Envelope:
    """An event the CLI originates: a stream of its own (sequence 1), from producer `cli`."""
    return seal(event, sequence=1, producer=Producer(service=f"cli:{operator}" if operator else "cli",
                                                   node=Settings.from_env().node),
                correlation_id=correlation_id or event.correlation_id or event.aggregate_id,
                causation_id=None, schema_version=schemas.current_version(event.type))


async def _end_offsets(consumer: AIOKafkaConsumer, aggregate_types: list[str]) -> dict:
    partitions = []
    for aggregate in aggregate_types:
        topic = topic_for(aggregate)
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        partitions += [TopicPartition(topic, p) for p in parts]
    consumer.assign(partitions)
    ends = await consumer.end_offsets(partitions)
    for tp, offset in ends.items():
        consumer.seek(tp, offset)
    return ends


async def publish_and_wait(
    settings: Settings,
    envelope: Envelope | None,
    answer_from: list[str],
    matches: Callable[[Envelope], bool],
    timeout_s: float = 60.0,
    from_beginning: bool = False,
) -> Envelope | None:
    """Publish ``envelope`` (if any), then wait for the first event that ``matches``."""
    await ensure_topics(settings)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap(), group_id=None,
                                enable_auto_commit=False, client_id=f"neurons-cli-{uuid.uuid4().hex[:6]}")
    await consumer.start()
    try:
        await _end_offsets(consumer, answer_from)
        if from_beginning:
            await consumer.seek_to_beginning()
        if envelope is not None:
            async with Publisher(settings, "cli") as publisher:
                await publisher.publish(envelope)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in decode_batch(await consumer.getmany(timeout_ms=500)):
                if matches(event):
                    return event
        return None
    finally:
        await consumer.stop()


def run(coro):
    return asyncio.run(coro)

"""Reading a log to its end without trusting the high watermark alone.

Some brokers report a partition's high watermark per record batch, not per
record (the embedded one answers ListOffsets with the last batch's base offset
plus one), so a reader that stops at that offset misses the rest of the last
batch. ``read_to_end`` reads from where the consumer stands until every
partition has reached the end the broker reported, and then until fetches have
returned nothing more for ``settle_s``: what a fetch returns is the log, the
reported end only a lower bound.
"""

from __future__ import annotations

import time
from typing import AsyncIterator, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition

# A reader's consumer asks the broker to hold an empty fetch at most FETCH_WAIT_MS (``fetch_max_wait_ms``),
# so SETTLE_S without a record spans at least one whole fetch that found nothing past the position.
FETCH_WAIT_MS = 100
SETTLE_S = 0.3


async def partitions_of(consumer: AIOKafkaConsumer, topics: Sequence[str]) -> list[TopicPartition]:
    """Every partition of ``topics`` the broker knows (metadata asked again once when one is unknown)."""
    if any(not consumer.partitions_for_topic(topic) for topic in topics):
        await consumer._client.force_metadata_update()
    return [TopicPartition(topic, p) for topic in topics for p in sorted(consumer.partitions_for_topic(topic) or ())]


async def read_to_end(consumer: AIOKafkaConsumer, partitions: Sequence[TopicPartition], *,
                      from_beginning: bool = True, settle_s: float = SETTLE_S, max_wait_s: float = 60.0,
                      max_records: int = 5000) -> AsyncIterator[list]:
    """Yield the records of ``partitions`` (a list per fetch) up to the end of the log.

    The consumer is assigned ``partitions`` (and sought to their start unless
    ``from_beginning`` is False). It stops once each partition's position has
    reached the end the broker reported when reading began and no record came
    for ``settle_s``; or after ``max_wait_s`` without reaching the reported end
    (a broker that went away). ``settle_s`` must be longer than the consumer's
    ``fetch_max_wait_ms`` (create it with ``FETCH_WAIT_MS``; aiokafka's default
    is 500 ms).
    """
    partitions = list(partitions)
    if not partitions:
        return
    # asked before the first fetch: asked after, the answer would wait behind that fetch
    reported = await consumer.end_offsets(partitions)
    if set(consumer.assignment()) != set(partitions):
        consumer.assign(partitions)
    if from_beginning:
        await consumer.seek_to_beginning(*partitions)
    give_up = time.monotonic() + max_wait_s
    while True:
        batch = await consumer.getmany(*partitions, timeout_ms=int(settle_s * 1000), max_records=max_records)
        records = [record for tp in partitions for record in batch.get(tp, ())]
        if records:
            give_up = time.monotonic() + max_wait_s
            yield records
            continue
        behind = [tp for tp in partitions if await consumer.position(tp) < reported[tp]]
        if not behind or time.monotonic() > give_up:
            return


async def read_records(consumer: AIOKafkaConsumer, partitions: Sequence[TopicPartition], **options) -> list:
    """Every record ``read_to_end`` yields, in one list (per partition in offset order)."""
    out: list = []
    async for records in read_to_end(consumer, partitions, **options):
        out.extend(records)
    return out

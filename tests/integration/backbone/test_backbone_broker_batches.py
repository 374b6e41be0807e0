"""Readers of the log read every record of multi-record batches, whatever high watermark the broker reports."""

import asyncio
import json

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from shared.bus import event_headers, signed_values
from shared.log_reader import read_records
from shared.topics import topic_for
from tests.support import dataset_payload, make_event, signer_of, wait_until

PARTITIONS = 3
BATCHES_PER_PARTITION = 2
RECORDS_PER_BATCH = 4
EVENTS = PARTITIONS * BATCHES_PER_PARTITION * RECORDS_PER_BATCH


def signed_datasets(settings, count: int) -> list[tuple]:
    """``count`` dataset.registered events, each as (envelope, the bytes its producer signed)."""
    events = [make_event("dataset.registered", f"ds-batch-{i}", dataset_payload(f"ds-batch-{i}"))
              for i in range(count)]
    return [(e, signed_values(signer_of(settings, e.producer.service), [e], [None])[0]) for e in events]


async def publish_in_batches(settings, events: list[tuple]) -> dict:
    """Several batches of several records on each partition of the dataset topic, with a raw producer;
    what the broker then reports as each partition's end."""
    topic = topic_for("dataset")
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap(), acks="all", linger_ms=0)
    await producer.start()
    try:
        chunks = [events[i:i + RECORDS_PER_BATCH] for i in range(0, len(events), RECORDS_PER_BATCH)]
        for index, chunk in enumerate(chunks):
            batch = producer.create_batch()
            for envelope, value in chunk:
                assert batch.append(key=envelope.aggregate_id.encode(), value=value, timestamp=None,
                                    headers=event_headers(envelope, [])) is not None
            await (await producer.send_batch(batch, topic, partition=index % PARTITIONS))
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap(), group_id=None)
    await consumer.start()
    try:
        return await consumer.end_offsets([TopicPartition(topic, p) for p in range(PARTITIONS)])
    finally:
        await consumer.stop()


async def read_dataset_topic(settings) -> list:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap(), group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        return await read_records(consumer, [TopicPartition(topic_for("dataset"), p) for p in range(PARTITIONS)])
    finally:
        await consumer.stop()


def test_replay_verify_and_republish_see_every_record_of_multi_record_batches(platform):
    settings = platform.settings
    asyncio.run(platform.aensure_topics())
    platform.start("registry")
    events = signed_datasets(settings, EVENTS)
    reported = asyncio.run(publish_in_batches(settings, events))
    # a broker that reports the end per batch says less than the log holds; Apache Kafka says exactly it
    assert sum(reported.values()) <= EVENTS

    records = asyncio.run(read_dataset_topic(settings))
    assert sorted(r.offset for r in records if r.partition == 0) == list(range(BATCHES_PER_PARTITION
                                                                                * RECORDS_PER_BATCH))
    assert len(records) == EVENTS

    wait_until(lambda: len(platform.archived("dataset.registered")) == EVENTS, 60, message="every event archived")
    replayed = platform.cli("audit", "replay", "--from-log").stdout
    assert f"replayed {EVENTS} events from the log (0 malformed records skipped)" in replayed

    report = json.loads(platform.cli("audit", "verify", "--json", check=False).stdout)
    assert report["log"] == {"read": True, "events": EVENTS, "malformed": 0, "archived": EVENTS,
                             "not_archived": 0, "not_on_log": 0}

    # every archived event is on the log: none is missing, none written again
    assert platform.cli("audit", "republish").stdout.strip() == "republished 0 events"

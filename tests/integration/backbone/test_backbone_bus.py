"""The bus against the real broker: headers, dead letters, de-duplication, restarts."""

import json

import pytest
from sqlmodel import select

from shared.store import ProcessedEvent
from shared.topics import dlq_topic, ensure_topics, topic_for
from tests.support import await_until, dataset_payload, make_event, read_topic, sign_as_producers


async def test_publisher_keys_by_aggregate_and_sets_routing_headers(platform, kafka_bootstrap):
    await platform.aensure_topics()
    event = make_event("dataset.registered", "ds-hdr", dataset_payload("ds-hdr"))
    async with platform.publisher() as publisher:
        await publisher.publish(event)
    [record] = await read_topic(kafka_bootstrap, topic_for("dataset"), 1)
    headers = dict(record.headers)
    assert record.key == b"ds-hdr"
    assert headers["event_type"] == b"dataset.registered"
    assert headers["schema_version"] == b"2"
    assert headers["event_id"] == event.event_id.encode()
    assert headers["traceparent"].startswith(b"00-")
    assert json.loads(record.value)["event_id"] == event.event_id


async def test_publisher_refuses_a_payload_the_schema_rejects(platform):
    await platform.aensure_topics()
    bad = make_event("dataset.registered", "ds-bad", dataset_payload("ds-bad"))
    bad = bad.with_payload({**bad.payload, "record_count": -1}, 2)
    async with platform.publisher() as publisher:
        with pytest.raises(Exception, match="record_count"):
            await publisher.publish(bad)


async def test_malformed_events_go_to_the_dlq_and_consumption_goes_on(platform, kafka_bootstrap):
    await platform.aensure_topics()
    platform.start("registry")
    good = make_event("dataset.registered", "ds-good", dataset_payload("ds-good"))
    unknown = json.loads(good.to_json()) | {"type": "dataset.exploded", "event_id": "6f1b6c0e-0000-4000-8000-000000000001"}
    # signed by its rightful producer, so what is refused is the payload, not the signature
    violation = sign_as_producers(platform.settings, [make_event(
        "dataset.registered", "ds-v", {**dataset_payload("ds-v"), "sha256": "not-a-digest"})])[0].to_dict()
    async with platform.publisher() as publisher:
        topic = topic_for("dataset")
        await publisher.send_raw(topic, b"\xff not json", b"x")
        await publisher.send_raw(topic, json.dumps(unknown).encode(), b"ds-good")
        await publisher.send_raw(topic, json.dumps(violation).encode(), b"ds-v")
        await publisher.publish(good)
    await await_until(lambda: platform.archived("dataset.registered"), 60, message="the good event archived")
    records = await read_topic(kafka_bootstrap, dlq_topic(), 3)
    reasons = {dict(r.headers)["dlq_kind"].decode(): dict(r.headers)["dlq_reason"].decode() for r in records}
    assert set(reasons) == {"bad_json", "unknown_type", "schema_violation"}
    assert "dataset.exploded" in reasons["unknown_type"]
    assert "sha256" in reasons["schema_violation"]
    assert all(dict(r.headers)["dlq_consumer"] == f"{platform.prefix.rstrip('.')}-registry".encode() for r in records)
    assert [e["event_id"] for e in platform.archived()] == [good.event_id]


async def test_the_same_event_delivered_twice_changes_state_once(platform):
    await platform.aensure_topics()
    platform.start("registry")
    event = make_event("dataset.registered", "ds-twice", dataset_payload("ds-twice"))
    follow = make_event("dataset.registered", "ds-after", dataset_payload("ds-after"))
    async with platform.publisher() as publisher:
        await publisher.publish(event)
        await publisher.publish(event)
        await publisher.publish(follow)
    await await_until(lambda: len(platform.archived()) >= 2, 60, message="both events archived")
    from services.registry.projections import StreamHead

    with platform.registry_session() as session:
        head = session.get(StreamHead, ("dataset", "ds-twice"))
        processed = session.exec(select(ProcessedEvent).where(ProcessedEvent.event_id == event.event_id)).all()
    assert head.event_count == 1
    assert len(processed) == 1
    # two aggregates, two partitions: no order between them, each archived once
    assert sorted(e["event_id"] for e in platform.archived()) == sorted([event.event_id, follow.event_id])


async def test_a_consumer_killed_with_sigkill_resumes_from_its_committed_offset(platform):
    await platform.aensure_topics()
    platform.start("registry")
    events = [make_event("dataset.registered", f"ds-{i % 5}", dataset_payload(f"ds-{i % 5}"), sequence=i // 5 + 1)
              for i in range(400)]
    async with platform.publisher() as publisher:
        await publisher.publish_many(events[:200])
        await await_until(lambda: len(platform.archived()) >= 50, 60, message="the first events archived")
        platform.kill("registry")
        await publisher.publish_many(events[200:])
    platform.start("registry")
    await await_until(lambda: len(platform.archived()) >= 400, 90, message="all 400 events archived")
    archived = [e["event_id"] for e in platform.archived()]
    assert sorted(archived) == sorted(e.event_id for e in events)  # none lost, none twice
    per_stream = {}
    for e in platform.archived():
        per_stream.setdefault(e["aggregate_id"], []).append(e["sequence"])
    assert all(seqs == sorted(seqs) for seqs in per_stream.values())  # order holds per aggregate


async def test_topics_are_created_explicitly_with_infinite_retention(platform, kafka_bootstrap):
    from aiokafka.admin import AIOKafkaAdminClient

    created = await ensure_topics(platform.settings)
    assert topic_for("training") in created and dlq_topic() in created
    assert await ensure_topics(platform.settings) == []
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        topics = await admin.describe_topics([topic_for("training")])
        assert len(topics[0]["partitions"]) == platform.settings.topic_partitions
    finally:
        await admin.close()


async def test_publish_many_places_records_as_send_does(platform, kafka_bootstrap):
    await platform.aensure_topics()
    events = [make_event("dataset.registered", f"ds-place-{i % 23}", dataset_payload(f"ds-place-{i % 23}"),
                         sequence=i // 23 + 1) for i in range(600)]
    async with platform.publisher() as publisher:
        for event in events[:100]:  # one record at a time through aiokafka's send
            await publisher.publish(event, wait=False)
        await publisher.producer.flush()
        await publisher.publish_many(events)  # all of them again, in batches the publisher fills itself
    records = await read_topic(kafka_bootstrap, topic_for("dataset"), 700)
    assert len(records) == 700
    copies: dict[bytes, list] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        copies.setdefault(dict(record.headers)["event_id"], []).append(record)
    for event in events[:100]:
        sent, batched = copies[event.event_id.encode()]
        assert batched.partition == sent.partition and batched.key == sent.key == event.aggregate_id.encode()
        assert [k for k, _ in batched.headers] == [k for k, _ in sent.headers]
        routing = [h for h in sent.headers if h[0] != "traceparent"]
        assert [h for h in batched.headers if h[0] != "traceparent"] == routing
        assert dict(batched.headers)["traceparent"].startswith(b"00-")
        assert batched.value == sent.value
    # per partition, and so per aggregate, the order given
    position = {e.event_id.encode(): n for n, e in enumerate(events)}
    for partition in {r.partition for r in records}:
        batched = [copies[dict(r.headers)["event_id"]][-1] for r in records if r.partition == partition]
        batched = sorted({r.offset: r for r in batched}.values(), key=lambda r: r.offset)
        order = [position[dict(r.headers)["event_id"]] for r in batched]
        assert order == sorted(order)


async def test_publish_many_sends_what_came_before_a_refused_event(platform, kafka_bootstrap):
    await platform.aensure_topics()
    good = [make_event("dataset.registered", f"ds-ok-{i}", dataset_payload(f"ds-ok-{i}")) for i in range(5)]
    bad = make_event("dataset.registered", "ds-refused", dataset_payload("ds-refused"))
    bad = bad.with_payload({**bad.payload, "record_count": -1}, 2)
    async with platform.publisher() as publisher:
        with pytest.raises(Exception, match="record_count"):
            await publisher.publish_many([*good, bad, *good])
        await publisher.producer.flush()
    records = await read_topic(kafka_bootstrap, topic_for("dataset"), 5)
    assert sorted(dict(r.headers)["event_id"] for r in records) == sorted(e.event_id.encode() for e in good)


async def test_publish_many_refuses_a_record_over_the_request_size_as_send_does(platform, kafka_bootstrap):
    from aiokafka.errors import MessageSizeTooLargeError

    await platform.aensure_topics()
    good = make_event("dataset.registered", "ds-small", dataset_payload("ds-small"))
    huge = make_event("dataset.registered", "ds-huge", dataset_payload("ds-huge", name="x" * 1_100_000))
    async with platform.publisher() as publisher:
        with pytest.raises(MessageSizeTooLargeError):
            await publisher.publish(huge)
        with pytest.raises(MessageSizeTooLargeError):
            await publisher.publish_many([good, huge])
    records = await read_topic(kafka_bootstrap, topic_for("dataset"), 1)
    assert [dict(r.headers)["event_id"] for r in records] == [good.event_id.encode()]


async def test_publish_many_sends_the_bytes_an_outbox_already_holds(platform, kafka_bootstrap):
    await platform.aensure_topics()
    events = [make_event("dataset.registered", f"ds-held-{i}", dataset_payload(f"ds-held-{i}")) for i in range(3)]
    held = [e.to_json() for e in events]
    async with platform.publisher() as publisher:
        await publisher.publish_many(events, validated=True, values=held)
    records = await read_topic(kafka_bootstrap, topic_for("dataset"), 3)
    assert sorted(r.value for r in records) == sorted(held)


async def test_a_command_sent_again_after_a_broker_error_is_processed_once(platform, kafka_bootstrap):
    """The broker refuses the first write (as a restarted embedded broker can): the command line's send goes
    again, and a copy the broker did take is dropped by its consumers."""
    from aiokafka.errors import UnknownError

    await platform.aensure_topics()
    platform.start("registry")
    event = make_event("dataset.registered", "ds-again", dataset_payload("ds-again"))
    async with platform.publisher() as publisher:
        real_send, refused = publisher.producer.send, []

        async def send_refusing_once(*args, **kwargs):
            delivery = await real_send(*args, **kwargs)  # the broker takes it, but the answer is an error
            if not refused:
                await delivery
                refused.append(True)
                raise UnknownError("the broker's answer to the first write")
            return delivery

        publisher.producer.send = send_refusing_once
        await publisher.publish_reliably(event, pause_s=0.05)
        publisher.producer.send = real_send
        # the stream's next event, on the same partition: once it is archived, both copies were read
        follow = make_event("dataset.registered", "ds-again", dataset_payload("ds-again"), sequence=2)
        await publisher.publish(follow)
    records = await read_topic(kafka_bootstrap, topic_for("dataset"), 3)
    assert [json.loads(r.value)["event_id"] for r in records] == [event.event_id] * 2 + [follow.event_id]
    await await_until(lambda: len(platform.archived()) >= 2, 60, message="the stream's next event archived")
    assert [e["event_id"] for e in platform.archived()] == [event.event_id, follow.event_id]


async def test_a_send_that_keeps_failing_raises_after_its_attempts(platform):
    from aiokafka.errors import UnknownError

    await platform.aensure_topics()
    event = make_event("dataset.registered", "ds-never", dataset_payload("ds-never"))
    async with platform.publisher() as publisher:
        calls = []

        async def send_refusing(*args, **kwargs):
            calls.append(args)
            raise UnknownError("refused")

        publisher.producer.send = send_refusing
        with pytest.raises(UnknownError):
            await publisher.publish_reliably(event, attempts=3, pause_s=0.01)
    assert len(calls) == 3

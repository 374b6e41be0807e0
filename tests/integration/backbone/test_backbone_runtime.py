"""The service runtime: a handler that keeps failing dead-letters its event, the outbox survives a crash."""

from sqlmodel import Session, select

from shared.contracts.envelope import NewEvent
from shared.service import Service
from shared.store import OutboxEvent, ProcessedEvent
from shared.topics import dlq_topic, topic_for
from tests.support import dataset_payload, make_event, read_topic, sign_as_producers


async def test_a_handler_that_keeps_failing_dead_letters_the_event(platform, kafka_bootstrap):
    await platform.aensure_topics()
    service = Service("evolution", reads=["dataset"], settings=platform.settings.with_(handler_retries=2))
    calls = []

    @service.handles("dataset.registered")
    def explode(event, ctx):
        calls.append(event.event_id)
        raise RuntimeError("disk full")

    [event] = sign_as_producers(platform.settings, [make_event("dataset.registered", "ds-x", dataset_payload("ds-x"))])
    result = await service.process(event.to_json(), b"ds-x", [], topic_for("dataset"), 0, 7)
    await service.close()
    assert result is None and len(calls) == 2
    [record] = await read_topic(kafka_bootstrap, dlq_topic(), 1)
    headers = dict(record.headers)
    assert headers["dlq_kind"] == b"handler_failed"
    assert b"disk full" in headers["dlq_reason"]
    assert headers["dlq_source_offset"] == b"7"
    with Session(service.engine) as session:
        row = session.get(ProcessedEvent, (service.consumer, event.event_id))
    assert row.outcome == "dead_lettered"


async def test_events_staged_before_a_crash_are_published_with_the_same_ids(platform, kafka_bootstrap):
    await platform.aensure_topics()
    settings = platform.settings
    crashed = Service("evolution", reads=["dataset"], settings=settings)
    with crashed.transaction() as ctx:  # committed, never flushed: the process died here
        [staged] = crashed.stage(ctx, [NewEvent("dataset.registered", "ds-o", dataset_payload("ds-o"))])
    restarted = Service("evolution", reads=["dataset"], settings=settings)
    assert await restarted.flush_outbox() == 1
    assert await restarted.flush_outbox() == 0
    await restarted.close()
    [record] = await read_topic(kafka_bootstrap, topic_for("dataset"), 1)
    assert dict(record.headers)["event_id"] == staged.event_id.encode()
    with Session(restarted.engine) as session:
        assert session.exec(select(OutboxEvent).where(OutboxEvent.published_at.is_(None))).all() == []

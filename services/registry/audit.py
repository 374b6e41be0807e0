"""Audit operations over the archive and the log: export, replay, republish, verify, and "what served at"."""

from __future__ import annotations

import asyncio
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy.engine import Engine
from sqlmodel import Session, func, select

from shared.archive import ArchivedEvent, Projection, export_jsonl, iter_archive, paused_gc, rebuild, table_digest
from shared.bus import MalformedEvent, Publisher, decode, event_headers
from shared.db import engine_for
from shared.contracts.envelope import Envelope, iso
from shared.settings import Settings
from shared.contracts.trust import parse_time, verify_decision
from shared.topics import AGGREGATE_TYPES, ensure_topics, topic_for
from shared.keys import load_keyring
from services.registry import queries
from services.registry.projections import all_projections

# Columns that differ between two faithful builds of the same history.
VOLATILE_COLUMNS = ("id", "archived_at", "updated_at_local")


def registry_engine(settings: Settings) -> Engine:
    return engine_for(settings.db_url("registry"))


def export(settings: Settings, out: Path) -> int:
    with Session(registry_engine(settings)) as session:
        return export_jsonl(session, out)


def replay_from_archive(settings: Settings, projections: list[Projection] | None = None,
                        engine: Engine | None = None, progress: Callable[[int], None] | None = None) -> int:
    projections = projections or all_projections()
    source = registry_engine(settings)
    target = engine or source
    with paused_gc():
        with Session(source) as session:
            events = list(iter_archive(session))
        return rebuild(target, projections, events, progress)


async def read_log(settings: Settings, timeout_s: float = 5.0) -> tuple[list[Envelope], int]:
    """Every valid event on the source-of-truth topics from offset 0, and the count of malformed records."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap(), enable_auto_commit=False,
                                auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    events: list[Envelope] = []
    malformed = 0
    try:
        partitions = []
        for aggregate in AGGREGATE_TYPES:
            for p in consumer.partitions_for_topic(topic_for(aggregate)) or await _partitions(consumer, aggregate):
                partitions.append(TopicPartition(topic_for(aggregate), p))
        # The end as it stands now, asked before the first fetch: asked after, the answer would
        # wait behind that fetch on the broker's connection.
        end = await consumer.end_offsets(partitions)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        remaining = {tp: off for tp, off in end.items() if off > 0}
        while remaining:
            batch = await consumer.getmany(timeout_ms=int(timeout_s * 1000), max_records=5000)
            if not batch:
                break
            for tp, records in batch.items():
                for record in records:
                    try:
                        events.append(decode(record.value))
                    except MalformedEvent:
                        malformed += 1
                    if record.offset + 1 >= end[tp]:
                        remaining.pop(tp, None)
    finally:
        await consumer.stop()
    # at-least-once delivery may have written an event twice; it counts once
    unique = {}
    for event in events:
        unique.setdefault(event.event_id, event)
    events = list(unique.values())
    # Across topics the log has no total order; per aggregate it does (one partition).
    events.sort(key=lambda e: (e.occurred_at, e.aggregate_type, e.aggregate_id, e.sequence))
    return events, malformed


async def _partitions(consumer: AIOKafkaConsumer, aggregate: str) -> set[int]:
    await consumer._client.force_metadata_update()
    return consumer.partitions_for_topic(topic_for(aggregate)) or set()


def replay_from_log(settings: Settings, progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    with paused_gc():
        events, malformed = asyncio.run(read_log(settings))
        return rebuild(registry_engine(settings), all_projections(), events, progress), malformed


async def republish(settings: Settings, force: bool = False) -> int:
    """Write the archive back to an empty broker, in archive order (per aggregate: sequence order)."""
    await ensure_topics(settings)
    if not force:
        events, _ = await read_log(settings, timeout_s=1.0)
        if events:
            raise RuntimeError(f"the log already holds {len(events)} events; pass --force to publish anyway")
    count = 0
    async with Publisher(settings, "registry") as publisher:
        with Session(registry_engine(settings)) as session:
            rows = session.exec(select(ArchivedEvent).order_by(ArchivedEvent.id)).all()
        for row in rows:
            envelope = Envelope.from_json(row.envelope_json)
            # the stored bytes go back unchanged: same event_id, same payload version
            await publisher.send_raw(topic_for(envelope.aggregate_type), row.envelope_json.encode(),
                                     envelope.aggregate_id.encode(), event_headers(envelope, []))
            count += 1
    return count


def verify(settings: Settings, attempts: int = 5) -> dict:
    """Rebuild every projection from the archive into a scratch database and compare digests.

    The registry archives and projects each event in one transaction, so the
    live tables hold exactly what the archive held at the same moment. The
    archive is read first and the live tables after, so an event archived in
    between would show up as a difference that is none. The comparison counts
    only when the archive did not move from before the one read to after the
    other; otherwise it is made again, ``attempts`` times in all. ``settled``
    says whether it held still, and ``archived_meanwhile`` how many events
    arrived during the last try (0 when settled).
    """
    projections = all_projections()
    source = registry_engine(settings)
    for _ in range(attempts):
        before = _archive_mark(source)
        report = _compare(settings, projections)
        after = _archive_mark(source)
        if after == before:
            break
    report["settled"] = after == before
    report["archived_meanwhile"] = after[0] - before[0]
    report["differs"] = [name for name, t in report["tables"].items() if not t["same"]]
    return report


def _archive_mark(engine: Engine) -> tuple[int, int | None]:
    """How many events the archive holds and its last id: equal marks mean nothing was archived
    between them (rows are only ever added)."""
    with Session(engine) as session:
        count, last = session.exec(select(func.count(), func.max(ArchivedEvent.id))).one()
    return count, last


def _compare(settings: Settings, projections: list[Projection]) -> dict:
    with tempfile.TemporaryDirectory(prefix="neurons-verify-") as tmp:
        scratch = engine_for(f"sqlite:///{tmp}/scratch.db")
        replay_from_archive(settings, projections, engine=scratch)
        report: dict = {"ok": True, "tables": {}}
        with Session(registry_engine(settings)) as live, Session(scratch) as rebuilt:
            for projection in projections:
                for table in projection.tables:
                    live_digest, live_rows = table_digest(live, table, VOLATILE_COLUMNS)
                    new_digest, new_rows = table_digest(rebuilt, table, VOLATILE_COLUMNS)
                    same = live_digest == new_digest
                    report["tables"][table.__tablename__] = {
                        "same": same, "live_rows": live_rows, "rebuilt_rows": new_rows,
                        "live_digest": live_digest, "rebuilt_digest": new_digest,
                    }
                    report["ok"] = report["ok"] and same
        scratch.dispose()
        from shared import db

        db._ENGINES.pop(f"sqlite:///{tmp}/scratch.db", None)
    return report


def audit_at(settings: Settings, at: datetime, *, profile: str | None = None, channel: str | None = None) -> dict:
    """Which adapter served (a profile, or a channel) at ``at``, who put it there, on what evidence.

    The archive is replayed up to ``at`` into scratch read models, so the answer
    rests on the log as it stood then, not on anything that changed since.
    """
    if at.tzinfo is None:
        raise ValueError("give the moment with its timezone, e.g. 2025-03-04T14:03:00Z")
    with paused_gc(), Session(registry_engine(settings)) as session:
        events = list(iter_archive(session, until=at))
    with tempfile.TemporaryDirectory(prefix="neurons-audit-at-") as tmp:
        url = f"sqlite:///{tmp}/at.db"
        scratch = engine_for(url)
        try:
            with paused_gc():
                rebuild(scratch, all_projections(), events)
            with Session(scratch) as session:
                answer = queries.served_at(session, profile=profile, channel=channel)
        finally:
            scratch.dispose()
            from shared import db

            db._ENGINES.pop(url, None)
    answer = {"at": iso(at), "events_replayed": len(events), **answer}
    approval = (answer.get("promotion") or {}).get("decision")
    if approval:
        answer["signature_check"] = _signature_check(settings, approval)
    return answer


def _signature_check(settings: Settings, decision: dict) -> dict:
    """The approver's signature checked against today's keyring, as of when it was signed."""
    keyring = load_keyring(settings.keyring_path)
    result = verify_decision(decision, keyring, now=parse_time(decision["issued_at"]), required_role=None)
    return {"ok": result.ok, "reason": result.reason, "detail": result.detail,
            "keyring": str(settings.keyring_path)}

"""The durable audit archive and the machinery to rebuild projections from it.

The registry stores every event it reads exactly once (unique event_id) in
SQL. That archive outlives the embedded broker's memory: the read models are
projections rebuilt from it (``rebuild``), the log can be restored from it
(``neurons audit republish``), and ``table_digest`` compares a rebuilt copy
with the live one (``neurons audit verify``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from sqlalchemy import Column, Text, delete, inspect
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, select

from shared.envelope import Envelope, utcnow


class ArchivedEvent(SQLModel, table=True):
    __tablename__ = "archived_events"
    id: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(unique=True)
    type: str = Field(index=True)
    schema_version: int
    aggregate_type: str = Field(index=True)
    aggregate_id: str = Field(index=True)
    sequence: int
    occurred_at: datetime = Field(index=True)
    correlation_id: str = Field(index=True)
    causation_id: str | None = None
    producer_service: str
    envelope_json: str = Field(sa_column=Column(Text, nullable=False))
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    archived_at: datetime = Field(default_factory=utcnow)


def archive(session: Session, envelope: Envelope, topic: str | None = None,
            partition: int | None = None, offset: int | None = None) -> bool:
    """Store ``envelope`` once; False when it is already archived."""
    existing = session.exec(select(ArchivedEvent.id).where(ArchivedEvent.event_id == envelope.event_id)).first()
    if existing is not None:
        return False
    session.add(
        ArchivedEvent(
            event_id=envelope.event_id,
            type=envelope.type,
            schema_version=envelope.schema_version,
            aggregate_type=envelope.aggregate_type,
            aggregate_id=envelope.aggregate_id,
            sequence=envelope.sequence,
            occurred_at=envelope.occurred_at,
            correlation_id=envelope.correlation_id,
            causation_id=envelope.causation_id,
            producer_service=envelope.producer.service,
            envelope_json=envelope.to_json().decode(),
            topic=topic,
            partition=partition,
            offset=offset,
        )
    )
    return True


def iter_archive(session: Session, until: datetime | None = None, batch: int = 2000) -> Iterator[Envelope]:
    """Every archived event in the order it was archived (per aggregate: its sequence)."""
    last = 0
    while True:
        query = select(ArchivedEvent).where(ArchivedEvent.id > last).order_by(ArchivedEvent.id).limit(batch)
        rows = session.exec(query).all()
        if not rows:
            return
        for row in rows:
            last = row.id
            if until is not None and _naive(row.occurred_at) > _naive(until):
                continue
            yield upcast_envelope(Envelope.from_json(row.envelope_json))


def _naive(ts: datetime) -> datetime:
    return ts.replace(tzinfo=None) if ts.tzinfo else ts


def upcast_envelope(envelope: Envelope) -> Envelope:
    from shared import schemas

    version, payload = schemas.upcast(envelope.type, envelope.schema_version, envelope.payload)
    return envelope if version == envelope.schema_version else envelope.with_payload(payload, version)


def export_jsonl(session: Session, out: Path) -> int:
    """Write every archived event, as published, one JSON object per line."""
    count = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for row in session.exec(select(ArchivedEvent).order_by(ArchivedEvent.id)):
            fh.write(row.envelope_json + "\n")
            count += 1
    return count


@dataclass(frozen=True)
class Projection:
    """A read model: the tables it owns and how one event changes them."""

    name: str
    tables: Sequence[type[SQLModel]]
    apply: Callable[[Session, Envelope], None]


def reset(engine: Engine, projections: Iterable[Projection]) -> None:
    with Session(engine) as session:
        for projection in projections:
            for table in projection.tables:
                session.exec(delete(table))
        session.commit()


def rebuild(engine: Engine, projections: Sequence[Projection], events: Iterable[Envelope],
            progress: Callable[[int], None] | None = None) -> int:
    """Empty the projections' tables and apply ``events`` in order."""
    SQLModel.metadata.create_all(engine)
    reset(engine, projections)
    count = 0
    with Session(engine) as session:
        for envelope in events:
            for projection in projections:
                projection.apply(session, envelope)
            count += 1
            if count % 500 == 0:
                session.commit()
                if progress:
                    progress(count)
        session.commit()
    return count


def table_digest(session: Session, table: type[SQLModel], ignore: Sequence[str] = ()) -> tuple[str, int]:
    """sha256 over the table's rows in primary-key order, without surrogate ids."""
    mapper = inspect(table)
    columns = [c.key for c in mapper.columns if c.key not in ignore]
    pk = [c for c in mapper.primary_key]
    rows = session.exec(select(table).order_by(*pk)).all()
    digest = hashlib.sha256()
    material = []
    for row in rows:
        material.append(json.dumps({c: _plain(getattr(row, c)) for c in columns}, sort_keys=True, default=str))
    for line in sorted(material):  # order-free: surrogate keys differ between builds
        digest.update(line.encode())
    return digest.hexdigest(), len(rows)


def _plain(value):
    if isinstance(value, datetime):
        return _naive(value).isoformat()
    return value

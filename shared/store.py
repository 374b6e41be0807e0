"""What makes a handler idempotent and its effects durable, in one SQL transaction.

- ``ProcessedEvent`` records (consumer, event_id): a redelivered event is seen
  and skipped in the same transaction that would have changed state.
- ``OutboxEvent`` holds the events a handler emits, sealed with their final
  event_id, until they are on the broker: a crash between the commit and the
  publish re-sends the same event ids, which every consumer de-duplicates.
- ``AggregateSequence`` keeps the last sequence seen or written per stream
  (optimistic concurrency: the unique key refuses a second event at a position).
- ``ServiceState`` is a JSON record per (service, kind, key). A service's
  decider state is kept there as rows keyed by aggregate (kind ``state``, see
  ``shared.decider``); other kinds hold small side records (a trace to continue).
- ``StateHead`` counts the saves of a service's decider state, so a worker
  holding an older copy in memory knows to reload it, and a save made from an
  older copy is refused instead of overwriting a newer one.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Iterable, Iterator

from sqlalchemy import Column, Text, UniqueConstraint, delete, insert, update
from sqlmodel import Field, Session, SQLModel, select

from shared.contracts.envelope import Envelope, utcnow


class ProcessedEvent(SQLModel, table=True):
    __tablename__ = "processed_events"
    consumer: str = Field(primary_key=True)
    event_id: str = Field(primary_key=True)
    event_type: str
    outcome: str = "applied"  # applied | dead_lettered
    processed_at: datetime = Field(default_factory=utcnow)


class OutboxEvent(SQLModel, table=True):
    __tablename__ = "outbox_events"
    __table_args__ = (UniqueConstraint("service", "aggregate_type", "aggregate_id", "sequence"),)
    id: int | None = Field(default=None, primary_key=True)
    service: str = Field(index=True)
    event_id: str = Field(unique=True)
    aggregate_type: str
    aggregate_id: str
    sequence: int
    envelope_json: str = Field(sa_column=Column(Text, nullable=False))
    traceparent: str | None = None
    published_at: datetime | None = Field(default=None, index=True)


class AggregateSequence(SQLModel, table=True):
    __tablename__ = "aggregate_sequences"
    service: str = Field(primary_key=True)
    aggregate_type: str = Field(primary_key=True)
    aggregate_id: str = Field(primary_key=True)
    last_sequence: int = 0


class ServiceState(SQLModel, table=True):
    __tablename__ = "service_state"
    service: str = Field(primary_key=True)
    kind: str = Field(primary_key=True)
    key: str = Field(primary_key=True)
    value_json: str = Field(sa_column=Column(Text, nullable=False))
    updated_at: datetime = Field(default_factory=utcnow)


class StateHead(SQLModel, table=True):
    __tablename__ = "state_heads"
    service: str = Field(primary_key=True)
    kind: str = Field(primary_key=True)
    version: int = 0


class StaleState(RuntimeError):
    """The state was saved by someone else since it was read; the message is handled again on the newer state."""


def already_processed(session: Session, consumer: str, event_id: str) -> bool:
    return session.get(ProcessedEvent, (consumer, event_id)) is not None


def mark_processed(session: Session, consumer: str, envelope: Envelope, outcome: str = "applied") -> None:
    session.add(ProcessedEvent(consumer=consumer, event_id=envelope.event_id, event_type=envelope.type, outcome=outcome))


def outbox_depth(session: Session, service: str) -> int:
    """Events ``service`` has stored in its outbox and not published yet."""
    from sqlalchemy import func

    query = select(func.count()).select_from(OutboxEvent).where(
        OutboxEvent.service == service, OutboxEvent.published_at.is_(None))
    return int(session.exec(query).one())


def observe_sequence(session: Session, service: str, envelope: Envelope) -> None:
    row = session.get(AggregateSequence, (service, envelope.aggregate_type, envelope.aggregate_id))
    if row is None:
        session.add(AggregateSequence(service=service, aggregate_type=envelope.aggregate_type,
                                      aggregate_id=envelope.aggregate_id, last_sequence=envelope.sequence))
    elif envelope.sequence > row.last_sequence:
        row.last_sequence = envelope.sequence
        session.add(row)


def next_sequence(session: Session, service: str, aggregate_type: str, aggregate_id: str) -> int:
    row = session.get(AggregateSequence, (service, aggregate_type, aggregate_id))
    if row is None:
        row = AggregateSequence(service=service, aggregate_type=aggregate_type, aggregate_id=aggregate_id)
    row.last_sequence += 1
    session.add(row)
    session.flush()
    return row.last_sequence


class StateStore:
    """JSON documents of one service, read and written inside the caller's session."""

    def __init__(self, session: Session, service: str) -> None:
        self.session = session
        self.service = service

    def get(self, kind: str, key: str, default: Any = None) -> Any:
        row = self.session.get(ServiceState, (self.service, kind, key))
        return json.loads(row.value_json) if row else default

    def put(self, kind: str, key: str, value: Any) -> None:
        row = self.session.get(ServiceState, (self.service, kind, key))
        text = json.dumps(value, sort_keys=True, default=str)
        if row is None:
            row = ServiceState(service=self.service, kind=kind, key=key, value_json=text)
        else:
            row.value_json = text
            row.updated_at = utcnow()
        self.session.add(row)

    def delete(self, kind: str, key: str) -> None:
        row = self.session.get(ServiceState, (self.service, kind, key))
        if row is not None:
            self.session.delete(row)

    def all(self, kind: str) -> dict[str, Any]:
        rows = self.session.exec(
            select(ServiceState).where(ServiceState.service == self.service, ServiceState.kind == kind)
        )
        return {row.key: json.loads(row.value_json) for row in rows}

    def items(self, kind: str) -> Iterator[tuple[str, Any]]:
        yield from self.all(kind).items()


# --- rows of a decider's state (shared.decider) ---------------------------------------


def state_version(session: Session, service: str, kind: str) -> int:
    """How many times the state was saved; 0 when it never was (a new database, or one from before rows)."""
    version = session.exec(
        select(StateHead.version).where(StateHead.service == service, StateHead.kind == kind)
    ).first()
    return version or 0


def advance_state_version(session: Session, service: str, kind: str, expected: int) -> int:
    """Count one more save of a state read at ``expected``; ``StaleState`` when it moved on since."""
    if expected == 0:
        session.add(StateHead(service=service, kind=kind, version=1))
        session.flush()  # a second first save of the same state fails here, on the primary key
        return 1
    moved = session.exec(
        update(StateHead)
        .where(StateHead.service == service, StateHead.kind == kind, StateHead.version == expected)
        .values(version=expected + 1)
    )
    if moved.rowcount != 1:
        raise StaleState(f"{service} {kind} was saved since version {expected} was read")
    return expected + 1


def read_state_rows(session: Session, service: str, kind: str) -> dict[str, str]:
    """The rows of one state: key -> JSON text as stored."""
    rows = session.exec(
        select(ServiceState.key, ServiceState.value_json)
        .where(ServiceState.service == service, ServiceState.kind == kind)
    )
    return {key: text for key, text in rows}


def write_state_rows(session: Session, service: str, kind: str, *, added: dict[str, str],
                     changed: dict[str, str], removed: Iterable[str]) -> None:
    """Insert, update and delete rows of one state; each row is addressed by its key, none is read first."""
    now = utcnow()
    if added:
        session.exec(insert(ServiceState), params=[
            {"service": service, "kind": kind, "key": key, "value_json": text, "updated_at": now}
            for key, text in added.items()])
    for key, text in changed.items():
        session.exec(
            update(ServiceState)
            .where(ServiceState.service == service, ServiceState.kind == kind, ServiceState.key == key)
            .values(value_json=text, updated_at=now)
        )
    removed = list(removed)
    if removed:
        session.exec(
            delete(ServiceState)
            .where(ServiceState.service == service, ServiceState.kind == kind, ServiceState.key.in_(removed))
        )

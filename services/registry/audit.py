"""Audit operations over the archive and the log: export, replay, republish, verify, and "what served at".

``verify_signatures`` checks every archived event's signature and producer at
the time it occurred; ``trust_history`` tells whose keys were trusted when.
Both walk the archive in the order events occurred, folding the operators'
enrolments and revocations into the trust anchors as they come
(``TrustWalk``), so a key revoked later still verifies what it signed before.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from sqlalchemy.engine import Engine
from sqlmodel import Session, func, select

from shared.archive import ArchivedEvent, Projection, export_jsonl, iter_archive, paused_gc, rebuild, table_digest
from shared.bus import MalformedEvent, Publisher, decode, event_headers
from shared.db import engine_at_head, engine_for
from shared.contracts.envelope import Envelope, iso
from shared.settings import Settings
from shared.contracts import schemas
from shared.contracts.signing import REASONS, Refused, RootCache, TrustState, fold_operator_event, key_id_of
from shared.contracts.trust import Keyring, KeyringError, parse_time, verify_decision
from shared.contracts.upcasters import UPCASTERS
from shared.topics import AGGREGATE_TYPES, ensure_topics, topic_for
from shared.keys import load_anchors
from shared.log_reader import FETCH_WAIT_MS, partitions_of, read_to_end
from shared.trust_view import check_envelope
from services.registry import queries
from services.registry.projections import all_projections

# Columns that differ between two faithful builds of the same history.
VOLATILE_COLUMNS = ("id", "archived_at", "updated_at_local")


def registry_engine(settings: Settings) -> Engine:
    return engine_at_head(settings.db_url("registry"))


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
    """Every valid event on the source-of-truth topics from offset 0, and the count of malformed records.

    Read to the end as ``shared.log_reader`` reads it (the reported high watermark is only a lower
    bound); ``timeout_s`` is how long it waits without a record before giving up on a broker that
    reported more than it delivers.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap(), enable_auto_commit=False,
                                auto_offset_reset="earliest", group_id=None, fetch_max_wait_ms=FETCH_WAIT_MS,
                                **settings.kafka_security())
    await consumer.start()
    events: list[Envelope] = []
    malformed = 0
    try:
        partitions = await partitions_of(consumer, [topic_for(aggregate) for aggregate in AGGREGATE_TYPES])
        async for records in read_to_end(consumer, partitions, max_wait_s=timeout_s):
            for record in records:
                try:
                    events.append(decode(record.value))
                except MalformedEvent:
                    malformed += 1
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


def replay_from_log(settings: Settings, progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    with paused_gc():
        events, malformed = asyncio.run(read_log(settings))
        return rebuild(registry_engine(settings), all_projections(), events, progress), malformed


async def republish(settings: Settings, force: bool = False) -> int:
    """Write back every archived event the broker's log lacks (all of them with ``force``), in archive
    order (per aggregate: sequence order); the count written.

    The log is read to its end first, so a broker that came back empty gets the whole archive, and
    one the services already wrote to since (they carry on after a restart) only what it lost.
    """
    await ensure_topics(settings)
    on_log = set() if force else {event.event_id for event in (await read_log(settings, timeout_s=2.0))[0]}
    count = 0
    async with Publisher(settings, "registry") as publisher:
        with Session(registry_engine(settings)) as session:
            rows = session.exec(select(ArchivedEvent).order_by(ArchivedEvent.id)).all()
        for row in rows:
            envelope = Envelope.from_json(row.envelope_json)
            if envelope.event_id in on_log:
                continue
            # the stored bytes go back unchanged: same event_id, same payload version
            await _send_again_on_refusal(publisher, topic_for(envelope.aggregate_type), row.envelope_json.encode(),
                                         envelope.aggregate_id.encode(), event_headers(envelope, []))
            count += 1
    return count


async def _send_again_on_refusal(publisher: Publisher, topic: str, value: bytes, key: bytes, headers: list,
                                 attempts: int = 5) -> None:
    """``send_raw``, tried again when the broker refuses a write: the embedded broker answers an unknown
    error when two producers append to one partition at the same moment (the services do, meanwhile)."""
    for attempt in range(attempts):
        try:
            await publisher.send_raw(topic, value, key, headers)
            return
        except KafkaError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))


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
    report["projections_ok"] = report["ok"]
    report["signatures"] = verify_signatures(settings)
    report["ok"] = report["ok"] and report["signatures"]["ok"]
    return report


def _archive_mark(engine: Engine) -> tuple[int, int | None]:
    """How many events the archive holds and its last id: equal marks mean nothing was archived
    between them (rows are only ever added)."""
    with Session(engine) as session:
        count, last = session.exec(select(func.count(), func.max(ArchivedEvent.id))).one()
    return count, last


def _compare(settings: Settings, projections: list[Projection]) -> dict:
    with tempfile.TemporaryDirectory(prefix="neurons-verify-") as tmp:
        scratch = engine_for(f"sqlite:///{tmp}/scratch.db", upgrade=True)
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
        scratch = engine_for(url, upgrade=True)
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
        answer["signature_check"] = _signature_check(settings, approval, at)
    return answer


def _signature_check(settings: Settings, decision: dict, at: datetime) -> dict:
    """The approver's signature checked against the operators' keys as the archive knew them at ``at``,
    each as it stood when the decision was signed (a key revoked since still counts)."""
    try:
        issued = parse_time(decision["issued_at"])
    except (KeyError, TypeError, ValueError):
        issued = at
    keyring = operator_keyring(settings, at, valid_at=min(issued, at))
    result = verify_decision(decision, keyring, now=issued, required_role=None)
    return {"ok": result.ok, "reason": result.reason, "detail": result.detail,
            "keyring": f"trust anchors {settings.trust_path} and the operators the archive enrolled up to {iso(at)}"}


# --- signatures and the key history ------------------------------------------------------------

SIGNED = "signed_and_authorised"
UPCAST = "upcast_before_archiving"  # archived after its payload was upcast: its bytes are not those signed
UNREADABLE = "unreadable"  # the archived text holds no envelope
OUTCOMES = (SIGNED, *REASONS, UPCAST, UNREADABLE)
LISTED = 100  # failures listed one by one in a report; the counts cover them all


class TrustWalk:
    """The trust anchors, with the operators' enrolments and revocations folded in as the events
    occurred: fed one instant's events after another (``check``), ``state`` holds the keys as they
    stood at that instant. A key only signs from its enrolment on and until its revocation."""

    def __init__(self, anchors: dict) -> None:
        self.state = TrustState.from_anchors(anchors)
        self.cache = RootCache()
        self.history: list[dict[str, Any]] = []  # one entry per operator.* event, in the order they occurred

    def check(self, events: list[Envelope]) -> dict[str, str | Refused]:
        """Each event's signer (its principal) or its refusal, by event id; ``events`` occurred at one instant.

        The instant's operator events come first, tried again until a pass admits none more (an admin
        enrolled at the same instant may sign another enrolment); the others see the keys they left.
        """
        outcome: dict[str, str | Refused] = {}
        pending = [e for e in events if e.aggregate_type == "operator"]
        progress = True
        while pending and progress:
            progress, left = False, []
            for envelope in pending:
                try:
                    principal = check_envelope(envelope, self.state, when=envelope.occurred_at, cache=self.cache)
                except Refused as refused:
                    outcome[envelope.event_id] = refused
                    left.append(envelope)
                    continue
                self._fold(envelope, principal)
                outcome[envelope.event_id] = principal
                progress = True
            pending = left
        for envelope in pending:
            self._note(envelope, refused=outcome[envelope.event_id])
        for envelope in events:
            if envelope.event_id not in outcome:
                try:
                    outcome[envelope.event_id] = check_envelope(envelope, self.state, when=envelope.occurred_at,
                                                                cache=self.cache)
                except Refused as refused:
                    outcome[envelope.event_id] = refused
        return outcome

    def _fold(self, envelope: Envelope, principal: str) -> None:
        key_id = envelope.payload.get("key_id")
        before = self.state.get(key_id)
        fold_operator_event(self.state, envelope.type, envelope.payload, principal, envelope.occurred_at)
        self._note(envelope, by=principal, applied=self.state.get(key_id) != before)

    def _note(self, envelope: Envelope, *, by: str | None = None, applied: bool = False,
              refused: Refused | None = None) -> None:
        p = envelope.payload
        entry = {"event": envelope.type, "at": iso(envelope.occurred_at), "event_id": envelope.event_id,
                 "operator_id": p.get("operator_id"), "key_id": p.get("key_id"),
                 "by": by or (envelope.signature or {}).get("principal"), "applied": applied}
        if envelope.type == "operator.enrolled":
            entry.update(roles=list(p.get("roles") or ()), label=p.get("label"))
        else:
            entry["reason"] = p.get("reason")
        if refused is not None:
            entry.update(refused=refused.reason, detail=refused.detail)
        elif not applied:
            entry["detail"] = ("the key was known already: an anchor, or enrolled before"
                               if envelope.type == "operator.enrolled" else
                               "no such key of this operator, or it was revoked already")
        self.history.append(entry)


def _instants(session: Session, *, until: datetime | None = None,
              operators_only: bool = False) -> Iterator[list[tuple[int, str]]]:
    """The archive's rows ``(id, envelope_json)``, one list per instant they occurred at, in time order
    (within an instant, in archive order)."""
    table = ArchivedEvent.__table__
    query = select(table.c.id, table.c.occurred_at, table.c.envelope_json).order_by(table.c.occurred_at, table.c.id)
    if until is not None:
        if until.tzinfo is None:
            raise ValueError("until must carry a timezone")
        query = query.where(table.c.occurred_at <= until.astimezone(timezone.utc))
    if operators_only:
        query = query.where(table.c.aggregate_type == "operator")
    rows = session.connection().execution_options(stream_results=True, yield_per=2000).execute(query)
    for _, group in itertools.groupby(rows, key=lambda row: row[1]):
        yield [(row[0], row[2]) for row in group]


def _read(envelope_json: str) -> Envelope | None:
    """The envelope as archived, not upcast: the bytes its producer signed (or what became of them)."""
    try:
        return Envelope.from_json(envelope_json)
    except ValueError:  # pydantic's ValidationError is one too
        return None


def walk_archive(settings: Settings, walk: TrustWalk, *, until: datetime | None = None, operators_only: bool = False,
                 ) -> Iterator[tuple[int, Envelope | None, str | Refused | None]]:
    """``(row id, envelope, its signer or refusal)`` for each archived event, in the order they occurred
    (an unreadable row comes with None twice); meanwhile ``walk`` holds the keys as of that event."""
    with paused_gc(), Session(registry_engine(settings)) as session:
        for rows in _instants(session, until=until, operators_only=operators_only):
            read = [(row_id, _read(text)) for row_id, text in rows]
            outcome = walk.check([envelope for _, envelope in read if envelope is not None])
            for row_id, envelope in read:
                yield row_id, envelope, (outcome[envelope.event_id] if envelope is not None else None)


def _upcast_before_archiving(envelope: Envelope, refused: Refused, state: TrustState) -> bool:
    """Whether a ``bad_signature`` is that of an event archived after it was upcast: a type with an
    older version that upcasts to the archived one, under a batch signature that is genuine (the
    signed root verifies with the key it names; only the event's bytes are not the leaf signed)."""
    if refused.reason != "bad_signature" or not any(
            (envelope.type, version) in UPCASTERS for version in range(1, envelope.schema_version)):
        return False
    block = envelope.signature or {}
    record = state.get(block.get("key_id", ""))
    if record is None or record.principal != block.get("principal"):
        return False
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from shared.contracts.signing import _message  # the signed message of a batch: its principal, key, size, root

    try:
        root = base64.b64decode(block["root"], validate=True)
        Ed25519PublicKey.from_public_bytes(base64.b64decode(record.public_key)).verify(
            base64.b64decode(block["sig"], validate=True), _message(record.principal, record.key_id, block["size"], root))
    except (InvalidSignature, KeyError, TypeError, ValueError):
        return False
    return True


def verify_signatures(settings: Settings) -> dict[str, Any]:
    """Every archived event's signature and producer, checked at the time the event occurred.

    ``counts`` has one entry per outcome (``OUTCOMES``); ``failures`` lists the first ``LISTED``
    events that failed, ``upcast`` those archived after an upcast (their signature covers bytes the
    archive no longer holds: they cannot be verified, and they are not counted as failures).
    """
    counts = dict.fromkeys(OUTCOMES, 0)
    failures: list[dict[str, Any]] = []
    upcast: list[dict[str, Any]] = []
    walk = TrustWalk(load_anchors(settings.trust_path))
    for row_id, envelope, outcome in walk_archive(settings, walk):
        if envelope is None:
            kind, detail = UNREADABLE, "the archived text is not an envelope"
        elif isinstance(outcome, Refused):
            kind = UPCAST if _upcast_before_archiving(envelope, outcome, walk.state) else outcome.reason
            detail = outcome.detail
        else:
            counts[SIGNED] += 1
            continue
        counts[kind] += 1
        entry = {"archive_id": row_id, "outcome": kind, "detail": detail}
        if envelope is not None:
            entry.update(event_id=envelope.event_id, type=envelope.type, schema_version=envelope.schema_version,
                         occurred_at=iso(envelope.occurred_at),
                         signed_by=(envelope.signature or {}).get("principal"))
        listed = upcast if kind == UPCAST else failures
        if len(listed) < LISTED:
            listed.append(entry)
    failed = sum(n for kind, n in counts.items() if kind not in (SIGNED, UPCAST))
    return {"ok": failed == 0, "events": sum(counts.values()), "failed": failed, "counts": counts,
            "failures": failures, "upcast": upcast, "trust_path": str(settings.trust_path)}


def trust_history(settings: Settings, until: datetime | None = None) -> dict[str, Any]:
    """Whose keys were trusted when: the anchors, each operator enrolment and revocation the archive
    holds (up to ``until``), the operators' keys as they stand after them, and who may write what."""
    anchors = load_anchors(settings.trust_path)
    walk = TrustWalk(anchors)
    for _ in walk_archive(settings, walk, until=until, operators_only=True):
        pass
    at = until.astimezone(timezone.utc) if until is not None else None
    keys = []
    for record in walk.state.keys.values():
        if record.principal.startswith("operator:") and not record.anchor:
            keys.append({**record.to_dict(), "valid": record.valid_at(at)})
    return {
        "trust_path": str(settings.trust_path), "until": iso(until) if until is not None else None,
        "anchors": {
            "services": {name: {"key_id": key_id_of(entry["public_key"])}
                         for name, entry in sorted(anchors["services"].items())},
            "admins": {name: {"key_id": key_id_of(entry["public_key"]), "label": entry.get("label")}
                       for name, entry in sorted(anchors["admins"].items())}},
        "history": walk.history,
        "operator_keys": sorted(keys, key=lambda k: (k["valid_from"] or "", k["key_id"])),
        "producers": {etype: list(allowed) for etype, allowed in sorted(schemas.producers().items())},
    }


def operator_keyring(settings: Settings, at: datetime, *, valid_at: datetime | None = None) -> Keyring:
    """The operators' keys as the archive knew them at ``at`` (the anchored admins and every enrolment
    and revocation up to it), each operator's key valid at ``valid_at`` (default ``at``), as a ``Keyring``."""
    walk = TrustWalk(load_anchors(settings.trust_path))
    for _ in walk_archive(settings, walk, until=at, operators_only=True):
        pass
    keyring = Keyring()
    for operator_id, record in walk.state.operator_keys(valid_at or at).items():
        try:
            keyring.add(operator_id, record.public_key, record.roles, created_at=record.valid_from)
        except KeyringError:
            continue  # an id or a role the keyring does not take cannot have signed a decision
    return keyring

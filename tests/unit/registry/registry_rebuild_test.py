"""Rebuilding the read models in memory gives the rows that applying the events one by one gives."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from sqlalchemy import Column, Text, inspect
from sqlalchemy.orm import registry as orm_registry
from sqlmodel import Field, Session, SQLModel, select

from services.registry.projections import StreamHead, all_projections
from services.registry.rows import dumps, get_or_new, loads
from shared import db
from shared.archive import (FoldSession, PlainRow, Projection, archive, fold, iter_archive, new_row, rebuild,
                            table_digest)
from tests.support import make_event
from tests.unit.registry.registry_harness import Registry, adapter_sha, cycle_events

SHA_1, SHA_2, SHA_3 = adapter_sha(1), adapter_sha(2), adapter_sha(3)


def one_by_one(engine, projections, events) -> None:
    """The live registry's way: each event applied to a real session, in a transaction of its own."""
    for projection in projections:
        for table in projection.tables:
            table.metadata.create_all(engine)
    for event in events:
        with Session(engine) as session:
            for projection in projections:
                projection.apply(session, event)
            session.commit()


def digests(engine, projections, ignore=()) -> dict[str, tuple[str, int]]:
    return digests_of(engine, [table for projection in projections for table in projection.tables], ignore)


def digests_of(engine, models, ignore=()) -> dict[str, tuple[str, int]]:
    with Session(engine) as session:
        return {model.__tablename__: table_digest(session, model, ignore) for model in models}


@pytest.fixture
def history(tmp_path) -> list:
    """Every event of three cycles, two promotions on one channel, a profile following them, a refused
    promotion and a soak cycle reported twice, in the order the registry archived them."""
    registry = Registry(tmp_path / "var")
    registry.operator("alice", "approver")
    registry.operator("erin", "approver")
    registry.operator("mallory", "requester")
    registry.feed(make_event("profile.create_requested", "pcmd-1", {
        "profile_id": "p-1", "traits": {"tone": "warm"}, "interaction_style": "terse", "context_preferences": {},
        "channel": "production", "requested_by": "alice"}, service="operator:alice"))
    first = cycle_events(SHA_1)
    registry.feed(*first, registry.grant(SHA_1, "alice"))
    again = next(e for e in first if e.type == "validation.cycle_completed")
    registry.feed(make_event(again.type, again.aggregate_id, again.payload, sequence=9, service="validator"))
    registry.feed(*cycle_events(SHA_2), registry.grant(SHA_2, "erin"))
    registry.feed(*cycle_events(SHA_3), registry.grant(SHA_3, "mallory"))  # not an approver: refused
    with Session(registry.service.engine) as session:
        events = list(iter_archive(session))
    types = [e.type for e in events]
    assert types.count("adapter.promoted") == 2 and types.count("profile.adapter_updated") == 2
    assert "adapter.promotion_refused" in types
    return events


@pytest.fixture
def engine(sql_url):
    return db.engine_for(sql_url)


def test_a_rebuild_holds_the_rows_of_every_event_applied_one_by_one(history, engine):
    projections = all_projections()
    one_by_one(engine, projections, history)
    applied = digests(engine, projections)

    count = rebuild(engine, projections, history)  # over the rows just written: they are replaced

    assert count == len(history)
    assert digests(engine, projections) == applied
    assert all(rows for _, rows in applied.values()), applied
    with Session(engine) as session:
        head = session.get(StreamHead, ("validation", f"val-{SHA_1[:16]}"))
    assert head.event_count == 5  # the same row, updated by every event of its stream


def test_a_long_loss_curve_and_soak_records_rebuild_as_applied_one_by_one(engine, monkeypatch):
    """Columns a projection appends to are kept decoded during a rebuild and written once: the text
    must be what encoding them after every event gives, thinned curve and late incidents included."""
    from services.registry import observability

    monkeypatch.setattr(observability, "MAX_CURVE_POINTS", 6)
    events = cycle_events(SHA_1)
    progressed = next(e for e in events if e.type == "training.progressed")
    cycle_done = next(e for e in events if e.type == "validation.cycle_completed")
    completed = next(e for e in events if e.type == "validation.completed")
    more = [make_event(progressed.type, progressed.aggregate_id,
                       {**progressed.payload, "step": step, "loss": 10.0 / step, "eval_loss": 2.0 if step % 3 else None},
                       sequence=10 + step, service="trainer") for step in range(5, 25)]
    soak = [make_event(cycle_done.type, cycle_done.aggregate_id,
                       {**cycle_done.payload, "cycle": n, "outcome": "fail" if n % 2 else "pass",
                        "incidents": [{"cycle": n, "replica_id": "c-2", "side": "candidate", "reason": "slow"}]},
                       sequence=10 + n, service="validator") for n in range(3, 9)]
    late = make_event(completed.type, completed.aggregate_id,
                      {**completed.payload, "incidents": [{"cycle": 9, "reason": "late"}]}, sequence=30,
                      service="validator")
    history = [*events, *more, *soak, late]
    projections = all_projections()
    one_by_one(engine, projections, history)
    applied = digests(engine, projections)

    rebuild(engine, projections, history)

    assert digests(engine, projections) == applied
    with Session(engine) as session:
        run = session.get(observability.TrainingRun, progressed.payload["job_id"])
        snapshot = session.get(observability.ValidationSnapshot, cycle_done.payload["validation_id"])
    curve = loads(run.loss_curve_json)
    assert len(curve) == 6 and curve[-2:] == [{"step": 23, "loss": 10.0 / 23, "eval_loss": 2.0}, {"step": 24, "loss": 10.0 / 24}]
    assert snapshot.cycles_done == 8 and len(loads(snapshot.incidents_json)) == 7


def test_a_value_held_by_the_fold_session_is_written_encoded_once():
    session = FoldSession()
    tally = new_row(session, Tally, name="t")
    session.add(tally)
    encoded: list[list[int]] = []

    def encode(value):
        encoded.append(list(value))
        return dumps(value)

    held = [1]
    session.hold(tally, "sequences", held, encode)
    held.append(2)
    assert session.held(tally, "sequences") is held and session.held(tally, "mood", "none") == "none"
    assert tally.sequences == "[]" and encoded == []  # not encoded while folding

    assert session.rows(Tally) == [tally]
    assert tally.sequences == "[1,2]" and encoded == [[1, 2]]
    assert session.held(tally, "sequences") is None  # written: nothing is held any more
    session.rows(Tally)
    assert encoded == [[1, 2]]


def test_read_model_json_is_sorted_compact_and_strict():
    assert dumps({"b": [1, 2.5], "a": None}) == '{"a":null,"b":[1,2.5]}'
    assert dumps({"loss": float("nan"), "best": float("inf")}) == '{"best":null,"loss":null}'
    assert dumps({"name": "grüße", "at": datetime(2025, 3, 4, tzinfo=timezone.utc), "x": float("nan")}) == \
        '{"at":"2025-03-04 00:00:00+00:00","name":"gr\\u00fc\\u00dfe","x":null}'
    assert dumps({"small": 1e-7}) == '{"small":1e-07}'
    assert loads(dumps({"a": [1, {"b": 2}]})) == {"a": [1, {"b": 2}]} and loads("", []) == []


def test_rows_go_to_the_driver_as_core_would_write_them(tmp_path):
    """On SQLite the compiled INSERT and the bound values go to the driver directly: the table holds
    what Core's insert of the same rows holds, times, NULLs and defaults included."""
    from sqlalchemy import insert

    from shared.archive import insert_rows, insert_values

    rows = []
    for n in range(5):
        head = StreamHead(aggregate_type="cycle", aggregate_id=f"c-{n}", last_sequence=n + 1,
                          last_type="cycle.proposed", last_event_id=f"e-{n}",
                          last_event_at=datetime(2025, 3, 4, 14, n, n, 1000 * n, tzinfo=timezone(timedelta(hours=n))))
        rows.append(head)
    tallies = [Tally(name="a"), Tally(name="b", mood=None, count=3)]
    notes = [Note(text="x"), Note(text="y", kind=None)]
    built = {}
    for way in ("driver", "core"):
        engine = db.engine_for(f"sqlite:///{tmp_path}/{way}.db")
        for model in (StreamHead, Tally, Note):
            model.metadata.create_all(engine)
        with engine.begin() as connection:
            for model, given in ((StreamHead, rows), (Tally, tallies), (Note, notes)):
                for columns, values in insert_values(model, given):
                    if way == "driver":
                        insert_rows(connection, model.__table__, columns, values)
                    else:
                        connection.execute(insert(model.__table__), [dict(zip(columns, row)) for row in values])
        built[way] = digests_of(engine, (StreamHead, Tally, Note))
        db._ENGINES.pop(f"sqlite:///{tmp_path}/{way}.db", None)
        engine.dispose()
    assert built["driver"] == built["core"]
    assert built["driver"]["stream_heads"][1] == 5


def test_times_are_bound_as_sqlalchemys_own_processors_write_them():
    """On SQLite a UTC time column is bound by one function: the text is SQLAlchemy's, byte for byte."""
    from sqlalchemy.dialects import sqlite

    from shared.archive import _bind_processor

    dialect = sqlite.dialect()
    column_type = StreamHead.__table__.c.last_event_at.type
    fused = _bind_processor(column_type, dialect)
    chain = column_type.dialect_impl(dialect).bind_processor(dialect)
    assert fused is not chain
    zones = [timezone.utc, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
    times = [datetime(2025, 3, 4, 14, 3, 0, tzinfo=zone) for zone in zones]
    times += [datetime(year, 12, 31, 23, 59, 59, micro, tzinfo=zone) for year in (1, 999, 1970, 2038, 9998)
              for micro in (0, 1, 999999) for zone in zones]
    times += [datetime(2025, 3, 4, 14, 3, 0, tzinfo=timezone.utc) + timedelta(seconds=n * 7919.123457)
              for n in range(500)]
    for value in times:
        assert fused(value) == chain(value)
    for naive in (datetime(2025, 3, 4, 14, 3), datetime(1, 1, 1)):
        with pytest.raises(ValueError) as expected:
            chain(naive)
        with pytest.raises(ValueError) as got:
            fused(naive)
        assert str(got.value) == str(expected.value)


def test_a_rebuild_of_some_projections_leaves_the_others_alone(history, engine):
    projections = all_projections()
    rebuild(engine, projections, history)
    before = digests(engine, projections)

    rebuild(engine, projections[:1], history[: len(history) // 2])

    after = digests(engine, projections)
    assert after["stream_heads"] != before["stream_heads"]
    assert {k: v for k, v in after.items() if k != "stream_heads"} == \
        {k: v for k, v in before.items() if k != "stream_heads"}


# --- a projection of its own: a counter updated many times, notes with surrogate ids ------------

_registry = orm_registry()


class _Base(SQLModel, registry=_registry):
    pass


class Tally(_Base, table=True):
    __tablename__ = "rebuild_test_tallies"
    name: str = Field(primary_key=True)
    count: int = 0
    last: str | None = None
    sequences: str = Field(default_factory=lambda: "[]")
    mood: str | None = Field(default=None, sa_column=Column(Text, default="calm"))  # a default of the column only
    first: str | None = None  # what the row held when it was made
    seen: str | None = None  # what it held when the last event came


class Note(_Base, table=True):
    __tablename__ = "rebuild_test_notes"
    id: int | None = Field(default=None, primary_key=True)
    text: str
    kind: str | None = Field(default=None, sa_column=Column(Text, default="plain"))


def _apply_notes(session, event) -> None:
    tally, new = get_or_new(session, Tally, {"name": event.aggregate_id})
    tally.seen = f"{new} {tally.count} {tally.last} {tally.sequences} {tally.mood}"
    if new:
        tally.first = tally.seen
    tally.count += 1
    tally.last = event.type
    tally.sequences = dumps(loads(tally.sequences) + [event.sequence])
    tally.mood = {5: None, 6: None, 12: "busy"}.get(event.sequence, tally.mood)  # the row is stored by now
    session.add(tally)
    note = new_row(session, Note, text=f"{event.aggregate_id} {event.sequence} {event.type}", kind=None)
    if event.sequence % 3 == 0:
        note.kind = "third"
    session.add(note)
    session.flush()
    if event.sequence == 7:
        note.kind = None  # after it was stored


NOTES = Projection("notes", [Tally, Note], _apply_notes)


def _note_events() -> list:
    return [make_event("cycle.proposed", f"cyc-{n % 3}", {"cycle_id": f"cyc-{n % 3}"}, sequence=n + 1)
            for n in range(12)]


def _notes_rebuilt_as_applied(engine) -> None:
    """Apply the note events one by one, rebuild them, and find the same tables."""
    events = _note_events()
    one_by_one(engine, [NOTES], events)
    applied = digests(engine, [NOTES], ignore=("id",))

    rebuild(engine, [NOTES], events)

    assert digests(engine, [NOTES], ignore=("id",)) == applied


def test_rows_with_surrogate_ids_are_all_written(engine):
    _notes_rebuilt_as_applied(engine)
    with Session(engine) as session:
        notes = session.exec(select(Note)).all()
        tallies = {t.name: t.count for t in session.exec(select(Tally)).all()}
    assert len(notes) == 12 and all(note.id is not None for note in notes)
    assert tallies == {"cyc-0": 4, "cyc-1": 4, "cyc-2": 4}


def test_defaults_and_rows_changed_after_they_were_made_are_stored_as_one_by_one(engine):
    _notes_rebuilt_as_applied(engine)
    with Session(engine) as session:
        tallies = {t.name: t for t in session.exec(select(Tally)).all()}
        kinds = [note.kind for note in session.exec(select(Note)).all()]
    # cyc-0 got sequences 1, 4, 7, 10, cyc-1 2, 5, 8, 11 and cyc-2 3, 6, 9, 12
    assert tallies["cyc-0"].first == "True 0 None [] calm"  # the defaults, the column's own included
    assert (tallies["cyc-0"].mood, tallies["cyc-0"].sequences) == ("calm", "[1,4,7,10]")
    assert tallies["cyc-0"].seen == "False 3 cycle.proposed [1,4,7] calm"
    assert tallies["cyc-1"].mood is None  # set to None after the row was made: NULL, not the default
    assert tallies["cyc-2"].mood == "busy" and tallies["cyc-2"].seen == "False 3 cycle.proposed [3,6,9] None"
    assert (kinds.count("plain"), kinds.count("third"), kinds.count(None)) == (7, 4, 1)


def test_a_new_row_holds_what_a_new_instance_of_its_model_holds():
    fold_session = FoldSession()
    for model in [table for projection in all_projections() for table in projection.tables]:
        key = {column.key: f"k-{column.key}" for column in inspect(model).primary_key}
        plain, instance = new_row(fold_session, model, **key), model(**key)
        assert isinstance(plain, PlainRow) and not isinstance(plain, SQLModel)
        assert {name: getattr(plain, name) for name in model.model_fields} == \
            {name: getattr(instance, name) for name in model.model_fields}, model.__name__
    with pytest.raises(TypeError, match="Tally has no column colour, size"):
        new_row(fold_session, Tally, name="t", size=1, colour="red")
    assert isinstance(new_row(Session(), Tally, name="t"), Tally)  # a real session gets the model itself
    tally = new_row(fold_session, Tally, name="t")
    assert (tally.count, tally.last, tally.sequences, tally.mood) == (0, None, "[]", "calm")
    fold_session.add(tally)
    assert fold_session.get(Tally, "t") is tally and fold_session.get(Tally, {"name": "t"}) is tally


def test_the_fold_session_finds_rows_by_any_form_of_their_key():
    session = FoldSession()
    head = StreamHead(aggregate_type="cycle", aggregate_id="c-1", last_sequence=1, last_type="cycle.proposed",
                      last_event_id="e", last_event_at=make_event("cycle.proposed", "c-1", {}).occurred_at)
    session.add(head)
    session.add(head)  # adding it again changes nothing

    assert session.get(StreamHead, ("cycle", "c-1")) is head
    assert session.get(StreamHead, {"aggregate_type": "cycle", "aggregate_id": "c-1"}) is head
    assert session.get(StreamHead, ("cycle", "c-2")) is None
    assert session.get(Tally, "nothing") is None
    assert session.rows(StreamHead) == [head]

    tally = Tally(name="t")
    session.add(tally)
    assert session.get(Tally, "t") is tally and session.get(Tally, ("t",)) is tally
    with pytest.raises(ValueError):
        session.add(Tally(name="t"))

    first, second = Note(text="a"), Note(text="b")
    session.add(first)
    session.add(second)
    session.add(first)
    assert session.rows(Note) == [first, second]


def test_the_fold_reports_progress_every_500_events():
    seen: list[int] = []
    events = [SimpleNamespace(n=n) for n in range(1250)]

    _, count = fold([Projection("none", [], lambda session, event: None)], events, seen.append)

    assert count == 1250 and seen == [500, 1000]


def test_the_archive_reads_back_in_order_in_batches_up_to_a_moment(engine):
    start = datetime(2025, 3, 4, 14, 0, tzinfo=timezone.utc)
    events = [make_event("cycle.proposed", f"cyc-{n}", {"cycle_id": f"cyc-{n}"})
              .model_copy(update={"occurred_at": start + timedelta(minutes=n)}) for n in range(5)]
    with Session(engine) as session:
        for event in events:
            archive(session, event)
        session.commit()
        every = list(iter_archive(session, batch=2))
        until = list(iter_archive(session, until=start + timedelta(minutes=2), batch=2))
        # the same moment written in another zone
        elsewhere = list(iter_archive(session, until=datetime(2025, 3, 4, 16, 2, tzinfo=timezone(timedelta(hours=2)))))

    assert [e.event_id for e in every] == [e.event_id for e in events]
    assert every[0] == events[0]
    assert [e.aggregate_id for e in until] == ["cyc-0", "cyc-1", "cyc-2"]
    assert [e.aggregate_id for e in elsewhere] == ["cyc-0", "cyc-1", "cyc-2"]

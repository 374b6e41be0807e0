"""The durable audit archive and the machinery to rebuild projections from it.

The registry stores every event it reads exactly once (unique event_id) in
SQL. That archive outlives the embedded broker's memory: the read models are
projections rebuilt from it (``rebuild``), the log can be restored from it
(``neurons audit republish``), and ``table_digest`` compares a rebuilt copy
with the live one (``neurons audit verify``).

A rebuild folds the events in memory first (``fold``: the projections' own
apply functions, run against a ``FoldSession``), then replaces the tables'
contents with the result in one transaction (``write``). The live registry
applies the same functions to a real ORM session, one event at a time.
"""

from __future__ import annotations

import gc
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache, partial
from operator import attrgetter
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence, TypeVar

from sqlalchemy import Column, Table, Text, delete, insert, inspect
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlmodel import Field, Session, SQLModel, select
from sqlmodel.sql.sqltypes import UTCDateTime

from shared.contracts import schemas
from shared.contracts.envelope import Envelope, utcnow

Row = TypeVar("Row", bound=SQLModel)


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
            partition: int | None = None, offset: int | None = None, raw: bytes | None = None) -> bool:
    """Store ``envelope`` once; False when it is already archived.

    ``raw`` is the record's value as it was published, kept as it is: an event
    upcast on reading still verifies against its signature (reading the
    archive upcasts it again, ``iter_archive``).
    """
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
            envelope_json=_as_published(envelope, raw),
            topic=topic,
            partition=partition,
            offset=offset,
        )
    )
    return True


def _as_published(envelope: Envelope, raw: bytes | None) -> str:
    if raw is not None and envelope.signature is not None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        if text and "\n" not in text and "\r" not in text:  # an export holds one event a line
            return text
    return envelope.to_json().decode()


def iter_archive(session: Session, until: datetime | None = None, batch: int = 5000) -> Iterator[Envelope]:
    """Every archived event in the order it was archived (per aggregate: its sequence).

    Reads only the columns it needs, ``batch`` rows at a time; with ``until``, the
    events that occurred after it are left out.
    """
    table = ArchivedEvent.__table__
    query = select(table.c.id, table.c.envelope_json).order_by(table.c.id).limit(batch)
    if until is not None:  # compared by the database: a stored time read back would be a datetime to parse
        if until.tzinfo is None:
            raise ValueError("until must carry a timezone")
        query = query.where(table.c.occurred_at <= until.astimezone(timezone.utc))
    connection = session.connection()
    last = 0
    while True:
        rows = connection.execute(query.where(table.c.id > last)).all()
        if not rows:
            return
        last = rows[-1][0]
        for _, envelope_json in rows:
            yield upcast_envelope(Envelope.from_json(envelope_json))


def _naive(ts: datetime) -> datetime:
    """A time as the archive stores it: UTC without a zone (a time with another zone is converted first)."""
    return ts.astimezone(timezone.utc).replace(tzinfo=None) if ts.tzinfo else ts


def upcast_envelope(envelope: Envelope) -> Envelope:
    version, payload = schemas.upcast(envelope.type, envelope.schema_version, envelope.payload)
    return envelope if version == envelope.schema_version else envelope.with_payload(payload, version)


def export_jsonl(session: Session, out: Path) -> int:
    """Write every archived event, as published, one JSON object per line."""
    count = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for envelope_json in session.exec(select(ArchivedEvent.envelope_json).order_by(ArchivedEvent.id)):
            fh.write(envelope_json + "\n")
            count += 1
    return count


@dataclass(frozen=True)
class Projection:
    """A read model: the tables it owns and how one event changes them.

    ``apply`` gets the registry's ORM session when it runs live and a
    ``FoldSession`` during a rebuild, so it uses only ``get``, ``add`` and
    ``flush``, makes its rows with ``new_row`` and treats them as plain
    attributes (no ORM or pydantic methods, no relationships).
    """

    name: str
    tables: Sequence[type[SQLModel]]
    apply: Callable[[Session, Envelope], None]


class PlainRow:
    """A row of a table model held as plain attributes: what a fold makes instead of an ORM instance.

    ``plain_row_class(model)`` gives the class for a model, one slot per column.
    A new row holds what a new ORM instance of the model holds once flushed:
    each column not given takes the field's default (or default factory), and a
    column left None that has a scalar column default takes that default (as
    the INSERT would store it). Setting a column afterwards is an UPDATE:
    None then stores NULL. Columns the database fills in (an autoincrement
    key, a server-side or generated default) stay None until written.
    """

    __slots__ = ()
    # Underscored, as no column of a model can be: the rest of the namespace is the columns'.
    _model: ClassVar[type[SQLModel]]
    # (attribute, default when not given, default factory or None, what None becomes)
    _fill: ClassVar[tuple[tuple[str, Any, Callable[[], Any] | None, Any], ...]]
    _key: ClassVar[Callable[[PlainRow], Any]]  # the primary key: a value, or a tuple of them

    # __init__(**columns): each class has its own, written out column by column (``_init_for``)

    def __repr__(self) -> str:
        values = ", ".join(f"{name}={getattr(self, name)!r}" for name, *_ in self._fill)
        return f"{type(self).__name__}({values})"


_IMMUTABLE = (type(None), str, int, float, bool, bytes, datetime, tuple, frozenset)


@lru_cache(maxsize=None)
def plain_row_class(model: type[SQLModel]) -> type[PlainRow]:
    """The ``PlainRow`` class of ``model``'s table (one per model)."""
    mapper = inspect(model)
    fill = []
    for prop in mapper.column_attrs:
        column = prop.columns[0]
        field = model.model_fields.get(prop.key)
        default, factory = None, None
        if field is not None and not field.is_required():
            if field.default_factory is None and isinstance(field.default, _IMMUTABLE):
                default = field.default
            else:  # a factory, or a mutable default the model copies for every instance
                factory = partial(field.get_default, call_default_factory=True)
        scalar = column.default is not None and column.default.is_scalar and not column.type.should_evaluate_none
        fill.append((prop.key, default, factory, column.default.arg if scalar else None))
    return type(f"{model.__name__}Row", (PlainRow,),
                {"__slots__": tuple(name for name, *_ in fill), "__module__": __name__,
                 "_model": model, "_fill": tuple(fill), "_key": attrgetter(*_primary_key(model)),
                 "__init__": _init_for(model, tuple(fill))})


def _init_for(model: type[SQLModel], fill: tuple[tuple[str, Any, Callable[[], Any] | None, Any], ...]) -> Callable:
    """``PlainRow.__init__`` for one model, written out column by column (as dataclasses do): each
    column not given takes its default or factory, None becomes what None stores, and a name that is
    no column raises TypeError. A fold makes a row for every new aggregate; a loop over the columns
    with a call per column was most of what that cost."""
    names: dict[str, Any] = {"_model": model}
    lines = ["def __init__(self, **values):", "    pop = values.pop"]
    for index, (name, default, factory, none) in enumerate(fill):
        names[f"_d{index}"], names[f"_f{index}"], names[f"_n{index}"] = default, factory, none
        get = f"pop({name!r}, _d{index})" if factory is None else f"pop({name!r}) if {name!r} in values else _f{index}()"
        lines += [f"    value = {get}", f"    self.{name} = _n{index} if value is None else value"]
    lines += ["    if values:",
              "        raise TypeError(f\"{_model.__name__} has no column {', '.join(sorted(values))}\")"]
    exec("\n".join(lines), names)
    return names["__init__"]


def new_row(session: Session | FoldSession, model: type[Row], **values: Any) -> Row:
    """A new row of ``model`` with ``values`` (not yet added): an instance of the model for an
    ORM session, a ``PlainRow`` of it for a ``FoldSession``."""
    if isinstance(session, FoldSession):
        return session.new(model, values)
    return model(**values)


class FoldSession:
    """The part of an ORM session a projection uses, over plain memory, for rebuilds.

    A projection's apply function reads and writes its rows through three calls:
    ``get(model, ident)``, ``add(row)`` and ``flush()``, and makes new rows with
    ``new_row`` (here: ``PlainRow`` objects, far cheaper to make and change than
    ORM instances). They work on a dict per model keyed by primary key, so
    folding an event costs no SQL; what it holds at the end is what the tables
    would hold after applying the same events one by one to a real session
    (``write`` stores it).

    - ``get`` takes the identity as a session does: a scalar, a tuple (primary
      key columns in table order) or a dict by column name;
    - ``add`` files a row (a ``PlainRow`` or an instance of the model) under its
      primary key; adding another row with the same key raises, as a session's
      flush would;
    - a row whose primary key is still unset when added (an autoincrement
      surrogate) is kept, in order, and given its id by the database when
      written, so ``get`` cannot find it by id;
    - ``flush`` has nothing to do: an added row is found straight away;
    - ``hold(row, column, value, encode)`` keeps a column's value decoded (a
      list a projection appends to, say) and ``held`` gives it back: the
      column is set to ``encode(value)`` once, when the rows are read for
      writing, instead of after every event.
    """

    def __init__(self) -> None:
        self._keyed: dict[type[SQLModel], dict[Any, Any]] = {}
        self._unkeyed: dict[type[SQLModel], dict[int, Any]] = {}
        self._classes: dict[type[SQLModel], type[PlainRow]] = {}
        self._held: dict[tuple[int, str], tuple[Any, Any, Callable[[Any], Any]]] = {}

    def hold(self, row: Any, column: str, value: Any, encode: Callable[[Any], Any]) -> None:
        """Keep ``value`` as ``row.column``'s content; the column gets ``encode(value)`` before it is written."""
        self._held[(id(row), column)] = (row, value, encode)

    def held(self, row: Any, column: str, otherwise: Any = None) -> Any:
        """The value held for ``row.column`` (see ``hold``), or ``otherwise``."""
        entry = self._held.get((id(row), column))
        return otherwise if entry is None else entry[1]

    def _settle(self) -> None:
        for (_, column), (row, value, encode) in self._held.items():
            setattr(row, column, encode(value))
        self._held.clear()

    def new(self, model: type[SQLModel], values: dict[str, Any]) -> PlainRow:
        """A new ``PlainRow`` of ``model`` (not yet added)."""
        cls = self._classes.get(model)
        if cls is None:
            cls = self._classes[model] = plain_row_class(model)
        return cls(**values)

    def get(self, model: type[SQLModel], ident: Any) -> Any:
        rows = self._keyed.get(model)
        if rows is None:
            return None
        if isinstance(ident, dict):
            ident = tuple(ident[name] for name in _primary_key(model))
        if isinstance(ident, (tuple, list)):
            ident = ident[0] if len(ident) == 1 else tuple(ident)
        return rows.get(ident)

    def add(self, row: Any) -> None:
        if isinstance(row, PlainRow):
            model, key = row._model, row._key(row)
        else:
            model, values = type(row), row.__dict__
            key = tuple(values.get(name) for name in _primary_key(model))
            key = key[0] if len(key) == 1 else key
        if key is None or (type(key) is tuple and None in key):
            self._unkeyed.setdefault(model, {})[id(row)] = row
            return
        rows = self._keyed.get(model)
        if rows is None:
            rows = self._keyed[model] = {}
        held = rows.setdefault(key, row)
        if held is not row:
            raise ValueError(f"another {model.__name__} row is already held under {key!r}")

    def flush(self) -> None:
        """Nothing to write: rows are visible to ``get`` as soon as they are added."""

    def rows(self, model: type[SQLModel]) -> list[Any]:
        """Every row of ``model``: those with a key in the order first added, then the others
        (each column held decoded set to its encoded value first)."""
        if self._held:
            self._settle()
        return [*self._keyed.get(model, {}).values(), *self._unkeyed.get(model, {}).values()]


@lru_cache(maxsize=None)
def _primary_key(model: type[SQLModel]) -> tuple[str, ...]:
    mapper = inspect(model)
    return tuple(mapper.get_property_by_column(column).key for column in mapper.primary_key)


_OMIT = object()  # leave the column out of the INSERT: the database fills it in


@lru_cache(maxsize=None)
def _insert_plan(model: type[SQLModel]) -> tuple[tuple[str, str, Any], ...]:
    """(attribute, column, what None becomes) for each column of ``model``'s table.

    None becomes what an ORM flush of a new row would store: the column's scalar
    default, or nothing at all (so the database's own default, a generated
    default or the autoincrement applies), or NULL.
    """
    mapper = inspect(model)
    plan = []
    for prop in mapper.column_attrs:
        if len(prop.columns) != 1:
            continue
        column = prop.columns[0]
        if column.table is not mapper.local_table:
            continue
        if column.type.should_evaluate_none:
            none = None
        elif column.primary_key:
            none = _OMIT
        elif column.default is not None:
            none = column.default.arg if column.default.is_scalar else _OMIT
        elif column.server_default is not None:
            none = _OMIT
        else:
            none = None
        plan.append((prop.key, column.key, none))
    return tuple(plan)


def insert_values(model: type[SQLModel], rows: Iterable[Any]) -> list[tuple[tuple[str, ...], list[tuple[Any, ...]]]]:
    """``rows`` as the values of their INSERT: (columns, one tuple per row), one pair per set of columns given.

    A ``PlainRow`` already holds its scalar defaults (see ``PlainRow``), so None
    in it stores NULL, except where the database fills the column in. An
    instance of the model is a row added but never flushed: None in it
    becomes what its INSERT would store. Rows usually give the same columns,
    so this is one pair, inserted with one executemany.
    """
    plan = _insert_plan(model)
    if not plan:
        return []
    columns = tuple(column for _, column, _ in plan)
    omittable = tuple(index for index, (_, _, none) in enumerate(plan) if none is _OMIT)
    read = attrgetter(*(attribute for attribute, _, _ in plan))
    single = len(plan) == 1
    groups: dict[tuple[int, ...], list[tuple[Any, ...]]] = {}
    for row in rows:
        if isinstance(row, PlainRow):
            values = (read(row),) if single else read(row)
        else:
            given = row.__dict__
            values = tuple(none if (value := given.get(attribute)) is None and none is not _OMIT else value
                           for attribute, _, none in plan)
        left_out = tuple(index for index in omittable if values[index] is None) if omittable else ()
        if left_out:
            values = tuple(value for index, value in enumerate(values) if index not in left_out)
        group = groups.get(left_out)
        if group is None:
            group = groups[left_out] = []
        group.append(values)
    return [(tuple(column for index, column in enumerate(columns) if index not in left_out), values)
            for left_out, values in groups.items()]


@lru_cache(maxsize=256)
def _driver_insert(dialect: Dialect, table: Table, columns: tuple[str, ...]) -> tuple[str, tuple[Any, ...]] | None:
    """The INSERT of ``columns`` into ``table`` as the driver takes it, with each column's bind
    processor (or None); None when the dialect's parameters are not positional or the compiled
    statement binds anything else (a column default Core would fill in per row)."""
    if not dialect.positional:
        return None
    compiled = insert(table).compile(dialect=dialect, column_keys=list(columns))
    if tuple(compiled.positiontup or ()) != columns:
        return None
    processors = tuple(_bind_processor(table.c[name].type, dialect) for name in columns)
    return compiled.string, processors


_SQLITE_DATETIME_TEXT = sqlite.DATETIME()._storage_format  # SQLAlchemy's own: 2025-03-04 14:03:00.000000


def _bind_processor(column_type: Any, dialect: Dialect) -> Callable[[Any], Any] | None:
    """The column's bind processor; for sqlmodel's UTC datetime stored as SQLite text in SQLAlchemy's
    format, one function that gives what its two chained processors give (the chain is a call per
    step and a dict per value; a rebuild writes several thousand times)."""
    impl = column_type.dialect_impl(dialect)
    chain = impl.bind_processor(dialect)
    if not (chain is not None and dialect.name == "sqlite" and type(column_type) is UTCDateTime
            and type(impl.impl) is sqlite.DATETIME and impl.impl._storage_format == _SQLITE_DATETIME_TEXT):
        return chain

    def utc_text(value: datetime) -> str:
        if type(value) is not datetime or value.utcoffset() is None:
            return chain(value)  # a subclass formats itself; a naive time gets sqlmodel's error
        if value.tzinfo is not timezone.utc:
            value = value.astimezone(timezone.utc)
        return value.isoformat(" ", "microseconds")[:26]  # without the +00:00

    return utc_text


def insert_rows(connection: Connection, table: Table, columns: tuple[str, ...], values: list[tuple[Any, ...]]) -> None:
    """INSERT one row per tuple of ``values`` (in ``columns`` order) in one executemany.

    Where the driver takes positional parameters (SQLite), the compiled
    statement and the rows, passed through the columns' bind processors, go
    to it directly; elsewhere (PostgreSQL) through Core's insert, which
    batches them into multi-row VALUES.
    """
    driver = _driver_insert(connection.dialect, table, columns)
    if driver is None:
        connection.execute(insert(table), [dict(zip(columns, row)) for row in values])
        return
    sql, processors = driver
    convert = [(index, process) for index, process in enumerate(processors) if process is not None]
    if convert:
        converted = []
        for row in values:
            row = list(row)
            for index, process in convert:
                value = row[index]
                if value is not None:
                    row[index] = process(value)
            converted.append(tuple(row))
        values = converted
    connection.exec_driver_sql(sql, values)


def fold(projections: Sequence[Projection], events: Iterable[Envelope],
         progress: Callable[[int], None] | None = None) -> tuple[FoldSession, int]:
    """Apply ``events`` in order to empty projections in memory; the rows and the count of events.

    ``progress`` is told the count every 500 events.
    """
    session = FoldSession()
    applies = [projection.apply for projection in projections]
    count = 0
    for envelope in events:
        for apply in applies:
            apply(session, envelope)
        count += 1
        if progress is not None and count % 500 == 0:
            progress(count)
    return session, count


def _tables(projections: Iterable[Projection]) -> list[type[SQLModel]]:
    """The projections' tables, parents before children."""
    models = list({model: None for projection in projections for model in projection.tables})
    order = {table: index for metadata in {model.metadata: None for model in models}
             for index, table in enumerate(metadata.sorted_tables)}
    return sorted(models, key=lambda model: order[model.__table__])


def write(engine: Engine, projections: Sequence[Projection], folded: FoldSession) -> None:
    """Replace what the projections' tables hold with ``folded``'s rows, in one transaction."""
    models = _tables(projections)
    with engine.begin() as connection:
        for model in reversed(models):  # children before parents
            connection.execute(delete(model.__table__))
        for model in models:
            for columns, values in insert_values(model, folded.rows(model)):
                insert_rows(connection, model.__table__, columns, values)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Hold the cyclic garbage collector while a replay reads and folds.

    A replay allocates and keeps tens of thousands of objects (envelopes, their
    payloads, rows) that form no reference cycles; every automatic collection
    on the way would walk them all again, and did so often enough to take most
    of the time spent reading the archive. Reference counting still frees what
    is dropped, and the first automatic collection after the replay walks
    what is left once.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def rebuild(engine: Engine, projections: Sequence[Projection], events: Iterable[Envelope],
            progress: Callable[[int], None] | None = None) -> int:
    """Rebuild the projections from ``events``: create those of their tables the database lacks, fold
    the events in memory, then replace the tables' rows with the result in one transaction. The
    count of events; ``progress`` as in ``fold``."""
    _create_missing(engine, [model.__table__ for model in _tables(projections)])
    folded, count = fold(projections, events, progress)
    write(engine, projections, folded)
    return count


def _create_missing(engine: Engine, tables: Sequence[Table]) -> None:
    """Create those of ``tables`` the database lacks (with their indexes): one look at what it
    holds, instead of one per table as ``create_all`` takes."""
    inspector = inspect(engine)
    existing = {schema: set(inspector.get_table_names(schema=schema)) for schema in {t.schema for t in tables}}
    missing = [table for table in tables if table.name not in existing[table.schema]]
    for metadata in {table.metadata: None for table in missing}:
        metadata.create_all(engine, tables=[table for table in missing if table.metadata is metadata])


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

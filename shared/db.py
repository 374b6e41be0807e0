"""SQL engines: SQLite under var/ by default, PostgreSQL when configured; the schema they hold.

The schema is versioned with Alembic (``shared/migrations``). ``neurons db upgrade``
(and ``neurons up``, before it starts anything) brings every database the platform
uses to the head revision with ``migrate``; a service refuses to start on a
database that is not there (``require_head``). A database an earlier version of
the platform created, before the schema was versioned, is adopted by the first
revision: the tables it lacks are created, those it holds get the columns they
lack (``add_column``), and the revision is recorded.

``engine_for`` opens a database as it is. A process that owns its databases
outright (the test suite, a tool on a scratch database) asks it to upgrade them
too: ``engine_for(url, upgrade=True)``, or ``upgrade_on_open(True)`` for every
engine the process opens.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import MetaData, event, inspect, make_url
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.schema import Column
from sqlmodel import create_engine


class OutdatedSchema(RuntimeError):
    """A table lacks a column that cannot be added in place (NOT NULL with no default)."""


class SchemaBehind(RuntimeError):
    """The database is not at the head revision: ``neurons db upgrade`` brings it there."""


class UnknownRevision(RuntimeError):
    """The database is at a revision this version of the platform does not have (a newer one wrote it)."""


_ENGINES: dict[str, Engine] = {}
_UPGRADED: weakref.WeakSet[Engine] = weakref.WeakSet()  # engines this process brought to head
_CHECKED: weakref.WeakSet[Engine] = weakref.WeakSet()  # engines found at head by ``engine_at_head``
_UPGRADE_ON_OPEN = False


def upgrade_on_open(enabled: bool) -> bool:
    """Make every ``engine_for`` in this process upgrade its database (tests, tools on scratch databases);
    what it was before, to put back."""
    global _UPGRADE_ON_OPEN
    before, _UPGRADE_ON_OPEN = _UPGRADE_ON_OPEN, enabled
    return before


def engine_for(url: str, upgrade: bool | None = None) -> Engine:
    """One engine per URL per process; SQLite gets WAL so readers never block writers. ``upgrade``:
    bring the database to the head revision first (default: what ``upgrade_on_open`` said)."""
    engine = _ENGINES.get(url)
    if engine is None:
        engine = _ENGINES[url] = _new_engine(url)
    if (_UPGRADE_ON_OPEN if upgrade is None else upgrade) and engine not in _UPGRADED:
        migrate(engine)
    return engine


def _new_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
        return engine
    if url.startswith("postgresql://"):
        url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    return create_engine(url, pool_pre_ping=True)


def shown(url: str | Engine) -> str:
    """The URL to print: without its password."""
    return (url.url if isinstance(url, Engine) else make_url(url)).render_as_string(hide_password=True)


def revision_of(engine: Engine) -> str | None:
    """The revision the database is at; None when no revision has run on it."""
    from shared import migrations

    with engine.connect() as connection:
        return migrations.current(connection)


def head_revision() -> str:
    from shared import migrations

    return migrations.head()


def migrate(target: str | Engine) -> tuple[str | None, str]:
    """Bring the database to the head revision (creating it from nothing, adopting one an earlier
    version made, or running the revisions it lacks); the revisions before and after.

    On PostgreSQL this runs under the schema lock, so processes upgrading one database at the
    same time take turns and the later ones find it at head.
    """
    from alembic import command

    from shared import migrations

    engine = engine_for(target, upgrade=False) if isinstance(target, str) else target
    with schema_lock(engine):
        before = revision_of(engine)
        _require_known(shown(target), before)
        if before != migrations.head():
            with engine.begin() as connection:
                command.upgrade(migrations.config(connection), "head")
    _UPGRADED.add(engine)
    return before, revision_of(engine) or "none"


def _require_known(database: str, revision: str | None) -> None:
    from shared import migrations

    if revision is not None and not migrations.known(revision):
        raise UnknownRevision(f"database {database} is at revision {revision}, which this version of the "
                              f"platform does not have (its newest is {migrations.head()}): run the newer version")


def check_head(url: str) -> None:
    """``SchemaBehind`` (or ``UnknownRevision``) unless the database at ``url`` is at the head revision."""
    engine = engine_for(url, upgrade=False)
    at, head = revision_of(engine), head_revision()
    _require_known(shown(url), at)
    if at != head:
        raise SchemaBehind(f"database {shown(url)} is at revision {at or 'none'}, needs {head}: "
                           "run neurons db upgrade")


def engine_at_head(url: str) -> Engine:
    """``engine_for(url)``, checked once per process to be at the head revision: a tool reading a
    service's database says in one line (``SchemaBehind``) that it needs ``neurons db upgrade``,
    instead of failing on a missing table."""
    engine = engine_for(url)
    if engine not in _UPGRADED and engine not in _CHECKED:
        check_head(url)
        _CHECKED.add(engine)
    return engine


def require_head(url: str, service: str) -> None:
    """At a service's start: exit with one line unless its database is at the head revision."""
    try:
        check_head(url)
    except (SchemaBehind, UnknownRevision) as exc:
        raise SystemExit(f"{service}: {exc}") from None


# Any fixed number: every process that creates or upgrades tables takes this advisory lock first.
_SCHEMA_LOCK = 0x6E6575726F6E73  # "neurons"


@contextmanager
def schema_lock(engine: Engine) -> Iterator[None]:
    """One process at a time creates or upgrades the tables of a database.

    Concurrent ``CREATE TABLE`` of the same table races in PostgreSQL's catalogue
    (``pg_type_typname_nsp_index``): on PostgreSQL an advisory lock, held by one
    connection for the whole upgrade. A SQLite file gets a lock file beside it.
    """
    if engine.dialect.name == "sqlite":
        with _file_lock(engine):
            yield
        return
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as connection:
        connection.exec_driver_sql(f"SELECT pg_advisory_lock({_SCHEMA_LOCK})")
        try:
            yield
        finally:
            connection.exec_driver_sql(f"SELECT pg_advisory_unlock({_SCHEMA_LOCK})")
            connection.commit()


@contextmanager
def _file_lock(engine: Engine) -> Iterator[None]:
    import fcntl
    from pathlib import Path

    database = engine.url.database
    if not database or database == ":memory:":
        yield
        return
    path = Path(f"{database}.migrate.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def add_missing_columns(engine: Engine, metadata: MetaData) -> list[str]:
    """Add to each table of ``metadata`` the database already holds the columns it lacks; the
    ``table.column`` names added.

    A column added this way is empty (NULL, or its scalar default) in the rows
    already there. In a projection that is the state of the rows before the
    events that fill it were read: ``neurons audit replay`` rebuilds them from
    the archive. A NOT NULL column with no scalar default cannot be added in
    place: ``OutdatedSchema`` names it.
    """
    inspector = inspect(engine)
    held = {}  # (schema, table name) -> its columns' names, one query per schema
    for schema in {table.schema for table in metadata.sorted_tables}:
        for (_, name), columns in inspector.get_multi_columns(schema=schema).items():
            held[(schema, name)] = {column["name"] for column in columns}
    added = []
    for table in metadata.sorted_tables:
        present = held.get((table.schema, table.name))
        if present is None:  # the database lacks the whole table: that is a revision's work
            continue
        for column in (column for column in table.columns if column.name not in present):
            try:
                with engine.begin() as connection:
                    connection.exec_driver_sql(_add_column(engine.dialect, column))
            except DBAPIError:
                # another process starting on the same database may have added it first
                if column.name not in {c["name"] for c in inspect(engine).get_columns(table.name, schema=table.schema)}:
                    raise
                continue
            added.append(f"{table.name}.{column.name}")
    return added


def add_column(connection: Connection, column: Column, defaults_from: Column | None = None) -> None:
    """``ALTER TABLE ... ADD COLUMN`` for ``column`` of its table, with the scalar default of
    ``defaults_from`` (the model's column) or its own; ``OutdatedSchema`` when it needs a value and has none."""
    connection.exec_driver_sql(_add_column(connection.dialect, column, defaults_from))


def _add_column(dialect: Dialect, column: Column, defaults_from: Column | None = None) -> str:
    default, literal = (defaults_from if defaults_from is not None else column).default, None
    if default is not None and default.is_scalar and default.arg is not None:
        render = column.type.literal_processor(dialect)
        literal = render(default.arg) if render is not None else None
    if not column.nullable and literal is None:
        raise OutdatedSchema(
            f"table {column.table.name} lacks column {column.name}, which needs a value in every row and has "
            "no default, so it cannot be added in place: the database predates it; move it aside and start again")
    preparer = dialect.identifier_preparer
    sql = (f"ALTER TABLE {preparer.format_table(column.table)} ADD COLUMN {preparer.quote(column.name)} "
           f"{column.type.compile(dialect=dialect)}")
    if literal is not None:
        sql += f" DEFAULT {literal}"
    if not column.nullable:
        sql += " NOT NULL"
    return sql


def dispose_all() -> None:
    for engine in _ENGINES.values():
        engine.dispose()
    _ENGINES.clear()

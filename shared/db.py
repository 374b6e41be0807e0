"""SQL engines: SQLite under var/ by default, PostgreSQL when configured.

Every engine creates the tables its database lacks, and adds to a table that
exists the columns a newer version of the platform gave it (``add_missing_columns``),
so a database written by an earlier version keeps working after an upgrade.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import MetaData, event, inspect
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.schema import Column
from sqlmodel import SQLModel, create_engine


class OutdatedSchema(RuntimeError):
    """A table lacks a column that cannot be added in place (NOT NULL with no default)."""


_ENGINES: dict[str, Engine] = {}


def engine_for(url: str) -> Engine:
    """One engine per URL per process; SQLite gets WAL so readers never block writers."""
    if url in _ENGINES:
        return _ENGINES[url]
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
    else:
        url = url.replace("postgresql://", "postgresql+psycopg://", 1) if url.startswith("postgresql://") else url
        engine = create_engine(url, pool_pre_ping=True)
    with schema_lock(engine):
        _create_tables(engine)
        add_missing_columns(engine, SQLModel.metadata)
    _ENGINES[url] = engine
    return engine


def _create_tables(engine: Engine, attempts: int = 40) -> None:
    """``create_all``; on SQLite a reader opening the same file (a tool, a test) may create a table
    between the check and the ``CREATE``, one table after another while both run: the check, made
    again a moment later, finds what the other created."""
    import time

    from sqlalchemy.exc import OperationalError

    for attempt in range(attempts):
        try:
            SQLModel.metadata.create_all(engine)
            return
        except OperationalError as exc:
            if "already exists" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.25)


# Any fixed number: every process that creates or upgrades tables takes this advisory lock first.
_SCHEMA_LOCK = 0x6E6575726F6E73  # "neurons"


@contextmanager
def schema_lock(engine: Engine) -> Iterator[None]:
    """One process at a time creates or upgrades the tables of a shared PostgreSQL database.

    Concurrent ``CREATE TABLE`` of the same table races in PostgreSQL's catalogue
    (``pg_type_typname_nsp_index``), which crashed services starting together on
    one database. SQLite databases are one per service, and SQLite locks the file.
    """
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
        if present is None:  # the database lacks the whole table: that is create_all's work
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


def _add_column(dialect: Dialect, column: Column) -> str:
    default, literal = column.default, None
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


def create_all(engine: Engine) -> None:
    SQLModel.metadata.create_all(engine)


def dispose_all() -> None:
    for engine in _ENGINES.values():
        engine.dispose()
    _ENGINES.clear()

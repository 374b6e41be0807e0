"""The platform's schema, versioned with Alembic.

The revisions under ``versions/`` are the schema: the first creates every table
the platform had when the schema became versioned, each later one changes it.
``env.py`` runs them on the connection ``shared.db.migrate`` hands it, so no
``alembic.ini`` is needed. After changing a table model, write the next
revision with ``python -m shared.migrations revision "what changed"``: Alembic
compares the models with a scratch database at the head revision and writes
the operations it finds, to be read and corrected before they are kept.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path

import sqlalchemy as sa
from alembic import op
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

HERE = Path(__file__).resolve().parent

# Every module that defines a table (``table=True``); each service's database holds all of them.
TABLE_MODULES = (
    "shared.store",
    "shared.archive",
    "services.registry.approvals",
    "services.registry.manifest",
    "services.registry.observability",
    "services.registry.profiles",
    "services.registry.projections",
)


def platform_metadata() -> sa.MetaData:
    """A copy of the platform's tables as its models define them now (what autogenerate compares with)."""
    from sqlmodel.main import default_registry

    for module in TABLE_MODULES:
        importlib.import_module(module)
    metadata = sa.MetaData()
    for mapper in default_registry.mappers:
        if mapper.class_.__module__ in TABLE_MODULES and mapper.local_table is not None:
            mapper.local_table.to_metadata(metadata)
    return metadata


def config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, made here: where the revisions are, and the connection to run them on."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = connection
    return cfg


@lru_cache(maxsize=1)
def head() -> str:
    """The newest revision."""
    revision = ScriptDirectory.from_config(config()).get_current_head()
    assert revision is not None, "shared/migrations/versions holds no revision"
    return revision


def known(revision: str) -> bool:
    """Whether ``revision`` is one of the revisions under ``versions/``."""
    return revision in _revisions()


@lru_cache(maxsize=1)
def _revisions() -> frozenset[str]:
    return frozenset(script.revision for script in ScriptDirectory.from_config(config()).walk_revisions())


def current(connection: Connection) -> str | None:
    """The revision the database is at; None for a database no revision has run on."""
    return MigrationContext.configure(connection).get_current_revision()


def create_table(present: set[str], name: str, *elements) -> bool:
    """``op.create_table``, or, for a table an earlier version of the platform created before its
    schema was versioned, add the columns it lacks. True when the table was created here (its
    indexes are then to create too)."""
    if name not in present:
        op.create_table(name, *elements)
        return True
    complete_table(op.get_bind(), sa.Table(name, sa.MetaData(), *elements))
    return False


def complete_table(connection: Connection, table: sa.Table) -> list[str]:
    """Add to ``table`` in the database the columns of its definition it lacks, each with the default its
    model gives it (``shared.db.add_column``'s rules); the names added."""
    from shared.db import add_column

    held = {column["name"] for column in sa.inspect(connection).get_columns(table.name)}
    model = platform_metadata().tables.get(table.name)
    added = []
    for column in table.columns:
        if column.name in held:
            continue
        defaults = model.columns.get(column.name) if model is not None else None
        add_column(connection, column, defaults_from=defaults)
        added.append(column.name)
    return added


def new_revision(message: str) -> None:
    """Write the next revision: what the models define now against a scratch database at head."""
    import tempfile

    from alembic import command

    from shared.db import engine_for

    with tempfile.TemporaryDirectory(prefix="neurons-revision-") as tmp:
        engine = engine_for(f"sqlite:///{tmp}/head.db", upgrade=True)
        try:
            with engine.begin() as connection:
                command.revision(config(connection), message=message, autogenerate=True)
        finally:
            engine.dispose()

"""The schema's revisions: what they create, how they adopt an earlier database, who refuses one behind."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlmodel import Session, select
from sqlmodel.main import default_registry

from shared import db, migrations
from shared.store import ProcessedEvent
from tests.support import ROOT

STORE_TABLES = {"processed_events", "outbox_events", "aggregate_sequences", "service_state", "state_heads"}


def fresh(url: str):
    """An engine on ``url`` that leaves its schema alone (the suite's engines upgrade theirs)."""
    return db.engine_for(url, upgrade=False)


def differences(engine) -> list:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, migrations.platform_metadata())


def test_an_upgrade_creates_exactly_the_tables_the_models_define(sql_url):
    engine = fresh(sql_url)
    assert db.revision_of(engine) is None

    assert db.migrate(sql_url) == (None, migrations.head())

    assert differences(engine) == []
    assert set(inspect(engine).get_table_names()) == set(migrations.platform_metadata().tables) | {"alembic_version"}
    assert db.migrate(sql_url) == (migrations.head(), migrations.head())  # at head: nothing to do
    db.check_head(sql_url)


def test_every_table_model_of_the_platform_is_in_the_revisions():
    for service in ("approval", "energy", "evolution", "registry", "serving", "trainer", "validator"):
        importlib.import_module(f"services.{service}.app")
    modules = {mapper.class_.__module__ for mapper in default_registry.mappers
               if mapper.class_.__module__.startswith(("shared.", "services."))}
    assert modules <= set(migrations.TABLE_MODULES), modules - set(migrations.TABLE_MODULES)


def test_a_database_an_earlier_version_made_is_adopted_with_its_rows(sql_url):
    """The earlier platform made at each start the tables its process had imported (a service's own
    file: the store's tables only) and no alembic_version."""
    engine = fresh(sql_url)
    metadata = migrations.platform_metadata()
    metadata.create_all(engine, tables=[metadata.tables[name] for name in sorted(STORE_TABLES)])
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE state_heads DROP COLUMN version"))  # a column added since
    with Session(engine) as session:
        session.add(ProcessedEvent(consumer="approval", event_id="e-1", event_type="cycle.proposed"))
        session.commit()

    assert db.migrate(sql_url) == (None, migrations.head())

    assert differences(engine) == []
    with Session(engine) as session:
        assert [row.event_id for row in session.exec(select(ProcessedEvent))] == ["e-1"]


def test_a_database_behind_is_named_in_one_line_that_says_what_to_run(sql_url):
    fresh(sql_url)
    with pytest.raises(db.SchemaBehind) as behind:
        db.check_head(sql_url)
    line = str(behind.value)
    assert line == (f"database {db.shown(sql_url)} is at revision none, needs {migrations.head()}: "
                    "run neurons db upgrade")
    assert "\n" not in line


def test_a_revision_this_version_does_not_have_is_refused(sql_url):
    db.migrate(sql_url)
    with fresh(sql_url).begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'ffff_later'"))

    with pytest.raises(db.UnknownRevision, match="is at revision ffff_later, which this version of the platform "
                                                  "does not have"):
        db.migrate(sql_url)
    with pytest.raises(db.UnknownRevision):
        db.check_head(sql_url)


def test_the_revisions_downgrade_to_nothing_and_back(tmp_path):
    from alembic import command

    url = f"sqlite:///{tmp_path}/down.db"
    engine = fresh(url)
    db.migrate(url)
    with engine.begin() as connection:
        command.downgrade(migrations.config(connection), "base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    assert db.migrate(url) == (None, migrations.head())
    assert differences(engine) == []


def neurons(var, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {"PATH": "/usr/bin:/bin", "NEURONS_VAR": str(var), "HOME": str(var), **(env or {})}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=120)


def test_db_upgrade_brings_each_services_sqlite_file_to_head_and_current_shows_it(tmp_path):
    var = tmp_path / "var"
    before = neurons(var, "db", "current")
    assert before.returncode == 1, before.stdout
    assert [line.split()[0] for line in before.stdout.splitlines()] == ["none"] * 7 + ["head"]

    upgraded = neurons(var, "db", "upgrade")

    assert upgraded.returncode == 0, upgraded.stderr
    lines = upgraded.stdout.splitlines()
    assert len(lines) == 7, lines
    for line, service in zip(lines, ("trainer", "evolution", "approval", "validator", "energy", "registry", "serving")):
        assert line.split()[:2] == [migrations.head(), service], line
        assert line.endswith(f"{var / 'db' / service}.db  (was none)"), line
    current = neurons(var, "db", "current")
    assert current.returncode == 0
    assert current.stdout.count(migrations.head()) == 8  # seven files, and the head itself
    again = neurons(var, "db", "upgrade")
    assert "(was" not in again.stdout


def test_a_service_on_a_database_behind_exits_with_one_line(tmp_path):
    var = tmp_path / "var"
    started = subprocess.run([sys.executable, "-m", "services.approval"], cwd=ROOT, capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "NEURONS_VAR": str(var), "HOME": str(var),
                                  "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}, timeout=120)
    assert started.returncode == 1
    refusal = (f"approval: database sqlite:///{var / 'db' / 'approval.db'} is at revision none, "
               f"needs {migrations.head()}: run neurons db upgrade")
    assert started.stderr.strip().splitlines() == [refusal]

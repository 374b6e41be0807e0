"""A database written by an earlier version keeps working: the engine adds the columns its tables lack."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, inspect, text
from sqlmodel import Session, SQLModel, create_engine

from services.registry import queries
from services.registry.observability import ValidationSnapshot
from shared import db

# columns this version added to the soak snapshot, and one it has always had (NOT NULL, default 0)
ADDED = ("sized_by_event_id", "advised_replicas", "cycles_done")


def plain_engine(url: str):
    return create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


def columns(engine, table: str) -> set[str]:
    return {c["name"] for c in inspect(engine).get_columns(table)}


def test_an_earlier_database_gets_the_new_columns_and_keeps_its_rows(sql_url):
    earlier = plain_engine(sql_url)
    SQLModel.metadata.create_all(earlier)
    with Session(earlier) as session:
        session.add(ValidationSnapshot(validation_id="val-earlier", replicas_planned=2, status="completed",
                                       verdict="pass"))
        session.commit()
    with earlier.begin() as connection:
        for name in ADDED:
            connection.execute(text(f"ALTER TABLE registry_validation_snapshots DROP COLUMN {name}"))
    assert not columns(earlier, "registry_validation_snapshots") & set(ADDED)
    earlier.dispose()

    engine = db.engine_for(sql_url)

    assert set(ADDED) <= columns(engine, "registry_validation_snapshots")
    with Session(engine) as session:
        snap = queries.snapshot(session, "val-earlier")
    assert snap["verdict"] == "pass" and snap["totals"]["replicas"] == 2
    assert snap["sized_by"] is None  # filled by the events when the projection is rebuilt
    assert snap["totals"]["cycles_done"] == 0  # the column's default, in the row already there
    assert db.add_missing_columns(engine, SQLModel.metadata) == []  # nothing left to add


def test_a_column_that_needs_a_value_and_has_no_default_is_named(sql_url):
    engine = plain_engine(sql_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE upgrade_probe (probe_id VARCHAR PRIMARY KEY)"))
        connection.execute(text("INSERT INTO upgrade_probe (probe_id) VALUES ('p-1')"))
    newer = MetaData()
    Table("upgrade_probe", newer, Column("probe_id", String, primary_key=True),
          Column("note", String, nullable=True), Column("weight", Integer, nullable=False))

    with pytest.raises(db.OutdatedSchema, match="upgrade_probe lacks column weight, which needs a value in every row"):
        db.add_missing_columns(engine, newer)

    assert columns(engine, "upgrade_probe") == {"probe_id", "note"}  # the nullable one was added first
    engine.dispose()

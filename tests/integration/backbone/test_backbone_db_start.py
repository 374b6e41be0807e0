"""Processes upgrading one fresh PostgreSQL database at the same time take turns: all of them succeed."""

from __future__ import annotations

import multiprocessing

import pytest
from sqlalchemy import inspect

pytestmark = pytest.mark.postgres


def _upgrade(url: str) -> str:
    # what `neurons db upgrade` (or `neurons up`) does, from several places at once
    from shared.db import migrate

    try:
        return migrate(url)[1]
    except Exception as exc:  # the answer is what the test compares
        return repr(exc)[:300]


def test_six_processes_upgrading_one_fresh_database_at_once_all_succeed(postgres_url, tmp_path, monkeypatch):
    from shared import db, migrations

    monkeypatch.setenv("NEURONS_VAR", str(tmp_path))
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        answers = pool.map(_upgrade, [postgres_url] * 6)

    assert answers == [migrations.head()] * 6
    engine = db.engine_for(postgres_url, upgrade=False)
    assert set(inspect(engine).get_table_names()) == set(migrations.platform_metadata().tables) | {"alembic_version"}
    db.check_head(postgres_url)

"""Services starting together on one fresh PostgreSQL database all get their tables."""

from __future__ import annotations

import multiprocessing

import pytest
from sqlalchemy import inspect

pytestmark = pytest.mark.postgres


def _start_engine(url: str) -> str:
    # what each service does first: import its tables, then open the shared database
    import services.approval.app  # noqa: F401
    import services.registry.projections  # noqa: F401
    from shared.db import engine_for

    try:
        engine_for(url)
        return "ok"
    except Exception as exc:  # the answer is what the test compares
        return repr(exc)[:300]


def test_six_processes_creating_the_tables_at_once_all_start(postgres_url, tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONS_VAR", str(tmp_path))
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        answers = pool.map(_start_engine, [postgres_url] * 6)

    assert answers == ["ok"] * 6
    from shared.db import engine_for

    assert {"processed_events", "outbox_events", "service_state"} <= set(inspect(engine_for(postgres_url)).get_table_names())

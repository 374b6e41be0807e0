"""The whole platform on one shared PostgreSQL database: its schema made by `neurons db upgrade`, then
the six services of a cycle all reading and writing it, from the request to the promotion."""

import json

import pytest
from sqlmodel import Session, select

from shared import db, migrations
from shared.store import OutboxEvent
from tests.e2e.cycle_support import CYCLE, SERVICES, prepare, start


@pytest.mark.slow
@pytest.mark.postgres
def test_one_cycle_runs_to_promotion_with_every_service_on_one_postgresql_database(postgres_url, platform, tmp_path,
                                                                                    monkeypatch):
    platform.env["NEURONS_DATABASE_URL"] = postgres_url  # a fresh database, for every service and command
    monkeypatch.setenv("NEURONS_DATABASE_URL", postgres_url)

    upgraded = platform.cli("db", "upgrade").stdout.splitlines()
    assert len(upgraded) == 1, upgraded  # one database, all seven services on it
    revision, services, url, was = upgraded[0].split(maxsplit=3)
    assert (revision, url, was) == (migrations.head(), postgres_url, "(was none)")
    assert services == "trainer,evolution,approval,validator,energy,registry,serving"
    db.check_head(postgres_url)

    prepare(platform, tmp_path)
    start(platform, tmp_path)
    summary = json.loads(platform.cli(*CYCLE, timeout=600).stdout)

    assert summary["outcome"] == "promoted", summary
    assert summary["promotion"]["channel"] == "production"
    assert summary["profiles_updated"] == ["helper-en"]
    # each of the six kept its outbox in the one database, and the registry its archive
    with Session(db.engine_for(postgres_url, upgrade=False)) as session:
        writers = set(session.exec(select(OutboxEvent.service)).all())
    assert set(SERVICES) <= writers, writers
    kinds = [e["type"] for e in platform.archived() if e["correlation_id"] == summary["cycle_id"]]
    assert kinds.count("adapter.promoted") == 1 and kinds.count("profile.adapter_updated") == 1
    verify = json.loads(platform.cli("audit", "verify", "--json").stdout)
    assert verify["ok"], verify["differs"]

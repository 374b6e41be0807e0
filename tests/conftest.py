"""Fixtures: one real broker per test session, real SQL, services as real processes.

The broker is the embedded Tansu broker, or real Apache Kafka through
testcontainers when a Docker engine is present and NEURONS_TEST_KAFKA=testcontainers.
Each test gets its own topic namespace, consumer groups and var/ folder, so tests
share the broker without seeing each other's events.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from tests.support import Platform
POSTGRES_URL = os.environ.get("NEURONS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session", autouse=True)
def databases_at_head():
    """The tests own their databases: every engine they open in-process (services' handlers run in
    the test, harnesses, tools) brings its database to the head revision first. Services started as
    processes get theirs upgraded by the launcher (``shared.processes.start_service``)."""
    from shared import db

    db.upgrade_on_open(True)
    yield
    db.upgrade_on_open(False)


def _docker_engine() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory) -> str:
    if os.environ.get("NEURONS_TEST_KAFKA") == "testcontainers" and _docker_engine():
        from testcontainers.kafka import KafkaContainer

        container = KafkaContainer().with_kraft()
        container.start()
        yield container.get_bootstrap_server()
        container.stop()
        return
    from shared import broker
    from shared.settings import Settings

    var = tmp_path_factory.mktemp("broker-var")
    settings = Settings.from_env().with_(var_dir=var, bootstrap_servers=None)
    info = broker.start(settings)
    yield info.bootstrap_servers
    broker.stop(settings)


@pytest.fixture
def platform(tmp_path, kafka_bootstrap, monkeypatch):
    plat = Platform(tmp_path / "var", kafka_bootstrap).apply(monkeypatch)
    yield plat
    plat.stop()


def postgres_available(url: str = POSTGRES_URL) -> str | None:
    """None when the server answers, else the reason it does not."""
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=3):
            return None
    except Exception as exc:  # any failure to reach the server is a reason to skip
        return f"no PostgreSQL at {url}: {exc.__class__.__name__}: {str(exc).strip()[:200]}"


@pytest.fixture
def postgres_url():
    """A fresh database on the local PostgreSQL server, dropped afterwards."""
    reason = postgres_available()
    if reason:
        pytest.skip(reason)
    import psycopg

    name = f"neurons_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    from shared.db import dispose_all

    dispose_all()
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def sql_url(request, tmp_path):
    """A fresh database, once on SQLite (a file in the test's folder) and once on the local PostgreSQL;
    the engine ``shared.db`` made for it is disposed of afterwards."""
    url = f"sqlite:///{tmp_path}/test.db" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    yield url
    from shared import db

    engine = db._ENGINES.pop(url, None)
    if engine is not None:
        engine.dispose()


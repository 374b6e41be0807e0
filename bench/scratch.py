"""A throw-away platform for each figure: its own var folder and topic namespace on a private broker.

The benchmark never reads or writes the platform the user runs: the embedded
broker is started in a temporary folder, each figure gets its own
``NEURONS_VAR`` and ``NEURONS_TOPIC_PREFIX`` (so one figure's events never
show up in another's log), and variables that would point at the user's
Kafka, database, collector or policies are unset while the figure runs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from shared import broker, processes
from shared.settings import Settings

# Settings that would reach outside the scratch folder.
UNSET = (
    "KAFKA_BOOTSTRAP_SERVERS",
    "NEURONS_DATABASE_URL",
    "NEURONS_TRACE_FILE",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "NEURONS_POLICIES",
    "NEURONS_ARTEFACT_REMOTE",
    "NEURONS_VALIDATION_THRESHOLDS",
    "NEURONS_ENERGY_BUDGETS",
    "NEURONS_SERVICE_KEY",  # one service's own key: each scratch service signs with its scratch key
)


@contextmanager
def environment(changes: dict[str, str | None]) -> Iterator[None]:
    """Set (or, for None, unset) variables, and put every one back afterwards."""
    saved = {name: os.environ.get(name) for name in changes}
    try:
        for name, value in changes.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Scratch:
    """The temporary root, the private broker, and one isolated platform per figure."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="neurons-bench-"))
        self.run_id = uuid.uuid4().hex[:8]
        self._broker_settings: Settings | None = None
        self.bootstrap: str | None = None

    def start_broker(self) -> str:
        if self.bootstrap is None:
            with environment({name: None for name in UNSET}):
                settings = Settings.from_env().with_(var_dir=self.root / "broker", bootstrap_servers=None)
                self.bootstrap = broker.start(settings).bootstrap_servers
            self._broker_settings = settings
        return self.bootstrap

    @contextmanager
    def platform(self, figure: str, services: tuple[str, ...] = (),
                 prepare: Callable[[Settings], None] | None = None) -> Iterator[Settings]:
        """Environment and settings of an isolated platform; ``services`` run as processes in it,
        started after ``prepare`` (keys, say) and stopped on the way out. Its trust anchors, services'
        keys and operators' keys live in its own var folder (``NEURONS_TRUST``, ``NEURONS_SERVICE_KEYS``,
        ``NEURONS_OPERATOR_KEYS``), never the user's."""
        bootstrap = self.start_broker()
        var = self.root / figure
        env: dict[str, str | None] = {name: None for name in UNSET}
        env.update({
            "NEURONS_VAR": str(var),
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "NEURONS_TOPIC_PREFIX": f"bench{self.run_id}.{figure}.neurons.",
            # the scratch platform's own trust: anchors, services' keys, operators' keys
            "NEURONS_TRUST": str(var / "keys" / "trust.json"),
            "NEURONS_SERVICE_KEYS": str(var / "keys" / "services"),
            "NEURONS_OPERATOR_KEYS": str(var / "keys" / "operators"),
            "NEURONS_API_PORT": "0",
            "NEURONS_SESSION_TIMEOUT_S": "6",
            "NEURONS_DRIFT_SOAK_S": "0",
            "NEURONS_SCHEDULE_INTERVAL_S": "0",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        })
        with environment(env):
            settings = Settings.from_env()
            from shared.topics import ensure_topics

            asyncio.run(ensure_topics(settings))
            try:
                if prepare is not None:
                    prepare(settings)
                for name in services:
                    processes.start_service(settings, name)
                if services:
                    processes.wait_ready(settings, services, timeout_s=90)
                yield settings
            finally:
                for name in services:
                    processes.stop_service(settings, name)
                _forget_engines(var)

    def close(self) -> None:
        if self._broker_settings is not None:
            broker.stop(self._broker_settings)
            self._broker_settings = None
            self.bootstrap = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Scratch":
        from shared import db

        # every database this process opens meanwhile is a scratch one, made at need
        self._upgraded_before = db.upgrade_on_open(True)
        return self

    def __exit__(self, *exc) -> None:
        from shared import db

        db.upgrade_on_open(self._upgraded_before)
        self.close()


def _forget_engines(var: Path) -> None:
    """Close the SQL engines this process opened on the scratch databases."""
    from shared import db

    for url in [u for u in db._ENGINES if str(var) in u]:
        db._ENGINES.pop(url).dispose()

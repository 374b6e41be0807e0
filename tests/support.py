"""What the tests share: an isolated platform on the test broker, and waiting."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "admin"  # every test platform's first admin, anchored in its trust file


def signer_of(settings, producer: str):
    """The key a producer named in an envelope signs with: a service's, or an operator's (``operator:<id>``)."""
    from shared.keys import operator_signer, require_service_signer

    if producer.startswith("operator:"):
        return operator_signer(settings, producer.split(":", 1)[1])
    return require_service_signer(settings, producer)


def sign_as_producers(settings, envelopes):
    """The envelopes signed, each by the key of the producer it names."""
    from shared.bus import signed_values
    from shared.contracts.envelope import Envelope

    return [Envelope.from_json(signed_values(signer_of(settings, e.producer.service), [e], [None])[0])
            for e in envelopes]


def _signing_publisher_class():
    from shared.bus import Publisher

    class _SigningPublisher(Publisher):
        def __init__(self, settings, **kwargs) -> None:
            super().__init__(settings, "test", signer=None, **kwargs)

        async def publish(self, envelope, **kwargs) -> None:
            await super().publish(sign_as_producers(self.settings, [envelope])[0], **kwargs)

        async def publish_many(self, envelopes, **kwargs) -> None:
            await super().publish_many(sign_as_producers(self.settings, envelopes), **kwargs)

    return _SigningPublisher


def SigningPublisher(settings, **kwargs):  # noqa: N802 - a class, made on first use (imports stay lazy)
    return _signing_publisher_class()(settings, **kwargs)


class Platform:
    """One isolated neurons installation on the shared test broker."""

    def __init__(self, var_dir: Path, bootstrap: str, database_url: str | None = None, **env: str) -> None:
        self.var_dir = var_dir
        self.prefix = f"t{uuid.uuid4().hex[:8]}.neurons."
        self.env = {
            "NEURONS_VAR": str(var_dir),
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "NEURONS_TOPIC_PREFIX": self.prefix,
            "NEURONS_SESSION_TIMEOUT_S": "6",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        if database_url:
            self.env["NEURONS_DATABASE_URL"] = database_url
        self.env.update(env)
        self.started: set[str] = set()
        from shared.keys import ensure_service_keys, init_admin, load_anchors

        ensure_service_keys(self.settings)
        if not load_anchors(self.settings.trust_path)["admins"]:
            init_admin(self.settings, ADMIN, "test platform admin")
        from shared.db import migrate

        migrate(self.settings.db_url("registry"))  # what the CLI reads (services' own: when each starts)

    def enroll(self, name: str, *roles: str) -> None:
        """Enrol operator ``name`` (a key pair under the platform's var/) with ``roles``, signed by the admin."""
        self.cli("operator", "enroll", name, *[arg for role in roles for arg in ("--role", role)])

    def publisher(self):
        """A publisher that signs each event with the key of the producer its envelope names."""
        return SigningPublisher(self.settings)

    def apply(self, monkeypatch) -> "Platform":
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        return self

    @property
    def settings(self):
        from shared.settings import Settings

        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            return Settings.from_env()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    async def aensure_topics(self) -> None:
        from shared.topics import ensure_topics

        await ensure_topics(self.settings)

    def start(self, *services: str, wait: bool = True, env: dict | None = None) -> None:
        from shared import processes

        for name in services:
            processes.start_service(self.settings, name, env={**self.env, **(env or {})})
            self.started.add(name)
        if wait:
            processes.wait_ready(self.settings, services, timeout_s=90)

    def stop(self, *services: str) -> None:
        from shared import processes

        processes.stop_services(self.settings, tuple(services or self.started))

    def kill(self, service: str) -> None:
        from shared import processes

        processes.kill_service(self.settings, service)

    def cli(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {**os.environ, **self.env}
        proc = subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"neurons {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def log(self, service: str) -> str:
        path = self.var_dir / "log" / f"{service}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def registry_session(self):
        from sqlmodel import Session

        from shared.db import engine_for

        return Session(engine_for(self.settings.db_url("registry")))

    def archived(self, event_type: str | None = None) -> list[dict]:
        from sqlmodel import select

        from shared.archive import ArchivedEvent

        with self.registry_session() as session:
            query = select(ArchivedEvent).order_by(ArchivedEvent.id)
            if event_type:
                query = query.where(ArchivedEvent.type == event_type)
            return [json.loads(r.envelope_json) for r in session.exec(query).all()]


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.25, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message}")


async def await_until(predicate, timeout: float = 60.0, interval: float = 0.25, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message}")


def make_event(event_type: str, aggregate_id: str, payload: dict, *, sequence: int = 1,
               correlation_id: str = "corr-test", service: str | None = None, version: int | None = None):
    """An envelope as its legitimate producer would seal it (``service``: the contract's first service,
    or ``operator:admin`` for operators' commands)."""
    from shared.contracts import schemas
    from shared.contracts.envelope import NewEvent, Producer, seal

    if service is None:
        allowed = schemas.producers()[event_type]
        services = [entry.split(":", 1)[1] for entry in allowed if entry.startswith("service:")]
        service = services[0] if services else f"operator:{ADMIN}"
    return seal(NewEvent(event_type, aggregate_id, payload), sequence=sequence,
                producer=Producer(service=service, node="test-node"), correlation_id=correlation_id,
                causation_id=None, schema_version=version or schemas.current_version(event_type))


def dataset_payload(dataset_id: str = "ds-1", **overrides) -> dict:
    payload = {"dataset_id": dataset_id, "name": "demo", "sha256": "ab" * 32, "uri": "file:///tmp/demo.jsonl",
               "record_count": 3, "quarantined": False}
    payload.update(overrides)
    return payload


async def read_topic(bootstrap: str, topic: str, expect: int, timeout: float = 30.0,
                     until: Callable[[list], bool] | None = None) -> list:
    """Every record of ``topic`` from offset 0, waiting until at least ``expect`` arrived (or, given
    ``until``, until it holds for the records read so far)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    records = []
    deadline = time.monotonic() + timeout
    try:
        done = until or (lambda read: len(read) >= expect)
        while not done(records) and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for recs in batch.values():
                records.extend(recs)
    finally:
        await consumer.stop()
    return records


def store_signed_adapter(settings, weights: bytes) -> str:
    """A small adapter folder with ``weights`` in the platform's artefact store, signed with the anchored
    adapter-signing key as the trainer signs it; its sha256."""
    import tempfile

    from shared.adapter_signing import sign_adapter
    from shared.artefacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ArtefactStore
    from shared.keys import model_signing_key_path

    with tempfile.TemporaryDirectory(prefix="adapter-") as scratch:
        folder = Path(scratch)
        (folder / ADAPTER_WEIGHTS).write_bytes(weights)
        (folder / ADAPTER_CONFIG).write_text(json.dumps({"r": 8, "lora_alpha": 16}))
        stored = ArtefactStore(settings.artefact_dir).put_adapter(
            folder, sign=lambda f: sign_adapter(f, model_signing_key_path(settings)))
    return stored.sha256

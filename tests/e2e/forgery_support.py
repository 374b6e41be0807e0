"""What the forgery suite shares: an attacker's raw writes to the topics, and what the platform made of them.

The attacker has write access to the topics and nothing else the platform
trusts (unless a test hands it a stolen key). It publishes with a bare
``aiokafka.AIOKafkaProducer``: a plausible envelope, keyed by its aggregate
id, with the headers every tool routes on (``event_type``,
``schema_version``, ``event_id``). Each consuming service must refuse what
it may not act on before any handler runs, and park it on the dead-letter
topic with the reason (``dlq_kind``) and who refused it (``dlq_consumer``).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from shared.bus import signed_values
from shared.contracts.envelope import Envelope
from shared.contracts.signing import Signer
from shared.topics import dlq_topic, group_id, topic_for
from tests.support import make_event, read_topic

# Who reads each topic: the ``reads=`` of each service's app.py; every service also reads ``operator``
# (``shared.service.Service`` adds it), so an operator event is checked by all six.
READERS = {
    "adapter": {"evolution", "validator", "registry"},
    "profile": {"registry"},
    "training": {"trainer", "evolution", "energy", "validator", "registry"},
    "cycle": {"evolution", "approval", "registry"},
    "research": {"evolution", "approval", "registry"},
    "dataset": {"trainer", "evolution", "validator", "registry"},
    "approval": {"approval", "evolution", "registry"},
    "operator": {"trainer", "evolution", "approval", "validator", "energy", "registry"},
}


def forged(event_type: str, aggregate_id: str, payload: dict, *, producer: str,
           correlation_id: str | None = None, sequence: int = 1) -> Envelope:
    """An envelope shaped as ``producer`` (``registry``, ``operator:alice``…) would seal it, not signed."""
    return make_event(event_type, aggregate_id, payload, service=producer, sequence=sequence,
                      correlation_id=correlation_id or aggregate_id)


def signed_by(envelope: Envelope, signer: Signer) -> bytes:
    """The record value of ``envelope`` signed by ``signer`` (whatever producer the envelope names)."""
    return signed_values(signer, [envelope], [None])[0]


def fresh_signer(principal: str) -> Signer:
    """A key nobody enrolled or anchored, claiming to be ``principal``."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Signer(principal, Ed25519PrivateKey.generate())


@dataclass(frozen=True)
class Injected:
    event_id: str
    event_type: str
    aggregate_type: str
    aggregate_id: str


async def inject(bootstrap: str, value: bytes) -> Injected:
    """Write ``value`` (an envelope's JSON) to its aggregate's topic with a bare aiokafka producer."""
    data = json.loads(value)
    topic = topic_for(data["aggregate_type"])
    headers = [("event_type", data["type"].encode()), ("schema_version", str(data["schema_version"]).encode()),
               ("event_id", data["event_id"].encode())]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value=value, key=data["aggregate_id"].encode(), headers=headers)
    finally:
        await producer.stop()
    return Injected(data["event_id"], data["type"], data["aggregate_type"], data["aggregate_id"])


@dataclass(frozen=True)
class DeadLetter:
    consumer: str  # the service that refused it
    kind: str
    reason: str
    value: bytes


def _service_of(consumer: str) -> str:
    return consumer.rsplit("-", 1)[-1]


async def dead_letters(bootstrap: str, event_id: str, services: set[str], timeout: float = 120.0) -> dict[str, DeadLetter]:
    """The dead letters of event ``event_id``, by refusing service, once every one of ``services`` has
    refused it (AssertionError naming the missing ones after ``timeout``)."""
    deadline = time.monotonic() + timeout
    found: dict[str, DeadLetter] = {}
    while True:
        records = await read_topic(bootstrap, dlq_topic(), expect=1 << 30, timeout=1.5)
        found = {}
        for record in records:
            headers = {k: v.decode() for k, v in record.headers}
            if headers.get("event_id") == event_id:
                service = _service_of(headers["dlq_consumer"])
                found[service] = DeadLetter(service, headers["dlq_kind"], headers["dlq_reason"], record.value)
        if set(found) >= services or time.monotonic() > deadline:
            break
    missing = services - set(found)
    assert not missing, f"{sorted(missing)} did not dead-letter event {event_id} within {timeout:.0f}s; got {found}"
    return found


async def settled(bootstrap: str, aggregate_type: str, services: set[str], timeout: float = 60.0) -> None:
    """Wait until each of ``services`` has consumed (and committed) every record now on the topic."""
    topic = topic_for(aggregate_type)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    deadline = time.monotonic() + timeout
    try:
        pending = set(services)
        while pending:
            for service in list(pending):
                committed = await admin.list_consumer_group_offsets(group_id(service), partitions=partitions)
                if all(ends[tp] == 0 or (committed.get(tp) is not None and committed[tp].offset >= ends[tp])
                       for tp in partitions):
                    pending.discard(service)
            if pending and time.monotonic() > deadline:
                raise AssertionError(f"{sorted(pending)} did not consume {topic} up to {ends} within {timeout:.0f}s")
            if pending:
                import asyncio

                await asyncio.sleep(0.5)
    finally:
        await admin.close()


async def log_records(bootstrap: str, aggregate_types: list[str]) -> list[Any]:
    """Every record now on the topics of ``aggregate_types``, read from their start to their end."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                client_id=f"forgery-read-{uuid.uuid4().hex[:6]}")
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        partitions = [TopicPartition(topic_for(a), p) for a in aggregate_types
                      for p in sorted(consumer.partitions_for_topic(topic_for(a)) or ())]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            behind = [tp for tp in partitions if await consumer.position(tp) < ends[tp]]
            if not behind:
                break
            for batch in (await consumer.getmany(*behind, timeout_ms=500)).values():
                records.extend(r for r in batch if r.offset < ends[TopicPartition(r.topic, r.partition)])
        return records
    finally:
        await consumer.stop()


@dataclass
class Serving:
    """What the serving runtime's rules make of the log: the target it would serve, and what it refused."""

    target: Any  # shared.adapter_runtime.Target, or None when nothing on the log set one
    refused: list[tuple[str, str, str]]  # (event id, stage, reason): "envelope" refusals and "decision" ones

    @property
    def adapter(self) -> str | None:
        """The adapter that would serve; None: the base model."""
        return self.target.sha256 if self.target is not None else None


async def serving_view(settings, bootstrap: str, *, channel: str | None = None,
                       profile: str | None = None) -> Serving:
    """Read the adapter (and profile) topics as ``AdapterRuntime.follow`` does, with its checks
    (``decode(admit=TrustView.admit)``, then ``ApprovedAdapters.admits``), without loading a model."""
    from shared.adapter_runtime import ApprovedAdapters, target_of
    from shared.bus import MalformedEvent, decode
    from shared.contracts.signing import Refused
    from shared.trust_view import TrustView

    trust = TrustView(settings)
    await trust.catch_up()
    approved = ApprovedAdapters(trust)
    latest, refused = None, []
    for record in await log_records(bootstrap, ["adapter"] + (["profile"] if profile else [])):
        event_id = dict(record.headers).get("event_id", b"").decode()
        try:
            event = decode(record.value, admit=trust.admit)
        except Refused as exc:
            if exc.reason == "unapproved":  # its decision did not verify: say which check refused it
                refused.append((event_id, "decision", exc.detail.split(": ")[1]))
            else:
                refused.append((event_id, "envelope", exc.reason))
            continue
        except MalformedEvent as exc:
            refused.append((event_id, "envelope", exc.kind))
            continue
        target = target_of(event, channel=channel, profile=profile)
        if event.type in ("adapter.promoted", "adapter.rolled_back", "profile.adapter_updated"):
            from shared.contracts.chain import verify_service_decision

            cause = event.payload.get("cause") if event.type == "profile.adapter_updated" else event.type
            verdict = verify_service_decision(event.payload, trust.keyring(), cause=cause or "")
            if not verdict:
                refused.append((event.event_id, "decision", verdict.reason))
        if approved.admits(event, target) and target is not None:
            latest = target
    return Serving(latest, refused)


def files_outside(root: Path, var_dir: Path) -> set[str]:
    """Every path under ``root`` that is not under ``var_dir`` (relative to ``root``)."""
    var_dir = var_dir.resolve()
    out = set()
    for path in Path(root).resolve().rglob("*"):
        if path == var_dir or var_dir in path.parents:
            continue
        out.add(str(path.relative_to(Path(root).resolve())))
    return out

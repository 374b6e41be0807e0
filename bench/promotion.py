"""Latency from a signed promotion grant to the profile following the new adapter.

The registry runs as its own process (a faust worker, as in production) on
the private broker. Before it starts, the scratch platform gets its trust as
a deployment does: the services' keys and the adapter-signing key
(``ensure_service_keys``), a first admin anchored in the trust file
(``init_admin``), and an approver the admin enrols on the log
(``operator.enrolled``, signed by the admin). One profile follows the
``production`` channel (created by the approver's signed command). For each
promotion a small real adapter folder is stored in the artefact store, signed
as the trainer signs it (OpenSSF model-signing), and the events it rests on
(training completed, validation passed, promotion requested), each signed by
its rightful producer, are published and archived first; then the clock
starts, the approval service's ``approval.granted`` carrying the operator's
decision (bound to the adapter, the validation and the channel) is published,
and the clock stops when a consumer on the profile topic sees the registry's
``profile.adapter_updated`` for that adapter. The path measured: publish, the
worker's fetch, envelope signature, decision and rule checks, the adapter's
files verified against their signature, archive and projections in one SQL
transaction, the outbox publish, and the measuring consumer's fetch (its wait
is short, ``MEASURE_FETCH_WAIT_MS``).

The latency is split at the moment the registry's handler took the grant
(the archive row is stamped in its transaction), and the baseline is the
broker's own delivery: a bare record published and read by a plain consumer
with the fetch wait the worker's consumer uses, at the same random pauses.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlmodel import Session, func, select

from bench.events import (
    make_event,
    profile_create_requested,
    promotion_granted,
    promotion_requested,
    signed,
    signed_envelopes,
    training_completed,
    validation_completed,
)
from bench.figure import Figure, percentile
from shared.adapter_signing import sign_adapter
from shared.archive import ArchivedEvent
from shared.artefacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ArtefactStore
from shared.bus import Publisher, decode_batch
from shared.contracts.envelope import Envelope, utcnow
from shared.db import engine_for
from shared.keys import ensure_service_keys, init_admin, model_signing_key_path, new_operator_key
from shared.settings import Settings
from shared.topics import dlq_topic, topic_for

NAME = "promotion"
TARGET_P99_MS = 250.0
ADMIN = "bench-admin"  # the scratch platform's first admin, anchored in its trust file
OPERATOR = "bench-approver"  # enrolled by the admin on the log, role approver
CHANNEL = "production"
PROFILE = "bench-assistant"
SERVICES = ("registry",)
# Grants arrive at random moments, as operators' do: the pause before each is
# drawn uniformly from this range (seconds), wider than the worker's fetch
# cycle, so the samples do not all fall at one phase of its polling. The
# shortest pause still lets the registry archive the previous promotion's own
# events first.
PAUSE_S = (0.2, 1.8)
# The measuring consumer's fetch wait: short, so the clock stops soon after the answer is there.
MEASURE_FETCH_WAIT_MS = 100
ADAPTER_BYTES = 4096  # each promoted adapter's weights file: small, random, so every sha is new


def prepare(settings: Settings) -> None:
    """What must exist before the registry starts: the services' keys and the adapter-signing key
    anchored in the trust file, a first admin anchored there too, and the approver enrolled on the
    log by the admin (the registry learns the operators from the log)."""
    ensure_service_keys(settings)
    init_admin(settings, ADMIN, "bench admin of a scratch platform")
    approver = new_operator_key(settings, OPERATOR)
    enrolment = make_event("operator.enrolled", OPERATOR, {
        "operator_id": OPERATOR, "public_key": approver.public_key, "key_id": approver.key_id,
        "roles": ["approver"], "label": "bench"}, service=f"operator:{ADMIN}", correlation_id=OPERATOR)
    asyncio.run(_publish_signed(settings, [enrolment]))


async def _publish_signed(settings: Settings, envelopes: Sequence[Envelope]) -> None:
    """Publish ``envelopes``, each signed by the key of the producer it names."""
    async with Publisher(settings, "bench", signer=None) as publisher:
        await publisher.publish_many(envelopes, values=signed(settings, envelopes))


def store_adapter(settings: Settings) -> str:
    """A small adapter folder with random weights, stored in the artefact store and signed with the
    anchored adapter-signing key, as the trainer leaves one; returns its sha256 (of the weights)."""
    with tempfile.TemporaryDirectory(prefix="bench-adapter-", dir=settings.var_dir) as scratch:
        folder = Path(scratch)
        (folder / ADAPTER_WEIGHTS).write_bytes(os.urandom(ADAPTER_BYTES))
        (folder / ADAPTER_CONFIG).write_text(json.dumps({"r": 8, "lora_alpha": 16, "peft_type": "LORA"}))
        stored = ArtefactStore(settings.artefact_dir).put_adapter(
            folder, sign=lambda f: sign_adapter(f, model_signing_key_path(settings)))
    return stored.sha256


def measure(settings: Settings, promotions: int = 30, warmup: int = 2, probes: int = 20) -> Figure:
    samples = asyncio.run(_promote(settings, promotions, warmup))
    delivery = asyncio.run(_delivery(settings, probes))
    delivery_p50, delivery_p99 = percentile(delivery, 50), percentile(delivery, 99)
    latencies = [s["total_ms"] for s in samples]
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    parts = {}
    for part in ("to_handler_ms", "after_handler_ms"):
        values = [s[part] for s in samples if s.get(part) is not None]
        if values:
            parts[part] = {"p50": round(percentile(values, 50), 1), "p99": round(percentile(values, 99), 1)}
    split = ""
    if len(parts) == 2:
        split = (f"; publish -> registry handler p50 {parts['to_handler_ms']['p50']:.0f} / p99 "
                 f"{parts['to_handler_ms']['p99']:.0f} ms, handler -> profile event seen p50 "
                 f"{parts['after_handler_ms']['p50']:.0f} / p99 {parts['after_handler_ms']['p99']:.0f} ms")
    return Figure(
        name=NAME, value=p99, unit="ms", p50=p50, p99=p99, baseline=delivery_p99,
        target=f"p99 < {TARGET_P99_MS:.0f} ms", passed=p99 < TARGET_P99_MS, samples=len(latencies),
        notes=(f"approval.granted published -> profile.adapter_updated seen, registry as a process on the "
               f"embedded broker; {promotions} promotions after {warmup} not counted, "
               f"{PAUSE_S[0]}-{PAUSE_S[1]} s apart at random; max {max(latencies):.0f} ms{split}; "
               f"baseline (p99): one raw record published and read by a plain aiokafka consumer with the "
               f"workers' fetch wait ({settings.fetch_wait_ms} ms, NEURONS_FETCH_WAIT_MS), p50 {delivery_p50:.0f} / p99 "
               f"{delivery_p99:.0f} ms over {len(delivery)}"),
        extra={"latencies_ms": [round(x, 2) for x in latencies], "max_ms": max(latencies), "parts": parts,
               "baseline_p50": delivery_p50, "baseline_samples": len(delivery)},
    )


async def _delivery(settings: Settings, probes: int) -> list[float]:
    """Publish -> receive of a bare record on the same broker, read as the workers' consumers read: with the
    fetch wait the services give them (``Settings.fetch_wait_ms``, shared.service's short fetch wait)."""
    topic = dlq_topic()  # no service reads it, and a probe is no event
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap(), group_id=None, enable_auto_commit=False,
                                client_id="neurons-bench-probe", fetch_max_wait_ms=settings.fetch_wait_ms)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap(), client_id="neurons-bench-probe",
                                acks="all", enable_idempotence=False, linger_ms=0)
    await consumer.start()
    await producer.start()
    try:
        await consumer._client.force_metadata_update()
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        for tp, offset in (await consumer.end_offsets(partitions)).items():
            consumer.seek(tp, offset)
        pauses = random.Random(1)
        latencies = []
        for index in range(probes + 1):  # the first one is not counted: connections warm up
            await asyncio.sleep(pauses.uniform(*PAUSE_S))
            key = f"probe-{index}".encode()
            started = time.perf_counter()
            await (await producer.send(topic, value=b"probe", key=key))
            deadline = time.monotonic() + 30
            while not any(r.key == key for records in (await consumer.getmany(timeout_ms=100)).values()
                          for r in records):
                if time.monotonic() > deadline:
                    raise TimeoutError("a probe record did not come back within 30s")
            if index:
                latencies.append((time.perf_counter() - started) * 1000)
        return latencies
    finally:
        await producer.stop()
        await consumer.stop()


async def _promote(settings: Settings, promotions: int, warmup: int) -> list[dict[str, float | None]]:
    total = promotions + warmup
    adapters = [store_adapter(settings) for _ in range(total)]  # real signed folders: the registry verifies them
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap(), group_id=None, enable_auto_commit=False,
                                client_id="neurons-bench-profiles", fetch_max_wait_ms=MEASURE_FETCH_WAIT_MS)
    await consumer.start()
    # every event is signed beforehand by its own producer's key: the publisher sends them as they are
    publisher = Publisher(settings, "bench", signer=None)
    await publisher.start()
    try:
        await consumer._client.force_metadata_update()
        # The adapter topic too, so that a refused promotion is reported rather than waited for.
        partitions = [TopicPartition(topic_for(a), p) for a in ("profile", "adapter")
                      for p in consumer.partitions_for_topic(topic_for(a)) or ()]
        consumer.assign(partitions)
        for tp, offset in (await consumer.end_offsets(partitions)).items():
            consumer.seek(tp, offset)

        await publisher.publish(signed_envelopes(settings, [profile_create_requested(PROFILE, CHANNEL, OPERATOR)])[0])
        await _wait_for(consumer, lambda e: e.type == "profile.created" and e.payload["profile_id"] == PROFILE, 60)

        # Everything each promotion rests on, archived by the registry before any grant.
        before = _archived(settings)
        rests_on = []
        for sha in adapters:
            cycle = f"cyc-{sha[:12]}"
            rests_on += [training_completed(sha, cycle), validation_completed(sha, cycle),
                         promotion_requested(sha, cycle)]
        await publisher.publish_many(rests_on, values=signed(settings, rests_on))
        await _until(lambda: _archived(settings) >= before + len(rests_on), 120, "the registry to archive "
                     f"{len(rests_on)} events")

        pauses = random.Random(0)
        measured = []
        for index, sha in enumerate(adapters):
            grant = signed_envelopes(settings, [promotion_granted(sha, f"cyc-{sha[:12]}", OPERATOR,
                                                                  settings.operator_key_dir, CHANNEL)])[0]
            await asyncio.sleep(pauses.uniform(*PAUSE_S))
            published_at = utcnow()
            started = time.perf_counter()
            await publisher.publish(grant)
            await _wait_for(consumer, lambda e, sha=sha: (e.type == "profile.adapter_updated"
                                                          and e.payload["adapter_sha256"] == sha), 30)
            elapsed_ms = (time.perf_counter() - started) * 1000
            if index >= warmup:
                measured.append((grant.event_id, published_at, elapsed_ms))
        handled = _handled_at(settings, [event_id for event_id, _, _ in measured])
        samples = []
        for event_id, published_at, elapsed_ms in measured:
            sample: dict[str, float | None] = {"total_ms": elapsed_ms, "to_handler_ms": None, "after_handler_ms": None}
            if event_id in handled:
                to_handler = (handled[event_id] - published_at).total_seconds() * 1000
                sample["to_handler_ms"] = to_handler
                sample["after_handler_ms"] = elapsed_ms - to_handler
            samples.append(sample)
        return samples
    finally:
        await publisher.stop()
        await consumer.stop()


async def _wait_for(consumer: AIOKafkaConsumer, matches, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in decode_batch(await consumer.getmany(timeout_ms=100)):
            if event.type == "adapter.promotion_refused" or event.type == "profile.update_refused":
                raise RuntimeError(f"the registry refused: {event.payload}")
            if matches(event):
                return event
    raise TimeoutError(f"no matching event within {timeout_s:.0f}s")


def _handled_at(settings: Settings, event_ids: list[str]) -> dict[str, datetime]:
    """When the registry's handler took each grant (the archive row is stamped in its transaction)."""
    with Session(engine_for(settings.db_url("registry"))) as session:
        rows = session.exec(select(ArchivedEvent.event_id, ArchivedEvent.archived_at)
                            .where(ArchivedEvent.event_id.in_(event_ids))).all()
    return {event_id: at if at.tzinfo else at.replace(tzinfo=timezone.utc) for event_id, at in rows}


def _archived(settings: Settings) -> int:
    try:
        with Session(engine_for(settings.db_url("registry"))) as session:
            return session.exec(select(func.count()).select_from(ArchivedEvent)).one()
    except Exception:  # the registry may still be creating its tables
        return 0


async def _until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)

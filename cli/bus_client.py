"""How the command line talks to a running platform: publish one event, await its answer."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Callable

from aiokafka import AIOKafkaConsumer

import typer

from shared.contracts import schemas
from shared.bus import Publisher, decode_batch
from shared.contracts.envelope import Envelope, NewEvent, Producer, seal
from shared.contracts.signing import Signer
from shared.keys import MissingKey, operator_signer
from shared.settings import Settings
from shared.log_reader import partitions_of
from shared.topics import ensure_topics, topic_for


def command_event(event: NewEvent, *, correlation_id: str | None = None, operator: str) -> Envelope:
    """An event an operator originates: a stream of its own (sequence 1), from producer ``operator:<id>``.
    It is published signed with that operator's key (``signer_for``)."""
    return seal(event, sequence=1, producer=Producer(service=f"operator:{operator}", node=Settings.from_env().node),
                correlation_id=correlation_id or event.correlation_id or event.aggregate_id,
                causation_id=None, schema_version=schemas.current_version(event.type))


def signer_for(settings: Settings, operator: str, key: Path | None = None) -> Signer:
    """The operator's signer; without a key, one line saying how to get one, and exit 2."""
    try:
        return operator_signer(settings, operator, key)
    except MissingKey as exc:
        typer.echo(f"neurons: {exc}", err=True)
        raise typer.Exit(2) from None


def check_may_publish(settings: Settings, operator: str, signer: Signer, event_type: str) -> None:
    """One line, before publishing, when the log says ``operator`` may not publish ``event_type`` with this key
    (every consumer would refuse it)."""
    from shared.contracts.signing import authorised
    from shared.trust_view import TrustView

    view = run(TrustView(settings).read_once())
    record = view.state.get(signer.key_id)
    if record is None or not record.valid_at(None):
        typer.echo(f"neurons: the key of {operator} ({signer.key_id}) is not enrolled or was revoked; "
                   f"an admin runs `neurons operator enroll {operator} --role ROLE`", err=True)
        raise typer.Exit(1)
    allowed = schemas.producers()[event_type]
    if not authorised(record.principal, record.roles, allowed):
        needed = ", ".join(entry.split(":", 1)[1] for entry in allowed if entry.startswith("operator:"))
        typer.echo(f"neurons: {operator} holds {', '.join(record.roles)}; {event_type} needs the role "
                   f"{needed}", err=True)
        raise typer.Exit(1)


async def publish_signed(settings: Settings, envelope: Envelope, signer: Signer) -> None:
    await ensure_topics(settings)
    async with Publisher(settings, "cli", signer=signer) as publisher:
        await publisher.publish_reliably(envelope)


async def _end_offsets(consumer: AIOKafkaConsumer, aggregate_types: list[str]) -> dict:
    partitions = await partitions_of(consumer, [topic_for(aggregate) for aggregate in aggregate_types])
    consumer.assign(partitions)
    # Where answers will come from. The end a broker reports may be short of the log's (the embedded one
    # reports it per record batch): reading from there re-reads a few older records, which the caller's
    # ``matches`` passes over, and never skips a newer one.
    ends = await consumer.end_offsets(partitions)
    for tp, offset in ends.items():
        consumer.seek(tp, offset)
    return ends


async def publish_and_wait(
    settings: Settings,
    envelope: Envelope | None,
    answer_from: list[str],
    matches: Callable[[Envelope], bool],
    timeout_s: float = 60.0,
    from_beginning: bool = False,
    signer: Signer | None = None,
) -> Envelope | None:
    """Publish ``envelope`` (if any, signed by ``signer``), then wait for the first event that ``matches``."""
    await ensure_topics(settings)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap(), group_id=None,
                                enable_auto_commit=False, client_id=f"neurons-cli-{uuid.uuid4().hex[:6]}",
                                **settings.kafka_security())
    await consumer.start()
    try:
        await _end_offsets(consumer, answer_from)
        if from_beginning:
            await consumer.seek_to_beginning()
        if envelope is not None:
            async with Publisher(settings, "cli", signer=signer) as publisher:
                await publisher.publish_reliably(envelope)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in decode_batch(await consumer.getmany(timeout_ms=500)):
                if matches(event):
                    return event
        return None
    finally:
        await consumer.stop()


def run(coro):
    return asyncio.run(coro)

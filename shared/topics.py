"""Topics: one per aggregate type, plus the dead-letter topic.

Topics are created explicitly at start-up; nothing relies on the broker
creating a topic on first use. Source-of-truth topics keep events forever.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

import os

from shared.settings import Settings

log = logging.getLogger("neurons.topics")
TOPIC_ALREADY_EXISTS = 36  # Kafka error code

AGGREGATE_TYPES = (
    "dataset",
    "cycle",
    "research",
    "approval",
    "training",
    "validation",
    "energy",
    "hardware",
    "scaling",
    "adapter",
    "profile",
    "operator",
    "serving",
)
SERVICES = ("trainer", "evolution", "approval", "validator", "energy", "registry", "serving")


def prefix() -> str:
    """Topic and group namespace; NEURONS_TOPIC_PREFIX lets several platforms share one cluster."""
    return os.environ.get("NEURONS_TOPIC_PREFIX") or "neurons."


def topic_for(aggregate_type: str) -> str:
    if aggregate_type not in AGGREGATE_TYPES:
        raise ValueError(f"no topic for aggregate type {aggregate_type!r}")
    return f"{prefix()}{aggregate_type}"


def dlq_topic() -> str:
    return f"{prefix()}dlq"


def all_topics() -> list[str]:
    return [topic_for(a) for a in AGGREGATE_TYPES] + [dlq_topic()]


def group_id(service: str) -> str:
    return f"{prefix().rstrip('.')}-{service}"


async def ensure_topics(settings: Settings) -> list[str]:
    """Create every topic the platform uses; return those that were new."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap(), client_id="neurons-admin",
                                **settings.kafka_security())
    for attempt in range(30):
        try:
            await admin.start()
            break
        except Exception:  # the broker may still be starting
            if attempt == 29:
                raise
            await asyncio.sleep(0.5)
    try:
        existing = set(await admin.list_topics())
        wanted = [(t, settings.topic_partitions) for t in all_topics()]
        new = [
            NewTopic(
                name,
                num_partitions=parts,
                replication_factor=settings.topic_replication,
                topic_configs={"retention.ms": "-1", "retention.bytes": "-1"},
            )
            for name, parts in wanted
            if name not in existing
        ]
        if not new:
            return []
        try:
            response = await admin.create_topics(new)
        except TopicAlreadyExistsError:
            response = None
        # the answer is per topic: under Kafka ACLs only the administrator creates topics
        # (deploy/kafka/init.sh), and a refusal here is that, not a failure
        errors = {topic: code for topic, code, *_ in getattr(response, "topic_errors", None) or ()}
        created = [t.name for t in new if errors.get(t.name, 0) == 0]
        refused = sorted(t for t, code in errors.items() if code not in (0, TOPIC_ALREADY_EXISTS))
        if created:
            log.info("created topics %s", created)
        if refused:
            log.warning("topics %s are missing and were not created (Kafka error codes %s; 29 or 31: this client "
                        "may not create topics, the cluster's administrator does)", refused,
                        sorted({errors[t] for t in refused}))
        return created
    finally:
        await admin.close()

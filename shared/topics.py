"""Topics: one per aggregate type, plus the dead-letter topic.

Topics are created explicitly at start-up; nothing relies on the broker
creating a topic on first use. Source-of-truth topics keep events forever,
with the configured replication factor and ``min.insync.replicas``
(``shared.broker_features.topic_configs``). A running service checks now and
then that its topics are still there (``TopicKeeper``): a broker that lost
them (the embedded one forgets everything on restart) gets them back.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

import os

from shared.broker_features import topic_configs
from shared.settings import Settings

log = logging.getLogger("neurons.topics")
TOPIC_ALREADY_EXISTS = 36  # Kafka error code


def _never_auto_create_topics() -> None:
    """Make every aiokafka client of this process ask for metadata without auto-creation.

    aiokafka asks the broker to create any topic its metadata requests name;
    a broker that does so (the embedded one, with 4 partitions; Kafka with
    ``auto.create.topics.enable``) would make a topic a producer or consumer
    merely named, with the broker's partition count instead of the configured
    one, and aggregates would change partition. Topics are created by
    ``ensure_topics`` only.
    """
    import aiokafka.admin.client
    import aiokafka.client
    from aiokafka.protocol.metadata import MetadataRequest

    if getattr(aiokafka.client.MetadataRequest, "never_auto_create", False):
        return

    class MetadataRequestWithoutAutoCreation(MetadataRequest):
        never_auto_create = True

        def __init__(self, topics=None, allow_auto_topic_creation: bool | None = False) -> None:
            super().__init__(topics, allow_auto_topic_creation)

    aiokafka.client.MetadataRequest = MetadataRequestWithoutAutoCreation
    aiokafka.admin.client.MetadataRequest = MetadataRequestWithoutAutoCreation


_never_auto_create_topics()

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


async def ensure_topics(settings: Settings, attempts: int = 30) -> list[str]:
    """Create every topic the platform uses; return those that were new."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap(), client_id="neurons-admin",
                                **settings.kafka_security())
    for attempt in range(attempts):
        try:
            await admin.start()
            break
        except Exception:  # the broker may still be starting
            if attempt == attempts - 1:
                await admin.close()
                raise
            await asyncio.sleep(0.5)
    try:
        return await create_missing(admin, settings)
    finally:
        await admin.close()


def new_topics(settings: Settings, existing: set[str]) -> list[NewTopic]:
    """The platform's topics ``existing`` lacks, as they are to be created."""
    return [
        NewTopic(name, num_partitions=settings.topic_partitions, replication_factor=settings.topic_replication,
                 topic_configs=topic_configs(settings))
        for name in all_topics()
        if name not in existing
    ]


async def create_missing(admin: AIOKafkaAdminClient, settings: Settings) -> list[str]:
    """Create the platform's topics the broker lacks with a started admin client; those it created."""
    new = new_topics(settings, set(await admin.list_topics()))
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


class TopicKeeper:
    """Puts back the platform's topics when the broker lost them; ``check`` is cheap when they are there.

    One admin client, kept open: a failed check closes it and the next one
    connects again, so a broker that was away (or came back empty) is found.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._admin: AIOKafkaAdminClient | None = None

    async def check(self) -> list[str]:
        """Create what is missing; the topics created (empty when all were there or the broker is away)."""
        try:
            if self._admin is None:
                admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.bootstrap(), client_id="neurons-keeper",
                                            **self.settings.kafka_security())
                await admin.start()
                self._admin = admin
            created = await create_missing(self._admin, self.settings)
        except Exception as exc:  # the broker is away: next time
            log.debug("topics not checked: %r", exc)
            await self.close()
            return []
        if created:
            log.warning("the broker had lost topics %s: created them again", created)
        return created

    async def close(self) -> None:
        if self._admin is not None:
            admin, self._admin = self._admin, None
            try:
                await admin.close()
            except Exception:  # closing a client whose broker is gone
                pass

"""What the broker can do, asked rather than assumed, and the client settings that follow.

Apache Kafka gives idempotent producers: with ``enable_idempotence`` a retried
send is written once, and ``acks=all`` waits for every in-sync replica. The
embedded broker (Tansu) lists InitProducerId among its APIs but answers it with
an error, so ``probe`` asks for a producer id for real instead of trusting the
list. ``producer_config`` and ``topic_configs`` are the pure decisions; delivery
stays at-least-once either way, and consumers de-duplicate on event_id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from shared.settings import Settings

log = logging.getLogger("neurons.broker")
INIT_PRODUCER_ID = 22  # Kafka API key
# what each broker this process talked to can do, by bootstrap address: one probe per broker
_PROBED: dict[str, "BrokerFeatures"] = {}


@dataclass(frozen=True)
class BrokerFeatures:
    idempotent_producer: bool
    reason: str  # why (not): what the broker answered


def producer_config(features: BrokerFeatures) -> dict:
    """aiokafka producer settings: acks=all always; idempotent where the broker hands out producer ids."""
    return {"acks": "all", "enable_idempotence": features.idempotent_producer}


def min_insync_replicas(settings: Settings) -> int:
    """NEURONS_TOPIC_MIN_INSYNC, else min(2, replication factor); never above the replication factor."""
    wanted = settings.topic_min_insync or min(2, settings.topic_replication)
    return max(1, min(wanted, settings.topic_replication))


def topic_configs(settings: Settings) -> dict[str, str]:
    """The configs every created topic gets: kept forever, and acks=all means ``min.insync.replicas`` copies."""
    return {"retention.ms": "-1", "retention.bytes": "-1", "min.insync.replicas": str(min_insync_replicas(settings))}


def features_from(api_keys: set[int], init_producer_error: int | None) -> BrokerFeatures:
    """The decision from what the broker answered: its API keys and, when it lists InitProducerId,
    the error code of a real InitProducerId request (None when not asked)."""
    if INIT_PRODUCER_ID not in api_keys:
        return BrokerFeatures(False, "the broker does not list InitProducerId among its APIs")
    if init_producer_error:
        return BrokerFeatures(False, f"the broker lists InitProducerId but answered it with error {init_producer_error}")
    return BrokerFeatures(True, "the broker handed out a producer id")


async def probe(settings: Settings) -> BrokerFeatures:
    """Ask the broker what it can do (ApiVersions, then a real InitProducerId); cached per address."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.protocol.admin import ApiVersionRequest
    from aiokafka.protocol.transaction import InitProducerIdRequest

    address = settings.bootstrap()
    if address in _PROBED:
        return _PROBED[address]
    client = AIOKafkaClient(bootstrap_servers=address, client_id="neurons-probe", **settings.kafka_security())
    try:
        await client.bootstrap()
        node = next(iter(client.cluster.brokers())).nodeId
        versions = await client.send(node, ApiVersionRequest())
        api_keys = {entry[0] for entry in versions.api_versions}
        error = None
        if INIT_PRODUCER_ID in api_keys:
            answer = await client.send(node, InitProducerIdRequest(None, 60000))
            error = answer.error_code or (0 if answer.producer_id >= 0 else -1)
    finally:
        await client.close()
    features = _PROBED[address] = features_from(api_keys, error)
    if features.idempotent_producer:
        log.info("idempotent producers with acks=all: %s", features.reason)
    else:
        log.info("producers use acks=all without idempotence (%s); consumers de-duplicate on event_id",
                 features.reason)
    return features

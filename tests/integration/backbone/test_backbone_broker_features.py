"""The publisher asks the broker what it can do: the embedded one refuses producer ids, so no idempotence."""

import logging

from shared import broker_features
from shared.bus import Publisher


async def test_the_embedded_broker_gets_acks_all_without_idempotence_and_a_line_saying_why(platform, caplog):
    if platform.settings.bootstrap() in broker_features._PROBED:  # asked already by an earlier test
        broker_features._PROBED.pop(platform.settings.bootstrap())
    caplog.set_level(logging.INFO, logger="neurons.broker")
    features = await broker_features.probe(platform.settings)
    if features.idempotent_producer:  # Apache Kafka (NEURONS_TEST_KAFKA=testcontainers) hands out producer ids
        assert features.reason == "the broker handed out a producer id"
        return
    assert features.reason == "the broker lists InitProducerId but answered it with error -1"
    assert ("producers use acks=all without idempotence (the broker lists InitProducerId but answered it with "
            "error -1); consumers de-duplicate on event_id") in caplog.messages
    async with Publisher(platform.settings, "test", signer=None) as publisher:
        # what aiokafka made of it: no producer-id manager, every replica's acknowledgement awaited
        assert publisher.producer._txn_manager is None and publisher.producer._sender._acks == -1

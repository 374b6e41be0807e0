"""What the producer and the topics are configured with, decided from what the broker answered and the settings."""

from pathlib import Path

import pytest

from shared.broker_features import (INIT_PRODUCER_ID, BrokerFeatures, features_from, min_insync_replicas,
                                    producer_config, topic_configs)
from shared.settings import Settings

KAFKA_APIS = {0, 1, 2, 3, 18, 19, INIT_PRODUCER_ID, 24, 25, 26}


def settings(**changes) -> Settings:
    return Settings(var_dir=Path("var"), bootstrap_servers="localhost:9092", database_url=None).with_(**changes)


def test_a_broker_that_hands_out_producer_ids_gets_idempotent_producers_with_acks_all():
    features = features_from(KAFKA_APIS, init_producer_error=0)
    assert features.idempotent_producer
    assert producer_config(features) == {"acks": "all", "enable_idempotence": True}


def test_a_broker_that_lists_init_producer_id_but_refuses_it_gets_acks_all_without_idempotence():
    # the embedded broker lists the API and answers it with error -1
    features = features_from(KAFKA_APIS, init_producer_error=-1)
    assert not features.idempotent_producer and "error -1" in features.reason
    assert producer_config(features) == {"acks": "all", "enable_idempotence": False}


def test_a_broker_without_init_producer_id_gets_acks_all_without_idempotence():
    features = features_from(KAFKA_APIS - {INIT_PRODUCER_ID}, init_producer_error=None)
    assert not features.idempotent_producer and "does not list" in features.reason
    assert producer_config(BrokerFeatures(False, "")) == {"acks": "all", "enable_idempotence": False}


@pytest.mark.parametrize(("replication", "min_insync", "expected"), [
    (1, None, 1), (2, None, 2), (3, None, 2), (5, None, 2), (3, 3, 3), (3, 1, 1), (1, 2, 1),
])
def test_min_insync_replicas_defaults_to_two_and_never_exceeds_the_replication_factor(replication, min_insync,
                                                                                         expected):
    assert min_insync_replicas(settings(topic_replication=replication, topic_min_insync=min_insync)) == expected


def test_created_topics_keep_events_forever_and_ask_for_the_in_sync_replicas():
    assert topic_configs(settings(topic_replication=3)) == {
        "retention.ms": "-1", "retention.bytes": "-1", "min.insync.replicas": "2"}


def test_the_settings_read_the_min_insync_variable(monkeypatch):
    monkeypatch.setenv("NEURONS_TOPIC_REPLICATION", "3")
    monkeypatch.setenv("NEURONS_TOPIC_MIN_INSYNC", "3")
    read = Settings.from_env()
    assert (read.topic_replication, read.topic_min_insync) == (3, 3)
    monkeypatch.delenv("NEURONS_TOPIC_MIN_INSYNC")
    assert Settings.from_env().topic_min_insync is None


def test_every_missing_topic_is_created_with_the_configured_partitions_replicas_and_configs(monkeypatch):
    from shared.topics import all_topics, new_topics

    monkeypatch.setenv("NEURONS_TOPIC_PREFIX", "neurons.")
    wanted = settings(topic_partitions=6, topic_replication=3, topic_min_insync=3)
    created = new_topics(wanted, existing={"neurons.cycle", "other.topic"})
    assert [t.name for t in created] == [t for t in all_topics() if t != "neurons.cycle"]
    assert {(t.num_partitions, t.replication_factor) for t in created} == {(6, 3)}
    assert all(t.topic_configs == {"retention.ms": "-1", "retention.bytes": "-1", "min.insync.replicas": "3"}
               for t in created)

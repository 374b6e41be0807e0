"""Faults a platform meets: crashed services, garbage on the topics, a broker that forgets."""

import asyncio
import json
import threading
from collections import Counter

import pytest

from shared.topics import AGGREGATE_TYPES, dlq_topic, topic_for
from tests.e2e.cycle_support import CYCLE, prepare, start
from tests.support import Platform, read_topic, wait_until


def run_cycle_in_background(platform: Platform) -> dict:
    """Start `neurons cycle run` and return a handle whose 'result' is filled when it ends."""
    handle: dict = {}

    def target() -> None:
        handle["result"] = platform.cli(*CYCLE, check=False, timeout=900)

    handle["thread"] = threading.Thread(target=target, daemon=True)
    handle["thread"].start()
    return handle


def archived_types(platform: Platform) -> Counter:
    return Counter(e["type"] for e in platform.archived())


@pytest.mark.slow
def test_every_service_killed_mid_cycle_still_gives_exactly_one_promotion(platform, tmp_path):
    prepare(platform, tmp_path)
    start(platform, tmp_path)
    handle = run_cycle_in_background(platform)
    # Each service dies (SIGKILL) at a moment it has work in flight, then comes back.
    plan = [("evolution", "cycle.proposed"), ("approval", "approval.granted"), ("trainer", "training.progressed"),
            ("energy", "training.completed"), ("validator", "validation.cycle_completed"),
            ("registry", "validation.completed")]
    for service, after in plan:
        wait_until(lambda: archived_types(platform)[after] > 0, 600, message=f"{after} before killing {service}")
        platform.kill(service)
        platform.start(service)
    handle["thread"].join(900)
    summary = json.loads(handle["result"].stdout)
    assert summary["outcome"] == "promoted", summary
    events = [e for e in platform.archived() if e["correlation_id"] == summary["cycle_id"]]
    counts = Counter(e["type"] for e in events)
    assert counts["adapter.promoted"] == 1 and counts["training.completed"] == 1
    assert counts["validation.completed"] == 1 and counts["profile.adapter_updated"] == 1
    ids = [e["event_id"] for e in platform.archived()]
    assert len(ids) == len(set(ids))
    # no state change applied twice: one event per (stream, sequence)
    positions = Counter((e["aggregate_type"], e["aggregate_id"], e["sequence"]) for e in platform.archived())
    assert max(positions.values()) == 1, [p for p, n in positions.items() if n > 1]


@pytest.mark.slow
def test_a_thousand_malformed_messages_land_in_the_dlq_and_the_cycle_completes(platform, tmp_path, kafka_bootstrap):
    prepare(platform, tmp_path)
    start(platform, tmp_path)
    handle = run_cycle_in_background(platform)
    wait_until(lambda: archived_types(platform)["training.started"] > 0, 300, message="training under way")

    async def garbage() -> None:
        good = platform.archived("dataset.registered")[0]
        async with platform.publisher() as publisher:
            for i in range(1000):
                topic = topic_for(AGGREGATE_TYPES[i % len(AGGREGATE_TYPES)])
                if i % 3 == 0:
                    value = b"\x00garbage %d" % i
                elif i % 3 == 1:
                    value = json.dumps({**good, "type": "dataset.vanished", "event_id": None}).encode()
                else:
                    broken = json.loads(json.dumps(good))
                    broken["payload"]["sha256"] = f"not-a-digest-{i}"
                    value = json.dumps(broken).encode()
                await publisher.send_raw(topic, value, f"junk-{i}".encode())

    asyncio.run(garbage())
    handle["thread"].join(900)
    summary = json.loads(handle["result"].stdout)
    assert summary["outcome"] == "promoted", summary

    def sources(records: list) -> set:
        return {(dict(r.headers)["dlq_source_topic"], dict(r.headers)["dlq_source_partition"],
                 dict(r.headers)["dlq_source_offset"]) for r in records}

    # every service that reads a topic refuses its junk: one record may be parked by several consumers
    records = asyncio.run(read_topic(kafka_bootstrap, dlq_topic(), 1000, timeout=120,
                                     until=lambda read: len(sources(read)) >= 1000))
    assert len(sources(records)) >= 1000
    assert all(dict(r.headers).get("dlq_reason") for r in records)
    counts = Counter(e["type"] for e in platform.archived() if e["correlation_id"] == summary["cycle_id"])
    assert counts["adapter.promoted"] == 1 and counts["profile.adapter_updated"] == 1

"""What an operator's `neurons cycle run` says is what happens: real processes, the real broker.

It checks what the cycle needs before it asks for anything, runs explicit
settings exactly or says why not, says when and why a gate holds a cycle
back, lets an admin start one the hardware gate would hold, and (slow) the
README's tiny cycle passes its soak and is promoted."""

import asyncio
import json

import pytest

from tests.e2e.cycle_support import TINY
from tests.support import Platform, make_event, wait_until

# a platform that trains nothing by itself: the schedule is on (an hour), but waits an interval after start-up
QUIET = {**TINY, "NEURONS_SCHEDULE_INTERVAL_S": "3600", "NEURONS_MAX_LOAD_PER_CORE": "0.85"}
BUSY = {"cores": 2, "memory_total_bytes": 16 * 2**30, "memory_available_bytes": 8 * 2**30, "gpus": [],
        "load_avg": [8.0, 8.0, 8.0], "cpu_model": "test"}
README_CYCLE = ("cycle", "run", "--model", "tiny", "--steps", "30", "--set", "learning_rate=0.001",
                "--set", "lora_rank=8", "--set", "lora_alpha=16", "--set", "mask_ratio=0.2", "--set", "batch_size=8",
                "--requested-by", "demo-requester", "--json")


def cycle_topic_size(platform: Platform) -> int:
    """How many records the cycle topic holds (cycle.requested lands there)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from shared.topics import ensure_topics, topic_for

    async def size() -> int:
        await ensure_topics(platform.settings)
        consumer = AIOKafkaConsumer(bootstrap_servers=platform.settings.bootstrap(), group_id=None)
        await consumer.start()
        try:
            topic = topic_for("cycle")
            await consumer._client.force_metadata_update()
            parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
            return sum((await consumer.end_offsets(parts)).values())
        finally:
            await consumer.stop()

    return asyncio.run(size())  # the platform fixture put its settings in the environment


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_cycle_run_checks_keys_roles_dataset_and_model_before_asking_for_anything(platform, tmp_path):
    platform.enroll("alice", "requester")
    platform.enroll("ops", "approver")
    run = ("cycle", "run", "--model", "tiny", "--steps", "30", "--requested-by", "alice")

    no_key = platform.cli(*run, "--operator", "nobody", check=False)
    assert no_key.returncode == 2 and "neurons operator enroll nobody" in one_line(no_key)
    own = platform.cli(*run, "--operator", "alice", check=False)
    assert own.returncode == 2 and "may not approve its promotion" in one_line(own)
    not_approver = platform.cli("cycle", "run", "--model", "tiny", "--requested-by", "ops", "--operator", "alice",
                                check=False)
    assert not_approver.returncode == 1
    assert one_line(not_approver) == "neurons: alice holds requester; this cycle needs alice to hold approver"
    no_dataset = platform.cli(*run, "--operator", "ops", check=False)
    assert no_dataset.returncode == 1 and "no usable dataset is registered" in one_line(no_dataset)
    unknown_gate = platform.cli(*run, "--operator", "ops", "--force-gate", "energy", check=False)
    assert unknown_gate.returncode == 2 and "only hardware may be forced" in one_line(unknown_gate)
    not_admin = platform.cli(*run, "--operator", "ops", "--force-gate", "hardware", check=False)
    assert one_line(not_admin) == "neurons: alice holds requester; this cycle needs alice to hold admin"

    from shared.ml.datasets import build_demo_dataset

    build_demo_dataset(tmp_path / "demo.jsonl", records=20)
    platform.cli("data", "add", str(tmp_path / "demo.jsonl"), "--no-cycle", "--operator", "alice")
    no_model = platform.cli("cycle", "run", "--model", "missing-model", "--requested-by", "alice", "--operator", "ops",
                            check=False)
    assert no_model.returncode == 1 and "missing-model" in one_line(no_model)

    assert cycle_topic_size(platform) == 0  # nothing was requested


@pytest.fixture
def evolving(platform, tmp_path):
    """Evolution, approval and the registry on a platform with a dataset; alice asks, ops approves."""
    platform.env.update(QUIET)
    platform.enroll("alice", "requester")
    platform.enroll("ops", "approver")
    platform.start("evolution", "approval", "registry")
    from shared.ml.datasets import build_demo_dataset

    build_demo_dataset(tmp_path / "demo.jsonl", records=20)
    platform.cli("data", "add", str(tmp_path / "demo.jsonl"), "--no-cycle", "--operator", "alice")
    return platform


def proposals(platform: Platform, command_id: str) -> list[dict]:
    return [e for e in platform.archived("cycle.proposed") if e["payload"]["trigger"].get("command_id") == command_id]


def test_explicit_settings_run_exactly_or_are_refused_and_gates_are_said_out_loud(evolving):
    platform = evolving
    ask = ("cycle", "run", "--model", "tiny", "--steps", "30", "--requested-by", "alice", "--operator", "ops")

    refused = platform.cli(*ask, "--set", "learning_rate=0.005", check=False)
    assert refused.returncode == 1
    assert one_line(refused) == ("neurons: refused: learning_rate=0.005 is outside the allowed range "
                                 "[1e-05, 0.001]")

    sent = json.loads(platform.cli(*ask, "--set", "learning_rate=0.00025", "--no-wait", "--json").stdout)
    [proposed] = wait_until(lambda: proposals(platform, sent["command_id"]), 60, message="the proposal")
    assert proposed["payload"]["config"]["learning_rate"] == 0.00025 and proposed["payload"]["config"]["steps"] == 30
    cycle_id = proposed["payload"]["cycle_id"]
    [training] = wait_until(lambda: [e for e in platform.archived("training.requested")
                                     if e["payload"]["cycle_id"] == cycle_id], 60, message="training.requested")
    assert training["payload"]["config"]["learning_rate"] == 0.00025

    asyncio.run(_publish_hardware(platform))  # the node is busy: 4 per core
    wait_until(lambda: platform.archived("hardware.profiled"), 60, message="the hardware profile")
    deferred = platform.cli(*ask, "--json", "--timeout", "60", check=False)
    assert deferred.returncode == 1
    notice, summary = [json.loads(line) for line in deferred.stdout.strip().splitlines()]
    assert notice["event"] == "cycle.deferred" and notice["gate"] == "hardware"
    assert notice["reason"] == "load average per core 4.00 is above 0.85" and notice["retry_at"]
    assert "--force-gate hardware" in notice["hint"]
    assert summary["outcome"].startswith("deferred: gate hardware: load average per core 4.00")
    said = platform.cli(*ask, "--timeout", "60", check=False)
    assert "gate hardware: load average per core 4.00 is above 0.85 (retry at " in said.stdout

    forced = json.loads(platform.cli("cycle", "run", "--model", "tiny", "--requested-by", "admin", "--force-gate",
                                     "hardware", "--no-wait", "--json").stdout)
    [started] = wait_until(lambda: proposals(platform, forced["command_id"]), 60, message="the forced proposal")
    assert started["payload"]["trigger"]["force_gates"] == ["hardware"]
    requested = [e for e in platform.archived("cycle.requested") if e["aggregate_id"] == forced["command_id"]]
    assert requested[0]["payload"]["force_gates"] == ["hardware"]

    held = platform.cli("cycle", "request", "--operator", "alice", "--set", "steps=30").stdout
    assert held.startswith("deferred ") and "gate hardware: load average per core 4.00 is above 0.85" in held
    let_through = platform.cli("cycle", "request", "--operator", "admin", "--force-gate", "hardware").stdout
    assert let_through.startswith("proposed ")

    # a requester's own envelope asking to force the gate (past the CLI's check) is refused by evolution
    asyncio.run(_publish_forced_request(platform, "req-alice-forces"))
    [no] = wait_until(lambda: [e for e in platform.archived("cycle.request_refused")
                               if e["payload"]["command_id"] == "req-alice-forces"], 60, message="the refusal")
    assert no["payload"]["reason"] == "forcing the hardware gate needs the admin role; alice holds requester"

    # the hour-long schedule waited an interval after start-up: no cycle of its own competed with these
    assert not [e for e in platform.archived() if e["type"] in ("cycle.proposed", "cycle.deferred")
                and e["payload"]["trigger"]["type"] == "schedule"]


async def _publish_hardware(platform: Platform) -> None:
    async with platform.publisher() as publisher:
        await publisher.publish(make_event("hardware.profiled", "node-busy", {**BUSY, "load_avg": [8.0, 8.0, 8.0]},
                                           service="energy"))


async def _publish_forced_request(platform: Platform, command_id: str) -> None:
    payload = {"operator_id": "alice", "config": None, "model": "tiny", "dataset_id": None,
               "force_gates": ["hardware"]}
    async with platform.publisher() as publisher:
        await publisher.publish(make_event("cycle.requested", command_id, payload, service="operator:alice",
                                           correlation_id=command_id))


@pytest.mark.slow
def test_the_readmes_tiny_cycle_passes_and_returns_at_its_last_event(platform, tmp_path):
    from tests.e2e.cycle_support import SERVICES

    platform.env.update(TINY)
    platform.enroll("demo-requester", "requester")
    platform.enroll("demo-operator", "approver")
    from shared.ml.datasets import build_demo_dataset

    build_demo_dataset(tmp_path / "demo.jsonl", records=120)
    platform.start(*SERVICES)
    platform.cli("data", "add", str(tmp_path / "demo.jsonl"), "--no-cycle", "--operator", "demo-requester")

    result = platform.cli(*README_CYCLE, check=False, timeout=900)  # no profile follows the channel

    assert result.stdout.strip(), result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["outcome"] == "promoted", summary
    assert result.returncode == 0 and summary["profiles_updated"] == []
    completed = [e for e in platform.archived("cycle.completed") if e["payload"]["cycle_id"] == summary["cycle_id"]]
    assert completed and completed[0]["payload"]["outcome"] == "promoted"
    [proposed] = [e for e in platform.archived("cycle.proposed") if e["payload"]["cycle_id"] == summary["cycle_id"]]
    assert proposed["payload"]["config"] == {"learning_rate": 0.001, "lora_rank": 8, "lora_alpha": 16,
                                             "mask_ratio": 0.2, "steps": 30, "batch_size": 8}

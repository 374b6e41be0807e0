"""The validator sizes its soaks to the energy service's advice, and keeps that advice across a restart
(the real broker, the validator as a process, killed and started again)."""

import json

from sqlmodel import Session

from shared.db import engine_for
from shared.store import ServiceState
from shared.topics import topic_for
from tests.support import await_until, make_event, read_topic

SHA = "ab" * 32


def advice(node: str, validator_replicas: int) -> dict:
    return {"node": node, "model_params": 3_000_000, "device": "cpu", "micro_batch": 4, "gradient_accumulation": 1,
            "effective_batch": 4, "trainer_replicas": 1, "validator_replicas": validator_replicas,
            "reasons": {"micro_batch": ["test"], "gradient_accumulation": ["test"], "trainer_replicas": ["test"],
                        "validator_replicas": [f"room for {validator_replicas} replica processes"]}}


def trained(job: str) -> dict:
    return {"job_id": job, "cycle_id": f"cyc-{job}", "kind": "mntp", "status": "trained", "fallback_reason": None,
            "adapter_uri": f"artefact://sha256/{SHA}", "adapter_sha256": SHA, "duration_s": 1.0,
            "metrics": {"before": {"loss": 2.0}, "after": {"loss": 1.5}},
            "energy": {"joules": 6.0, "method": "model", "components": [{"name": "cpu", "joules": 6.0, "method": "model"}],
                       "duration_s": 1.0, "cpu_s": 1.0, "reason": "no RAPL counters"},
            "base_model": "tiny", "base_model_checksum": None, "dataset_sha256": None, "config": {}}


def kept_advice(platform) -> dict | None:
    with Session(engine_for(platform.settings.db_url("validator"))) as session:
        row = session.get(ServiceState, ("validator", "validator", "advice"))
        return json.loads(row.value_json) if row is not None else None


async def test_a_restarted_validator_sizes_its_next_soak_to_the_advice_it_read_before(platform, kafka_bootstrap):
    platform.env.update({"NEURONS_SOAK_REPLICAS": "2", "NEURONS_SOAK_CYCLES": "1", "NEURONS_SOAK_EPISODES": "2",
                         "NEURONS_DRIFT_SOAK_S": "0"})
    await platform.aensure_topics()
    platform.start("validator")
    node = platform.settings.node
    scaling = make_event("scaling.recommended", node, advice(node, 2), service="energy")
    async with platform.publisher() as publisher:
        await publisher.publish(scaling)
    kept = await await_until(lambda: kept_advice(platform), 60, message="the validator to keep the advice")
    assert kept == {"event_id": scaling.event_id, "validator_replicas": 2}
    # Restarted, it does not read the advice again (its offset is past it, or it is known as processed):
    # only what it kept sizes the next soak.
    platform.kill("validator")
    platform.start("validator")
    async with platform.publisher() as publisher:
        await publisher.publish(make_event("training.completed", "job-1", trained("job-1"), sequence=4,
                                           service="trainer", correlation_id="cyc-job-1"))
    records = await read_topic(kafka_bootstrap, topic_for("validation"), 2, timeout=60)
    events = {e["type"]: e["payload"] for e in (json.loads(r.value) for r in records)}
    started = events["validation.started"]
    # 2 processes: one candidate replica and its baseline twin, not the 2 + 2 configured
    assert started["replicas"] == 1
    assert started["sized_by"] == {"event_id": scaling.event_id, "validator_replicas": 2}
    # the run itself cannot soak here (no held-out data): it is closed as inconclusive, not left hanging
    assert events["validation.completed"]["verdict"] == "inconclusive"

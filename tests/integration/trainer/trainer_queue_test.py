"""The trainer honours the scaling advice's ``trainer_replicas``: jobs beyond it wait in order, say so
(``training.queued`` with their position) and start, first in first, as running jobs end
(real broker, the trainer as a process, the tiny model trained by real workers)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlmodel import Session, select

from shared.contracts.envelope import iso
from shared.db import engine_for
from shared.store import ServiceState
from tests.support import await_until, make_event, sign_as_producers

pytestmark = pytest.mark.slow


def advice(node: str, trainer_replicas: int) -> dict:
    reasons = {"micro_batch": [], "gradient_accumulation": [], "trainer_replicas": ["test advice"],
               "validator_replicas": []}
    return {"node": node, "model_params": 1_000_000, "device": "cpu", "micro_batch": 4, "gradient_accumulation": 1,
            "trainer_replicas": trainer_replicas, "validator_replicas": 2, "reasons": reasons}


def dataset(settings) -> dict:
    """The demo's paragraphs under var/datasets, where the trainer reads datasets from."""
    from shared.ml.datasets import build_demo_dataset

    path = settings.var_dir / "datasets" / "queue.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_demo_dataset(path, records=48)
    from shared.ml import dataset_sha256

    return {"dataset_id": "ds-queue", "sha256": dataset_sha256(path), "uri": path.as_uri()}


def request(settings, job: str, steps: int) -> dict:
    """A training request on the tiny model, granted by the approval service's policy."""
    cycle_id = f"cyc-{job}"
    config = {"steps": steps, "batch_size": 2, "learning_rate": 1e-3}
    grant = make_event("approval.granted", f"apr-cycle-{cycle_id}", {
        "request_id": f"apr-cycle-{cycle_id}", "kind": "cycle", "subject_id": cycle_id, "cycle_id": cycle_id,
        "subject": {"cycle_id": cycle_id, "config": config}, "actor": "policy:auto-mntp-under-energy",
        "policy": {"name": "auto-mntp-under-energy", "rule": {}}, "decision": None,
        "granted_at": iso(datetime.now(timezone.utc))}, service="approval", correlation_id=cycle_id)
    return {"job_id": job, "cycle_id": cycle_id, "kind": "mntp", "model": "tiny", "dataset": dataset(settings), "config": config,
            "warm_start": None, "hardware_plan": None, "requested_by": "test",
            "grant": sign_as_producers(settings, [grant])[0].to_dict()}


def trainer_state_row(platform, kind: str, key: str):
    with Session(engine_for(platform.settings.db_url("trainer"))) as session:
        row = session.exec(select(ServiceState).where(ServiceState.service == "trainer", ServiceState.kind == kind,
                                                      ServiceState.key == key)).first()
        return row


def of(platform, event_type: str, job: str) -> list[dict]:
    return [e for e in platform.archived(event_type) if e["payload"]["job_id"] == job]


async def test_jobs_beyond_the_advised_trainer_replicas_wait_in_order(platform):
    await platform.aensure_topics()
    platform.start("trainer", "registry")
    settings = platform.settings
    async with platform.publisher() as publisher:
        # given the energy service advises two trainers on this node
        await publisher.publish(make_event("scaling.recommended", settings.node, advice(settings.node, 2),
                                           service="energy"))
        await await_until(lambda: trainer_state_row(platform, "advice", "scaling"), 60, message="the advice read")

        # when four jobs are requested, the first two long enough to be training when the others arrive
        for job, steps in (("job-1", 60), ("job-2", 60)):
            await publisher.publish(make_event("training.requested", job, request(settings, job, steps),
                                               service="evolution", correlation_id=f"cyc-{job}"))
            await await_until(lambda job=job: of(platform, "training.started", job), 60, message=f"{job} started")
        for job in ("job-3", "job-4"):
            await publisher.publish(make_event("training.requested", job, request(settings, job, 4),
                                               service="evolution", correlation_id=f"cyc-{job}"))
            await await_until(lambda job=job: of(platform, "training.queued", job), 60, message=f"{job} queued")

        # then the third and fourth wait, in order, and say why
        [third], [fourth] = of(platform, "training.queued", "job-3"), of(platform, "training.queued", "job-4")
        assert third["payload"]["position"] == 1 and fourth["payload"]["position"] == 2
        assert third["payload"]["capacity"] == 2
        assert set(third["payload"]["running"]) <= {"job-1", "job-2"}
        assert third["payload"]["advice_event_id"] is not None
        assert of(platform, "training.started", "job-3") == []

        # and every job trains to its end, never more than two at once, the waiting ones first in first
        for job in ("job-1", "job-2", "job-3", "job-4"):
            await await_until(lambda job=job: of(platform, "training.completed", job) or
                              of(platform, "training.failed", job), 300, message=f"{job} ended")
    assert [of(platform, "training.completed", job) != [] for job in ("job-1", "job-2", "job-3", "job-4")] == \
        [True] * 4, platform.log("trainer")[-3000:]
    # in the order they happened; an end and a start at the same instant: the end first (it freed the slot)
    timeline = sorted((e for e in platform.archived() if e["type"] in ("training.started", "training.completed")),
                      key=lambda e: (e["occurred_at"], e["type"] == "training.started"))
    running, most = set(), 0
    for e in timeline:
        (running.add if e["type"] == "training.started" else running.discard)(e["payload"]["job_id"])
        most = max(most, len(running))
    assert most == 2
    starts = [e["payload"]["job_id"] for e in timeline if e["type"] == "training.started"]
    assert starts[2:] == ["job-3", "job-4"]
    first_end = min(e["occurred_at"] for e in timeline if e["type"] == "training.completed")
    assert min(e["occurred_at"] for e in of(platform, "training.started", "job-3")) >= first_end
    assert trainer_state_row(platform, "queue", "job-3") is None  # nobody is left waiting
    assert fourth["payload"]["reason"].startswith("2 job(s) running, 1 waiting before it")

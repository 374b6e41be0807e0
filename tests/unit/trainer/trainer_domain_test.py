"""Training jobs, given / when / then, on plain values."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest

from services.trainer.domain import (
    COMPLETED,
    FAILED,
    REQUESTED,
    RUNNING,
    JobFailed,
    JobFinished,
    JobProgressed,
    RequestTraining,
    ResumeJob,
    TrainerState,
    apply_hardware_plan,
    decide,
    evolve,
    handle,
    initial_state,
    jobs_to_resume,
)
from shared.contracts.envelope import NewEvent
from shared.contracts.schemas import validate_payload

SHA = "a" * 64
ADAPTER = "b" * 64
BASE = "c" * 64


@dataclass(frozen=True)
class Event:
    type: str
    aggregate_id: str
    payload: dict[str, Any] = field(default_factory=dict)


def requested(job_id="job-1", dataset_id="ds-1", sha256=SHA, kind="mntp", hardware_plan=None) -> Event:
    return Event("training.requested", job_id, {
        "job_id": job_id, "cycle_id": "cycle-1", "kind": kind, "model": "tiny",
        "dataset": {"dataset_id": dataset_id, "sha256": sha256, "uri": f"file:///data/{dataset_id}.jsonl"},
        "config": {"steps": 10, "learning_rate": 1e-3, "batch_size": 8}, "warm_start": None,
        "hardware_plan": hardware_plan, "requested_by": "evolution",
    })


def registered(dataset_id="ds-1", sha256=SHA, quarantined=False, reason=None) -> Event:
    return Event("dataset.registered", dataset_id, {
        "dataset_id": dataset_id, "name": "demo", "sha256": sha256, "uri": "file:///demo.jsonl",
        "record_count": 10, "quarantined": quarantined, "quarantine_reason": reason,
    })


def given(*messages) -> TrainerState:
    """The state after these events and commands, each handled as the runtime would."""
    state = initial_state()
    for message in messages:
        state, _ = handle(message, state)
    return state


def result(status="trained", reason=None) -> dict[str, Any]:
    return {
        "adapter_uri": f"artefact://sha256/{ADAPTER}", "adapter_sha256": ADAPTER, "status": status,
        "fallback_reason": reason, "metrics": {"before": {"loss": 9.1, "accuracy": 0.02}, "after": {"loss": 7.2, "accuracy": 0.1}},
        "duration_s": 12.5, "energy": {"joules": 120.0, "source": "rapl"},
        "base_model": {"name": "tiny", "checksum": BASE}, "steps": 10, "tokens": 4000,
    }


def progress(step, job_id="job-1", **point) -> JobProgressed:
    return JobProgressed(job_id, {"step": step, "total_steps": 10, "learning_rate": 1e-3, "tokens_per_s": 240.0,
                                  "loss": 5.0, **point})


def test_a_request_starts_the_job():
    state, events = handle(requested(), initial_state())
    assert [e.type for e in events] == ["training.started"]
    assert events[0].aggregate_id == "job-1"
    assert events[0].payload["dataset_sha256"] == SHA and events[0].payload["resumed_from_step"] is None
    assert state.jobs["job-1"]["status"] == RUNNING


def test_deciding_before_folding_the_request_gives_the_same_answer():
    assert [e.type for e in decide(requested(), initial_state())] == ["training.started"]


@pytest.mark.parametrize("history", [
    [requested()],
    [requested(), JobFinished("job-1", result())],
    [requested(), JobFailed("job-1", "train", "out of memory")],
])
def test_a_redelivered_request_produces_nothing(history):
    assert handle(requested(), given(*history))[1] == []


def test_a_request_on_a_quarantined_dataset_fails_at_the_dataset_stage():
    state, events = handle(requested(), given(registered(quarantined=True, reason="contains secrets")))
    assert [e.type for e in events] == ["training.failed"]
    assert events[0].payload["stage"] == "dataset" and "contains secrets" in events[0].payload["error"]
    assert state.jobs["job-1"]["status"] == FAILED


def test_quarantined_content_fails_under_another_dataset_id():
    events = decide(requested(dataset_id="ds-new"), given(registered(dataset_id="ds-old", quarantined=True, reason="pii")))
    assert events[0].type == "training.failed" and events[0].payload["stage"] == "dataset"


def test_a_request_for_other_content_than_registered_fails():
    events = decide(requested(sha256="e" * 64), given(registered()))
    assert events[0].type == "training.failed" and "sha256" in events[0].payload["error"]


def test_a_clean_registered_dataset_trains():
    assert [e.type for e in decide(requested(), given(registered()))] == ["training.started"]


def test_an_unknown_kind_fails_the_request():
    events = decide(requested(kind="dpo"), initial_state())
    assert events[0].type == "training.failed" and events[0].payload["stage"] == "request"


def test_the_hardware_plan_sets_micro_batches_and_keeps_the_effective_batch():
    state = given(requested(hardware_plan={"micro_batch": 3}))
    config = state.jobs["job-1"]["config"]
    assert (config["batch_size"], config["grad_accum"]) == (3, 3)
    assert apply_hardware_plan({"batch_size": 8}, None) == {"batch_size": 8}


def test_progress_is_recorded_while_running_once_per_step():
    state, events = handle(progress(4, checkpoint_step=4, energy_j=33.0), given(requested()))
    assert [e.type for e in events] == ["training.progressed"]
    assert events[0].payload["loss"] == 5.0 and events[0].payload["reward_mean"] is None
    assert (state.jobs["job-1"]["last_step"], state.jobs["job-1"]["checkpoint_step"]) == (4, 4)
    # A resumed worker repeats the steps after its checkpoint: not recorded twice.
    assert decide(progress(3), state) == [] and decide(progress(4), state) == []
    assert len(decide(progress(5), state)) == 1


def test_no_progress_before_start_or_after_the_end():
    assert decide(progress(1), given(registered(quarantined=True), requested())) == []
    assert decide(progress(11), given(requested(), JobFinished("job-1", result()))) == []


def test_a_completion_carries_the_artefact_and_happens_once():
    state, events = handle(JobFinished("job-1", result()), given(requested()))
    assert [e.type for e in events] == ["training.completed"]
    payload = events[0].payload
    assert payload["adapter_sha256"] == ADAPTER and payload["adapter_uri"].endswith(ADAPTER)
    assert payload["status"] == "trained" and payload["fallback_reason"] is None
    assert payload["base_model"] == "tiny" and payload["base_model_checksum"] == BASE
    assert payload["dataset_sha256"] == SHA and payload["kind"] == "mntp" and payload["cycle_id"] == "cycle-1"
    assert payload["metrics"]["before"] == {"loss": 9.1, "accuracy": 0.02}
    assert (payload["metrics"]["loss_before"], payload["metrics"]["loss_after"]) == (9.1, 7.2)
    assert payload["energy"] == {"joules": 120.0, "source": "rapl"} and payload["duration_s"] == 12.5
    assert payload["config"]["steps"] == 10
    assert state.jobs["job-1"]["status"] == COMPLETED
    assert decide(JobFinished("job-1", result()), state) == []
    assert decide(JobFailed("job-1", "train", "late"), state) == []


def test_no_completion_after_a_failure():
    state, events = handle(JobFailed("job-1", "train", "nan loss", retryable=True), given(requested()))
    assert events[0].payload["retryable"] is True and events[0].payload["error"] == "nan loss"
    assert decide(JobFinished("job-1", result()), state) == []


def test_a_fallback_completion_needs_its_reason():
    state = given(requested())
    with pytest.raises(ValueError):
        decide(JobFinished("job-1", result(status="fallback")), state)
    events = decide(JobFinished("job-1", {**result(status="fallback", reason="torch cannot be imported"),
                                          "base_model": {"name": "tiny", "checksum": None}}), state)
    assert events[0].payload["fallback_reason"] == "torch cannot be imported"
    assert events[0].payload["base_model_checksum"] is None


def test_a_restarted_trainer_resumes_running_jobs_from_their_checkpoint():
    state = given(requested(), progress(6, checkpoint_step=5), requested("job-2"), JobFinished("job-2", result()))
    assert jobs_to_resume(state) == ["job-1"]
    state, events = handle(ResumeJob("job-1", 5), state)
    assert events[0].type == "training.started"
    assert events[0].payload["resumed_from_step"] == 5 and events[0].payload["attempt"] == 2
    assert state.jobs["job-1"]["status"] == RUNNING
    assert decide(ResumeJob("job-2", None), state) == []


def test_commands_for_unknown_jobs_do_nothing():
    assert decide(JobFinished("nope", result()), initial_state()) == []
    assert decide(progress(1, job_id="nope"), initial_state()) == []


def test_the_request_command_is_idempotent():
    command = RequestTraining(job_id="job-9", cycle_id="c-9", kind="rl", model="tiny",
                              dataset={"dataset_id": "ds-1", "sha256": SHA, "uri": "file:///p.jsonl"},
                              config={"reward": "length_target"}, requested_by="alice")
    state, events = handle(command, initial_state())
    assert [e.type for e in events] == ["training.requested"] and state.jobs["job-9"]["status"] == REQUESTED
    assert decide(command, state) == []


def test_evolve_leaves_the_given_state_alone():
    state = given(requested())
    before = copy.deepcopy(state.to_dict())
    evolve(state, Event("training.completed", "job-1", {"job_id": "job-1", "adapter_sha256": ADAPTER}))
    assert state.to_dict() == before
    assert TrainerState.from_dict(state.to_dict()) == state


def test_every_emitted_payload_matches_its_schema():
    emitted: list[NewEvent] = []
    state = initial_state()
    command = RequestTraining(job_id="job-7", cycle_id="c-7", kind="mntp", model="smollm2",
                              dataset={"dataset_id": "ds-1", "sha256": SHA, "uri": "file:///d.jsonl"},
                              config={"steps": 4}, warm_start=ADAPTER, hardware_plan={"micro_batch": 2})
    for message in (command,):
        state, events = handle(message, state)
        emitted += events
    for message in (
        Event(emitted[0].type, emitted[0].aggregate_id, emitted[0].payload),
        progress(2, job_id="job-7", checkpoint_step=2, energy_j=12.0),
        progress(3, job_id="job-7", loss=None, reward_mean=0.4, reward_std=0.1),
        ResumeJob("job-7", 2),
        JobFinished("job-7", {**result(status="fallback", reason="peft cannot be imported"),
                              "base_model": {"name": "smollm2", "checksum": None}}),
    ):
        state, events = handle(message, state)
        emitted += events
    emitted += decide(requested("job-8"), given(registered(quarantined=True)))
    emitted += decide(requested("job-10", kind="dpo"), initial_state())
    emitted += handle(JobFailed("job-11", "train", "boom"), given(requested("job-11")))[1]
    emitted += handle(JobFinished("job-12", result()), given(requested("job-12")))[1]

    assert {e.type for e in emitted} == {"training.requested", "training.started", "training.progressed",
                                         "training.completed", "training.failed"}
    for event in emitted:
        validate_payload(event.type, 1, event.payload)
        assert event.aggregate_type == "training"

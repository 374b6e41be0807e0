"""Laws of the trainer decider: a redelivered training request starts nothing, the log replays to the
live state, the state survives its rows, and the runtime absorbs any redelivered record.

The domain promises the first for ``training.requested`` ("a request for a job already known produces
nothing"); a dataset registration delivered again after a later one for the same dataset would be
folded again by the domain alone, which is why the runtime's processed-events table is the law's
keeper for every record (checked last).
"""

from __future__ import annotations

from functools import reduce

from hypothesis import given
from hypothesis import strategies as st

from services.trainer import domain
from tests.unit.laws.law_support import (
    assert_redelivery_changes_nothing,
    assert_replay_gives_live_state,
    Ids,
    Runtime,
    drive,
    event,
    interleave,
    laws,
    move,
    redelivery_is_absorbed,
    rows_round_trip,
    sha,
)

# --- the adapter: the one place that knows the domain's signatures --------------------------------

CONFIG = None  # the trainer has no configuration
initial_state = domain.initial_state
from_rows = domain.TrainerState.from_rows


def step(message, state):
    return domain.handle(message, state, CONFIG)


def replay(events):
    return reduce(domain.evolve, events, initial_state())


def wire(runtime: Runtime) -> None:
    """``services/trainer/app.py``: registrations and requests run through the decider (the job runner's
    lines are commands here, see ``play``)."""
    @runtime.service.handles("dataset.registered", "training.requested")
    def on_event(envelope, ctx):
        runtime.decider.run(ctx, envelope, CONFIG)


# --- plausible messages -----------------------------------------------------------------------------

DATASETS = {"ds-1": "a", "ds-2": "b"}
minutes = st.sampled_from([0, 1, 5, 30])


@move
def registration(dataset_id: str, letter: str, quarantined: bool):
    return lambda state, now, ids: event(ids, "dataset.registered", dataset_id, {
        "dataset_id": dataset_id, "name": dataset_id, "sha256": sha(letter), "uri": f"file:///data/{dataset_id}.jsonl",
        "record_count": 10, "quarantined": quarantined, "quarantine_reason": "pii found" if quarantined else None},
        now, "cli")


@move
def request(job_id: str, dataset_id: str, letter: str, kind: str, plan: dict | None):
    return lambda state, now, ids: event(ids, "training.requested", job_id, {
        "job_id": job_id, "cycle_id": f"cyc-{job_id}", "kind": kind, "model": "tiny",
        "dataset": {"dataset_id": dataset_id, "sha256": sha(letter), "uri": f"file:///data/{dataset_id}.jsonl"},
        "config": {"steps": 10, "learning_rate": 1e-3, "batch_size": 8}, "warm_start": None,
        "hardware_plan": plan, "requested_by": "evolution"}, now, "evolution")


@move
def progressed(job_id: str, step_no: int, checkpoint: int | None):
    return lambda state, now, ids: domain.JobProgressed(job_id, {
        "step": step_no, "total_steps": 10, "learning_rate": 1e-3, "tokens_per_s": 240.0, "loss": 5.0 - step_no / 10,
        "checkpoint_step": checkpoint})


@move
def finished(job_id: str, status: str):
    return lambda state, now, ids: domain.JobFinished(job_id, {
        "adapter_uri": f"artefact://sha256/{sha('f')}", "adapter_sha256": sha("f"), "status": status,
        "fallback_reason": None if status == "trained" else "no ML stack",
        "metrics": {"before": {"loss": 9.1}, "after": {"loss": 7.2}}, "duration_s": 12.5,
        "energy": {"joules": 120.0}, "base_model": {"name": "tiny", "checksum": sha("9")}})


@move
def failed(job_id: str):
    return lambda state, now, ids: domain.JobFailed(job_id, "train", "CUDA out of memory", retryable=False)


@move
def resumed(job_id: str, checkpoint: int | None):
    return lambda state, now, ids: domain.ResumeJob(job_id, checkpoint)


@st.composite
def job_story(draw, job_id: str):
    """One job: its request, then the runner's lines (progress, maybe a restart), then one ending."""
    dataset_id = draw(st.sampled_from(sorted(DATASETS)))
    letter = draw(st.sampled_from([DATASETS[dataset_id], DATASETS[dataset_id], "d"]))  # "d": not the registered content
    story = [request(job_id, dataset_id, letter, draw(st.sampled_from(["mntp", "mntp", "rl"])),
                     draw(st.sampled_from([None, {"micro_batch": 2}])))]
    steps = sorted(draw(st.lists(st.integers(1, 10), max_size=4)))
    for n in steps:
        story.append(progressed(job_id, n, draw(st.sampled_from([None, n]))))
        if draw(st.integers(0, 4)) == 0:
            story.append(resumed(job_id, n))
    ending = draw(st.sampled_from(["trained", "fallback", "failed", None]))
    if ending == "failed":
        story.append(failed(job_id))
    elif ending is not None:
        story.append(finished(job_id, ending))
    if draw(st.booleans()):  # the runner repeats itself: a late line after the end
        story.append(draw(st.sampled_from([finished(job_id, "trained"), failed(job_id), progressed(job_id, 3, None)])))
    return [(draw(minutes), move) for move in story]


@st.composite
def scripts(draw):
    jobs = draw(st.lists(st.sampled_from(["job-1", "job-2", "job-3"]), min_size=1, max_size=3, unique=True))
    registrations = [(draw(minutes), registration(d, draw(st.sampled_from([DATASETS[d], "d"])), draw(st.booleans())))
                     for d in draw(st.lists(st.sampled_from(sorted(DATASETS)), max_size=3))]
    return interleave(draw, [*(draw(job_story(job)) for job in jobs), registrations])


def run(script):
    return drive(step, initial_state(), script, Ids(), "trainer")


# --- the laws ----------------------------------------------------------------------------------------


@laws(30)
@given(scripts(), st.integers(min_value=0))
def test_a_redelivered_request_starts_nothing_and_changes_nothing(script, pick):
    journal = run(script)
    assert_redelivery_changes_nothing(journal, step, [e for e in journal.consumed if e.type == "training.requested"], pick)


@laws(30)
@given(scripts())
def test_replaying_the_log_gives_the_state_built_live(script):
    assert_replay_gives_live_state(run(script), replay)


@laws(30)
@given(scripts())
def test_the_state_read_back_from_its_rows_is_the_state(script):
    journal = run(script)
    assert rows_round_trip(journal.state, from_rows) == journal.state


@laws(10)
@given(scripts(), st.integers(min_value=0), st.booleans())
def test_the_runtime_absorbs_a_redelivered_record(tmp_path, script, pick, restart):
    runtime = Runtime(tmp_path, "trainer", ["training", "dataset"], domain, from_rows, wire)
    redelivery_is_absorbed(runtime, script, CONFIG, pick, restart)

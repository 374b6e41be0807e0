"""Laws of the energy decider: a redelivered job completion reports nothing twice, the log (and the
service's own events alone) replays to the live state, the state survives its rows, and the runtime
absorbs any redelivered record."""

from __future__ import annotations

from datetime import timedelta
from functools import reduce

from hypothesis import given
from hypothesis import strategies as st

from services.energy import domain
from shared.contracts.values import iso
from tests.unit.laws.law_support import (
    assert_redelivery_changes_nothing,
    assert_replay_gives_live_state,
    Ev,
    Ids,
    Runtime,
    drive,
    event,
    hardware_profile,
    interleave,
    laws,
    move,
    redelivery_is_absorbed,
    rows_round_trip,
    sha,
    training_completed,
    validation_completed,
)

# --- the adapter: the one place that knows the domain's signatures --------------------------------

CONFIG = domain.EnergyConfig(carbon_intensity_g_per_kwh=400.0, pue=1.2, budgets=domain.parse_budgets("1h=0.05,24h=0.2"))


def initial_state():
    return domain.initial_state(CONFIG)


def from_rows(rows):
    return domain.EnergyState.from_rows(rows, CONFIG.budgets)


def _time(message):
    return getattr(message, "occurred_at", None) or message.at


def step(message, state):
    """What ``shared.decider.Decider.run`` does: fold an event in, decide, fold the decided events
    sealed at the message's time (the domain has no ``handle``)."""
    if hasattr(message, "type"):
        state = domain.evolve(state, message)
    decided = domain.decide(message, state, CONFIG)
    for new in decided:
        state = domain.evolve(state, Ev(new.type, new.aggregate_id, new.payload, _time(message)))
    return state, decided


def replay(events):
    return reduce(domain.evolve, events, initial_state())


def wire(runtime: Runtime) -> None:
    """``services/energy/app.py``: every job completion runs through the decider."""
    @runtime.service.handles("training.completed", "validation.completed")
    def on_job_completed(envelope, ctx):
        runtime.decider.run(ctx, envelope, CONFIG)


# --- plausible messages -----------------------------------------------------------------------------

JOBS = ("job-1", "job-2", "job-3")
minutes = st.sampled_from([0, 1, 10, 45, 120])
# joules as meters give them: nothing, a small job, one that alone crosses the 1h budget (0.05 Wh)
readings = st.sampled_from([None, {}, {"joules": None, "reason": "RAPL: not readable"}, 36.0, 180.0, 720.0])


def reading(joules, ended_minutes_ago: int | None, now):
    if joules is None or isinstance(joules, dict):
        return joules
    energy = {"joules": joules, "method": "rapl", "components": [{"name": "package-0", "joules": joules,
                                                                    "method": "rapl"}],
              "duration_s": 60.0, "cpu_s": 50.0, "reason": None}
    if ended_minutes_ago is not None:  # the job ended a while before its completion was published
        energy["ended_at"] = iso(now - timedelta(minutes=ended_minutes_ago))
    return energy


@move
def completion(job_id: str, kind: str, joules, ended_minutes_ago):
    def build(state, now, ids):
        energy = reading(joules, ended_minutes_ago, now)
        if kind == "training":
            payload = training_completed(job_id, "cyc-1", sha("c"), energy=energy)
            return event(ids, "training.completed", job_id, payload, now, "trainer")
        payload = validation_completed(job_id, sha("c"), verdict="pass", energy=energy)
        payload.setdefault("energy", energy)
        return event(ids, "validation.completed", job_id, payload, now, "validator")
    return build


@move
def profile(load: float):
    return lambda state, now, ids: domain.ProfileHardware("node-1", hardware_profile(load), now)


@move
def recommend():
    return lambda state, now, ids: domain.RecommendScaling("node-1", now)


@st.composite
def scripts(draw):
    """Each job completes with one reading (a second delivery is the same record); the clock profiles
    the hardware and asks for a recommendation now and then."""
    jobs = draw(st.lists(st.sampled_from(JOBS), min_size=1, max_size=3, unique=True))
    completions = [[(draw(minutes), completion(job, draw(st.sampled_from(["training", "validation"])),
                                                draw(readings), draw(st.sampled_from([None, None, 5, 90]))))]
                   for job in jobs]
    clock = draw(st.lists(st.tuples(minutes, st.one_of(st.builds(profile, st.sampled_from([0.2, 3.5])),
                                                       st.builds(recommend))), max_size=3))
    return interleave(draw, [*completions, clock])


def run(script):
    return drive(step, initial_state(), script, Ids(), "energy")


# --- the laws ----------------------------------------------------------------------------------------


@laws(30)
@given(scripts(), st.integers(min_value=0))
def test_a_redelivered_completion_reports_nothing_and_changes_nothing(script, pick):
    journal = run(script)
    assert_redelivery_changes_nothing(journal, step, journal.consumed, pick)


@laws(30)
@given(scripts())
def test_replaying_the_log_gives_the_state_built_live(script):
    assert_replay_gives_live_state(run(script), replay)


@laws(30)
@given(scripts())
def test_replaying_its_own_events_alone_gives_the_state_built_live(script):
    # what a database from before the rows is rebuilt from (``_from_own_events`` in the app)
    journal = run(script)
    assert replay(journal.own) == journal.state


@laws(30)
@given(scripts())
def test_the_state_read_back_from_its_rows_writes_the_same_rows(script):
    journal = run(script)
    assert rows_round_trip(journal.state, from_rows).to_rows() == journal.state.to_rows()


def test_the_state_read_back_from_its_rows_is_the_state():
    journal = run([(0, completion("job-2", "training", None, None)), (0, completion("job-1", "training", None, None))])
    assert rows_round_trip(journal.state, from_rows) == journal.state


@laws(10)
@given(scripts(), st.integers(min_value=0), st.booleans())
def test_the_runtime_absorbs_a_redelivered_record(tmp_path, script, pick, restart):
    runtime = Runtime(tmp_path, "energy", ["training", "validation"], domain, from_rows, wire)
    redelivery_is_absorbed(runtime, script, CONFIG, pick, restart)

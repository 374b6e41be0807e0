"""Laws of the validator decider: a redelivered training result starts no second run, the log replays
to the live state, the state survives its rows, and the runtime absorbs any redelivered record.

The domain promises the first for ``training.completed`` (one candidate run per adapter); an older
``adapter.promoted`` delivered again after a newer one would move the baseline back if the domain
alone saw it, which is why the runtime's processed-events table is the law's keeper for every record.
"""

from __future__ import annotations

import random
from dataclasses import replace
from functools import reduce

from hypothesis import given
from hypothesis import strategies as st

from services.validator import domain
from shared.contracts.envelope import iso
from tests.unit.laws.law_support import (
    assert_redelivery_changes_nothing,
    assert_replay_gives_live_state,
    T0,
    Ev,
    Ids,
    Runtime,
    artefact_uri,
    drive,
    event,
    interleave,
    laws,
    move,
    redelivery_is_absorbed,
    rows_round_trip,
    sha,
    signed,
    training_completed,
)

# --- the adapter: the one place that knows the domain's signatures --------------------------------

CONFIG = None  # the plan and the thresholds live in the state


def initial_state():
    return domain.initial_state()


def from_rows(rows):
    return domain.ValidatorState.from_rows(rows)


def _time(message):
    return getattr(message, "occurred_at", None) or getattr(message, "requested_at", None)


def step(message, state):
    """What ``shared.decider.Decider.run`` does: fold an event in, decide, fold the decided events
    sealed (the domain has no ``handle``)."""
    if hasattr(message, "type"):
        state = domain.evolve(state, message)
    decided = domain.decide(message, state, CONFIG)
    for new in decided:
        # a runner's command carries no time; the events it leads to carry theirs in the payload
        state = domain.evolve(state, Ev(new.type, new.aggregate_id, new.payload, _time(message) or T0))
    return state, decided


def replay(events):
    return reduce(domain.evolve, events, initial_state())


def wire(runtime: Runtime) -> None:
    """``services/validator/app.py``: training results and promotions through the decider, a rollback
    saved as the adapter in production."""
    @runtime.service.handles("training.completed", "adapter.promoted")
    def on_event(envelope, ctx):
        runtime.decider.run(ctx, envelope, CONFIG)

    @runtime.service.handles("adapter.rolled_back")
    def on_rolled_back(envelope, ctx):
        state = runtime.decider.state(ctx)
        back = domain.Baseline("production", envelope.payload["adapter_sha256"], envelope.payload.get("adapter_uri"))
        runtime.decider.save(ctx, replace(state, production={**state.production,
                                                             envelope.payload.get("kind", "mntp"): back}))


# --- plausible messages -----------------------------------------------------------------------------

ADAPTERS = ("a", "b", "c")
minutes = st.sampled_from([0, 1, 5, 60, 7 * 60])


@move
def trained(letter: str, status: str, kind: str):
    return lambda state, now, ids: event(ids, "training.completed", f"job-{letter}", training_completed(
        f"job-{letter}", f"cyc-{letter}", sha(letter), status=status, kind=kind), now, "trainer")


@move
def promoted(letter: str, kind: str):
    return lambda state, now, ids: event(ids, "adapter.promoted", "production", {
        "channel": "production", "adapter_sha256": sha(letter), "adapter_uri": artefact_uri(sha(letter)),
        "kind": kind, "cycle_id": f"cyc-{letter}", "validation_id": f"val-{sha(letter)[:16]}",
        "previous_adapter_sha256": None, "approval_request_id": f"apr-promotion-val-{sha(letter)[:16]}",
        "approver": "alice", "promoted_at": iso(now)}, now, "registry")


@move
def rolled_back(letter: str):
    return lambda state, now, ids: event(ids, "adapter.rolled_back", "production", {
        "channel": "production", "adapter_sha256": sha(letter), "adapter_uri": artefact_uri(sha(letter)),
        "kind": "mntp", "previous_adapter_sha256": None, "operator_id": "dave", "request_id": "rb-1",
        "reason": None, "rolled_back_at": iso(now),
        "decision": signed("rb-1", "rollback", "dave", now, f"nonce-{ids.n}",
                           extra={"channel": "production", "adapter_sha256": sha(letter)}, kind="rollback",
                           about={"channel": "production", "adapter_sha256": sha(letter)})}, now, "registry")


def _replicas(seed: int, shift: float) -> list[dict]:
    rng = random.Random(seed)
    def samples(mean: float, sd: float) -> list[float]:
        return [rng.gauss(mean, sd) for _ in range(8)]

    return [{"replica_id": f"{side}-0", "side": side,
             "samples": {"mntp_loss": samples(2.0 + (shift if side == "candidate" else 0.0), 0.02),
                         "latency_ms": samples(100.0, 5.0), "errors": [0.0] * 8},
             "incident": None, "load": None}
            for side in ("candidate", "baseline")]


def _run(state, pick: int):
    runs = sorted(state.runs)
    return state.runs[runs[pick % len(runs)]] if runs else None


@move
def cycle_finished(pick: int, cycle: int, shift: float):
    def build(state, now, ids):
        run = _run(state, pick)
        return None if run is None else domain.CycleFinished(run.validation_id, cycle, _replicas(cycle, shift))
    return build


@move
def run_finished(pick: int, shift: float):
    def build(state, now, ids):
        run = _run(state, pick)
        if run is None:
            return None
        raw = {"validation_id": run.validation_id, "adapter_sha256": run.adapter_sha256,
               "baseline": run.baseline.to_dict(), "kind": run.kind,
               "cycles": [{"cycle": c, "replicas": _replicas(c, shift)} for c in (1, 2)]}
        return domain.RunFinished(run.validation_id, raw, f"file:///var/validation/{run.validation_id}.json")
    return build


@move
def abandon(pick: int):
    def build(state, now, ids):
        run = _run(state, pick)
        return None if run is None else domain.AbandonRun(run.validation_id, "node gone")
    return build


@move
def drift_soak(letter: str):
    return lambda state, now, ids: domain.StartDriftSoak(sha(letter), artefact_uri(sha(letter)), "mntp", now)


@st.composite
def scripts(draw):
    """Each adapter's training ends once (a second delivery is the same record); promotions and
    rollbacks on their own topic; the soak runner's lines and the drift clock as commands."""
    letters = draw(st.lists(st.sampled_from(ADAPTERS), min_size=1, max_size=3, unique=True))
    training = [[(draw(minutes), trained(letter, draw(st.sampled_from(["trained", "trained", "fallback"])),
                                         draw(st.sampled_from(["mntp", "rl"]))))] for letter in letters]
    production = draw(st.lists(st.tuples(minutes, st.one_of(
        st.builds(promoted, st.sampled_from(ADAPTERS), st.sampled_from(["mntp", "rl"])),
        st.builds(rolled_back, st.sampled_from(ADAPTERS)))), max_size=3))
    runner = draw(st.lists(st.tuples(minutes, st.one_of(
        st.builds(cycle_finished, st.integers(0, 3), st.integers(1, 3), st.sampled_from([-0.3, 0.0, 0.4])),
        st.builds(run_finished, st.integers(0, 3), st.sampled_from([-0.3, 0.4])),
        st.builds(abandon, st.integers(0, 3)),
        st.builds(drift_soak, st.sampled_from(ADAPTERS)))), max_size=4))
    return interleave(draw, [*training, production, runner])


def run(script):
    return drive(step, initial_state(), script, Ids(), "validator")


# --- the laws ----------------------------------------------------------------------------------------


@laws(30)
@given(scripts(), st.integers(min_value=0))
def test_a_redelivered_training_result_starts_no_second_run_and_changes_nothing(script, pick):
    journal = run(script)
    assert_redelivery_changes_nothing(journal, step, [e for e in journal.consumed if e.type == "training.completed"], pick)


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
    runtime = Runtime(tmp_path, "validator", ["training", "adapter", "dataset", "scaling"], domain, from_rows, wire)
    redelivery_is_absorbed(runtime, script, CONFIG, pick, restart)

"""Laws of the approval decider: a redelivered subject opens nothing, the log replays to the live
state, the state survives its rows, and the runtime absorbs any redelivered record."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st

from services.approval import domain
from shared.contracts.policies import default_policies
from tests.unit.laws.law_support import (
    assert_redelivery_changes_nothing,
    assert_replay_gives_live_state,
    Ids,
    Runtime,
    drive,
    event,
    keyring,
    laws,
    move,
    redelivery_is_absorbed,
    rows_round_trip,
    sha,
    signed,
)

# --- the adapter: the one place that knows the domain's signatures --------------------------------

CONFIG = domain.ApprovalConfig(keyring=keyring(), policies=default_policies(), request_ttl=timedelta(hours=24))
initial_state = domain.initial_state
from_rows = domain.ApprovalState.from_rows


def step(message, state):
    return domain.handle(message, state, CONFIG)


def replay(events):
    return domain.replay(events, initial_state())


def wire(runtime: Runtime) -> None:
    """``services/approval/app.py``: the subjects run through the decider (decisions and the clock are
    commands here, see ``play``)."""
    @runtime.service.handles("cycle.proposed", "research.proposed", "validation.completed")
    def on_subject(envelope, ctx):
        runtime.decider.run(ctx, envelope, CONFIG)


# --- plausible messages -----------------------------------------------------------------------------

CYCLES = ("cyc-1", "cyc-2", "cyc-3")
VALIDATIONS = ("val-1", "val-2")
OPERATORS = ("alice", "alice", "bob", "carol", "mallory")
MINUTES = st.sampled_from([0, 1, 5, 60, 25 * 60])


@move
def proposal(cycle: str, kind: str, energy_wh: float, requested_by: str):
    def build(state, now, ids):
        etype = "cycle.proposed" if kind == "mntp" else "research.proposed"
        payload = {
            "cycle_id": cycle, "kind": kind, "model": "smollm2",
            "dataset": {"dataset_id": "ds-1", "sha256": sha("a"), "uri": "file:///data/ds-1.jsonl"},
            "config": {"learning_rate": 2e-4, "lora_rank": 8, "steps": 200}, "warm_start": sha("b"),
            "energy_estimate_wh": energy_wh, "requested_by": requested_by, "proposed_at": now.isoformat(),
        }
        if kind == "mntp":
            payload.update(generation=0, individual={"individual_id": f"ind-{cycle}", "generation": 0, "parents": []})
        return event(ids, etype, cycle, payload, now, "evolution")
    return build


@move
def validation(validation_id: str, verdict: str, purpose: str, cycle: str):
    def build(state, now, ids):
        return event(ids, "validation.completed", validation_id, {
            "validation_id": validation_id, "adapter_sha256": sha("c" if validation_id == "val-1" else "d"),
            "adapter_uri": f"file:///artefacts/{validation_id}", "baseline": {"kind": "base", "adapter_sha256": None},
            "kind": "mntp", "purpose": purpose, "cycle_id": cycle, "verdict": verdict,
            "explanation": f"soak {verdict}", "score": 0.8, "raw_data_uri": None,
            "sample_sizes": {"candidate": {"latency_ms": 30}, "baseline": {"latency_ms": 30}},
            "thresholds": {"metrics": {}, "groups": {}, "pass_score": 0.6, "marginal_score": 0.4,
                           "consecutive_failures": 2, "min_samples": 5}}, now, "validator")
    return build


@move
def decision(pick: int, verdict: str, operator: str, nonce: int):
    def build(state, now, ids):
        # mostly a request still waiting, sometimes one decided already or one never opened
        known = sorted(r.request_id for r in state.pending()) * 3 + sorted(state.requests) + ["apr-cycle-unknown"]
        request_id = known[pick % len(known)]
        request = state.requests.get(request_id)  # the decision signs what the request is about
        decision = signed(request_id, verdict, operator, now, f"nonce-{nonce}",
                          kind=request.kind if request else None, about=request.subject if request else None)
        return domain.SubmitDecision(decision, now, request_id)
    return build


@move
def tick():
    return lambda state, now, ids: domain.Tick(now)


moves = st.tuples(MINUTES, st.one_of(
    st.builds(proposal, st.sampled_from(CYCLES), st.sampled_from(["mntp", "rl"]),
              st.sampled_from([1.0, 120.0]), st.sampled_from(["evolution", "carol", "bob"])),
    st.builds(validation, st.sampled_from(VALIDATIONS), st.sampled_from(["pass", "fail", "inconclusive"]),
              st.sampled_from(["candidate", "drift"]), st.sampled_from(CYCLES)),
    st.builds(decision, st.integers(0, 5), st.sampled_from(["grant", "reject"]), st.sampled_from(OPERATORS),
              st.integers(0, 2)),
    st.builds(tick),
))
scripts = st.lists(moves, min_size=1, max_size=8)


def run(script):
    return drive(step, initial_state(), script, Ids(), "approval")


# --- the laws ----------------------------------------------------------------------------------------


@laws(30)
@given(scripts, st.integers(min_value=0))
def test_a_redelivered_subject_decides_nothing_and_changes_nothing(script, pick):
    journal = run(script)
    assert_redelivery_changes_nothing(journal, step, journal.consumed, pick)


@laws(30)
@given(scripts)
def test_replaying_the_log_gives_the_state_built_live(script):
    assert_replay_gives_live_state(run(script), replay)


@laws(30)
@given(scripts)
def test_the_state_read_back_from_its_rows_is_the_state(script):
    journal = run(script)
    assert rows_round_trip(journal.state, from_rows) == journal.state


@laws(10)
@given(scripts, st.integers(min_value=0), st.booleans())
def test_the_runtime_absorbs_a_redelivered_record(tmp_path, script, pick, restart):
    runtime = Runtime(tmp_path, "approval", ["cycle", "research", "validation", "approval"], domain, from_rows, wire)
    redelivery_is_absorbed(runtime, script, CONFIG, pick, restart)

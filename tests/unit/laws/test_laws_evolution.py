"""Laws of the evolution decider: its own events change nothing when they come back from the log, a
redelivered grant starts no second training, the log replays to the live state, the state survives its
rows, and the runtime absorbs any redelivered record.

Evolution reads its own topics (``cycle``, ``research``, ``training``): every event it decides is
folded once when decided and once more when it comes back from the log, later, after whatever the
service did meanwhile. The runtime cannot help there (the first fold was no delivery), so that law
belongs to the domain. Facts from other services (energy, hardware, datasets) are de-duplicated by
the runtime's processed-events table (checked last).
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st

from services.evolution import domain
from shared.contracts.envelope import iso
from shared.contracts.policies import default_policies, proposal_subject
from tests.unit.laws.law_support import (
    assert_redelivery_changes_nothing,
    assert_replay_gives_live_state,
    Ids,
    Runtime,
    artefact_uri,
    drive,
    event,
    hardware_profile,
    interleave,
    keyring,
    laws,
    move,
    redelivery_is_absorbed,
    rows_round_trip,
    sha,
    signed,
    training_completed,
    validation_completed,
    weighted,
)

# --- the adapter: the one place that knows the domain's signatures --------------------------------

CONFIG = domain.EvolutionConfig(keyring=keyring(), policies=default_policies(), schedule_interval=timedelta(hours=6),
                                max_pending_approvals=2, retry_after=timedelta(minutes=30))
initial_state = domain.initial_state
from_rows = domain.EvolutionState.from_rows


def step(message, state):
    try:
        return domain.handle(message, state, CONFIG)
    except domain.CommandRejected:
        return state, []  # the operator hears why (``cycle.request_refused``); nothing else happens


def replay(events):
    return domain.replay(events, initial_state())


def wire(runtime: Runtime) -> None:
    """``services/evolution/app.py``: every event it reads runs through the decider, its own included
    (operator requests and the clock are commands here, see ``play``)."""
    @runtime.service.handles("*")
    def on_event(envelope, ctx):
        runtime.decider.run(ctx, envelope, CONFIG)


# --- plausible messages -----------------------------------------------------------------------------

DATASETS = ("ds-1", "ds-2")
minutes = st.sampled_from([0, 1, 10, 31, 90, 6 * 60])


def _cycle(state, pick: int, *statuses: str):
    cycles = sorted((c for c in state.cycles.values() if not statuses or c.status in statuses),
                    key=lambda c: c.cycle_id)
    return cycles[pick % len(cycles)] if cycles else None


@move
def dataset(dataset_id: str, letter: str, quarantined: bool):
    return lambda state, now, ids: event(ids, "dataset.registered", dataset_id, {
        "dataset_id": dataset_id, "name": dataset_id, "sha256": sha(letter), "uri": f"file:///data/{dataset_id}.jsonl",
        "record_count": 100, "quarantined": quarantined, "quarantine_reason": "pii found" if quarantined else None},
        now, "cli")


@move
def tick():
    return lambda state, now, ids: domain.Tick(now)


@move
def operator_cycle(command: int, dataset_id: str | None):
    return lambda state, now, ids: domain.RequestCycle("carol", now, dataset_id=dataset_id, command_id=f"cmd-{command}")


@move
def operator_research(command: int, letter: str | None):
    return lambda state, now, ids: domain.RequestResearch("carol", now, adapter_sha256=sha(letter) if letter else None,
                                                          command_id=f"res-{command}")


@move
def hardware(load: float, available_gib: float):
    return lambda state, now, ids: event(ids, "hardware.profiled", "node-1", hardware_profile(load, 4, available_gib),
                                         now, "energy")


@move
def scaling():
    return lambda state, now, ids: event(ids, "scaling.recommended", "node-1", {
        "node": "node-1", "model_params": 135_000_000, "device": "cpu", "micro_batch": 4, "gradient_accumulation": 2,
        "trainer_replicas": 1, "validator_replicas": 2,
        "reasons": {"micro_batch": [], "gradient_accumulation": [], "trainer_replicas": [], "validator_replicas": []}},
        now, "energy")


@move
def energy_reported(job: int, wh: float, carbon: float):
    return lambda state, now, ids: event(ids, "energy.reported", f"job-e{job}", {
        "job_id": f"job-e{job}", "job_kind": "training", "cycle_id": None, "joules": wh * 3600, "wh": wh,
        "gco2e": wh / 1000 * carbon, "pue": 1.0, "carbon_intensity": carbon, "method": "rapl",
        "methods": {"cpu": "rapl"}, "reason": None, "window": {"started_at": None, "ended_at": iso(now)}},
        now, "energy")


@move
def budget_exceeded(hours: int):
    return lambda state, now, ids: event(ids, "energy.budget_exceeded", "budget-24h", {
        "window": "24h", "window_s": 86400.0, "budget_wh": 500.0, "used_wh": 510.0, "crossed_at": iso(now),
        "until": iso(now + timedelta(hours=hours))}, now, "energy")


@move
def approval_requested(pick: int):
    """Approval opens a request for a proposal (``approval.requested``)."""
    def build(state, now, ids):
        cycle = _cycle(state, pick, domain.PROPOSED)
        if cycle is None:
            return None
        kind = "research" if cycle.kind == "rl" else "cycle"
        return event(ids, "approval.requested", cycle.request_id, {
            "request_id": cycle.request_id, "kind": kind, "subject_id": cycle.cycle_id, "subject": {},
            "cycle_id": cycle.cycle_id, "evidence": [],
            "policy": {"name": "cycle-needs-approver", "auto_approve": False, "rule": {}},
            "requested_by": cycle.requested_by,
            "requested_at": iso(now), "expires_at": iso(now + timedelta(hours=24))}, now, "approval")
    return build


@move
def approval_granted(pick: int, actor: str, nonce: int):
    """A grant of a proposal: by the policy that covers it, by a policy that does not, or signed by an
    operator (``alice`` approves; ``carol`` asked for operator cycles; ``mallory`` is no one)."""
    def build(state, now, ids):
        cycle = _cycle(state, pick, domain.PROPOSED, domain.APPROVED)
        if cycle is None:
            return None
        kind = "research" if cycle.kind == "rl" else "cycle"
        decision = None if actor.startswith("policy:") else signed(
            cycle.request_id, "grant", actor, now, f"n-{nonce}", kind=kind, about=proposal_subject(cycle.proposal))
        return event(ids, "approval.granted", cycle.request_id, {
            "request_id": cycle.request_id, "kind": kind, "subject_id": cycle.cycle_id, "subject": {},
            "cycle_id": cycle.cycle_id, "requested_by": cycle.requested_by,
            "actor": actor if actor.startswith("policy:") else f"operator:{actor}",
            "policy": {"name": actor.removeprefix("policy:"), "rule": {}} if actor.startswith("policy:") else None,
            "decision": decision, "granted_at": iso(now)}, now, "approval")
    return build


@move
def approval_closed(pick: int, how: str, promotion: bool):
    """A rejection or an expiry, of a proposal or of the promotion of a cycle's adapter."""
    def build(state, now, ids):
        cycle = _cycle(state, pick, domain.EVALUATED if promotion else domain.PROPOSED)
        if cycle is None:
            return None
        kind = "promotion" if promotion else ("research" if cycle.kind == "rl" else "cycle")
        request_id = f"apr-promotion-{cycle.cycle_id}" if promotion else cycle.request_id
        payload = {"request_id": request_id, "kind": kind, "subject_id": cycle.cycle_id, "cycle_id": cycle.cycle_id}
        if how == "rejected":
            payload.update(actor="operator:alice", operator_id="alice", rejected_at=iso(now),
                           decision=signed(request_id, "reject", "alice", now, f"r-{ids.n}", kind=kind,
                                           about={"adapter_sha256": _adapter(cycle)} if promotion
                                           else proposal_subject(cycle.proposal)))
        else:
            payload.update(expires_at=iso(now), expired_at=iso(now))
        return event(ids, f"approval.{how}", request_id, payload, now, "approval")
    return build


def _adapter(cycle) -> str:
    """The adapter a cycle's training made: one per cycle (its id ends in a hex digit), one for research."""
    return sha("f") if cycle.kind == "rl" else sha(cycle.cycle_id[-1])


@move
def training_ended(pick: int, outcome: str, joules: float):
    def build(state, now, ids):
        cycle = _cycle(state, pick, domain.APPROVED)
        if cycle is None:
            return None
        job_id = cycle.job_id or f"job-{cycle.cycle_id}"
        if outcome == "failed":
            return event(ids, "training.failed", job_id, {
                "job_id": job_id, "cycle_id": cycle.cycle_id, "stage": "train", "error": "CUDA out of memory"},
                now, "trainer")
        return event(ids, "training.completed", job_id, training_completed(
            job_id, cycle.cycle_id, _adapter(cycle), status=outcome, kind=cycle.kind, energy={"joules": joules},
            loss=(3.0, 2.4)), now, "trainer")
    return build


@move
def validated(pick: int, verdict: str, purpose: str):
    def build(state, now, ids):
        cycle = _cycle(state, pick, domain.APPROVED, domain.EVALUATED)
        if cycle is None:
            return None
        return event(ids, "validation.completed", f"val-{cycle.cycle_id}", validation_completed(
            f"val-{cycle.cycle_id}", _adapter(cycle), verdict=verdict, purpose=purpose,
            cycle_id=cycle.cycle_id if purpose == "candidate" else None, kind=cycle.kind), now, "validator")
    return build


@move
def promoted(pick: int):
    def build(state, now, ids):
        cycle = _cycle(state, pick, domain.EVALUATED)
        if cycle is None:
            return None
        return event(ids, "adapter.promoted", "production", {
            "channel": "production", "adapter_sha256": _adapter(cycle), "adapter_uri": artefact_uri(_adapter(cycle)),
            "kind": cycle.kind, "cycle_id": cycle.cycle_id, "validation_id": f"val-{cycle.cycle_id}",
            "previous_adapter_sha256": None, "approval_request_id": f"apr-promotion-{cycle.cycle_id}",
            "approver": "alice", "promoted_at": iso(now)}, now, "registry")
    return build


picks = st.integers(0, 3)
world = st.tuples(minutes, weighted(
    (2, st.builds(hardware, st.sampled_from([0.2, 0.2, 3.9]), st.sampled_from([8.0, 8.0, 1.0]))),
    (1, st.builds(scaling)),
    (2, st.builds(energy_reported, st.integers(0, 3), st.sampled_from([0.5, 40.0]),
                  st.sampled_from([200.0, 350.0, 600.0]))),
    (1, st.builds(budget_exceeded, st.sampled_from([1, 30]))),
))
operators = st.tuples(minutes, weighted(
    (2, st.builds(dataset, st.sampled_from(DATASETS), st.sampled_from(["a", "b"]),
                  st.sampled_from([False, False, True]))),
    (3, st.builds(tick)),
    (2, st.builds(operator_cycle, st.integers(0, 2), st.sampled_from([None, "ds-1", "ds-2"]))),
    (1, st.builds(operator_research, st.integers(0, 2), st.sampled_from([None, "c"]))),
))
reactions = st.tuples(minutes, weighted(
    (2, st.builds(approval_requested, picks)),
    (4, st.builds(approval_granted, picks, st.sampled_from(["policy:auto-mntp-under-energy", "alice", "alice",
                                                            "policy:cycle-needs-approver", "mallory", "carol"]),
                  st.integers(0, 2))),
    (1, st.builds(approval_closed, picks, st.sampled_from(["rejected", "expired"]), st.booleans())),
    (3, st.builds(training_ended, picks, st.sampled_from(["trained", "trained", "fallback", "failed"]),
                  st.sampled_from([3600.0, 72000.0]))),
    (3, st.builds(validated, picks, st.sampled_from(["pass", "pass", "fail", "inconclusive"]),
                  st.sampled_from(["candidate", "candidate", "drift"]))),
    (2, st.builds(promoted, picks)),
))


@st.composite
def scripts(draw):
    """The world (hardware, energy), operators and datasets, and the other services' reactions to what
    evolution proposed, interleaved; a reaction names a cycle that exists by then."""
    first = [(0, dataset("ds-1", "a", False))] if draw(st.booleans()) else []
    return first + interleave(draw, [draw(st.lists(world, max_size=3)), draw(st.lists(operators, max_size=4)),
                                     draw(st.lists(reactions, max_size=8))])


def run(script):
    return drive(step, initial_state(), script, Ids(), "evolution")


# --- the laws ----------------------------------------------------------------------------------------


@laws(30)
@given(scripts(), st.integers(min_value=0))
def test_its_own_event_coming_back_from_the_log_decides_nothing_and_changes_nothing(script, pick):
    journal = run(script)
    assert_redelivery_changes_nothing(journal, step, journal.own, pick)


def test_the_first_of_two_deferrals_coming_back_from_the_log_changes_nothing():
    # the hardware gate stays closed across two retries; the first deferral comes back from the log after
    # the second one was decided (a consumer that lags, or one catching up after a restart)
    journal = run([(0, hardware(3.9, 8.0)), (0, dataset("ds-1", "a", False)), (31, tick()), (31, tick())])
    first = journal.own[0]
    assert first.type == "cycle.deferred" and first.payload["attempt"] == 1

    state, events = step(first, journal.state)

    assert events == []
    assert state == journal.state


@laws(30)
@given(scripts(), st.integers(min_value=0))
def test_a_redelivered_grant_starts_no_second_training_and_changes_nothing(script, pick):
    journal = run(script)
    assert_redelivery_changes_nothing(journal, step, [e for e in journal.consumed if e.type == "approval.granted"], pick)


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
    runtime = Runtime(tmp_path, "evolution", ["dataset", "cycle", "research", "approval", "training", "validation",
                                              "energy", "hardware", "scaling", "adapter"], domain, from_rows, wire,
                      refused=(domain.CommandRejected,))
    redelivery_is_absorbed(runtime, script, CONFIG, pick, restart)

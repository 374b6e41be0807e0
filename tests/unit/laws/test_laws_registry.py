"""Laws of the registry decider: a replayed grant promotes nothing, the log replays to the live state,
the state survives its rows, and the runtime absorbs any redelivered record.

The registry's own events are folded when decided, not when they come back from the log
(``services/registry/app.py``), and its de-duplication of everything else is the runtime's
processed-events table: a profile command or a rollback delivered twice would be answered twice by
the domain alone (with a refusal), so that law is checked on the runtime.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.registry import domain
from shared.topics import AGGREGATE_TYPES
from tests.unit.laws.law_support import (
    assert_redelivery_changes_nothing,
    assert_replay_gives_live_state,
    Ids,
    Runtime,
    drive,
    event,
    interleave,
    keyring,
    laws,
    move,
    redelivery_is_absorbed,
    rows_round_trip,
    sha,
    signed,
    weighted,
)
from tests.unit.registry.registry_givens import granted, requested, trained, validated

# --- the adapter: the one place that knows the domain's signatures --------------------------------

CONFIG = domain.RegistryConfig(keyring=keyring())
initial_state = domain.initial_state
from_rows = domain.RegistryState.from_rows


def step(message, state):
    return domain.handle(message, state, CONFIG)


def replay(events):
    return domain.replay(events, initial_state())


def wire(runtime: Runtime) -> None:
    """``services/registry/app.py``: every event another service wrote that the decisions read."""
    @runtime.service.handles("*")
    def on_event(envelope, ctx):
        if envelope.type in domain.RELEVANT and envelope.producer.service != runtime.service.name:
            runtime.decider.run(ctx, envelope, CONFIG)


# --- plausible messages -----------------------------------------------------------------------------

ADAPTERS = ("a", "b", "c")
CHANNELS = ("production", "staging")
PROFILES = ("p-1", "p-2")


def _given(ids, ev, now, producer):
    """One of the registry's givens (``registry_givens``), at ``now`` with a counted id."""
    return event(ids, ev.type, ev.aggregate_id, ev.payload, now, producer)


def artefact(letter: str) -> str:
    return f"artefact://sha256/{sha(letter)}"


@move
def validation(letter: str, verdict: str):
    return lambda state, now, ids: _given(ids, validated(sha(letter), verdict, uri=artefact(letter)), now, "validator")


@move
def training(letter: str, status: str):
    def build(state, now, ids):
        ev = trained(sha(letter), status)
        # the given is shaped for the registry's reading; the contract asks for the rest of the result
        payload = {**ev.payload, "adapter_uri": artefact(letter),
                   "metrics": {"before": {"loss": 3.0}, "after": {"loss": 2.0}},
                   "fallback_reason": "no ML stack" if status == "fallback" else None,
                   "duration_s": 12.0, "energy": None, "base_model": "tiny", "base_model_checksum": None,
                   "dataset_sha256": sha("e"), "config": {"steps": 10}}
        return event(ids, ev.type, ev.aggregate_id, payload, now, "trainer")
    return build


@move
def promotion_request(letter: str, requested_by: str):
    def build(state, now, ids):
        # approval opens a promotion request once, for the validation that passed (the registry may
        # read the request first: the two travel on different topics)
        if f"apr-promotion-val-{sha(letter)[:16]}" in state.requests:
            return None
        return _given(ids, requested(sha(letter), requested_by), now, "approval")
    return build


@move
def grant(letter: str, operator: str | None, nonce: int, channel: str | None):
    """A grant of ``letter``'s promotion request: signed by ``operator``, or by a policy when None."""
    def build(state, now, ids):
        request_id = f"apr-promotion-val-{sha(letter)[:16]}"
        if request_id not in state.requests:
            return None  # a grant follows its request on the request's own stream
        about = {"adapter_sha256": sha(letter), "validation_id": f"val-{sha(letter)[:16]}", "channel": channel}
        decision = (signed(request_id, "grant", operator, now, f"nonce-{nonce}",
                           extra={"channel": channel} if channel else None, kind="promotion", about=about)
                    if operator else None)
        ev = granted(sha(letter), decision, operator, at=now)
        return event(ids, ev.type, ev.aggregate_id, ev.payload, now, "approval")
    return build


@move
def rollback(channel: str, pick: int, operator: str, nonce: int):
    def build(state, now, ids):
        # mostly an adapter that served before the current one: what an operator rolls back to
        served = [s.sha256 for s in state.channel(channel).served]
        earlier = [s for s in served if s != served[-1]] if served else []
        choices = (earlier if earlier and pick else served) or [sha("a")]
        target = choices[pick % len(choices)]
        request_id = f"rb-{nonce}-{target[:4]}"
        target_of = {"channel": channel, "adapter_sha256": target}
        decision = signed(request_id, "rollback", operator, now, f"nonce-{nonce}", extra=target_of,
                          kind="rollback", about=target_of)
        return event(ids, "adapter.rollback_requested", request_id, {
            "channel": channel, "adapter_sha256": target, "signed": decision, "submitted_via": "cli"}, now, "cli")
    return build


@move
def profile_create(profile_id: str, channel: str):
    return lambda state, now, ids: event(ids, "profile.create_requested", f"pcmd-{ids.n + 1}", {
        "profile_id": profile_id, "traits": {"tone": "warm"}, "interaction_style": "concise",
        "context_preferences": {"history_turns": 8}, "channel": channel, "requested_by": "alice"}, now, "cli")


@move
def profile_update(profile_id: str, expected: int, changes: dict):
    return lambda state, now, ids: event(ids, "profile.update_requested", f"pcmd-{ids.n + 1}", {
        "profile_id": profile_id, "expected_version": expected, "changes": changes, "requested_by": "alice"},
        now, "cli")


letters = st.sampled_from(ADAPTERS)


operators = st.sampled_from(["alice", "alice", "alice", "carol", "mallory", None])
minutes = st.sampled_from([0, 1, 5, 60])


@st.composite
def adapter_story(draw, letter: str):
    """What the registry reads about one adapter, in an order its topics allow: the validation and the
    training result on their own topics, the promotion request and its grants on the approval topic."""
    verdict = draw(st.sampled_from(["pass", "pass", "fail"]))
    status = draw(st.sampled_from(["trained", "trained", "fallback"]))
    approval = [promotion_request(letter, draw(st.sampled_from(["validator", "validator", "alice"])))]
    approval += [grant(letter, draw(operators), draw(st.integers(0, 3)), draw(st.sampled_from([None, None, "staging"])))
                 for _ in range(draw(st.integers(0, 2)))]
    streams = [[validation(letter, verdict)], [training(letter, status)] if draw(st.booleans()) else [], approval]
    return [(draw(minutes), move) for move in interleave(draw, streams)]


rollbacks = st.builds(rollback, st.sampled_from(["production", "production", "staging"]), st.integers(0, 3),
                      st.sampled_from(["dave", "dave", "alice"]), st.integers(0, 3))
noise = st.tuples(minutes, weighted(
    (2, rollbacks),
    (1, st.builds(profile_create, st.sampled_from(PROFILES), st.sampled_from(CHANNELS))),
    (1, st.builds(profile_update, st.sampled_from(PROFILES), st.integers(1, 3),
                  st.sampled_from([{"interaction_style": "terse"}, {"channel": "staging"},
                                   {"channel": "production"}, {"traits": {"tone": "dry"}}]))),
))


@st.composite
def scripts(draw):
    """A few adapters' stories and some operator commands, interleaved. Each adapter has one verdict and
    one training outcome, so a second delivery of either is a redelivery of the same fact."""
    stories = [draw(adapter_story(letter)) for letter in draw(st.lists(letters, min_size=1, max_size=3, unique=True))]
    stories.append(draw(st.lists(noise, max_size=5)))
    # rollbacks late too, once adapters may have served
    return interleave(draw, stories) + draw(st.lists(st.tuples(minutes, rollbacks), max_size=2))


def run(script):
    return drive(step, initial_state(), script, Ids(), "registry")


# --- the laws ----------------------------------------------------------------------------------------


@laws(30)
@given(scripts(), st.integers(min_value=0))
def test_a_replayed_grant_promotes_nothing_and_changes_nothing(script, pick):
    journal = run(script)
    assert_redelivery_changes_nothing(journal, step, [e for e in journal.consumed if e.type == "approval.granted"], pick,
                                      watched=("adapter.promoted", "profile.adapter_updated"))


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
    runtime = Runtime(tmp_path, "registry", list(AGGREGATE_TYPES), domain, from_rows, wire)
    redelivery_is_absorbed(runtime, script, CONFIG, pick, restart)


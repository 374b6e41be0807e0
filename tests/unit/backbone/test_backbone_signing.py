"""Signed envelopes (shared.contracts.signing): every event of a Merkle batch verifies on its own, and a
consumer refuses, with the reason the dead-letter topic carries, whatever was not signed as it reads."""

from __future__ import annotations

import base64
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.bus import signed_values
from shared.contracts.envelope import Envelope, NewEvent, Producer, iso, seal
from shared.contracts.signing import (
    MAX_BATCH,
    REASONS,
    KeyRecord,
    Refused,
    RootCache,
    Signer,
    TrustState,
    check,
    check_envelope,
    fold_operator_events,
    sign_batch,
)

T0 = datetime(2025, 3, 4, 14, 3, tzinfo=timezone.utc)


def key(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


TRAINER = Signer("service:trainer", key(1))
REGISTRY = Signer("service:registry", key(2))
ROOT = Signer("operator:root", key(3))  # the anchored admin
ALICE = Signer("operator:alice", key(4))
CAROL = Signer("operator:carol", key(5))
STRANGER = Signer("service:trainer", key(6))  # claims to be the trainer, with a key nobody anchored


def anchors() -> dict:
    return {"services": {"trainer": {"public_key": TRAINER.public_key},
                         "registry": {"public_key": REGISTRY.public_key}},
            "admins": {"root": {"public_key": ROOT.public_key}}}


def trust() -> TrustState:
    state = TrustState.from_anchors(anchors())
    state.add(KeyRecord(ALICE.key_id, ALICE.principal, ALICE.public_key, ("approver",), valid_from=iso(T0)))
    state.add(KeyRecord(CAROL.key_id, CAROL.principal, CAROL.public_key, ("requester",), valid_from=iso(T0)))
    return state


def envelope(event_type: str, aggregate_id: str, payload: dict, producer: str, at: datetime = T0) -> Envelope:
    return seal(NewEvent(event_type, aggregate_id, payload), sequence=1, producer=Producer(service=producer, node="n"),
                correlation_id=aggregate_id, causation_id=None, schema_version=1, occurred_at=at)


def progressed(i: int) -> Envelope:
    return envelope("training.progressed", "job-1", {"job_id": "job-1", "cycle_id": "cyc-1", "step": i,
                                                     "total_steps": 100, "loss": 3.0 - i / 100}, "trainer")


def published(signer: Signer, envelopes: list[Envelope]) -> list[Envelope]:
    """The envelopes as ``signer``'s publisher writes them, read back by a consumer."""
    return [Envelope.from_json(value) for value in signed_values(signer, envelopes, [None] * len(envelopes))]


def refusal(event: Envelope, state: TrustState | None = None, **kw) -> str:
    with pytest.raises(Refused) as refused:
        check_envelope(event, state or trust(), **kw)
    assert refused.value.reason in REASONS
    return refused.value.reason


# --- batches -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", range(1, MAX_BATCH + 2))
def test_every_event_of_a_batch_verifies_on_its_own(size):
    events = published(TRAINER, [progressed(i) for i in range(size)])
    state = trust()

    assert [check_envelope(e, state) for e in events] == ["service:trainer"] * size
    blocks = [e.signature for e in events]
    assert [b["index"] for b in blocks] == [i % MAX_BATCH for i in range(size)]
    assert {b["size"] for b in blocks[:MAX_BATCH]} == {min(size, MAX_BATCH)}
    assert len({b["root"] for b in blocks}) == (size + MAX_BATCH - 1) // MAX_BATCH  # one signed root per 64
    assert all(len(b["path"]) <= 6 for b in blocks)


@pytest.mark.parametrize("size", [2, 3, 5, 17, 64])
def test_a_proof_verifies_only_its_own_event(size):
    canonical = [progressed(i).to_json() for i in range(size)]
    blocks = sign_batch(TRAINER, canonical)
    allowed = ("service:trainer",)

    for i, block in enumerate(blocks):
        assert check("training.progressed", block, canonical[i], trust(), allowed=allowed).principal == TRAINER.principal
        other = canonical[(i + 1) % size]
        with pytest.raises(Refused) as refused:
            check("training.progressed", block, other, trust(), allowed=allowed)
        assert refused.value.reason == "bad_signature"


def test_a_batch_holds_one_to_64_events():
    for size in (0, MAX_BATCH + 1):
        with pytest.raises(ValueError):
            sign_batch(TRAINER, [b"{}"] * size)


def test_a_verified_root_is_cached_and_a_forged_one_is_not():
    events = published(TRAINER, [progressed(i) for i in range(4)])
    cache = RootCache()
    for event in events:
        check_envelope(event, trust(), cache=cache)
    forged = events[0].model_copy(update={"signature": {**events[0].signature,
                                                        "sig": base64.b64encode(b"\x00" * 64).decode()}})

    assert refusal(forged, cache=cache) == "bad_signature"


# --- refusals --------------------------------------------------------------------------------------


def test_an_unsigned_event_is_refused():
    assert refusal(progressed(1)) == "unsigned"


def test_a_payload_changed_after_signing_is_refused():
    [event] = published(TRAINER, [progressed(1)])
    changed = event.with_payload({**event.payload, "loss": 0.001}, event.schema_version)

    assert refusal(changed) == "bad_signature"


@pytest.mark.parametrize("field, value", [("event_id", "00000000-0000-0000-0000-000000000001"),
                                          ("sequence", 2), ("aggregate_id", "job-2")])
def test_an_envelope_changed_after_signing_is_refused(field, value):
    [event] = published(TRAINER, [progressed(1)])

    assert refusal(event.model_copy(update={field: value})) == "bad_signature"


def test_a_signature_relabelled_to_another_principal_is_refused():
    [event] = published(TRAINER, [progressed(1)])
    relabelled = event.model_copy(update={"signature": {**event.signature, "principal": "service:registry"}})

    assert refusal(relabelled) == "bad_signature"


def test_a_key_nobody_anchored_or_enrolled_is_refused():
    [event] = published(STRANGER, [progressed(1)])

    assert refusal(event) == "unknown_key"


def test_a_revoked_key_is_refused_now_and_counts_for_what_it_signed_before():
    [decision] = published(ALICE, [envelope("approval.decision_submitted", "sub-1", {}, "operator:alice")])
    state = trust()
    state.keys[ALICE.key_id] = replace(state.keys[ALICE.key_id], revoked_at=iso(T0 + timedelta(hours=1)))

    assert refusal(decision, state) == "revoked_key"
    assert check_envelope(decision, state, when=T0 + timedelta(minutes=5)) == "operator:alice"
    assert refusal(decision, state, when=T0 + timedelta(hours=2)) == "revoked_key"


@pytest.mark.parametrize("signer, event", [
    (REGISTRY, progressed(1).model_copy(update={"producer": Producer(service="registry", node="n")})),  # not its type
    (TRAINER, progressed(1).model_copy(update={"producer": Producer(service="evolution", node="n")})),  # names another
    (CAROL, envelope("approval.decision_submitted", "sub-1", {}, "operator:carol")),  # a requester, not an approver
    (ALICE, envelope("training.progressed", "job-1", {}, "operator:alice")),  # an operator writing a service's event
    (ALICE, envelope("operator.enrolled", "bob", {}, "operator:alice")),  # only admins enrol
])
def test_a_producer_the_contract_does_not_allow_is_refused(signer, event):
    [signed] = published(signer, [event])

    assert refusal(signed) == "unauthorised_producer"


def test_an_admin_enrols_and_revokes_operators_on_the_log():
    bob = Signer("operator:bob", key(7))

    def enrolment(name, signer, by, at):
        return envelope("operator.enrolled", name, {"operator_id": name, "public_key": signer.public_key,
                                                    "key_id": signer.key_id, "roles": ["approver"]}, by, at)

    events = published(ROOT, [enrolment("bob", bob, "operator:root", T0)])
    events += published(ALICE, [enrolment("eve", Signer("operator:eve", key(8)), "operator:alice", T0)])
    events += published(ROOT, [envelope("operator.revoked", "bob", {"operator_id": "bob", "key_id": bob.key_id},
                                        "operator:root", T0 + timedelta(hours=1))])

    state = fold_operator_events(TrustState.from_anchors(anchors()), events)

    assert state.get(bob.key_id).roles == ("approver",)
    assert state.get(bob.key_id).revoked_at == iso(T0 + timedelta(hours=1))
    assert Signer("operator:eve", key(8)).key_id not in state.keys  # alice is no admin: her enrolment counts for nothing
    assert "bob" in state.operator_keys(T0 + timedelta(minutes=30)) and "bob" not in state.operator_keys()

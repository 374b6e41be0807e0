"""A research loop's adapter that passed its soak is proposed for the `research` channel, and an operator's
grant that signed that channel promotes it there (approval's and the registry's own rules)."""

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.approval import domain as approval
from services.registry import domain as registry
from services.serving import domain as serving
from shared.contracts.policies import default_policies
from shared.contracts.schemas import validate_payload
from shared.contracts.trust import (
    RESEARCH_CHANNEL,
    Keyring,
    decision_subject,
    promotion_channel,
    public_key_b64,
    sign_decision,
)

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)
SHA = "e" * 64


@dataclass
class Event:
    type: str
    aggregate_id: str
    payload: dict
    occurred_at: datetime = NOW
    event_id: str = field(default="ev-1")


def test_an_rl_adapter_or_any_research_loops_adapter_goes_to_research_and_others_to_production():
    assert promotion_channel("rl") == promotion_channel("mntp", from_research=True) == RESEARCH_CHANNEL
    assert promotion_channel("mntp") == promotion_channel(None) == "production"


def research_proposed():
    return Event("research.proposed", "cyc-r", {
        "cycle_id": "cyc-r", "kind": "rl", "model": "tiny", "dataset": None, "config": {"steps": 2},
        "warm_start": "b" * 64, "energy_estimate_wh": 1.0, "requested_by": "operator:alice",
        "proposed_at": NOW.isoformat()})


def passed(kind="rl", cycle_id="cyc-r"):
    return Event("validation.completed", "val-r", {
        "validation_id": "val-r", "adapter_sha256": SHA, "adapter_uri": f"artefact://sha256/{SHA}",
        "baseline": {"kind": "parent", "adapter_sha256": "b" * 64}, "kind": kind, "purpose": "candidate",
        "cycle_id": cycle_id, "verdict": "pass", "explanation": "pass", "score": 0.8, "raw_data_uri": None,
        "sample_sizes": {"candidate": {}, "baseline": {}}, "thresholds": {}})


def test_the_promotion_request_of_a_research_loop_names_the_research_channel():
    config = approval.ApprovalConfig(keyring=Keyring(), policies=default_policies())
    state, _ = approval.handle(research_proposed(), approval.initial_state(), config)
    _, [requested] = approval.handle(passed(), state, config)
    validate_payload("approval.requested", 1, requested.payload)
    assert requested.payload["kind"] == "promotion" and requested.payload["subject"]["channel"] == "research"
    # the operator who asked for the loop cannot approve shipping its result
    assert requested.payload["requested_by"] == "operator:alice"


def test_a_cycles_promotion_request_still_names_no_channel_so_production():
    config = approval.ApprovalConfig(keyring=Keyring(), policies=default_policies())
    _, [requested] = approval.handle(passed(kind="mntp", cycle_id="cyc-m"), approval.initial_state(), config)
    assert "channel" not in requested.payload["subject"]
    assert decision_subject("promotion", requested.payload["subject"])["channel"] == "production"


def test_a_grant_that_signed_the_research_channel_promotes_the_adapter_there():
    key = Ed25519PrivateKey.generate()
    keyring = Keyring()
    keyring.add("erin", public_key_b64(key), ["approver"], created_at=NOW - timedelta(days=1))
    config = registry.RegistryConfig(keyring=keyring)
    subject = {"validation_id": "val-r", "adapter_sha256": SHA, "channel": "research"}
    request = Event("approval.requested", "apr-promotion-val-r", {
        "request_id": "apr-promotion-val-r", "kind": "promotion", "subject_id": "val-r", "subject": subject,
        "cycle_id": "cyc-r", "requested_by": "operator:alice"})
    training = Event("training.completed", "job-r", {"adapter_sha256": SHA, "adapter_uri": f"artefact://sha256/{SHA}",
                                                     "kind": "rl", "cycle_id": "cyc-r", "status": "trained"})
    signed = sign_decision("apr-promotion-val-r", "grant", "erin", key, NOW, NOW + timedelta(minutes=10),
                           subject=decision_subject("promotion", subject))
    grant = Event("approval.granted", "apr-promotion-val-r", {
        "request_id": "apr-promotion-val-r", "kind": "promotion", "subject_id": "val-r", "subject": subject,
        "actor": "operator:erin", "decision": signed, "granted_at": NOW.isoformat()})
    state = registry.replay([request, training, passed()])
    _, [promoted] = registry.handle(grant, state, config)
    assert promoted.type == "adapter.promoted"
    assert promoted.payload["channel"] == "research" and promoted.payload["adapter_sha256"] == SHA
    validate_payload("adapter.promoted", 1, promoted.payload)
    # serving answers `channel:research` with it, as a policy: it generates
    served = serving.evolve(serving.initial_state(), Event("adapter.promoted", "research", promoted.payload))
    route = serving.route(served, "channel:research")
    assert (route.adapter_sha256, route.kind, route.channel) == (SHA, "rl", "research")
    serving.check_kind(route, serving.CHAT)


def test_a_research_promotion_is_no_default_warm_start_for_the_next_cycles():
    from services.evolution import domain as evolution

    def promoted(sha, channel):
        return Event("adapter.promoted", channel, {"channel": channel, "adapter_sha256": sha, "kind": "mntp"})

    state = evolution.replay([promoted("d" * 64, "production"), promoted(SHA, "research")])
    assert state.promoted_adapter == "d" * 64
    assert evolution.replay([promoted(SHA, "production")]).promoted_adapter == SHA

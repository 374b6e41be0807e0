"""Evolution, approval and the operator's CLI on the real broker, as separate processes."""

import json

from tests.support import SigningPublisher
from datetime import datetime, timedelta, timezone

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.contracts.trust import sign_decision
from tests.support import await_until, dataset_payload, make_event

SERVICES = ("evolution", "approval", "registry")
FAST = {"NEURONS_EVOLUTION_TICK_S": "1", "NEURONS_MAX_STEPS": "30", "NEURONS_MAX_LOAD_PER_CORE": "1000",
        "NEURONS_SCHEDULE_INTERVAL_S": "0"}


def types(platform, correlation_id=None):
    return [e["type"] for e in platform.archived() if correlation_id in (None, e["correlation_id"])]


async def test_a_dataset_leads_to_a_policy_approved_training_request(platform):
    platform.env.update(FAST)
    await platform.aensure_topics()
    platform.start(*SERVICES)
    async with platform.publisher() as publisher:
        await publisher.publish(make_event("dataset.registered", "ds-flow", dataset_payload("ds-flow")))
    wanted = ("cycle.proposed", "approval.requested", "approval.granted", "training.requested")
    # the registry reads each topic on its own: wait until all four are archived
    await await_until(lambda: all(platform.archived(t) for t in wanted), 60, message="the cycle's first events")
    [proposed] = platform.archived("cycle.proposed")
    [requested] = platform.archived("approval.requested")
    [granted] = platform.archived("approval.granted")
    [training] = platform.archived("training.requested")
    cycle_id = proposed["payload"]["cycle_id"]
    assert requested["payload"]["kind"] == "cycle"
    assert granted["payload"]["actor"].startswith("policy:")
    assert training["payload"]["cycle_id"] == cycle_id
    assert training["payload"]["dataset"]["dataset_id"] == "ds-flow"
    assert training["payload"]["config"]["steps"] <= 30
    assert {e["correlation_id"] for e in (proposed, requested, granted, training)} == {cycle_id}


async def test_research_needs_a_signed_human_approval_and_forgeries_change_nothing(platform, tmp_path):
    platform.env.update(FAST)
    settings = platform.settings
    await platform.aensure_topics()
    for name, role in (("alice", "requester"), ("bob", "approver"), ("carol", "requester")):
        platform.enroll(name, role)
    platform.start(*SERVICES)
    async with SigningPublisher(settings) as publisher:
        await publisher.publish(make_event("dataset.registered", "ds-r", dataset_payload("ds-r")))
        await await_until(lambda: platform.archived("training.requested"), 60, message="the first cycle's training")
        out = platform.cli("research", "request", "--operator", "alice", "--adapter", "ab" * 32).stdout
        assert out.startswith("proposed ")
        research = await await_until(
            lambda: [e for e in platform.archived("approval.requested") if e["payload"]["kind"] == "research"], 60,
            message="a research approval request")
        request_id = research[0]["payload"]["request_id"]
        assert research[0]["payload"]["policy"]["auto_approve"] is False  # a human must decide

        # a grant written straight to the topic, signed by a key that is not bob's
        now = datetime.now(timezone.utc)
        fake = sign_decision(request_id, "grant", "bob", Ed25519PrivateKey.generate(), issued_at=now,
                             expires_at=now + timedelta(minutes=5))
        forged = make_event("approval.granted", request_id, {**granted_shape(request_id, research[0]["payload"]),
                            "decision": fake}, sequence=50, correlation_id=research[0]["correlation_id"])
        await publisher.publish(forged)

        refused = platform.cli("approve", request_id, "--operator", "carol", check=False)
        assert refused.returncode == 1 and "needs the role approver" in refused.stderr  # carol may not sign decisions

    def rl_training():
        return [e for e in platform.archived("training.requested") if e["payload"]["kind"] == "rl"]

    assert rl_training() == []  # neither the forgery nor carol's decision started anything

    granted = platform.cli("approve", request_id, "--operator", "bob").stdout
    assert granted.startswith("granted: ")
    [rl] = await await_until(rl_training, 60, message="the RL training request")
    assert rl["payload"]["requested_by"] == "alice"
    replay = platform.cli("approve", request_id, "--operator", "bob", check=False)
    assert replay.returncode == 1 and "not_pending" in replay.stderr
    listing = json.loads(platform.cli("approvals", "list", "--json").stdout)
    assert {r["request_id"] for r in listing} >= {request_id}


def granted_shape(request_id, requested):
    return {"request_id": request_id, "kind": requested["kind"], "subject_id": requested["subject_id"],
            "actor": "operator:bob", "granted_at": "2026-01-01T00:00:00Z", "policy": requested["policy"]}

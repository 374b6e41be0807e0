"""Forgeries an attacker with write access to the topics can try, against the real services and broker.

The six services run once for the module, as processes, on the tiny model.
The attacker writes with a bare aiokafka producer (``forgery_support.inject``):
plausible envelopes and the usual headers. For each forgery the suite checks
where it was stopped (the dead-letter topic with its reason, or the service
whose rule refused it), and that it changed nothing: no projection of the
registry, no training, nothing promoted, nothing the serving runtime would
load. One real cycle (started when the module starts, so it trains while the
envelope forgeries run) gives the adapter the last forgeries need.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from shared.contracts.envelope import Envelope, iso
from shared.contracts.trust import decision_subject, sign_decision
from shared.keys import operator_signer, service_signer
from tests.e2e.cycle_support import SERVICES, TINY
from tests.e2e.forgery_support import (
    READERS,
    dead_letters,
    files_outside,
    forged,
    fresh_signer,
    inject,
    log_records,
    serving_view,
    settled,
    signed_by,
)
from tests.support import Platform, await_until, wait_until

pytestmark = pytest.mark.slow  # like every end-to-end test: real processes, one real (tiny) training cycle

ENV = {**TINY, "NEURONS_MAX_STEPS": "30",  # a cycle a forged dataset starts stays small
       "NEURONS_MAX_PENDING_APPROVALS": "50"}  # the research requests left pending gate nothing


@dataclass
class World:
    platform: Platform
    root: Path
    bootstrap: str
    dataset: dict  # alice's dataset.registered, as archived
    cycle_id: str  # the real cycle alice asked for at start

    @property
    def settings(self):
        return self.platform.settings

    def archived(self, event_type: str | None = None, **payload) -> list[dict]:
        return [e for e in self.platform.archived(event_type)
                if all(e["payload"].get(k) == v for k, v in payload.items())]

    def with_event_id(self, event_id: str) -> list[dict]:
        return [e for e in self.platform.archived() if e["event_id"] == event_id]

    def registry(self) -> dict:
        """The registry's read models a forgery must not move: channels, their history, profiles, adapters."""
        from services.registry import queries

        with self.platform.registry_session() as session:
            return {"channels": queries.channels(session, lineage=False),
                    "history": queries.channel_history(session, "production"),
                    "profiles": queries.profiles(session),
                    "adapters": {a["adapter_sha256"] for a in queries.manifest(session)["adapters"]},
                    "approvals": {a["request_id"]: a["status"] for a in queries.approvals(session)}}


@pytest.fixture(scope="module")
def world(tmp_path_factory, kafka_bootstrap):
    root = tmp_path_factory.mktemp("forgery")
    platform = Platform(root / "var", kafka_bootstrap, **ENV)
    with pytest.MonkeyPatch.context() as mp:
        platform.apply(mp)
        platform.enroll("alice", "requester", "approver")  # asks for the cycle; an approver, but not of her own
        platform.enroll("bob", "approver")
        platform.enroll("ops", "approver")
        platform.enroll("mallory", "requester")
        from shared.ml.datasets import build_demo_dataset

        build_demo_dataset(root / "demo.jsonl", records=120)
        try:
            platform.start(*SERVICES)
            platform.cli("profiles", "create", "helper-en", "--channel", "production", "--trait", "tone=warm",
                         "--operator", "alice")
            platform.cli("data", "add", str(root / "demo.jsonl"), "--name", "stdlib", "--no-cycle",
                         "--operator", "alice")
            [dataset] = wait_until(lambda: platform.archived("dataset.registered"), 60, message="alice's dataset")
            wait_until(lambda: platform.archived("profile.created"), 60, message="the profile")
            # the real cycle: requested now, it trains while the envelope forgeries run; nobody signs its promotion
            out = platform.cli("cycle", "run", "--model", "tiny", "--steps", "30", "--set", "learning_rate=0.001",
                               "--requested-by", "alice", "--no-wait", "--json").stdout
            command_id = json.loads(out)["command_id"]
            [proposed] = wait_until(lambda: [e for e in platform.archived("cycle.proposed")
                                             if e["payload"]["trigger"].get("command_id") == command_id],
                                    120, message="the real cycle's proposal")
            yield World(platform, root, kafka_bootstrap, dataset, proposed["payload"]["cycle_id"])
        finally:
            platform.stop()


@pytest.fixture(scope="module")
def cycle(world) -> dict:
    """The real cycle once its soak passed: its adapter, and its promotion request, still pending."""
    def ended():
        events = [e for e in world.platform.archived() if e["correlation_id"] == world.cycle_id]
        done = [e for e in events if e["type"] in ("validation.completed", "training.failed")]
        promotion = [e for e in events if e["type"] == "approval.requested" and e["payload"]["kind"] == "promotion"]
        return (done, promotion, events) if done and (promotion or done[0]["type"] == "training.failed"
                                                       or done[0]["payload"]["verdict"] != "pass") else None

    done, promotion, events = wait_until(ended, 900, interval=2, message="the real cycle's verdict")
    assert done[0]["type"] == "validation.completed" and done[0]["payload"]["verdict"] == "pass", (
        f"the real cycle did not pass its soak, so the promotion forgeries have nothing to forge against: {done[0]}")
    [trained] = [e for e in events if e["type"] == "training.completed"]
    return {"adapter_sha256": trained["payload"]["adapter_sha256"], "adapter_uri": trained["payload"]["adapter_uri"],
            "validation_id": done[0]["payload"]["validation_id"], "request": promotion[0]["payload"]}


# --- helpers ------------------------------------------------------------------------------------


async def refused_everywhere(world: World, injected, kind: str) -> dict:
    """The forgery's dead letters: every reader of its topic refused it with ``kind``; nothing archived it."""
    letters = await dead_letters(world.bootstrap, injected.event_id, READERS[injected.aggregate_type])
    assert {s: d.kind for s, d in letters.items()} == {s: kind for s in READERS[injected.aggregate_type]}, letters
    assert world.with_event_id(injected.event_id) == [], "the registry archived (and projected) a refused event"
    return letters


def promoted_payload(sha: str, *, decision=None, request_id: str = "apr-promotion-val-forged",
                     validation_id: str | None = "val-forged", channel: str = "production") -> dict:
    return {"channel": channel, "adapter_sha256": sha, "adapter_uri": f"artefact://sha256/{sha}", "kind": "mntp",
            "cycle_id": "cyc-forged", "validation_id": validation_id, "previous_adapter_sha256": None,
            "approval_request_id": request_id, "approver": "bob", "approval_event_id": None,
            "promoted_at": iso(datetime.now(timezone.utc)), "decision": decision}


def profile_update_payload(sha: str, decision=None) -> dict:
    return {"profile_id": "helper-en", "channel": "production", "adapter_sha256": sha,
            "adapter_uri": f"artefact://sha256/{sha}", "kind": "mntp", "previous_adapter_sha256": None,
            "cause": "adapter.promoted", "cause_event_id": str(uuid.uuid4()), "version": 1,
            "updated_at": iso(datetime.now(timezone.utc)), "decision": decision}


def training_payload(world: World, job_id: str, cycle_id: str, grant=None) -> dict:
    d = world.dataset["payload"]
    return {"job_id": job_id, "cycle_id": cycle_id, "kind": "mntp", "model": "tiny",
            "dataset": {"dataset_id": d["dataset_id"], "sha256": d["sha256"], "uri": d["uri"]},
            "config": {"steps": 5, "learning_rate": 0.001}, "warm_start": None, "hardware_plan": None,
            "requested_by": "alice", "grant": grant}


def cycle_request(operator_id: str, *, producer: str, **extra) -> Envelope:
    command_id = f"req-{uuid.uuid4().hex[:12]}"
    return forged("cycle.requested", command_id, {"operator_id": operator_id, "dataset_id": None, "config": {"steps": 5},
                                                  "model": None, **extra}, producer=producer)


def decision(request: dict, operator_id: str, key, *, subject: dict | None = None, name: str | None = None) -> dict:
    now = datetime.now(timezone.utc)
    return sign_decision(request["request_id"], "grant", name or operator_id, key, issued_at=now,
                         expires_at=now + timedelta(minutes=10),
                         subject=subject if subject is not None else decision_subject(request["kind"], request["subject"]))


def submission(signed: dict, request_id: str, operator: str) -> Envelope:
    """An approval.decision_submitted as the CLI writes it, from ``operator:<operator>``."""
    return forged("approval.decision_submitted", f"sub-{signed['nonce']}",
                  {"request_id": request_id, "signed": signed, "submitted_via": "cli"},
                  producer=f"operator:{operator}", correlation_id=request_id)


async def answer_to(world: World, signed: dict, timeout: float = 90) -> dict:
    """The approval service's answer to the decision ``signed`` (matched on its nonce)."""
    def found():
        return [e for t in ("approval.granted", "approval.rejected", "approval.refused") for e in world.archived(t)
                if (e["payload"].get("decision") or {}).get("nonce") == signed["nonce"]]

    [answer] = await await_until(found, timeout, message=f"the answer to decision {signed['nonce']}")
    return answer


def research_request(world: World) -> dict:
    """A research loop alice asks for (a human must approve it): its approval request, pending."""
    out = world.platform.cli("research", "request", "--operator", "alice", "--adapter", secrets.token_hex(32),
                             "--dataset", world.dataset["payload"]["dataset_id"]).stdout
    assert out.startswith("proposed "), out
    cycle_id = out.split()[1]
    [requested] = wait_until(lambda: world.archived("approval.requested", cycle_id=cycle_id), 60,
                             message="the research approval request")
    assert requested["payload"]["policy"]["auto_approve"] is False and requested["payload"]["requested_by"] == "alice"
    return requested["payload"]


def granted_for(world: World, *request_ids: str) -> list[dict]:
    return [e for e in world.archived("approval.granted") if e["payload"]["request_id"] in request_ids]


# --- 1-4: unsigned events -------------------------------------------------------------------------


async def test_1_an_unsigned_promotion_of_an_arbitrary_adapter_changes_nothing(world):
    before = world.registry()
    sha = secrets.token_hex(32)
    injected = await inject(world.bootstrap, forged("adapter.promoted", "production", promoted_payload(sha),
                                                    producer="registry").to_json())
    letters = await refused_everywhere(world, injected, "unsigned")
    assert all("carries no signature" in d.reason for d in letters.values()), letters
    after = world.registry()
    assert after["channels"] == before["channels"] == [] and after["history"] == []
    assert sha not in after["adapters"] and after["profiles"] == before["profiles"]
    serving = await serving_view(world.settings, world.bootstrap, channel="production")
    assert serving.adapter is None and (injected.event_id, "envelope", "unsigned") in serving.refused


async def test_2_an_unsigned_profile_update_changes_nothing(world):
    before = world.registry()
    sha = secrets.token_hex(32)
    injected = await inject(world.bootstrap, forged("profile.adapter_updated", "helper-en",
                                                    profile_update_payload(sha), producer="registry").to_json())
    await refused_everywhere(world, injected, "unsigned")
    after = world.registry()
    [profile] = [p for p in after["profiles"] if p["profile_id"] == "helper-en"]
    assert profile["active_adapter_sha256"] is None and after["profiles"] == before["profiles"]
    serving = await serving_view(world.settings, world.bootstrap, profile="helper-en")
    assert serving.adapter is None and (injected.event_id, "envelope", "unsigned") in serving.refused


async def test_3_a_training_request_without_evolution_s_signature_or_grant_trains_nothing(world):
    jobs = world.settings.var_dir / "jobs"
    # unsigned: refused before the trainer's handler
    job = f"forged-job-{uuid.uuid4().hex[:8]}"
    injected = await inject(world.bootstrap, forged("training.requested", job,
                                                    training_payload(world, job, f"cyc-{job}"),
                                                    producer="evolution").to_json())
    await refused_everywhere(world, injected, "unsigned")
    assert not world.archived("training.started", job_id=job) and not (jobs / job).exists()

    # signed with evolution's stolen key but no grant, then with a real grant for another cycle: the trainer's chain
    # check refuses both (training.failed at the approval stage), and no worker starts
    evolution = service_signer(world.settings, "evolution")
    [grant] = await await_until(lambda: world.archived("approval.granted", cycle_id=world.cycle_id), 60,
                                message="the real cycle's policy grant")
    grant_envelope = Envelope.from_json(json.dumps(grant))
    for reason, payload_grant in (("no_grant", None), ("grant_mismatch", grant_envelope.to_dict())):
        job = f"forged-job-{uuid.uuid4().hex[:8]}"
        envelope = forged("training.requested", job, training_payload(world, job, f"cyc-{job}", payload_grant),
                          producer="evolution")
        await inject(world.bootstrap, signed_by(envelope, evolution))
        [failed] = await await_until(lambda: world.archived("training.failed", job_id=job), 90,
                                     message=f"the trainer's refusal of {job}")
        assert failed["payload"]["stage"] == "approval" and failed["payload"]["error"].startswith(f"{reason}:"), failed
        assert not world.archived("training.started", job_id=job) and not (jobs / job).exists()


async def test_4_an_unsigned_policy_grant_starts_no_training(world):
    [real] = await await_until(lambda: world.archived("approval.granted", cycle_id=world.cycle_id), 60,
                               message="the real cycle's policy grant")
    cycle_id = f"cyc-forged-{uuid.uuid4().hex[:8]}"
    payload = {**real["payload"], "request_id": f"apr-cycle-{cycle_id}", "subject_id": cycle_id, "cycle_id": cycle_id,
               "subject": {**real["payload"]["subject"], "cycle_id": cycle_id}}
    injected = await inject(world.bootstrap, forged("approval.granted", payload["request_id"], payload,
                                                    producer="approval", correlation_id=cycle_id).to_json())
    await refused_everywhere(world, injected, "unsigned")
    assert not world.archived("training.requested", cycle_id=cycle_id)


# --- 5-8: signatures that are not what they claim -----------------------------------------------------


async def test_5_a_key_nobody_anchored_claiming_to_be_the_registry_is_unknown(world):
    sha = secrets.token_hex(32)
    envelope = forged("adapter.promoted", "production", promoted_payload(sha), producer="registry")
    injected = await inject(world.bootstrap, signed_by(envelope, fresh_signer("service:registry")))
    letters = await refused_everywhere(world, injected, "unknown_key")
    assert all("(service:registry) is not known" in d.reason for d in letters.values()), letters
    assert sha not in world.registry()["adapters"] and world.registry()["channels"] == []


async def test_6_a_revoked_operator_s_request_is_refused(world):
    world.platform.enroll("trudy", "requester")
    trudy = operator_signer(world.settings, "trudy")  # read before the revocation: she keeps her key file
    world.platform.cli("operator", "revoke", "trudy", "--reason", "left the team")
    await settled(world.bootstrap, "operator", READERS["cycle"])  # each reader of cycle.* has folded the revocation
    envelope = cycle_request("trudy", producer="operator:trudy")
    injected = await inject(world.bootstrap, signed_by(envelope, trudy))
    letters = await refused_everywhere(world, injected, "revoked_key")
    assert all(f"key {trudy.key_id} of operator:trudy was revoked" in d.reason for d in letters.values()), letters
    assert not [e for e in world.archived("cycle.proposed") if e["payload"]["trigger"].get("command_id")
                == envelope.aggregate_id]


async def test_7_a_real_signature_over_a_modified_payload_is_refused(world):
    # alice's dataset.registered as it is on the log, one payload field changed, the signature kept
    real_id = world.dataset["event_id"]
    [record] = [r for r in await log_records(world.bootstrap, ["dataset"])
                if dict(r.headers).get("event_id", b"").decode() == real_id]
    envelope = Envelope.from_json(record.value)
    assert envelope.signature and envelope.signature["principal"] == "operator:alice"
    tampered = envelope.model_copy(update={"payload": {**envelope.payload, "record_count": 999_999}})
    injected = await inject(world.bootstrap, tampered.to_json())
    assert injected.event_id == real_id
    # refused_everywhere would not do: the genuine event, with this id, is archived
    letters = await dead_letters(world.bootstrap, real_id, READERS["dataset"])
    assert {s: d.kind for s, d in letters.items()} == {s: "bad_signature" for s in READERS["dataset"]}, letters
    assert all("is not the one that was signed" in d.reason for d in letters.values()), letters
    [archived] = world.with_event_id(real_id)  # the registry kept the original, once
    assert archived["payload"]["record_count"] == world.dataset["payload"]["record_count"] != 999_999


async def test_8_a_service_signing_a_type_it_may_not_write_is_unauthorised(world):
    sha = secrets.token_hex(32)
    envelope = forged("adapter.promoted", "production", promoted_payload(sha), producer="trainer")
    trainer = service_signer(world.settings, "trainer")  # the trainer's real key, var/keys/services/trainer.pem
    injected = await inject(world.bootstrap, signed_by(envelope, trainer))
    letters = await refused_everywhere(world, injected, "unauthorised_producer")
    assert all("service:trainer" in d.reason and "may not publish adapter.promoted" in d.reason
               for d in letters.values()), letters
    assert sha not in world.registry()["adapters"] and world.registry()["channels"] == []


# --- 9-12: operators acting under another's name ---------------------------------------------------------


async def test_9_mallory_cannot_ask_for_a_cycle_in_alice_s_name(world):
    mallory = operator_signer(world.settings, "mallory")
    # her key, alice named as the envelope's producer: refused before any handler
    envelope = cycle_request("alice", producer="operator:alice")
    injected = await inject(world.bootstrap, signed_by(envelope, mallory))
    letters = await refused_everywhere(world, injected, "unauthorised_producer")
    assert all("signed by operator:mallory but names producer 'operator:alice'" in d.reason
               for d in letters.values()), letters

    # her key and her name on the envelope, alice's in the payload: evolution refuses the command
    envelope = cycle_request("alice", producer="operator:mallory")
    await inject(world.bootstrap, signed_by(envelope, mallory))
    [refusal] = await await_until(lambda: world.archived("cycle.request_refused", command_id=envelope.aggregate_id),
                                  60, message="evolution's refusal")
    assert refusal["payload"]["operator_id"] == "alice" and "signed by 'mallory'" in refusal["payload"]["reason"]
    for command in (injected.aggregate_id, envelope.aggregate_id):
        assert not [e for t in ("cycle.proposed", "cycle.deferred") for e in world.archived(t)
                    if e["payload"]["trigger"].get("command_id") == command]


async def test_10_a_decision_replayed_on_another_request_is_refused(world):
    a, b = research_request(world), research_request(world)
    bob = operator_signer(world.settings, "bob")
    signed = decision(a, "bob", bob.private_key)  # bob's real grant of A ...
    await inject(world.bootstrap, signed_by(submission(signed, b["request_id"], "bob"), bob))  # ... submitted for B
    answer = await answer_to(world, signed)
    assert answer["type"] == "approval.refused" and answer["payload"]["reason"] == "request_mismatch", answer
    assert answer["payload"]["operator_id"] == "bob"
    assert granted_for(world, a["request_id"], b["request_id"]) == []
    approvals = world.registry()["approvals"]
    assert approvals[a["request_id"]] == approvals[b["request_id"]] == "pending"
    world.research = (a, b)  # the next forgeries reuse these pending requests


async def test_11a_a_decision_signed_over_another_subject_is_refused(world):
    a, b = getattr(world, "research", None) or (research_request(world), research_request(world))
    bob = operator_signer(world.settings, "bob")
    # bob's real signature on request A, over B's cycle and configuration
    signed = decision(a, "bob", bob.private_key, subject=decision_subject("research", b["subject"]))
    await inject(world.bootstrap, signed_by(submission(signed, a["request_id"], "bob"), bob))
    answer = await answer_to(world, signed)
    assert answer["type"] == "approval.refused" and answer["payload"]["reason"] == "subject_mismatch", answer
    assert granted_for(world, a["request_id"], b["request_id"]) == []


async def test_12_alice_cannot_approve_her_own_request_under_bob_s_name(world):
    a, _ = getattr(world, "research", None) or (research_request(world), research_request(world))
    alice = operator_signer(world.settings, "alice")
    # the decision claims bob, alice's key signed it; the envelope is honestly hers (she is an approver)
    as_bob = decision(a, "alice", alice.private_key, name="bob")
    await inject(world.bootstrap, signed_by(submission(as_bob, a["request_id"], "alice"), alice))
    answer = await answer_to(world, as_bob)
    assert answer["type"] == "approval.refused" and answer["payload"]["reason"] == "bad_signature", answer
    assert answer["payload"]["operator_id"] == "bob"
    # under her own name: she asked for it, she may not decide it
    as_alice = decision(a, "alice", alice.private_key)
    await inject(world.bootstrap, signed_by(submission(as_alice, a["request_id"], "alice"), alice))
    answer = await answer_to(world, as_alice)
    assert answer["type"] == "approval.refused" and answer["payload"]["reason"] == "self_approval", answer
    assert granted_for(world, a["request_id"]) == [] and world.registry()["approvals"][a["request_id"]] == "pending"


# --- 13: ids that would become paths outside var/ -----------------------------------------------------------


async def test_13_ids_and_uris_that_leave_var_are_refused(world):
    alice = operator_signer(world.settings, "alice")
    var = world.settings.var_dir
    outside_before = files_outside(world.root, var)
    marker = f"escaped-{uuid.uuid4().hex[:8]}"
    sha = secrets.token_hex(32)

    # a dataset URI with '..': the schema refuses it, after the signature was found good
    payload = {"dataset_id": f"../../{marker}", "name": "passwd", "sha256": sha,
               "uri": f"file://{var}/datasets/../../../etc/passwd", "record_count": 3, "quarantined": False}
    injected = await inject(world.bootstrap, signed_by(forged("dataset.registered", f"ds-{marker}", payload,
                                                              producer="operator:alice"), alice))
    letters = await refused_everywhere(world, injected, "schema_violation")
    assert all("uri" in d.reason for d in letters.values()), letters

    # a model with '..' in an operator's cycle request
    envelope = cycle_request("alice", producer="operator:alice", model=f"../../{marker}")
    injected = await inject(world.bootstrap, signed_by(envelope, alice))
    await refused_everywhere(world, injected, "schema_violation")

    # a job id that would be var/jobs/../../<marker>, even under evolution's own (stolen) signature
    job = f"../../{marker}"
    envelope = forged("training.requested", f"job-{marker}", training_payload(world, job, f"cyc-{marker}"),
                      producer="evolution")
    injected = await inject(world.bootstrap, signed_by(envelope, service_signer(world.settings, "evolution")))
    letters = await refused_everywhere(world, injected, "schema_violation")
    assert all("job_id" in d.reason for d in letters.values()), letters

    # a URI the schema lets through (file:///etc/passwd) under an id with '..': the cycle it starts is granted by
    # policy, and the trainer refuses the dataset path before it reads or writes anything
    dataset_id = f"../../{marker}-2"
    payload = {**payload, "dataset_id": dataset_id, "uri": "file:///etc/passwd", "sha256": secrets.token_hex(32)}
    await inject(world.bootstrap, signed_by(forged("dataset.registered", f"ds-{marker}-2", payload,
                                                   producer="operator:alice"), alice))
    [proposed] = await await_until(lambda: [e for e in world.archived("cycle.proposed")
                                            if e["payload"]["trigger"].get("dataset_id") == dataset_id], 90,
                                   message="the cycle the forged dataset starts")
    cycle_id = proposed["payload"]["cycle_id"]
    [failed] = await await_until(lambda: world.archived("training.failed", cycle_id=cycle_id), 120,
                                 message="the trainer's refusal of the path")
    assert failed["payload"]["stage"] == "dataset" and failed["payload"]["error"].startswith("refused: "), failed
    assert "'file:///etc/passwd' lies outside" in failed["payload"]["error"], failed
    assert not world.archived("training.completed", cycle_id=cycle_id)
    assert not (var / "jobs" / failed["payload"]["job_id"]).exists()
    # nothing landed outside var/, nor where the ids would have led
    assert files_outside(world.root, var) == outside_before
    for base in (var / "datasets", var / "jobs", var / "models", var / "artefacts"):
        assert not (base / f"../../{marker}").exists() and not (base / dataset_id).exists()
    assert not any(marker in p.name for p in world.root.parent.iterdir())


# --- 15: an enrolment no admin signed -------------------------------------------------------------------------


async def test_15_an_approver_cannot_enrol_an_admin(world):
    bob = operator_signer(world.settings, "bob")
    eve = fresh_signer("operator:eve")
    payload = {"operator_id": "eve", "public_key": eve.public_key, "key_id": eve.key_id, "roles": ["admin"],
               "label": None}
    injected = await inject(world.bootstrap, signed_by(forged("operator.enrolled", "eve", payload,
                                                              producer="operator:bob"), bob))
    letters = await refused_everywhere(world, injected, "unauthorised_producer")  # all six services read operator.*
    assert all("operator:bob (roles approver) may not publish operator.enrolled" in d.reason
               for d in letters.values()), letters
    assert "eve" not in world.platform.cli("operator", "list").stdout
    # what eve signs afterwards names a key nobody knows
    envelope = cycle_request("eve", producer="operator:eve")
    injected = await inject(world.bootstrap, signed_by(envelope, eve))
    letters = await refused_everywhere(world, injected, "unknown_key")
    assert all(f"key {eve.key_id} (operator:eve) is not known" in d.reason for d in letters.values()), letters


# --- what needs the real cycle's adapter -------------------------------------------------------------------------


@pytest.mark.timeout(1200)
async def test_11b_a_promotion_grant_over_another_adapter_is_refused(world, cycle):
    request = cycle["request"]
    assert request["requested_by"] == "alice" and request["subject"]["adapter_sha256"] == cycle["adapter_sha256"]
    bob = operator_signer(world.settings, "bob")
    other = {**decision_subject("promotion", request["subject"]), "adapter_sha256": secrets.token_hex(32)}
    signed = decision(request, "bob", bob.private_key, subject=other)
    await inject(world.bootstrap, signed_by(submission(signed, request["request_id"], "bob"), bob))
    answer = await answer_to(world, signed)
    assert answer["type"] == "approval.refused" and answer["payload"]["reason"] == "subject_mismatch", answer
    assert granted_for(world, request["request_id"]) == [] and not world.archived("adapter.promoted")
    after = world.registry()
    assert after["approvals"][request["request_id"]] == "pending" and after["channels"] == []


def _flip_byte(path: Path) -> bytes:
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return original


@pytest.mark.timeout(1200)
async def test_14_a_tampered_adapter_is_neither_loaded_nor_promoted(world, cycle):
    from shared.adapter_runtime import AdapterRuntime, Target
    from shared.adapter_signing import AdapterSignatureError, verify_adapter_with
    from shared.artefacts import ArtefactCorrupted

    settings, sha = world.settings, cycle["adapter_sha256"]
    folder = settings.artefact_dir / sha
    target = Target(sha, cycle["adapter_uri"], "test")
    verify_adapter_with(folder, settings)  # as the trainer signed it
    control = await asyncio.to_thread(AdapterRuntime.load, settings, "tiny")
    assert await asyncio.to_thread(control.activate, target) and control.active == sha  # it loads untampered

    summary = folder / "training_summary.json"
    original = _flip_byte(summary)
    try:
        with pytest.raises(AdapterSignatureError) as failed:
            verify_adapter_with(folder, settings)
        assert failed.value.modified == ("training_summary.json",) and failed.value.missing == ()
        assert "training_summary.json was modified" in str(failed.value)
        runtime = await asyncio.to_thread(AdapterRuntime.load, settings, "tiny")
        with pytest.raises(AdapterSignatureError, match="training_summary.json"):
            await asyncio.to_thread(runtime.activate, target)
        assert runtime.active is None and runtime.swaps == []

        # an approver's genuine grant: the approval service grants, the registry checks the files and refuses
        request_id = cycle["request"]["request_id"]
        granted = world.platform.cli("approve", request_id, "--operator", "ops").stdout
        assert granted.startswith(f"granted: {request_id}"), granted
        [refusal] = await await_until(lambda: world.archived("adapter.promotion_refused",
                                                             approval_request_id=request_id), 90,
                                      message="the registry's refusal of the tampered adapter")
        assert refusal["payload"]["reason"] == "adapter_not_verified", refusal
        assert "training_summary.json was modified" in refusal["payload"]["detail"]
        assert not world.archived("adapter.promoted") and not world.archived("profile.adapter_updated")
        assert world.registry()["channels"] == []
    finally:
        summary.write_bytes(original)

    weights = folder / "adapter_model.safetensors"
    original = _flip_byte(weights)
    try:
        with pytest.raises(AdapterSignatureError) as failed:
            verify_adapter_with(folder, settings)
        assert failed.value.modified == ("adapter_model.safetensors",)
        runtime = await asyncio.to_thread(AdapterRuntime.load, settings, "tiny")
        with pytest.raises(ArtefactCorrupted, match=sha):  # the weights no longer hash to the adapter's name
            await asyncio.to_thread(runtime.activate, target)
        assert runtime.active is None
    finally:
        weights.write_bytes(original)
    verify_adapter_with(folder, settings)


# --- 16: what a stolen service key cannot do -----------------------------------------------------------------------


@pytest.mark.timeout(1200)
async def test_16_a_stolen_registry_key_puts_nothing_in_service(world, cycle):
    from shared.adapter_runtime import AdapterRuntime

    settings, sha = world.settings, cycle["adapter_sha256"]
    registry = service_signer(settings, "registry")  # var/keys/services/registry.pem, stolen
    request = cycle["request"]
    subject = decision_subject("promotion", request["subject"])
    bob = operator_signer(settings, "bob")
    forgeries = {
        "no_decision": None,
        # "bob's" grant over exactly this adapter, signed by a key that is not bob's
        "bad_signature": decision(request, "bob", fresh_signer("operator:bob").private_key, subject=subject),
        # bob's real grant, over another adapter
        "subject_mismatch": decision(request, "bob", bob.private_key,
                                     subject={**subject, "adapter_sha256": secrets.token_hex(32)}),
    }
    sent = {}
    for reason, forged_decision in forgeries.items():
        payload = promoted_payload(sha, decision=forged_decision, request_id=request["request_id"],
                                   validation_id=cycle["validation_id"])
        envelope = forged("adapter.promoted", "production", payload, producer="registry")
        sent[reason] = (await inject(world.bootstrap, signed_by(envelope, registry))).event_id
    profile_update = forged("profile.adapter_updated", "helper-en", profile_update_payload(sha), producer="registry")
    sent["profile"] = (await inject(world.bootstrap, signed_by(profile_update, registry))).event_id
    # the signatures are the registry's own, but what they put in service no operator approved: every reader
    # refuses them (unapproved, with the check that failed), and nothing is archived
    for reason, event_id in sent.items():
        aggregate = "profile" if reason == "profile" else "adapter"
        letters = await dead_letters(world.bootstrap, event_id, READERS[aggregate])
        assert {d.kind for d in letters.values()} == {"unapproved"}, letters
        assert all((reason if reason != "profile" else "no_decision") in d.reason for d in letters.values()), letters
        assert not world.with_event_id(event_id)

    serving = await serving_view(settings, world.bootstrap, channel="production")
    assert serving.adapter is None, serving
    for reason in forgeries:
        assert (sent[reason], "decision", reason) in serving.refused, serving.refused
    by_profile = await serving_view(settings, world.bootstrap, profile="helper-en")
    assert by_profile.adapter is None and (sent["profile"], "decision", "no_decision") in by_profile.refused

    # the serving runtime itself, following the log of the channel and of the profile: the base model keeps serving
    for follow in ({"channel": "production"}, {"profile": "helper-en"}):
        runtime = await asyncio.to_thread(AdapterRuntime.load, settings, "tiny")
        ready = asyncio.Event()
        task = asyncio.ensure_future(runtime.follow(settings, ready=ready, **follow))
        try:
            await asyncio.wait_for(ready.wait(), 60)
            await asyncio.sleep(2)  # anything that would still arrive
            assert runtime.active is None and runtime.swaps == [], (follow, runtime.status())
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@pytest.mark.timeout(1200)
async def test_16b_a_stolen_registry_key_moves_no_read_model_nor_warm_start(world, cycle):
    settings, sha = world.settings, cycle["adapter_sha256"]
    registry = service_signer(settings, "registry")
    payload = promoted_payload(sha, request_id=cycle["request"]["request_id"], validation_id=cycle["validation_id"])
    sent = [await inject(world.bootstrap, signed_by(forged("adapter.promoted", "production", payload,
                                                           producer="registry"), registry)),
            await inject(world.bootstrap, signed_by(forged("profile.adapter_updated", "helper-en",
                                                           profile_update_payload(sha), producer="registry"), registry))]
    # every reader refuses them before any handler: a signature is not an approval
    for forgery, aggregate in zip(sent, ("adapter", "profile")):
        letters = await dead_letters(world.bootstrap, forgery.event_id, READERS[aggregate])
        assert {d.kind for d in letters.values()} == {"unapproved"}, letters
        assert all("no_decision" in d.reason for d in letters.values()), letters
        assert not world.with_event_id(forgery.event_id)  # not archived, so in no read model nor audit
    await settled(world.bootstrap, "adapter", READERS["adapter"])
    view = world.registry()
    [profile] = [p for p in view["profiles"] if p["profile_id"] == "helper-en"]
    problems = []
    if view["channels"]:
        problems.append(f"registry: production serves {view['channels'][0]['adapter_sha256'][:12]} "
                        f"approved by {view['channels'][0]['approver']!r}")
    if profile["active_adapter_sha256"] is not None:
        problems.append(f"registry: helper-en serves {profile['active_adapter_sha256'][:12]}")
    if world.archived("cycle.completed", cycle_id=world.cycle_id, outcome="promoted"):
        problems.append("evolution: the real cycle completed as 'promoted'")
    proposed = world.platform.cli("research", "request", "--operator", "alice", "--dataset",
                                  world.dataset["payload"]["dataset_id"], check=False)
    if proposed.returncode == 0:
        problems.append(f"evolution: a research loop without --adapter warm-starts from it: {proposed.stdout.strip()}")
    assert not problems, problems

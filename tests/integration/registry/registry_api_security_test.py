"""The registry API: a bearer token off loopback, and only operators' own signed envelopes, relayed as they are."""

from __future__ import annotations

import asyncio
import json
import secrets
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from cli.bus_client import command_event
from services.registry.api import binding_problem, create_app, is_loopback
from shared.bus import signed_values
from shared.contracts import schemas
from shared.contracts.envelope import Envelope, NewEvent, Producer, seal, utcnow
from shared.contracts.signing import Signer
from shared.contracts.trust import sign_decision
from shared.keys import operator_signer, require_service_signer
from shared.settings import Settings
from shared.topics import topic_for
from tests.support import await_until

TOKEN = "s3cret-" + "x" * 24


# --- binding and the bearer token (the app alone) -----------------------------------


def settings_for(tmp_path: Path, **changes) -> Settings:
    return Settings(var_dir=tmp_path / "var", bootstrap_servers=None, database_url=None).with_(**changes)


def test_loopback_is_told_from_every_other_address():
    assert all(is_loopback(host) for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "10.1.2.3", "registry.example", ""))


def test_the_settings_bind_loopback_by_default_and_keep_the_token_out_of_their_repr(monkeypatch):
    monkeypatch.delenv("NEURONS_API_HOST", raising=False)
    monkeypatch.delenv("NEURONS_API_TOKEN", raising=False)
    default = Settings.from_env()
    assert default.api_host == "127.0.0.1" and default.api_token is None and binding_problem(default) is None
    monkeypatch.setenv("NEURONS_API_HOST", "0.0.0.0")
    monkeypatch.setenv("NEURONS_API_TOKEN", TOKEN)
    configured = Settings.from_env()
    assert configured.api_host == "0.0.0.0" and configured.api_token == TOKEN
    assert TOKEN not in repr(configured)


def test_an_api_off_loopback_without_a_token_is_refused(tmp_path):
    settings = settings_for(tmp_path, api_host="0.0.0.0")
    assert "NEURONS_API_TOKEN" in binding_problem(settings)
    with pytest.raises(ValueError, match="NEURONS_API_TOKEN"):
        create_app(settings)


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_with_a_token_every_request_carries_it(tmp_path, host):
    client = TestClient(create_app(settings_for(tmp_path, api_host=host, api_token=TOKEN)))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": TOKEN}):
        for path in ("/api/health", "/", "/openapi.json", "/dashboard/dashboard.js"):
            answer = client.get(path, headers=headers)
            assert answer.status_code == 401, (path, headers)
            assert answer.json()["error"] == "unauthorised"
            assert answer.headers["www-authenticate"].startswith("Bearer")
        posted = client.post("/api/approvals/apr-1/decisions", content=b"{}", headers=headers)
        assert posted.status_code == 401
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/api/health", headers=good).json()["ok"] is True
    assert client.get("/openapi.json", headers=good).status_code == 200
    assert client.get("/", headers={"authorization": f"bearer {TOKEN}"}).status_code == 200


def test_on_loopback_without_a_token_none_is_needed(tmp_path):
    client = TestClient(create_app(settings_for(tmp_path)))
    assert client.get("/api/health").json()["ok"] is True


# --- operators' signed decisions, against a running registry -------------------------


async def api_info(registry) -> dict:
    """What the registry wrote about its API once it serves it (after its start-up reads the operators)."""
    path = registry.var_dir / "run" / "registry-api.json"
    await await_until(path.exists, 60, message="the registry API's address file")
    return json.loads(path.read_text())


def decision(request_id: str, operator: str, key: Ed25519PrivateKey, *, decided: str = "grant",
             producer: str | None = None, settings=None) -> Envelope:
    """An unsigned approval.decision_submitted envelope, as ``neurons approve`` builds it."""
    now = utcnow()
    signed = sign_decision(request_id, decided, operator, key, issued_at=now,
                           expires_at=now + timedelta(minutes=10), nonce=secrets.token_hex(16))
    event = NewEvent("approval.decision_submitted", f"sub-{signed['nonce']}",
                     {"request_id": request_id, "signed": dict(signed), "submitted_via": "api"})
    if producer is None:
        return command_event(event, correlation_id=request_id, operator=operator)
    return seal(event, sequence=1, producer=Producer(service=producer, node="test-node"), correlation_id=request_id,
                causation_id=None, schema_version=schemas.current_version(event.type))


def signed(signer: Signer, envelope: Envelope) -> bytes:
    return signed_values(signer, [envelope], [None])[0]


async def post(registry, request_id: str, body: bytes) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.post(f"{(await api_info(registry))['url']}/api/approvals/{request_id}/decisions", content=body,
                                 headers={"Content-Type": "application/json"})


def refused(answer: httpx.Response, status: int, error: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == error, answer.text


async def approval_records(settings) -> list:
    """Every record on the approval topic, from its start."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap(), group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        topic = topic_for("approval")
        await consumer._client.force_metadata_update()
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        await consumer.seek_to_beginning(*partitions)
        records = []
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            for batch in (await consumer.getmany(*partitions, timeout_ms=1000)).values():
                records += batch
        return records
    finally:
        await consumer.stop()


async def test_the_api_binds_loopback_by_default(registry):
    info = await api_info(registry)
    assert info["host"] == "127.0.0.1" and info["url"].startswith("http://127.0.0.1:")
    assert info["token_required"] is False


async def test_only_an_operators_own_signed_decision_is_published_and_unchanged(registry):
    settings = registry.settings
    alice, erin = operator_signer(settings, "alice"), operator_signer(settings, "erin")
    request_id = "apr-promotion-val-api-security"
    turned_down: list[str] = []

    # an envelope with no signature block, and the body the API took before: a bare signed decision
    unsigned = decision(request_id, "alice", alice.private_key)
    refused(await post(registry, request_id, unsigned.to_json()), 403, "unsigned")
    turned_down.append(unsigned.event_id)
    bare = unsigned.payload["signed"]
    refused(await post(registry, request_id, json.dumps(bare).encode()), 400, "bad_envelope")
    refused(await post(registry, request_id, b"not json"), 400, "bad_envelope")

    # a key nobody enrolled, under alice's name
    forger = Signer("operator:alice", Ed25519PrivateKey.generate())
    forged = decision(request_id, "alice", forger.private_key)
    refused(await post(registry, request_id, signed(forger, forged)), 403, "unknown_key")
    turned_down.append(forged.event_id)

    # a service's key: the command is the operator's, never a service's
    approval_key = require_service_signer(settings, "approval")
    as_service = decision(request_id, "alice", alice.private_key, producer="approval")
    refused(await post(registry, request_id, signed(approval_key, as_service)), 403, "unauthorised_producer")
    registry_key = require_service_signer(settings, "registry")
    in_alices_name = decision(request_id, "alice", alice.private_key)
    refused(await post(registry, request_id, signed(registry_key, in_alices_name)), 403, "unauthorised_producer")
    turned_down += [as_service.event_id, in_alices_name.event_id]

    # a signature that no longer covers the bytes
    tampered = json.loads(signed(alice, decision(request_id, "alice", alice.private_key)))
    tampered["payload"]["submitted_via"] = "cli"
    refused(await post(registry, request_id, json.dumps(tampered).encode()), 403, "bad_signature")
    turned_down.append(tampered["event_id"])

    # operator-signed, but not for this endpoint, this request, or by the operator who decided
    other_type = command_event(NewEvent("cycle.requested", "cyc-api", {}), operator="alice")
    refused(await post(registry, request_id, signed(alice, other_type)), 422, "wrong_type")
    elsewhere = decision("apr-some-other-request", "alice", alice.private_key)
    refused(await post(registry, request_id, signed(alice, elsewhere)), 422, "wrong_path")
    relayed = command_event(NewEvent("approval.decision_submitted", "sub-relay", in_alices_name.payload),
                            correlation_id=request_id, operator="erin")
    refused(await post(registry, request_id, signed(erin, relayed)), 403, "wrong_operator")
    turned_down += [other_type.event_id, elsewhere.event_id, relayed.event_id]

    # alice's own decision, signed with her key: accepted and published as it is
    good = decision(request_id, "alice", alice.private_key)
    body = signed(alice, good)
    answer = await post(registry, request_id, body)
    assert answer.status_code == 202, answer.text
    assert answer.json()["event_id"] == good.event_id and answer.json()["operator"] == "alice"

    async def published():
        return [r for r in await approval_records(settings) if r.value and good.event_id.encode() in r.value]

    found = []
    for _ in range(40):
        found = await published()
        if found:
            break
        await asyncio.sleep(0.25)
    [record] = found
    assert record.value == body  # byte for byte: same event id, same producer, same signature block
    on_topic = Envelope.from_json(record.value)
    assert on_topic.signature == json.loads(body)["signature"]
    assert on_topic.signature["principal"] == "operator:alice" and on_topic.producer.service == "operator:alice"
    values = [r.value or b"" for r in await approval_records(settings)]
    assert not [event_id for event_id in turned_down if any(event_id.encode() in v for v in values)]


async def test_a_revoked_operators_decision_is_refused(registry):
    settings = registry.settings
    registry.enroll("frank", "approver")
    frank = operator_signer(settings, "frank")
    registry.cli("operator", "revoke", "frank", "--reason", "left the team")
    await await_until(lambda: any(e["payload"]["operator_id"] == "frank" for e in registry.archived("operator.revoked")),
                      60, message="the registry reading frank's revocation")
    request_id = "apr-promotion-val-api-revoked"
    refused(await post(registry, request_id, signed(frank, decision(request_id, "frank", frank.private_key))),
            403, "revoked_key")

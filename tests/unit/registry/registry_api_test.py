"""The HTTP API over the read models, and the one thing it writes: a signed decision, passed on as published."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from services.registry.api import create_app
from shared.contracts import schemas
from shared.contracts.envelope import utcnow
from shared.bus import signed_values
from shared.contracts.trust import decision_subject, sign_decision
from shared.keys import operator_signer
from tests.support import make_event
from tests.unit.registry.registry_harness import Registry, adapter_sha, cycle_events

SHA, OTHER = adapter_sha(3), adapter_sha(4)


@pytest.fixture
def registry(tmp_path):
    reg = Registry(tmp_path / "var")
    reg.operator("alice", "approver")
    reg.feed(*cycle_events(SHA), reg.grant(SHA, "alice"), *cycle_events(OTHER))
    return reg


@pytest.fixture
def published():
    return []


@pytest.fixture
def client(registry, published):
    async def publish(envelope):
        published.append(envelope)

    return TestClient(create_app(registry.settings, publish, trust=registry.service.trust))


def test_the_manifest_names_the_adapter_in_production_and_its_approver(client):
    manifest = client.get("/api/manifest").json()

    assert manifest["channels"]["production"]["adapter_sha256"] == SHA
    assert manifest["channels"]["production"]["approver"] == "alice"
    assert {a["adapter_sha256"] for a in manifest["adapters"]} == {SHA, OTHER}
    assert client.get(f"/api/adapters/{SHA[:10]}").json()["adapter_sha256"] == SHA
    assert [h["action"] for h in client.get("/api/channels/production/history").json()] == ["promoted"]


def test_snapshots_energy_approvals_and_the_dashboard_answer(client):
    snap = client.get(f"/api/snapshots/val-{SHA[:16]}").json()
    assert snap["totals"]["cycles_done"] == 2 and snap["promotion_approval"]["status"] == "granted"
    assert client.get("/api/energy").json()["totals"]["wh"] == 3.0
    [pending] = client.get("/api/approvals", params={"pending": True}).json()
    assert pending["request_id"] == f"apr-promotion-val-{OTHER[:16]}" and pending["evidence"]
    dashboard = client.get("/api/dashboard").json()
    assert dashboard["channels"][0]["adapter_sha256"] == SHA and len(dashboard["pending_approvals"]) == 1
    assert client.get("/api/snapshots/val-nothing").status_code == 404


def test_a_signed_decision_is_published_for_the_approval_service(client, registry, published):
    request_id, now = f"apr-promotion-val-{OTHER[:16]}", utcnow()
    signer = operator_signer(registry.settings, "alice")
    signed = sign_decision(request_id, "grant", "alice", signer.private_key, issued_at=now,
                           expires_at=now + timedelta(minutes=5), subject=decision_subject(
                               "promotion", {"adapter_sha256": OTHER, "validation_id": f"val-{OTHER[:16]}"}))
    envelope = make_event("approval.decision_submitted", f"sub-{signed['nonce']}", {
        "request_id": request_id, "signed": signed, "submitted_via": "api"}, service="operator:alice",
        correlation_id=request_id)
    body = signed_values(signer, [envelope], [None])[0]  # the envelope as alice signed it

    answer = client.post(f"/api/approvals/{request_id}/decisions", content=body)

    assert answer.status_code == 202
    [event] = published
    assert event.type == "approval.decision_submitted" and event.payload["signed"] == signed
    assert event.payload["submitted_via"] == "api" and answer.json()["event_id"] == event.event_id
    assert event.to_json() == body  # passed on as it is: same event, same signature
    schemas.validate_payload(event.type, event.schema_version, event.payload)
    mismatch = client.post("/api/approvals/apr-other/decisions", content=body)
    assert mismatch.status_code == 422 and len(published) == 1
    unsigned = client.post(f"/api/approvals/{request_id}/decisions", content=envelope.to_json())
    assert unsigned.status_code == 403 and unsigned.json()["error"] == "unsigned" and len(published) == 1


def test_the_dashboard_page_and_the_openapi_document_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "neurons registry" in page.text
    assert "fetch(\"/api/dashboard\"" in client.get("/dashboard/dashboard.js").text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/manifest", "/api/snapshots/{validation_id}", "/api/approvals/{request_id}/decisions",
            "/api/profiles", "/api/energy", "/api/audit/at"} <= set(paths)

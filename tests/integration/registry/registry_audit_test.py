"""`neurons audit at`, `neurons audit verify` and `neurons audit trust` against a registry that promoted adapters."""

from __future__ import annotations

import json
import sqlite3
import time

from shared.contracts.envelope import iso, utcnow
from tests.integration.registry.registry_events import promote, publish, sha_of
from tests.support import await_until, make_event


async def test_audit_at_a_moment_between_two_promotions_names_the_first_adapter_and_its_approver(registry):
    first, second = sha_of("audit-first"), sha_of("audit-second")
    await promote(registry, first, operator="alice")
    between = utcnow()
    time.sleep(0.05)
    await promote(registry, second, operator="erin")

    then = json.loads(registry.cli("audit", "at", iso(between), "--channel", "production", "--json").stdout)
    now = json.loads(registry.cli("audit", "at", iso(utcnow()), "--json").stdout)

    assert then["adapter_sha256"] == first
    assert then["approved_by"] == "alice"
    assert then["promotion"]["request_id"] == f"apr-promotion-val-{first[:16]}"
    assert {"validation.completed", "adapter"} <= {e["type"] for e in then["evidence"]}
    assert then["serving"]["validation"]["verdict"] == "pass"
    assert then["signature_check"]["ok"] is True
    assert now["adapter_sha256"] == second and now["approved_by"] == "erin"
    assert now["put_in_service"]["previous_adapter_sha256"] == first
    text = registry.cli("audit", "at", iso(between)).stdout
    assert first in text and "approved by alice" in text


async def test_audit_verify_finds_no_difference_and_names_a_table_altered_by_hand(registry):
    await promote(registry, sha_of("verify-one"), channel="verify")

    clean = registry.cli("audit", "verify", "--json")
    report = json.loads(clean.stdout)
    assert clean.returncode == 0 and report["ok"] and report["differs"] == []
    assert {"registry_adapters", "registry_channels", "registry_approvals", "registry_profiles",
            "registry_validation_snapshots", "registry_energy_reports"} <= set(report["tables"])

    db = registry.var_dir / "db" / "registry.db"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE registry_channels SET approver = 'mallory' WHERE channel = 'verify'")
    try:
        altered = registry.cli("audit", "verify", check=False)
        assert altered.returncode == 1
        assert "differs: registry_channels" in altered.stdout
    finally:
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE registry_channels SET approver = 'alice' WHERE channel = 'verify'")
    assert registry.cli("audit", "verify").returncode == 0


async def test_audit_verify_checks_signatures_as_of_when_signed_and_audit_trust_tells_the_key_history(registry):
    registry.enroll("frank", "requester")
    request = make_event("cycle.requested", "req-frank", {"operator_id": "frank"}, service="operator:frank")
    await publish(registry.settings, request)
    await await_until(lambda: any(e["event_id"] == request.event_id for e in registry.archived("cycle.requested")),
                      60, message="frank's cycle request archived")
    registry.cli("operator", "revoke", "frank", "--reason", "rotated")
    await await_until(lambda: registry.archived("operator.revoked"), 60, message="the revocation archived")

    trust = json.loads(registry.cli("audit", "trust", "--json").stdout)
    verified = registry.cli("audit", "verify", "--json", check=False)
    report = json.loads(verified.stdout)["signatures"]

    steps = {(e["event"], e["operator_id"]): e for e in trust["history"]}
    assert steps[("operator.enrolled", "frank")]["by"] == "operator:admin"
    assert steps[("operator.enrolled", "frank")]["roles"] == ["requester"]
    assert steps[("operator.revoked", "frank")]["by"] == "operator:admin" and steps[("operator.revoked", "frank")]["applied"]
    assert trust["producers"]["cycle.requested"] == ["operator:requester", "operator:approver", "operator:admin"]
    assert "enrolled frank key" in registry.cli("audit", "trust").stdout
    # frank's request was signed before his key was revoked: it still verifies
    assert verified.returncode == 0 and report["ok"], report
    assert report["counts"]["signed_and_authorised"] == report["events"] == len(registry.archived())

    db = registry.var_dir / "db" / "registry.db"
    with sqlite3.connect(db) as conn:
        (original,) = conn.execute("SELECT envelope_json FROM archived_events WHERE event_id = ?",
                                   (request.event_id,)).fetchone()
        conn.execute("UPDATE archived_events SET envelope_json = ? WHERE event_id = ?",
                     (original.replace('"test-node"', '"other-node"'), request.event_id))
    try:
        tampered = registry.cli("audit", "verify", check=False)
        assert tampered.returncode == 1
        assert "FAILED bad_signature: archive row" in tampered.stdout and request.event_id in tampered.stdout
        assert "1 events FAILED" in tampered.stdout
    finally:
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE archived_events SET envelope_json = ? WHERE event_id = ?", (original, request.event_id))

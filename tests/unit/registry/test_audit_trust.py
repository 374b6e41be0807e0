"""`neurons audit verify` checks every archived event's signature as of when it occurred; `neurons audit trust`
tells whose keys were trusted when; `audit at` checks a decision against the keys the archive knew then.

The registry's real handler archives events signed with real keys (the services' and an admin's anchored in
the trust file, an operator enrolled and later revoked on the log), decoded as its consumer decodes them."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest
from typer.testing import CliRunner

from cli.main import app as cli_app
from services.registry import app as registry_app
from services.registry import audit
from shared.bus import decode, signed_values
from shared.contracts.envelope import NewEvent, Producer, seal
from shared.contracts.trust import sign_decision
from shared.keys import ensure_service_keys, init_admin, new_operator_key, service_signer
from shared.settings import Settings
from shared.service import Service
from shared.topics import AGGREGATE_TYPES

T0 = datetime(2025, 3, 4, 9, 0, tzinfo=timezone.utc)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def sealed(event_type: str, aggregate_id: str, payload: dict, when: datetime, producer: str,
           version: int | None = None):
    from shared.contracts import schemas

    return seal(NewEvent(event_type, aggregate_id, payload), sequence=1,
                producer=Producer(service=producer, node="test-node"), correlation_id=aggregate_id,
                causation_id=None, schema_version=version or schemas.current_version(event_type), occurred_at=when)


class Log:
    """Events signed as published, fed to the registry's real handler as its consumer decodes them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.service = Service("registry", reads=AGGREGATE_TYPES, settings=settings)
        self.service.handles("*")(registry_app.on_event)
        self.ids: dict[str, str] = {}

    def publish(self, name: str, envelope, signer) -> None:
        value = signed_values(signer, [envelope], [None])[0]
        self.service._apply(decode(value))
        self.ids[name] = envelope.event_id


@pytest.fixture
def history(tmp_path, monkeypatch):
    """An admin anchored; alice enrolled at +10 min, acts at +20, revoked at +30, acts again at +40; a trainer
    event at +15; a dataset registered by alice in schema version 1 at +25 (archived upcast to version 2);
    mallory (no admin) tries to enrol herself at +35."""
    monkeypatch.setenv("NEURONS_VAR", str(tmp_path / "var"))
    for name in ("NEURONS_DATABASE_URL", "NEURONS_TRUST", "NEURONS_SERVICE_KEYS", "NEURONS_SERVICE_KEY",
                 "NEURONS_OPERATOR_KEYS"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings.from_env()
    ensure_service_keys(settings)
    admin = init_admin(settings, "root", "test admin")
    alice = new_operator_key(settings, "alice")
    mallory = new_operator_key(settings, "mallory")
    log = Log(settings)
    enrol = {"operator_id": "alice", "public_key": alice.public_key, "key_id": alice.key_id, "roles": ["requester"],
             "label": None}
    log.publish("root-enrolled", sealed("operator.enrolled", "root", {
        "operator_id": "root", "public_key": admin.public_key, "key_id": admin.key_id, "roles": ["admin"],
        "label": "test admin"}, at(0), "operator:root"), admin)
    log.publish("alice-enrolled", sealed("operator.enrolled", "alice", enrol, at(10), "operator:root"), admin)
    log.publish("trainer", sealed("training.started", "job-1", {
        "job_id": "job-1", "cycle_id": "cyc-1", "kind": "mntp", "model": "tiny", "dataset_sha256": "d" * 64,
        "config": {"steps": 4}, "resumed_from_step": None}, at(15), "trainer"), service_signer(settings, "trainer"))
    log.publish("alice-before", sealed("cycle.requested", "req-1", {"operator_id": "alice"}, at(20),
                                       "operator:alice"), alice)
    log.publish("dataset-v1", sealed("dataset.registered", "ds-1", {
        "dataset_id": "ds-1", "name": "demo", "sha256": "ab" * 32, "uri": "file:///tmp/demo.jsonl", "records": 3},
        at(25), "operator:alice", version=1), alice)
    log.publish("alice-revoked", sealed("operator.revoked", "alice", {
        "operator_id": "alice", "key_id": alice.key_id, "reason": "left the team"}, at(30), "operator:root"), admin)
    log.publish("mallory-enrolled", sealed("operator.enrolled", "mallory", {
        "operator_id": "mallory", "public_key": mallory.public_key, "key_id": mallory.key_id, "roles": ["admin"],
        "label": None}, at(35), "operator:mallory"), mallory)
    log.publish("alice-after", sealed("cycle.requested", "req-2", {"operator_id": "alice"}, at(40),
                                      "operator:alice"), alice)
    log.alice = alice
    return log


def cli(*args: str):
    return CliRunner().invoke(cli_app, ["audit", *args])


def tamper(settings: Settings, event_id: str) -> None:
    with sqlite3.connect(settings.var_dir / "db" / "registry.db") as conn:
        conn.execute("UPDATE archived_events SET envelope_json = replace(envelope_json, '\"test-node\"', "
                     "'\"other-node\"') WHERE event_id = ?", (event_id,))


def test_each_event_is_checked_with_the_keys_as_they_stood_when_it_occurred(history):
    report = audit.verify_signatures(history.settings)

    by_id = {entry["event_id"]: entry for entry in report["failures"]}
    assert report["events"] == 8
    assert report["counts"][audit.SIGNED] == 5  # both enrolments by root, the trainer, alice before, the revocation
    assert by_id[history.ids["alice-after"]]["outcome"] == "revoked_key"
    assert by_id[history.ids["mallory-enrolled"]]["outcome"] == "unknown_key"
    assert report["counts"]["revoked_key"] == 1 and report["counts"]["unknown_key"] == 1
    assert [e["event_id"] for e in report["upcast"]] == [history.ids["dataset-v1"]]
    assert report["counts"][audit.UPCAST] == 1 and report["failed"] == 2 and not report["ok"]


def test_a_tampered_archived_row_fails_and_verify_exits_non_zero(history):
    tamper(history.settings, history.ids["trainer"])

    result = cli("verify")
    report = json.loads(cli("verify", "--json").stdout)

    assert result.exit_code == 1
    assert report["projections_ok"] and report["differs"] == []
    assert report["signatures"]["counts"]["bad_signature"] == 1
    assert "signed and authorised" in result.stdout and "bad_signature" in result.stdout
    assert f"FAILED bad_signature: archive row 3 training.started {history.ids['trainer']}" in result.stdout
    assert "upcast before archiving (not verifiable)" in result.stdout
    assert "3 events FAILED" in result.stdout


def test_a_clean_archive_verifies(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONS_VAR", str(tmp_path / "var"))
    settings = Settings.from_env()
    ensure_service_keys(settings)
    log = Log(settings)
    log.publish("trainer", sealed("training.started", "job-1", {
        "job_id": "job-1", "cycle_id": "cyc-1", "kind": "mntp", "model": "tiny", "dataset_sha256": "d" * 64,
        "config": {"steps": 4}, "resumed_from_step": None}, at(15), "trainer"), service_signer(settings, "trainer"))

    result = cli("verify")

    assert result.exit_code == 0, result.stdout
    assert "every event signed and authorised" in result.stdout


def test_audit_trust_tells_the_key_history_and_who_may_write_what(history):
    result = cli("trust")
    report = json.loads(cli("trust", "--json").stdout)

    assert result.exit_code == 0, result.stdout
    alice = history.alice.key_id
    steps = [(e["event"], e["operator_id"], e["applied"], e.get("refused")) for e in report["history"]]
    assert steps == [("operator.enrolled", "root", False, None), ("operator.enrolled", "alice", True, None),
                     ("operator.revoked", "alice", True, None), ("operator.enrolled", "mallory", False, "unknown_key")]
    enrolled = report["history"][1]
    assert enrolled["by"] == "operator:root" and enrolled["roles"] == ["requester"] and enrolled["key_id"] == alice
    assert report["history"][2]["at"] == "2025-03-04T09:30:00Z"
    assert [k["revoked_at"] for k in report["operator_keys"]] == ["2025-03-04T09:30:00Z"]
    assert report["producers"]["operator.enrolled"] == ["operator:admin"]
    assert set(report["anchors"]["services"]) >= {"trainer", "registry"} and "root" in report["anchors"]["admins"]
    text = result.stdout
    assert f"enrolled alice key {alice} roles requester by operator:root" in text
    assert f"revoked  alice key {alice} by operator:root (left the team)" in text
    assert "REFUSED enrolled mallory" in text
    assert "dataset.registered" in text and "operator:requester" in text


def test_audit_at_checks_a_decision_with_the_keys_the_archive_knew_then(history):
    def decision(when: datetime) -> dict:
        return sign_decision("apr-1", "grant", "alice", history.alice.private_key, issued_at=when,
                             expires_at=when + timedelta(minutes=10))

    assert "alice" in audit.operator_keyring(history.settings, at(20))
    assert "alice" not in audit.operator_keyring(history.settings, at(5))
    assert "alice" not in audit.operator_keyring(history.settings, at(45))
    assert audit.operator_keyring(history.settings, at(45), valid_at=at(20)).get("alice").roles == ("requester",)
    assert audit._signature_check(history.settings, decision(at(20)), at(45))["ok"]
    late = audit._signature_check(history.settings, decision(at(35)), at(45))
    assert not late["ok"] and late["reason"] == "unknown_operator"

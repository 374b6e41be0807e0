"""The read models, built by the registry's real handler: manifest, snapshots, energy, audit, verify."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text

from services.registry import audit, queries
from shared.contracts.envelope import utcnow
from tests.support import dataset_payload, make_event
from tests.unit.registry.registry_harness import Registry, adapter_sha, cycle_events

SHA_1, SHA_2 = adapter_sha(1), adapter_sha(2)


@pytest.fixture
def registry(tmp_path):
    reg = Registry(tmp_path / "var")
    reg.operator("alice", "approver")
    reg.operator("erin", "approver")
    return reg


def test_a_promotion_shows_in_the_manifest_with_its_whole_lineage(registry):
    registry.feed(*cycle_events(SHA_1))

    emitted = registry.feed(registry.grant(SHA_1, "alice"))

    assert [e.type for e in emitted] == ["adapter.promoted"]
    with registry.session() as session:
        manifest = queries.manifest(session)
    production = manifest["channels"]["production"]
    assert production["adapter_sha256"] == SHA_1 and production["approver"] == "alice"
    adapter = production["adapter"]
    assert adapter["lineage"]["dataset_sha256"] == "d" * 64 and adapter["lineage"]["dataset_id"] == "ds-1"
    assert adapter["lineage"]["base_model"] == "tiny"
    assert adapter["lineage"]["config"]["lora_rank"] == 8
    assert adapter["energy"]["wh"] == 1.5 and adapter["energy"]["training_wh"] == 1.0
    assert adapter["validation"]["verdict"] == "pass"
    [approval] = adapter["approvals"]
    assert approval["status"] == "granted" and approval["operator_id"] == "alice"
    assert approval["outcome"] == "promoted to production"


def test_the_trainers_report_completes_the_lineage_and_draws_the_loss_curve(registry):
    registry.feed(*cycle_events(SHA_1), registry.grant(SHA_1, "alice"))

    with registry.session() as session:
        adapter = queries.adapter_view(session, SHA_1)
        [run] = queries.training_runs(session)

    assert adapter["status"] == "trained"
    assert adapter["lineage"]["base_model_sha256"] == "c" * 64
    assert adapter["metrics"]["loss_before"] == 4.0 and adapter["metrics"]["loss_after"] == 1.0
    assert [p["loss"] for p in run["loss_curve"]] == [4.0, 3.0, 2.0, 1.0]


def test_a_soak_snapshot_holds_totals_records_load_energy_and_its_approval(registry):
    registry.feed(*cycle_events(SHA_1))

    with registry.session() as session:
        snap = queries.snapshot(session, f"val-{SHA_1[:16]}")

    assert snap["status"] == "completed" and snap["verdict"] == "pass"
    assert snap["totals"]["cycles_done"] == 2 and snap["totals"]["episodes"] == 20
    assert snap["success_rate"] == 0.5  # one pass, one marginal
    assert [r["outcome"] for r in snap["cycles"]] == ["pass", "marginal"]
    assert len(snap["replica_load"]) == 2 and snap["incidents"][0]["reason"] == "oom"
    assert snap["energy"]["wh"] == 0.5
    assert snap["promotion_approval"]["status"] == "pending"
    assert snap["pending_approvals"] == [f"apr-promotion-val-{SHA_1[:16]}"]


def test_a_soak_snapshot_names_the_advice_it_was_sized_to(registry):
    advice = "0b7e4f2a-9c1d-4e8b-a6f3-5d2c1b0a9e8f"
    events = cycle_events(SHA_1)
    started = next(e for e in events if e.type == "validation.started")
    sized = started.with_payload({**started.payload, "replicas": 1,
                                  "sized_by": {"event_id": advice, "validator_replicas": 1}}, started.schema_version)
    registry.feed(*[sized if e is started else e for e in events], *cycle_events(SHA_2))

    with registry.session() as session:
        fitted = queries.snapshot(session, f"val-{SHA_1[:16]}")
        as_configured = queries.snapshot(session, f"val-{SHA_2[:16]}")
        shown = {v["validation_id"]: v for v in queries.dashboard(session)["validations"]}

    assert fitted["sized_by"] == {"event_id": advice, "validator_replicas": 1}
    assert fitted["totals"]["replicas"] == 1
    assert as_configured["sized_by"] is None and as_configured["totals"]["replicas"] == 2
    assert shown[f"val-{SHA_1[:16]}"]["sized_by"] == fitted["sized_by"]
    assert audit.verify(registry.settings)["ok"]  # a rebuild from the archive gives the same rows


def test_audit_at_answers_from_the_log_as_it_stood(registry):
    registry.feed(*cycle_events(SHA_1), registry.grant(SHA_1, "alice"))
    between = utcnow()
    time.sleep(0.01)
    registry.feed(*cycle_events(SHA_2), registry.grant(SHA_2, "erin"))

    then = audit.audit_at(registry.settings, between, channel="production")
    now = audit.audit_at(registry.settings, utcnow())

    assert then["adapter_sha256"] == SHA_1 and then["approved_by"] == "alice"
    assert then["signature_check"]["ok"]
    assert then["serving"]["lineage"]["dataset_sha256"] == "d" * 64
    assert now["adapter_sha256"] == SHA_2 and now["approved_by"] == "erin"


def test_audit_at_a_profile_names_its_adapter(registry):
    registry.feed(*cycle_events(SHA_1), registry.grant(SHA_1, "alice"))
    registry.feed(make_event("profile.create_requested", "pcmd-1", {
        "profile_id": "p-1", "traits": {}, "interaction_style": "terse", "context_preferences": {},
        "channel": "production", "requested_by": "alice"}, service="operator:alice"))

    answer = audit.audit_at(registry.settings, utcnow(), profile="p-1")

    assert answer["profile"]["version"] == 1 and answer["adapter_sha256"] == SHA_1
    assert answer["approved_by"] == "alice"


def test_verify_finds_no_difference_and_names_a_table_altered_by_hand(registry):
    registry.feed(*cycle_events(SHA_1), registry.grant(SHA_1, "alice"))
    assert audit.verify(registry.settings)["ok"]

    with registry.session() as session:
        session.exec(text("UPDATE registry_validation_snapshots SET cycles_passed = 7"))
        session.commit()
    report = audit.verify(registry.settings)

    assert not report["ok"] and report["differs"] == ["registry_validation_snapshots"]


def test_verify_compares_again_when_an_event_is_archived_while_it_checks(registry, monkeypatch):
    registry.feed(*cycle_events(SHA_1))
    replay, arrivals = audit.replay_from_archive, []

    def replay_then_an_event_arrives(*args, **kwargs):
        count = replay(*args, **kwargs)  # the archive has been read; the live tables not yet
        if len(arrivals) < arriving:
            arrivals.append(registry.feed(make_event("dataset.registered", f"ds-{len(arrivals)}", dataset_payload())))
        return count

    monkeypatch.setattr(audit, "replay_from_archive", replay_then_an_event_arrives)
    arriving = 1
    report = audit.verify(registry.settings)
    assert report["ok"] and report["settled"] and report["archived_meanwhile"] == 0
    assert len(arrivals) == 1

    arriving = 10  # events keep arriving: every try sees one more in the live tables than it rebuilt
    report = audit.verify(registry.settings, attempts=3)
    assert not report["settled"] and report["archived_meanwhile"] == 1
    assert not report["ok"] and report["differs"] == ["stream_heads"]


def test_an_event_delivered_twice_changes_the_read_models_once(registry):
    events = cycle_events(SHA_1)
    registry.feed(*events)
    registry.feed(*events)

    with registry.session() as session:
        snap = queries.snapshot(session, f"val-{SHA_1[:16]}")
    assert snap["totals"]["cycles_done"] == 2 and snap["totals"]["episodes"] == 20


@pytest.mark.postgres
def test_the_read_models_verify_and_answer_on_postgresql(tmp_path, postgres_url):
    registry = Registry(tmp_path / "var", database_url=postgres_url)
    registry.operator("alice", "approver")
    registry.feed(*cycle_events(SHA_1), registry.grant(SHA_1, "alice"))

    report = audit.verify(registry.settings)  # live on PostgreSQL, rebuilt on SQLite: the same rows
    answer = audit.audit_at(registry.settings, utcnow())

    assert report["ok"], report["differs"]
    assert answer["adapter_sha256"] == SHA_1 and answer["approved_by"] == "alice"

"""`neurons cycle explain CYCLE_ID`: why a cycle was deferred, which past results chose its settings, why
it was rejected; read from the registry's archive (real SQLite) as evolution and the other services left it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import Session
from typer.testing import CliRunner

from cli.main import app as cli_app
from services.evolution import domain
from services.evolution.search import SearchSettings
from services.registry.audit import registry_engine
from shared.archive import archive
from shared.contracts import schemas
from shared.contracts.envelope import NewEvent, Producer, iso, seal
from shared.contracts.policies import proposal_subject
from shared.contracts.trust import decision_subject, sign_decision
from shared.db import migrate
from shared.settings import Settings

PRODUCERS = {"cycle": "evolution", "research": "evolution", "approval": "approval", "training": "trainer",
             "validation": "validator", "energy": "energy", "dataset": "operator:alice", "hardware": "energy"}


@pytest.fixture
def settings(tmp_path, monkeypatch) -> Settings:
    monkeypatch.setenv("NEURONS_VAR", str(tmp_path / "var"))
    monkeypatch.delenv("NEURONS_DATABASE_URL", raising=False)
    settings = Settings.from_env()
    migrate(settings.db_url("registry"))
    return settings


@pytest.fixture
def history(settings, config, run, event, keys, facts, dataset_registered, now):
    """Two cycles scored (one passed, one failed); a third deferred by the hardware gate, then proposed;
    a fourth rejected by an approver. Every event archived by the registry as it would be."""
    config = domain.EvolutionConfig(keyring=config.keyring, policies=config.policies, schedule_interval=None,
                                    search=SearchSettings(population_size=2, seed=3))
    log: list = []

    def step(messages, state):
        state, emitted = run(config, messages, state)
        log.extend(m for m in messages if hasattr(m, "type"))
        log.extend(emitted)
        return state, emitted

    def decision(proposal, verdict: str):
        cycle_id = proposal.payload["cycle_id"]
        request_id = f"apr-cycle-{cycle_id}"
        signed = sign_decision(request_id, verdict, "alice", keys["alice"], now, now + timedelta(hours=1),
                               subject=decision_subject("cycle", proposal_subject(proposal.payload)))
        if verdict == "grant":
            return event("approval.granted", request_id, {
                "request_id": request_id, "kind": "cycle", "subject_id": cycle_id, "cycle_id": cycle_id,
                "actor": "operator:alice", "decision": signed, "policy": None, "granted_at": iso(now)})
        return event("approval.rejected", request_id, {
            "request_id": request_id, "kind": "cycle", "subject_id": cycle_id, "cycle_id": cycle_id,
            "actor": "operator:alice", "operator_id": "alice", "reason": "too close to the release",
            "decision": signed, "rejected_at": iso(now)})

    state, ids = domain.initial_state(), {}
    for n, (name, loss_after, verdict) in enumerate((("good", 2.0, "pass"), ("bad", 2.9, "fail")), start=1):
        state, (proposal,) = step([dataset_registered(f"ds-{n}", sha=f"{n:x}" * 64)], state)
        ids[name] = cycle_id = proposal.payload["cycle_id"]
        state, _ = step([decision(proposal, "grant"),
                         facts.training_completed(cycle_id, loss_before=3.0, loss_after=loss_after),
                         facts.validation_completed(cycle_id, verdict)], state)
    state, (deferred,) = step([facts.hardware(load_1m=8.0), dataset_registered("ds-3", sha="3" * 64)], state)
    ids["third"] = deferred.payload["cycle_id"]
    state, (proposal,) = step([facts.hardware(load_1m=0.5), domain.Tick(now + timedelta(hours=1))], state)
    state, (proposal,) = step([dataset_registered("ds-4", sha="4" * 64)], state)
    ids["rejected"] = proposal.payload["cycle_id"]
    state, _ = step([decision(proposal, "reject")], state)
    requested = event("cycle.requested", "req-1", {"operator_id": "bob", "dataset_id": None,
                                                   "config": {"steps": 50}, "warm_start": None})
    log.append(requested)  # the operator's command as the log carries it; evolution turns it into RequestCycle
    state, (proposal,) = step([domain.RequestCycle("bob", now, config={"steps": 50}, command_id="req-1")], state)
    ids["operator"] = proposal.payload["cycle_id"]
    _archive(settings, log)
    return ids


def _archive(settings: Settings, log: list) -> None:
    with Session(registry_engine(settings)) as session:
        for n, e in enumerate(log):
            aggregate = e.type.split(".")[0]
            payload = dict(e.payload)
            correlation = payload.get("cycle_id") or e.aggregate_id
            envelope = seal(NewEvent(e.type, e.aggregate_id, payload), sequence=n + 1,
                            producer=Producer(service="operator:bob" if e.type == "cycle.requested"
                                              else PRODUCERS[aggregate], node="test"),
                            correlation_id=correlation, causation_id=None,
                            schema_version=schemas.current_version(e.type),
                            occurred_at=getattr(e, "occurred_at", None))
            archive(session, envelope)
        session.commit()


def explain(*args: str):
    return CliRunner().invoke(cli_app, ["cycle", "explain", *args])


def test_explain_shows_the_deferral_and_the_past_results_that_chose_the_settings(history):
    result = explain(history["third"])

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"cycle {history['third']} (mntp), started by dataset ds-3"
    deferred = [line for line in lines if line.startswith("deferred")]
    assert len(deferred) == 1
    assert "gate hardware: load average per core 2.00 is above 0.85; retry at " in deferred[0]
    assert any(line.startswith("settings chosen by crossover: child of the winners") for line in lines)
    chosen = {line.split()[3]: line for line in lines if line.startswith("chosen by parent")}
    assert set(chosen) == {history["good"], history["bad"]}
    good, bad = history["good"], history["bad"]
    assert chosen[good] == (f"chosen by parent {good} (mntp): verdict pass (val-cccccccc-candidate-pass), "
                            "fitness 100, 10 Wh measured by the trainer's own reading")
    assert chosen[bad] == (f"chosen by parent {bad} (mntp): verdict fail (val-cccccccc-candidate-fail), "
                           "fitness -1e+06, 10 Wh measured by the trainer's own reading")


def test_explain_shows_a_scored_cycle_and_why_a_rejected_one_ended(history):
    scored = explain(history["bad"]).output.splitlines()
    rejected = explain(history["rejected"]).output.splitlines()

    assert "settings chosen by initial: the first configuration tried: the usual LoRA/MNTP starting point" in (
        explain(history["good"]).output.splitlines())
    assert any(line.startswith("scored: verdict fail, fitness -1e+06") for line in scored)
    assert scored[-1] == "ended failed (fitness -1e+06)"
    assert "approval rejected (cycle) by operator:alice: too close to the release" in rejected
    assert rejected[-1] == "ended rejected (fitness -)"


def test_explain_by_the_command_id_shows_who_asked_and_what_they_set(history):
    by_command = explain("req-1").output.splitlines()
    by_cycle = explain(history["operator"]).output.splitlines()

    assert by_command == by_cycle
    assert by_command[0] == f"cycle {history['operator']} (mntp), started by bob's request req-1"
    assert by_command[1].startswith("requested by bob at ")
    assert 'set by the operator: {"steps": 50}' in by_command


def test_a_cycle_id_nobody_knows_gets_one_line_saying_what_to_do(history):
    result = explain("cyc-000000000000")

    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [(
        "neurons: no cycle 'cyc-000000000000' in the registry's archive; give a cycle id as `neurons cycle "
        "request` printed it (cyc-… or res-…), with the services up (`neurons status`)")]

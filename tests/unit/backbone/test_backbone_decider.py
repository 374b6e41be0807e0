"""The decider runner: a service's state kept as rows keyed by aggregate, in the transaction of each message.

Driven with the approval service's real domain on a real SQLite database, through the
runtime's own transaction (``Service._apply``), as the consumer would drive it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import event as sa_event
from sqlmodel import Session, select

from services.approval import domain
from shared.contracts.envelope import utcnow
from shared.decider import KIND, Decider, from_document
from shared.service import Service
from shared.settings import Settings
from shared.store import OutboxEvent, ServiceState, StaleState, StateHead, StateStore
from tests.support import make_event

NOW = datetime(2025, 3, 4, 14, 3, tzinfo=timezone.utc)


def approvals() -> Decider:
    """A fresh runner, as a freshly started process has: nothing held in memory."""
    return Decider(domain, from_rows=domain.ApprovalState.from_rows,
                   upgrade=from_document("approvals", "all", domain.ApprovalState.from_dict))


class Approval:
    """The approval service's wiring, reduced to one handler over a given runner."""

    def __init__(self, var_dir, runner: Decider | None = None) -> None:
        settings = Settings.from_env().with_(var_dir=var_dir, database_url=None, trace_file=None, otlp_endpoint=None)
        self.service = Service("approval", reads=["cycle"], settings=settings)
        self.runner = runner or approvals()
        self.service.handles("cycle.proposed")(self.on_proposed)
        self.service.every(5.0)(self.tick)

    def on_proposed(self, event, ctx):
        self.runner.run(ctx, event, domain.ApprovalConfig())  # stages its events itself

    def tick(self, ctx):
        self.runner.run(ctx, domain.Tick(now=ctx.now), domain.ApprovalConfig())

    def state(self) -> domain.ApprovalState:
        with self.service.transaction() as ctx:
            return self.runner.state(ctx)

    def rows(self) -> dict[str, str]:
        with Session(self.service.engine) as session:
            return {row.key: row.value_json for row in session.exec(
                select(ServiceState).where(ServiceState.service == "approval", ServiceState.kind == KIND))}

    def outbox(self) -> list[str]:
        with Session(self.service.engine) as session:
            return [row.event_id for row in session.exec(select(OutboxEvent))]


def proposed(cycle_id: str, *, energy_wh: float = 120.0):
    """A proposal that waits for an operator (over the 50 Wh the default policy grants by itself)."""
    return make_event("cycle.proposed", cycle_id, {
        "cycle_id": cycle_id, "kind": "mntp", "model": "smollm2",
        "dataset": {"dataset_id": "ds-1", "sha256": "a" * 64, "uri": "file:///data/ds-1.jsonl"},
        "config": {"learning_rate": 2e-4, "lora_rank": 8, "steps": 200}, "warm_start": None,
        "energy_estimate_wh": energy_wh, "requested_by": "evolution", "proposed_at": NOW.isoformat()},
        service="evolution", correlation_id=cycle_id)


@pytest.fixture
def approval(tmp_path):
    return Approval(tmp_path / "var")


class Writes:
    """The statements that wrote state rows, as (verb, row keys)."""

    def __init__(self, engine) -> None:
        self.engine, self.seen = engine, []
        sa_event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, conn, cursor, statement, parameters, context, executemany) -> None:
        verb = statement.split(None, 1)[0].upper()
        if "service_state" in statement and verb in ("INSERT", "UPDATE", "DELETE"):
            params = parameters if executemany else [parameters]
            keys = sorted(str(v) for p in params for v in (p.values() if isinstance(p, dict) else p)
                          if str(v).startswith(("request:", "nonce:")))
            self.seen.append((verb, keys))

    def close(self) -> None:
        sa_event.remove(self.engine, "before_cursor_execute", self._record)


def test_the_state_is_kept_as_one_row_per_aggregate(approval, tmp_path):
    approval.service._apply(proposed("cyc-1"))
    approval.service._apply(proposed("cyc-2"))

    assert sorted(approval.rows()) == ["request:apr-cycle-cyc-1", "request:apr-cycle-cyc-2"]
    with Session(approval.service.engine) as session:
        assert session.get(ServiceState, ("approval", "approvals", "all")) is None  # no document beside the rows
        assert session.get(StateHead, ("approval", KIND)).version == 2
    # a process started afterwards reads the same state from the rows alone
    restarted = Approval(tmp_path / "var")
    assert restarted.state() == approval.state()
    assert set(restarted.state().requests) == {"apr-cycle-cyc-1", "apr-cycle-cyc-2"}


def test_only_the_rows_that_changed_are_written(approval):
    approval.service._apply(proposed("cyc-1"))
    approval.service._apply(proposed("cyc-2"))
    writes = Writes(approval.service.engine)
    try:
        approval.service._apply(proposed("cyc-3"))
        assert writes.seen == [("INSERT", ["request:apr-cycle-cyc-3"])]

        writes.seen.clear()
        with approval.service.transaction() as ctx:  # nothing has expired yet: nothing to write
            approval.tick(ctx)
        assert writes.seen == []

        writes.seen.clear()
        with approval.service.transaction() as ctx:
            approval.runner.run(ctx, domain.Tick(now=utcnow() + timedelta(days=2)), domain.ApprovalConfig())
        assert writes.seen == [("UPDATE", ["request:apr-cycle-cyc-1"]), ("UPDATE", ["request:apr-cycle-cyc-2"]),
                               ("UPDATE", ["request:apr-cycle-cyc-3"])]
    finally:
        writes.close()
    assert {r.status for r in approval.state().requests.values()} == {domain.EXPIRED}


def test_a_redelivered_event_changes_nothing(approval):
    event = proposed("cyc-1")
    approval.service._apply(event)
    rows, outbox = approval.rows(), approval.outbox()

    writes = Writes(approval.service.engine)
    try:
        approval.service._apply(event)
    finally:
        writes.close()

    assert writes.seen == []
    assert approval.rows() == rows and approval.outbox() == outbox


def test_a_database_with_the_state_in_one_document_starts_and_moves_to_rows(tmp_path):
    # what the previous version left: every request in one document, rewritten on each event
    earlier = domain.replay([])
    earlier, _ = domain.handle(proposed("cyc-1"), earlier, domain.ApprovalConfig())
    earlier, _ = domain.handle(proposed("cyc-2", energy_wh=1.0), earlier, domain.ApprovalConfig())  # auto-granted
    earlier = domain.ApprovalState(earlier.requests, frozenset({"n-1"}))
    approval = Approval(tmp_path / "var")
    with approval.service.transaction() as ctx:
        StateStore(ctx.session, "approval").put("approvals", "all", earlier.to_dict())

    approval.service._apply(proposed("cyc-1"))  # known from the document: nothing new
    approval.service._apply(proposed("cyc-3"))

    assert approval.state().requests.keys() == {"apr-cycle-cyc-1", "apr-cycle-cyc-2", "apr-cycle-cyc-3"}
    assert Approval(tmp_path / "var").state() == approval.state()
    assert sorted(approval.rows()) == ["nonce:n-1", "request:apr-cycle-cyc-1", "request:apr-cycle-cyc-2",
                                       "request:apr-cycle-cyc-3"]
    assert {k: v for k, v in approval.state().requests.items() if k != "apr-cycle-cyc-3"} == earlier.requests
    with Session(approval.service.engine) as session:
        assert session.get(ServiceState, ("approval", "approvals", "all")) is None  # the rows took its place
        outbox = {row.aggregate_id for row in session.exec(select(OutboxEvent))}
    assert outbox == {"apr-cycle-cyc-3"}  # the proposal the document already answered was not answered again


def test_a_failed_transaction_leaves_the_state_as_committed(approval):
    approval.service._apply(proposed("cyc-1"))

    def fails(event, ctx):
        approval.runner.run(ctx, event, domain.ApprovalConfig())
        raise RuntimeError("the store went away")

    approval.service.handles("cycle.proposed")(fails)
    with pytest.raises(RuntimeError):
        approval.service._apply(proposed("cyc-2"))

    assert set(approval.state().requests) == {"apr-cycle-cyc-1"}
    assert sorted(approval.rows()) == ["request:apr-cycle-cyc-1"]


def test_a_worker_holding_an_older_state_reloads_it_and_never_overwrites_a_newer_one(tmp_path):
    first, second = Approval(tmp_path / "var"), Approval(tmp_path / "var")  # two workers, one database
    first.service._apply(proposed("cyc-1"))
    assert set(second.state().requests) == {"apr-cycle-cyc-1"}  # held in memory from here on

    first.service._apply(proposed("cyc-2"))
    second.service._apply(proposed("cyc-3"))  # sees that the state moved on, reads it again
    assert set(second.state().requests) == {"apr-cycle-cyc-1", "apr-cycle-cyc-2", "apr-cycle-cyc-3"}

    with second.service.transaction() as late:
        second.runner.state(late)  # read here ...
        first.service._apply(proposed("cyc-4"))  # ... saved there meanwhile ...
        with pytest.raises(StaleState):
            second.runner.run(late, proposed("cyc-5"), domain.ApprovalConfig())  # ... so this save is refused
        late.session.rollback()
    second.service._apply(proposed("cyc-5"))  # handled again, on the newer state
    assert len(first.state().requests) == len(second.state().requests) == 5


# --- every service's state survives its rows --------------------------------------------


def stored(rows: dict) -> dict:
    """The rows as the runner stores and reads them back: JSON."""
    return {key: json.loads(json.dumps(record, sort_keys=True, default=str)) for key, record in rows.items()}


def test_the_registry_state_survives_its_rows():
    from services.registry import domain as registry

    served = [registry.Served("a" * 64, "artefact://a", "mntp"), registry.Served("b" * 64, "artefact://b", "rl")]
    state = registry.RegistryState(
        adapters={"b" * 64: registry.AdapterFacts("b" * 64, "artefact://b", "rl", "cyc-1", "val-1", "pass", False)},
        channels={"production": registry.Channel("production", served[1], tuple(served))},
        profiles={"p-1": registry.Profile("p-1", {"tone": "warm"}, "concise", {"history_turns": 8}, "production", 2,
                                          "alice", "b" * 64, "artefact://b")},
        requests={"apr-promotion-val-1": registry.PromotionRequest("apr-promotion-val-1", "b" * 64, "bob", None)},
        parked={"apr-promotion-val-2": ({"request_id": "apr-promotion-val-2", "kind": "promotion"},
                                        "2025-03-04T14:03:00Z", "ev-2")},
        acted_on=frozenset({"apr-promotion-val-1"}), used_nonces=frozenset({"n-1", "n:2"}))

    rows = stored(state.to_rows())

    assert registry.RegistryState.from_rows(rows) == state
    assert {key.split(":", 1)[0] for key in rows} == {"adapter", "channel", "profile", "request", "parked",
                                                      "acted_on", "nonce"}
    assert registry.RegistryState.from_rows({}) == registry.initial_state()


def test_the_evolution_state_survives_its_rows():
    from services.evolution import domain as evolution
    from services.evolution.search import Individual, Population

    cycle = evolution.Cycle("cyc-1", "mntp", "deferred", {"type": "schedule", "slot": 3}, "evolution",
                            gate="energy", retry_at=NOW + timedelta(minutes=30), attempts=1)
    state = evolution.EvolutionState(
        cycles={"cyc-1": cycle},
        datasets={"ds-1": {"dataset_id": "ds-1", "sha256": "d" * 64, "uri": "file:///d", "name": None,
                           "quarantined": False}},
        latest_dataset_id="ds-1", promoted_adapter="b" * 64, hardware={"cores": 8}, scaling={"micro_batch": 4},
        energy_samples=((NOW, 1.5), (NOW, 2.5), (NOW + timedelta(hours=1), 0.25)),
        budget={"at": NOW, "exceeded": True, "until": NOW + timedelta(hours=2), "used_wh": 12.0, "budget_wh": 10.0},
        carbon={"g_per_kwh": 350.0, "at": "2025-03-04T14:03:00Z"},
        pending_approvals={"apr-cycle-cyc-2": {"kind": "cycle", "cycle_id": "cyc-2", "adapter_sha256": None}},
        open_incidents=frozenset({"drift-" + "b" * 64}), last_schedule_slot=3,
        population=Population(tuple(Individual(f"ind-{n}", 0, {"steps": 10 * n}, (), f"cyc-{n}", None)
                                    for n in range(12))))

    assert evolution.EvolutionState.from_rows(stored(state.to_rows())) == state
    assert evolution.EvolutionState.from_rows({}) == evolution.initial_state()


def test_the_energy_state_survives_its_rows_and_takes_its_budgets_from_the_configuration():
    from services.energy import domain as energy

    budgets = energy.parse_budgets("24h=100")
    state = energy.EnergyState(
        budgets=budgets,
        usage=(energy.Usage(NOW, 1.5, "training:job-1"), energy.Usage(NOW + timedelta(minutes=5), None,
                                                                      "validation:val-1")),
        reported=frozenset({"training:job-0", "training:job-1", "validation:val-1"}),
        recent_wh={"training": (1.0, 1.5)},
        crossings={"day": {"window": "day", "until": "2025-03-05T14:03:00Z"}},
        hardware={"node-1": {"cores": 8, "gpus": []}})

    rows = stored(state.to_rows())

    assert energy.EnergyState.from_rows(rows, budgets) == state
    assert energy.EnergyState.from_rows({}, budgets) == energy.initial_state(energy.EnergyConfig(budgets=budgets))


def test_a_trainer_database_with_rows_of_kinds_jobs_and_datasets_moves_to_the_deciders_rows(tmp_path):
    from services.trainer import app as trainer_app
    from services.trainer import domain as trainer

    settings = Settings.from_env().with_(var_dir=tmp_path / "var", database_url=None, trace_file=None,
                                         otlp_endpoint=None)
    service = Service("trainer", reads=["training", "dataset"], settings=settings)
    job = {"status": trainer.RUNNING, "cycle_id": "cyc-1", "kind": "mntp", "model": "tiny", "dataset": {},
           "config": {"steps": 4}, "warm_start": None, "hardware_plan": None, "requested_by": "evolution",
           "attempt": 1, "last_step": 2, "checkpoint_step": 2}
    dataset = {"sha256": "d" * 64, "quarantined": False, "quarantine_reason": None}
    with service.transaction() as ctx:
        ctx.state.put("jobs", "job-1", {**job, "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
        ctx.state.put("datasets", "ds-1", dataset)

    with service.transaction() as ctx:
        state = trainer_app.trainer.state(ctx)

    assert state == trainer.TrainerState(jobs={"job-1": job}, datasets={"ds-1": dataset})
    with service.transaction() as ctx:
        assert ctx.state.all("jobs") == {} and ctx.state.all("datasets") == {}
        assert set(ctx.state.all(KIND)) == {"job:job-1", "dataset:ds-1"}
        assert ctx.state.get("traces", "job-1") == "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    assert trainer.TrainerState.from_rows(stored(state.to_rows())) == state


def test_a_validator_database_from_before_the_rows_is_read_from_its_outbox_and_records(tmp_path):
    from services.validator import app as validator_app
    from services.validator import domain as validator

    settings = Settings.from_env().with_(var_dir=tmp_path / "var", database_url=None, trace_file=None,
                                         otlp_endpoint=None)
    service = Service("validator", reads=["training"], settings=settings)
    sha = "ab" * 32
    trained = make_event("training.completed", "job-1", {
        "job_id": "job-1", "cycle_id": "cyc-1", "kind": "mntp", "status": "trained",
        "adapter_uri": f"artefact://sha256/{sha}", "adapter_sha256": sha}, service="trainer")
    configured = validator.initial_state(validator_app.PLAN, validator_app.thresholds)
    in_production = {"kind": "production", "adapter_sha256": "cd" * 32, "adapter_uri": "artefact://cd"}
    with service.transaction() as ctx:  # what the previous version left: its outbox and two records
        service.stage(ctx, validator.decide(trained, configured))
        ctx.state.put("validator", "production", {"mntp": in_production})
        ctx.state.put("validator", "advice", {"event_id": "ev-1", "validator_replicas": 2})

    with service.transaction() as ctx:
        state = validator_app.validator.state(ctx)

    assert list(state.runs) == [f"val-{sha[:16]}"] and state.runs[f"val-{sha[:16]}"].active
    assert state.production == {"mntp": validator.Baseline.from_dict(in_production)}
    assert state.plan == validator_app.PLAN.fitted(2, validator_app.thresholds.min_samples, "ev-1")
    with service.transaction() as ctx:
        assert set(ctx.state.all(KIND)) == {f"run:val-{sha[:16]}", "production:mntp", "plan"}
        assert ctx.state.get("validator", "production") is None
    rows = stored(state.to_rows())
    assert validator.ValidatorState.from_rows(rows, validator_app.PLAN, validator_app.thresholds) == state
    judged = replace(state, runs={k: replace(r, cycle_outcomes={1: "pass", 2: "fail"}, status="completed",
                                             verdict="fail") for k, r in state.runs.items()})
    rows = stored(judged.to_rows())
    assert validator.ValidatorState.from_rows(rows, validator_app.PLAN, validator_app.thresholds) == judged

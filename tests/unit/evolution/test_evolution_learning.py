"""The search learns from every result: each verdict (MNTP and RL) and each energy report scores the
configuration that produced it, and the next proposal says which past results chose it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from services.evolution import domain
from services.evolution.search import FAIL_FITNESS, SearchSettings, population_from_events
from shared.contracts.envelope import iso
from shared.contracts.policies import proposal_subject
from shared.contracts.trust import decision_subject, sign_decision

ADAPTER = "c" * 64


@pytest.fixture
def energy_reported(event, now):
    def _report(cycle_id: str, job_kind: str, wh: float, job_id: str | None = None):
        job_id = job_id or (f"job-{cycle_id}" if job_kind == "training" else f"val-{cycle_id}")
        return event("energy.reported", job_id, {
            "job_id": job_id, "job_kind": job_kind, "cycle_id": cycle_id, "joules": wh * 3600, "wh": wh,
            "gco2e": wh / 1000 * 200, "pue": 1.0, "carbon_intensity": 200.0, "method": "rapl",
            "methods": {"cpu": "rapl"}, "reason": None, "window": {"started_at": None, "ended_at": iso(now)}})
    return _report


@pytest.fixture
def grant(event, keys, now):
    """alice's signed grant of a proposal (a cycle's or a research loop's)."""
    def _grant(proposal):
        kind = "research" if proposal.type == "research.proposed" else "cycle"
        cycle_id = proposal.payload["cycle_id"]
        request_id = f"apr-{kind}-{cycle_id}"
        signed = sign_decision(request_id, "grant", "alice", keys["alice"], now, now + timedelta(hours=1),
                               subject=decision_subject(kind, proposal_subject(proposal.payload)))
        return event("approval.granted", request_id, {
            "request_id": request_id, "kind": kind, "subject_id": cycle_id, "cycle_id": cycle_id,
            "actor": "operator:alice", "decision": signed, "policy": None, "granted_at": iso(now)})
    return _grant


@pytest.fixture
def small_search(config):
    """Two configurations tried and scored are enough to breed the third."""
    return domain.EvolutionConfig(keyring=config.keyring, policies=config.policies, schedule_interval=None,
                                  search=SearchSettings(population_size=2, seed=3))


@pytest.fixture
def scored_cycle(run, grant, facts, dataset_registered, energy_reported):
    """A dataset's cycle proposed, granted, trained, validated and its two jobs' energy reported."""
    def _cycle(config, state, n: int, *, loss_after: float, verdict: str = "pass", validation_wh: float = 5.0):
        state, (proposal,) = run(config, [dataset_registered(f"ds-{n}", sha=f"{n:x}" * 64)], state)
        cycle_id = proposal.payload["cycle_id"]
        state, emitted = run(config, [
            grant(proposal),
            facts.training_completed(cycle_id, loss_before=3.0, loss_after=loss_after, joules=36_000.0),
            energy_reported(cycle_id, "training", 10.0),
            facts.validation_completed(cycle_id, verdict),
            energy_reported(cycle_id, "validation", validation_wh),
        ], state)
        return state, cycle_id, [proposal] + emitted
    return _cycle


def test_each_energy_report_after_the_verdict_rescores_the_configuration(small_search, scored_cycle, run,
                                                                         energy_reported, assert_valid):
    # given a cycle whose training energy (10 Wh) was reported before its verdict
    # when the verdict passes and then the soak's 5 Wh are reported
    state, cycle_id, events = scored_cycle(small_search, domain.initial_state(), 1, loss_after=2.5)

    # then the verdict scores 0.5 loss per 10 Wh, and the soak's report rescores it per 15 Wh
    evaluated = next(e for e in events if e.type == "cycle.evaluated").payload
    rescored = next(e for e in events if e.type == "cycle.rescored").payload
    assert evaluated["fitness"] == pytest.approx(0.5 / 0.010)
    assert [r["job_id"] for r in evaluated["energy_reports"]] == [f"job-{cycle_id}"]
    assert rescored["fitness"] == pytest.approx(0.5 / 0.015)
    assert rescored["previous_fitness"] == pytest.approx(50.0)
    assert rescored["energy_wh"] == pytest.approx(15.0)
    assert rescored["because"] == {"type": "energy.reported", "job_id": f"val-{cycle_id}"}
    individual = state.population.by_cycle(cycle_id)
    assert individual.fitness == pytest.approx(0.5 / 0.015)
    assert {r["job_id"] for r in individual.energy_reports} == {f"job-{cycle_id}", f"val-{cycle_id}"}
    assert state.cycles[cycle_id].fitness == pytest.approx(0.5 / 0.015)
    assert_valid(events)

    # and a report read again changes nothing
    _, again = run(small_search, [energy_reported(cycle_id, "validation", 5.0)], state)
    assert again == []


def test_an_energy_report_before_the_verdict_is_counted_by_the_verdict(small_search, run, grant, facts,
                                                                       dataset_registered, energy_reported):
    # given a trained cycle whose soak's energy is reported before its verdict arrives
    state, (proposal,) = run(small_search, [dataset_registered("ds-1")])
    cycle_id = proposal.payload["cycle_id"]
    state, early = run(small_search, [grant(proposal), facts.training_completed(cycle_id, joules=36_000.0),
                                      energy_reported(cycle_id, "validation", 10.0)], state)

    # when the verdict arrives
    state, events = run(small_search, [facts.validation_completed(cycle_id, "pass")], state)

    # then its one evaluation counts the trainer's 10 Wh and the soak's 10 Wh, and no rescoring follows
    assert [e.type for e in early] == ["training.requested"]
    assert [e.type for e in events] == ["cycle.evaluated"]
    assert events[0].payload["energy_wh"] == pytest.approx(20.0)
    assert events[0].payload["fitness"] == pytest.approx(0.5 / 0.020)


def test_a_research_loop_result_enters_the_search(run, config, grant, event, facts, dataset_registered, now,
                                                  energy_reported, assert_valid):
    # given a research loop on the promoted adapter, granted by a human approver
    state = domain.replay([dataset_registered("ds-1"), facts.adapter_promoted("e" * 64)])
    state, (proposal,) = run(config, [domain.RequestResearch("bob", now, command_id="r-1")], state)
    cycle_id = proposal.payload["cycle_id"]
    trained = event("training.completed", f"job-{cycle_id}", {
        "job_id": f"job-{cycle_id}", "cycle_id": cycle_id, "kind": "rl", "status": "trained",
        "adapter_sha256": ADAPTER, "adapter_uri": "file:///a",
        "metrics": {"before": {"reward_mean": 0.2}, "after": {"reward_mean": 0.5}, "reward_mean_before": 0.2,
                    "reward_mean_after": 0.5},
        "energy": {"joules": 7_200.0, "method": "rapl"}})

    # when it trains (reward 0.2 -> 0.5 for 2 Wh), passes its soak and the soak's 2 Wh are reported
    state, events = run(config, [grant(proposal), trained, facts.validation_completed(cycle_id, "pass"),
                                 energy_reported(cycle_id, "validation", 2.0)], state)

    # then its settings are a configuration of the search, scored by reward gained per kWh measured
    assert [e.type for e in events] == ["training.requested", "cycle.evaluated", "cycle.rescored"]
    assert events[1].payload["individual_id"] == f"rl-{cycle_id}"
    assert events[1].payload["fitness"] == pytest.approx(0.3 / 0.002)
    individual = state.population.by_cycle(cycle_id)
    assert individual.kind == "rl" and individual.verdict == "pass"
    assert individual.config == proposal.payload["config"]
    assert individual.fitness == pytest.approx(0.3 / 0.004)
    assert_valid(events)


def test_a_failed_research_verdict_ranks_its_settings_last(run, config, grant, event, facts, dataset_registered,
                                                          now):
    state = domain.replay([dataset_registered("ds-1"), facts.adapter_promoted("e" * 64)])
    state, (proposal,) = run(config, [domain.RequestResearch("bob", now, command_id="r-2")], state)
    cycle_id = proposal.payload["cycle_id"]

    state, events = run(config, [grant(proposal), facts.training_completed(cycle_id),
                                 facts.validation_completed(cycle_id, "fail")], state)

    assert [e.type for e in events] == ["training.requested", "cycle.evaluated", "cycle.completed"]
    assert state.population.by_cycle(cycle_id).fitness == FAIL_FITNESS


def test_the_next_routine_proposal_names_the_results_that_chose_it(small_search, scored_cycle, run,
                                                                   dataset_registered, assert_valid):
    # given two configurations tried: one passed (loss 3.0 -> 2.0), one failed its soak
    state, good, _ = scored_cycle(small_search, domain.initial_state(), 1, loss_after=2.0)
    state, bad, _ = scored_cycle(small_search, state, 2, loss_after=2.9, verdict="fail")

    # when a new dataset starts the next routine cycle
    _, (proposal,) = run(small_search, [dataset_registered("ds-3", sha="f" * 64)], state)

    # then its settings are bred from those two, and the proposal lists them with their verdicts and fitness
    rationale = proposal.payload["rationale"]
    assert rationale["method"] == "crossover"
    parents = {r["cycle_id"]: r for r in rationale["results"] if r["role"] == "parent"}
    assert set(parents) == {good, bad}
    assert parents[good]["verdict"] == "pass"
    assert parents[good]["fitness"] == pytest.approx(1.0 / 0.015)
    assert parents[good]["energy_reports"] == [f"job-{good}", f"val-{good}"]
    assert parents[bad]["verdict"] == "fail" and parents[bad]["fitness"] == FAIL_FITNESS
    assert set(proposal.payload["individual"]["parents"]) == {r["individual_id"] for r in parents.values()}
    assert_valid([proposal])


def test_the_first_proposals_say_they_start_and_explore(small_search, run, dataset_registered):
    _, (first,) = run(small_search, [dataset_registered("ds-1")])

    assert first.payload["rationale"] == {
        "method": "initial", "reason": "the first configuration tried: the usual LoRA/MNTP starting point",
        "results": []}


def test_the_population_rebuilt_from_evolutions_own_events_keeps_every_rescoring(small_search, scored_cycle):
    state, _, first = scored_cycle(small_search, domain.initial_state(), 1, loss_after=2.5)
    state, _, second = scored_cycle(small_search, state, 2, loss_after=2.0, validation_wh=20.0)

    own = [e for e in first + second if e.type.startswith(("cycle.", "research."))]

    assert population_from_events(own) == state.population


def test_an_earlier_rescoring_read_late_does_not_undo_a_later_one(small_search, scored_cycle, run,
                                                                  energy_reported, consumed):
    # given a scored cycle rescored once by its soak's report, then again by a second soak's report
    state, cycle_id, events = scored_cycle(small_search, domain.initial_state(), 1, loss_after=2.5)
    first = next(e for e in events if e.type == "cycle.rescored")
    state, (second,) = run(small_search, [energy_reported(cycle_id, "validation", 15.0, job_id="val-again")],
                           state)

    # when the first rescoring comes back from the log after the second
    state, _ = run(small_search, [consumed(first)], state)

    # then the fitness counting every report holds: 0.5 loss per 30 Wh
    assert state.population.by_cycle(cycle_id).fitness == pytest.approx(0.5 / 0.030)
    assert state.cycles[cycle_id].fitness == pytest.approx(0.5 / 0.030)

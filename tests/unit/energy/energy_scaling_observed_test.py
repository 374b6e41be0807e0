"""Scaling from observation: the soaks' replica memory, latency and incidents and the trainer's measured
joules per step size the advice beside the hardware profile, and its reasons name them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from services.energy.domain import (
    SCALING_RECOMMENDED,
    EnergyConfig,
    EnergyState,
    ProfileHardware,
    decide,
    evolve,
    initial_state,
)
from services.energy.scaling import Observed, observe, recommend_scaling
from shared.contracts.schemas import validate_payload

GiB = 2**30
AT = datetime(2025, 3, 4, 14, 3, tzinfo=timezone.utc)
# 16 cores, 20 GiB free: the model says a 135M-parameter replica needs well under 1 GiB
NODE = {"cores": 16, "memory_total_bytes": 32 * GiB, "memory_available_bytes": 20 * GiB, "gpus": [],
        "load_avg": [0.0, 0.0, 0.0], "cpu_model": "x"}


@dataclass(frozen=True)
class Event:
    type: str
    aggregate_id: str
    payload: dict[str, Any] = field(default_factory=dict)
    occurred_at: datetime = AT


def soak_cycle(cycle: int, rss_mb: float, latency_ms: float, processes: int = 4, incidents: int = 0,
               validation_id: str = "val-1") -> Event:
    replicas = [{"replica_id": f"r{n}", "side": "candidate" if n % 2 else "baseline", "episodes": 20,
                 "rss_mb": rss_mb - 10 * n, "cpu_percent": 90.0, "latency_ms": latency_ms,
                 "incident": "replica exited with -9 (killed)" if n < incidents else None}
                for n in range(processes)]
    return Event("validation.cycle_completed", validation_id, {"validation_id": validation_id, "cycle": cycle,
                                                              "replicas": replicas})


def training_completed(job_id: str, joules: float, steps: int) -> Event:
    return Event("training.completed", job_id, {"job_id": job_id, "steps": steps,
                                               "energy": {"joules": joules, "method": "rapl"}})


def observed(*events: Event) -> Observed:
    state = Observed()
    for e in events:
        state = observe(state, e)
    return state


def test_the_replicas_observed_memory_outranks_the_model_of_it():
    # given soaks whose replicas peaked at 4 GiB each, where the model expects a fraction of that
    seen = observed(soak_cycle(1, rss_mb=3000, latency_ms=200), soak_cycle(2, rss_mb=4096, latency_ms=220))

    # when the advice is made for a node with 20 GiB free
    modelled = recommend_scaling(NODE, model_params=135_000_000)
    advice = recommend_scaling(NODE, model_params=135_000_000, observed=seen)

    # then 16 GiB usable / 4 GiB per replica allow 4 replica processes, and the reason says so
    assert modelled["validator_replicas"] == 8
    assert advice["validator_replicas"] == 4
    assert ("observed peak replica memory 4096 MiB over the last 2 soak cycle(s): 16.00 GiB usable RAM / "
            "4.00 GiB -> 4") in advice["reasons"]["validator_replicas"]
    assert advice["inputs"]["observed"]["replica_peak_rss_mb"] == 4096.0


def test_replicas_that_starve_each_other_are_fewer_next_time():
    # given 4 replica processes whose episodes took 20 s, twice the 10 s target
    seen = observed(soak_cycle(1, rss_mb=500, latency_ms=20_000))

    advice = recommend_scaling(NODE, model_params=135_000_000, observed=seen)

    assert advice["validator_replicas"] == 2
    assert ("observed median episode latency 20000 ms with 4 replica processes, above the 10000 ms target -> 2"
            in advice["reasons"]["validator_replicas"])


def test_latency_within_target_is_named_and_sets_no_cap():
    advice = recommend_scaling(NODE, model_params=135_000_000, observed=observed(soak_cycle(1, 500, 150)))

    assert advice["validator_replicas"] == 8
    assert ("observed median episode latency 150 ms with 4 replica processes, within the 10000 ms target"
            in advice["reasons"]["validator_replicas"])


def test_incidents_in_the_last_soak_cycle_leave_room_only_for_the_replicas_that_ran_clean():
    seen = observed(soak_cycle(1, 500, 150, processes=4, incidents=1))

    advice = recommend_scaling(NODE, model_params=135_000_000, observed=seen)

    assert advice["validator_replicas"] == 3
    assert ("1 of 4 replica processes ended in an incident in the last soak cycle (replica exited with -9 "
            "(killed)) -> 3") in advice["reasons"]["validator_replicas"]


def test_the_measured_joules_per_step_size_the_trainers_to_the_budget_left():
    # given two training jobs measured at 360 J per step, 100 steps each (10 Wh a job)
    seen = observed(training_completed("job-1", joules=36_000, steps=100),
                    training_completed("job-2", joules=36_000, steps=100))

    # when 25 Wh are left in the tightest budget window on a node whose cores hold 4 trainers
    advice = recommend_scaling(NODE, model_params=135_000_000, remaining_wh=25.0, binding_window="24h",
                               observed=seen)

    # then the budget pays for 250 steps: 2 jobs
    assert advice["trainer_replicas"] == 2
    assert ("measured 360 J per step (median of 2 training job(s), 100 steps a job): 25.0 Wh left pay for "
            "250 steps -> 2 job(s)") in advice["reasons"]["trainer_replicas"]
    assert advice["inputs"]["observed"]["joules_per_step"] == 360.0


def test_without_observations_the_reasons_say_the_advice_is_modelled():
    advice = recommend_scaling(NODE, model_params=135_000_000)

    assert "no soak observed yet: replica memory and latency as modelled" in advice["reasons"]["validator_replicas"]
    assert "no training job measured yet: no joules per step to size against" in advice["reasons"]["trainer_replicas"]


def test_each_soak_cycle_and_job_is_observed_once_and_only_the_latest_are_kept():
    again = observed(soak_cycle(1, 500, 100), soak_cycle(1, 900, 100), training_completed("job-1", 100, 10),
                     training_completed("job-1", 900, 10))
    many = observed(*(soak_cycle(n, 100 + n, 100) for n in range(30)))

    assert len(again.soak_cycles) == 1 and again.soak_cycles[0]["peak_rss_mb"] == 500
    assert len(again.training_jobs) == 1 and again.training_jobs[0]["joules"] == 100
    assert [c["key"] for c in many.soak_cycles] == [f"val-1#{n}" for n in range(10, 30)]


def test_the_energy_service_sizes_on_what_its_state_observed_and_keeps_it_in_its_rows():
    # given the energy service has read a soak cycle whose replicas peaked at 4 GiB
    state = evolve(initial_state(), soak_cycle(1, rss_mb=4096, latency_ms=200))
    state = evolve(state, training_completed("job-1", joules=7200, steps=20))

    # when the hardware is profiled
    events = decide(ProfileHardware(node="node-1", profile=NODE, at=AT), state, EnergyConfig())

    # then the advice follows the observation, and the observation survives a restart (its rows)
    advice = next(e.payload for e in events if e.type == SCALING_RECOMMENDED)
    validate_payload(SCALING_RECOMMENDED, 1, advice)
    assert advice["validator_replicas"] == 4
    assert advice["inputs"]["observed"]["joules_per_step"] == 360.0
    assert EnergyState.from_rows(state.to_rows()).observed == state.observed

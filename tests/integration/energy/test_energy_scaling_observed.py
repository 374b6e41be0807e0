"""The energy service sizes its scaling advice on what the soaks and training jobs were observed to do
(real broker, the energy service as a process): the replicas' memory and latency from a soak cycle, the
joules per step of a training job, named in the advice's reasons."""

from tests.support import await_until, make_event
from tests.integration.energy.test_energy_budget_flow import completed

FAST = {"NEURONS_HARDWARE_PROFILE_S": "1", "NEURONS_ENERGY_BUDGETS": "24h=1000"}


def soak_cycle(rss_mb: float, latency_ms: float) -> dict:
    replicas = [{"replica_id": f"r{n}", "side": side, "episodes": 20, "rss_mb": rss_mb, "cpu_percent": 50.0,
                 "latency_ms": latency_ms, "incident": None} for n, side in enumerate(("candidate", "baseline"))]
    return {"validation_id": "val-observed", "cycle": 1, "outcome": "pass", "score": 0.9, "metrics": {},
            "vetoes": [], "reason": "all metrics same or better", "replicas": replicas, "incidents": [],
            "failing_streak": 0, "stop_early": False}


def observed_advice(platform):
    return [e for e in platform.archived("scaling.recommended")
            if (e["payload"].get("inputs") or {}).get("observed", {}).get("soak_cycles")
            and e["payload"]["inputs"]["observed"].get("training_jobs")]


async def test_a_soak_cycle_and_a_training_job_size_the_next_advice(platform):
    platform.env.update(FAST)
    await platform.aensure_topics()
    platform.start("energy", "registry")
    async with platform.publisher() as publisher:
        await publisher.publish(make_event("validation.cycle_completed", "val-observed", soak_cycle(2048.0, 300.0),
                                           service="validator", correlation_id="cyc-observed"))
        await publisher.publish(make_event("training.completed", "job-1", {**completed("job-1"), "steps": 30},
                                           sequence=4, service="trainer", correlation_id="cyc-job-1"))

    advice = (await await_until(lambda: observed_advice(platform), 90, message="advice sized on observations"))[-1]
    observed = advice["payload"]["inputs"]["observed"]
    assert observed["replica_peak_rss_mb"] == 2048.0
    assert observed["replica_latency_ms"] == 300.0
    assert observed["joules_per_step"] == 12.0  # 360 J over 30 steps
    replicas_reasons = " | ".join(advice["payload"]["reasons"]["validator_replicas"])
    assert "observed peak replica memory 2048 MiB over the last 1 soak cycle(s)" in replicas_reasons
    assert "observed median episode latency 300 ms with 2 replica processes, within the 10000 ms target" in (
        replicas_reasons)
    trainer_reasons = " | ".join(advice["payload"]["reasons"]["trainer_replicas"])
    assert "measured 12 J per step (median of 1 training job(s), 30 steps a job)" in trainer_reasons

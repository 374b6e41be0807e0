"""A crossed energy budget, measured by the energy service, closes evolution's gate (real broker, real processes)."""

from tests.support import await_until, dataset_payload, make_event

FAST = {"NEURONS_EVOLUTION_TICK_S": "1", "NEURONS_MAX_LOAD_PER_CORE": "1000", "NEURONS_SCHEDULE_INTERVAL_S": "0",
        "NEURONS_ENERGY_BUDGETS": "12h=0.01", "NEURONS_HARDWARE_PROFILE_S": "600"}


def completed(job: str) -> dict:
    return {"job_id": job, "cycle_id": f"cyc-{job}", "kind": "mntp", "status": "trained", "fallback_reason": None,
            "adapter_uri": "artefact://sha256/" + "ab" * 32, "adapter_sha256": "ab" * 32,
            "metrics": {"before": {"loss": 2.0}, "after": {"loss": 1.5}}, "duration_s": 60.0,
            "energy": {"joules": 360.0, "method": "model", "components": [{"name": "cpu", "joules": 360.0,
                                                                          "method": "model"}],
                       "duration_s": 60.0, "cpu_s": 30.0, "reason": "no RAPL counters"},
            "base_model": "tiny", "base_model_checksum": None, "dataset_sha256": None, "config": {}}


async def test_a_crossed_budget_defers_the_next_cycle_with_the_energy_gate(platform):
    platform.env.update(FAST)
    await platform.aensure_topics()
    platform.start("energy", "evolution", "approval", "registry")
    async with platform.publisher() as publisher:
        await publisher.publish(make_event("training.completed", "job-1", completed("job-1"), sequence=4,
                                           service="trainer", correlation_id="cyc-job-1"))
        [exceeded] = await await_until(lambda: platform.archived("energy.budget_exceeded"), 60,
                                       message="energy.budget_exceeded")
        assert exceeded["payload"]["budget_wh"] == 0.01 and exceeded["payload"]["used_wh"] >= 0.1
        [report] = platform.archived("energy.reported")
        assert report["payload"]["method"] == "model" and report["payload"]["joules"] == 360.0

        await publisher.publish(make_event("dataset.registered", "ds-budget", dataset_payload("ds-budget")))
    [deferred] = await await_until(lambda: platform.archived("cycle.deferred"), 60, message="cycle.deferred")
    assert deferred["payload"]["gate"] == "energy"
    assert deferred["payload"]["retry_at"]
    assert platform.archived("cycle.proposed") == []

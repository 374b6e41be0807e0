"""The metrics catalogue (shared.metrics.METRICS) against what a MeterProvider exports to Prometheus."""

from __future__ import annotations

from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.metrics import (METRICS, Metrics, record_approval_waits, record_channel_change, record_energy,
                            record_evolution, record_soak, record_training)
from tests.support import make_event


def _record_everything(metrics: Metrics) -> None:
    """One value in every catalogued metric, each label set to ``<label>-value``."""
    for spec in METRICS.values():
        labels = {label: f"{label}-value" for label in spec.labels if label != "service"}
        if spec.kind == "counter":
            metrics.add(spec.name, 2, **labels)
        elif spec.kind == "histogram":
            metrics.record(spec.name, 0.5, **labels)
        elif spec.name in ("neurons_consumer_lag", "neurons_outbox_depth"):
            metrics.observe(spec.name, lambda labels=labels: [(3, labels)])
        else:
            metrics.set(spec.name, 3, **labels)


def _samples(metrics: Metrics) -> dict[str, list]:
    exported: dict[str, list] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            exported.setdefault(sample.name, []).append((family.type, sample))
    return exported


def test_every_catalogued_metric_is_exported_under_its_name_type_and_labels():
    metrics = Metrics("trainer")
    _record_everything(metrics)

    exported = _samples(metrics)

    for spec in METRICS.values():
        name = f"{spec.name}_count" if spec.kind == "histogram" else spec.name
        assert name in exported, f"{spec.name} is catalogued but not exported"
        [(kind, sample)] = exported[name]
        assert kind == spec.kind
        assert set(sample.labels) == set(spec.labels)
        assert sample.labels["service"] == "trainer"
        assert sample.value == (1 if spec.kind == "histogram" else 2 if spec.kind == "counter" else 3)


def test_only_catalogued_metrics_are_exported_and_all_are_named_neurons():
    metrics = Metrics("registry")
    _record_everything(metrics)

    families = {family.name for family in text_string_to_metric_families(metrics.render().decode())}
    catalogued = {spec.name.removesuffix("_total") for spec in METRICS.values()}

    assert families - {"target_info"} == catalogued
    assert all(name.startswith("neurons_") for name in METRICS)
    assert all(spec.kind in ("counter", "gauge", "histogram") and spec.help for spec in METRICS.values())


def test_a_name_outside_the_catalogue_or_wrong_labels_are_refused():
    metrics = Metrics("approval")

    with pytest.raises(KeyError, match="not in the metrics catalogue"):
        metrics.add("neurons_made_up_total")
    with pytest.raises(TypeError, match="is a counter"):
        metrics.set("neurons_promotions_total", 1, channel="production")
    with pytest.raises(ValueError, match="takes the labels"):
        metrics.add("neurons_promotions_total", adapter="x")


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def test_training_events_set_throughput_and_loss_and_add_joules():
    metrics = Metrics("trainer")
    progressed = make_event("training.progressed", "job-1", {
        "job_id": "job-1", "cycle_id": "cycle-7", "step": 5, "total_steps": 10, "loss": 2.25, "tokens_per_s": 480.0,
        "energy_j": 12.0})
    completed = make_event("training.completed", "job-1", {
        "job_id": "job-1", "cycle_id": "cycle-7", "kind": "mntp", "status": "trained",
        "energy": {"joules": 40.5, "method": "rapl"}})

    record_training(metrics, [progressed, completed], "mntp")

    assert _value(metrics, "neurons_training_tokens_per_second", cycle_id="cycle-7", kind="mntp") == 480.0
    assert _value(metrics, "neurons_training_loss", cycle_id="cycle-7") == 2.25
    assert _value(metrics, "neurons_training_energy_joules_total", cycle_id="cycle-7") == 40.5
    assert _value(metrics, "neurons_training_jobs_total", kind="mntp", status="trained") == 1


def test_verdicts_p_values_channel_changes_and_approval_waits_are_counted():
    metrics = Metrics("registry")
    verdict = make_event("validation.completed", "val-1", {
        "verdict": "pass", "purpose": "candidate",
        "metrics": {"mntp_loss": {"p_two_sided": 0.004}, "latency_ms": {"p_two_sided": None}}})
    promoted = make_event("adapter.promoted", "production", {"channel": "production"})
    rolled_back = make_event("adapter.rolled_back", "production", {"channel": "production"})
    granted = make_event("approval.granted", "req-1", {"request_id": "req-1", "kind": "promotion"})
    asked = {"req-1": granted.occurred_at - timedelta(seconds=90)}

    record_soak(metrics, [verdict])
    for event in (promoted, promoted, rolled_back):
        record_channel_change(metrics, event)
    record_approval_waits(metrics, [granted, promoted], asked.get)

    assert _value(metrics, "neurons_soak_verdicts_total", verdict="pass", purpose="candidate") == 1
    assert _value(metrics, "neurons_soak_p_value_count", metric="mntp_loss") == 1
    assert _value(metrics, "neurons_soak_p_value_bucket", metric="mntp_loss", le="0.01") == 1
    assert _value(metrics, "neurons_soak_p_value_count", metric="latency_ms") == 0
    assert _value(metrics, "neurons_promotions_total", channel="production") == 2
    assert _value(metrics, "neurons_rollbacks_total", channel="production") == 1
    assert _value(metrics, "neurons_approval_wait_seconds_sum", kind="promotion", outcome="granted") == 90.0


def test_energy_reports_add_joules_and_emissions_and_count_what_was_not_measured():
    metrics = Metrics("energy")
    measured = make_event("energy.reported", "job-1", {
        "job_id": "job-1", "job_kind": "training", "joules": 3600.0, "gco2e": 0.3, "method": "rapl"})
    unmeasured = make_event("energy.reported", "val-1", {
        "job_id": "val-1", "job_kind": "validation", "joules": None, "gco2e": None, "method": None,
        "reason": "no counter readable"})
    crossed = make_event("energy.budget_exceeded", "12h", {"window": "12h"})

    record_energy(metrics, [measured, measured, unmeasured, crossed])

    assert _value(metrics, "neurons_energy_joules_total", job_kind="training", method="rapl") == 7200.0
    assert _value(metrics, "neurons_energy_gco2e_total", job_kind="training") == 0.6
    assert _value(metrics, "neurons_energy_unmeasured_jobs_total", job_kind="validation") == 1
    assert _value(metrics, "neurons_energy_budget_exceeded_total", window="12h") == 1


def test_proposed_deferred_completed_and_refused_cycles_are_counted():
    metrics = Metrics("evolution")
    proposed = make_event("cycle.proposed", "cyc-1", {"kind": "mntp", "trigger": {"type": "operator"}})
    research = make_event("research.proposed", "cyc-2", {"kind": "rl", "trigger": {"type": "operator"}})
    deferred = make_event("cycle.deferred", "cyc-3", {"gate": "hardware", "reason": "load 1.9 per core"})
    completed = make_event("cycle.completed", "cyc-1", {"kind": "mntp", "outcome": "promoted"})
    refused = make_event("research.request_refused", "req-1", {"reason": "no adapter to continue"})

    record_evolution(metrics, [proposed, research, deferred, deferred, completed, refused])

    assert _value(metrics, "neurons_cycles_proposed_total", kind="mntp", trigger="operator") == 1
    assert _value(metrics, "neurons_cycles_proposed_total", kind="rl", trigger="operator") == 1
    assert _value(metrics, "neurons_cycles_deferred_total", gate="hardware") == 2
    assert _value(metrics, "neurons_cycles_completed_total", kind="mntp", outcome="promoted") == 1
    assert _value(metrics, "neurons_cycle_requests_refused_total", kind="rl") == 1

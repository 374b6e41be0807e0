"""The energy contract: what the meter and the domain emit validates, and nulls need reasons."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from services.energy.domain import EnergyConfig, decide, initial_state
from shared.energy_meter import EnergyMeter
from shared.contracts.schemas import SchemaError, validate_payload


class Completed:
    type = "training.completed"
    aggregate_id = "train-7"
    occurred_at = datetime(2026, 3, 2, tzinfo=timezone.utc)

    def __init__(self, energy):
        self.payload = {"job_id": "train-7", "cycle_id": "c-7", "energy": energy}


@pytest.mark.parametrize("use_model", [True, False])
def test_a_real_meter_reading_flows_into_a_valid_report(tmp_path, use_model):
    meter = EnergyMeter(powercap_root=tmp_path / "none", use_nvml=False, use_model=use_model)
    with meter.window("train") as window:
        sum(range(100_000))
    config = EnergyConfig()
    [event] = decide(Completed(window.reading.to_dict()), initial_state(config), config)
    validate_payload("energy.reported", 1, event.payload)
    assert (event.payload["joules"] is None) is (not use_model)


def test_a_null_reading_without_a_reason_is_rejected():
    payload = {
        "job_id": "j", "job_kind": "training", "cycle_id": None, "joules": None, "wh": None, "gco2e": None,
        "pue": 1.2, "carbon_intensity": 400, "method": None, "methods": {}, "reason": None,
        "window": {"started_at": None, "ended_at": "2026-03-02T00:00:00Z"},
    }
    with pytest.raises(SchemaError, match="reason"):
        validate_payload("energy.reported", 1, payload)
    validate_payload("energy.reported", 1, {**payload, "reason": "RAPL unreadable"})


def test_negative_energy_is_rejected():
    with pytest.raises(SchemaError):
        validate_payload(
            "energy.budget_exceeded", 1,
            {"window": "24h", "window_s": 86400, "budget_wh": 1, "used_wh": -1, "crossed_at": "x", "until": "y"},
        )

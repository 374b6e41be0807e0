"""Site figures and budgets from the environment."""

from __future__ import annotations

import pytest

from services.energy.meters import energy_config


def test_defaults():
    config = energy_config({})
    assert config.carbon_intensity_g_per_kwh == 400.0 and config.pue == 1.2 and config.budgets == ()


def test_values_from_the_environment():
    config = energy_config(
        {"NEURONS_CARBON_INTENSITY": "56", "NEURONS_PUE": "1.1", "NEURONS_ENERGY_BUDGETS": "12h=300, 24h=500", "NEURONS_MODEL_PARAMS": "1000"}
    )
    assert config.carbon_intensity_g_per_kwh == 56.0 and config.pue == 1.1
    assert [(b.name, b.budget_wh) for b in config.budgets] == [("12h", 300.0), ("24h", 500.0)]
    assert config.scaling.default_model_params == 1000


@pytest.mark.parametrize(
    "env, name",
    [
        ({"NEURONS_PUE": "0.8"}, "NEURONS_PUE"),
        ({"NEURONS_CARBON_INTENSITY": "lots"}, "NEURONS_CARBON_INTENSITY"),
        ({"NEURONS_ENERGY_BUDGETS": "24h"}, "NEURONS_ENERGY_BUDGETS"),
    ],
)
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(ValueError, match=name):
        energy_config(env)

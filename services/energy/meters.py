"""The energy service's view of the world outside the domain: site figures from the environment.

Grid carbon intensity and PUE are properties of where the machine runs, not
of the job, so they come from settings; budgets are the operator's. Bad values
fail at start-up with the variable's name rather than skewing every report.
"""

from __future__ import annotations

import math
import os
from typing import Mapping

from services.energy.domain import EnergyConfig, ScalingConfig, parse_budgets

DEFAULT_CARBON_INTENSITY_G_PER_KWH = 400.0
DEFAULT_PUE = 1.2

ENV_VARS: dict[str, str] = {
    "NEURONS_CARBON_INTENSITY": "grid carbon intensity in gCO2e per kWh (default 400)",
    "NEURONS_PUE": "power usage effectiveness of the site, 1.0 or more (default 1.2)",
    "NEURONS_ENERGY_BUDGETS": "rolling energy budgets in Wh, e.g. 12h=300,24h=500 (default none)",
    "NEURONS_MODEL_PARAMS": "parameters of the base model, for scaling recommendations (default 135000000)",
}


def carbon_intensity(env: Mapping[str, str] | None = None) -> float:
    return _positive(env, "NEURONS_CARBON_INTENSITY", DEFAULT_CARBON_INTENSITY_G_PER_KWH, minimum=0.0)


def pue(env: Mapping[str, str] | None = None) -> float:
    # Below 1.0 would mean the site gives energy back.
    return _positive(env, "NEURONS_PUE", DEFAULT_PUE, minimum=1.0)


def energy_config(env: Mapping[str, str] | None = None) -> EnergyConfig:
    """The domain's config from the environment (``os.environ`` unless given)."""
    env = os.environ if env is None else env
    try:
        budgets = parse_budgets(env.get("NEURONS_ENERGY_BUDGETS"))
    except ValueError as exc:
        raise ValueError(f"NEURONS_ENERGY_BUDGETS: {exc}") from None
    scaling = ScalingConfig()
    params = env.get("NEURONS_MODEL_PARAMS")
    if params:
        value = _positive({"NEURONS_MODEL_PARAMS": params}, "NEURONS_MODEL_PARAMS", 0.0, minimum=1.0)
        scaling = ScalingConfig(default_model_params=int(value))
    return EnergyConfig(
        carbon_intensity_g_per_kwh=carbon_intensity(env),
        pue=pue(env),
        budgets=budgets,
        scaling=scaling,
    )


def _positive(env: Mapping[str, str] | None, name: str, default: float, *, minimum: float) -> float:
    env = os.environ if env is None else env
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number; got {raw!r}") from None
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be at least {minimum:g}; got {raw!r}")
    return value

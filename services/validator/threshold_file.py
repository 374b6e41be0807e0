"""Reading a thresholds file (JSON or YAML, ``NEURONS_THRESHOLDS`` or ``validate rejudge --thresholds``)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from services.validator.thresholds import Thresholds


def load_thresholds(path: str | Path) -> Thresholds:
    """The thresholds in ``path``: the defaults, changed where the file says."""
    path = Path(path)
    text = path.read_text()
    data = (yaml.safe_load(text) or {}) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: thresholds must be a mapping")
    return Thresholds.from_dict(data)

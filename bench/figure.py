"""One measured figure: the platform's number, its baseline, and whether it met its target."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class Figure:
    name: str
    value: float | None
    unit: str
    target: str
    passed: bool
    samples: int
    baseline: float | None = None
    ratio: float | None = None
    p50: float | None = None
    p99: float | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failed(cls, name: str, unit: str, target: str, error: BaseException) -> "Figure":
        """A figure that could not be measured; it never counts as passed."""
        return cls(name=name, value=None, unit=unit, target=target, passed=False, samples=0,
                   notes=f"not measured: {error.__class__.__name__}: {error}")

    @property
    def is_latency(self) -> bool:
        return self.p99 is not None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "value": self.value, "unit": self.unit, "baseline": self.baseline}
        if self.is_latency:
            data["p50"] = self.p50
            data["p99"] = self.p99
        else:
            data["ratio"] = self.ratio
        data.update({"target": self.target, "passed": self.passed, "samples": self.samples, "notes": self.notes})
        if self.extra:
            data.update(self.extra)
        return data


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or not baseline:
        return None
    return value / baseline


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

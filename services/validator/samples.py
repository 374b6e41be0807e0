"""The raw data of a soak run as values: what every replica measured, cycle by cycle. No I/O.

A soak runs a candidate adapter on R candidate replicas and R baseline replicas
(the adapter in production, or the base model when none is) for C cycles of E
evaluation episodes each. The replica runner (``soak.run_soak``) stores what
they measured as *raw data*; ``judgement`` computes every verdict from it, so a
stored run can be judged again. The episode metrics are listed in ``replica``.

Raw data (JSON)::

    {
      "validation_id": "val-3f2a...",
      "adapter_sha256": "<64 hex>",                  # the candidate
      "baseline": {"kind": "production" | "base", "adapter_sha256": "<64 hex>" | null},
      "kind": "mntp" | "rl",
      "cycles": [
        {
          "cycle": 1,                                # 1-based
          "replicas": [
            {
              "replica_id": "candidate-0",
              "side": "candidate" | "baseline",
              "samples": {                           # one value per episode
                "mntp_loss": [2.31, 2.28, ...],      # MNTP adapters
                "mntp_accuracy": [0.41, ...],
                "reward": [0.8, ...],                # RL adapters
                "latency_ms": [41.0, ...],
                "rss_mb": [812.5, ...],
                "errors": [0, 0, 1, ...]
              },
              "incident": null | {"reason": "killed by the OOM killer after episode 12"},
              "load": {"rss_mb": 812.5, "cpu_percent": 93.0, "latency_ms": 41.2}   # optional
            }
          ]
        }
      ]
    }

A replica that crashed keeps the samples it produced before the crash and
carries an ``incident``; the verdict reports the resulting sample sizes per
side, so a reduced sample is visible rather than silently averaged away.
``load`` is the replica's own resource summary for the cycle; when it is
absent, rss and latency are summarised from the samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

SIDES = ("candidate", "baseline")


class Sides(NamedTuple):
    """One metric's samples, pooled per side."""

    candidate: Sequence[float]
    baseline: Sequence[float]


@dataclass(frozen=True)
class Incident:
    cycle: int
    replica_id: str
    side: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"cycle": self.cycle, "replica_id": self.replica_id, "side": self.side, "reason": self.reason}

    def describe(self) -> str:
        return f"cycle {self.cycle}, {self.side} replica {self.replica_id}: {self.reason}"


@dataclass(frozen=True)
class ReplicaResult:
    replica_id: str
    side: str
    samples: Mapping[str, tuple[float, ...]]
    incident: Mapping[str, Any] | None = None
    load: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"replica {self.replica_id}: side must be one of {SIDES}, not {self.side!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ReplicaResult":
        try:
            samples = {m: tuple(float(v) for v in values) for m, values in (data.get("samples") or {}).items()}
            return cls(
                replica_id=str(data["replica_id"]),
                side=data["side"],
                samples=samples,
                incident=dict(data["incident"]) if data.get("incident") else None,
                load=dict(data["load"]) if data.get("load") else None,
            )
        except KeyError as exc:
            raise ValueError(f"replica result lacks {exc.args[0]!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "replica_id": self.replica_id,
            "side": self.side,
            "samples": {m: list(v) for m, v in self.samples.items()},
            "incident": dict(self.incident) if self.incident else None,
            "load": dict(self.load) if self.load else None,
        }

    @property
    def episodes(self) -> int:
        return max((len(v) for v in self.samples.values()), default=0)

    def load_summary(self) -> dict[str, Any]:
        load = dict(self.load or {})
        rss = load.get("rss_mb", _summary(self.samples.get("rss_mb"), max))
        latency = load.get("latency_ms", _summary(self.samples.get("latency_ms"), _median))
        return {
            "replica_id": self.replica_id,
            "side": self.side,
            "episodes": self.episodes,
            "rss_mb": json_number(rss),
            "cpu_percent": json_number(load.get("cpu_percent")),
            "latency_ms": json_number(latency),
            "incident": (self.incident or {}).get("reason") if self.incident else None,
        }


@dataclass(frozen=True)
class CycleSamples:
    """One cycle's replica results; samples are pooled per side per metric."""

    cycle: int
    replicas: tuple[ReplicaResult, ...] = ()

    @classmethod
    def from_raw(cls, data: Mapping[str, Any]) -> "CycleSamples":
        if "cycle" not in data:
            raise ValueError("raw cycle lacks 'cycle'")
        return cls(int(data["cycle"]), tuple(ReplicaResult.from_dict(r) for r in data.get("replicas") or ()))

    def side(self, side: str) -> dict[str, list[float]]:
        pooled: dict[str, list[float]] = {}
        for replica in self.replicas:
            if replica.side == side:
                for metric, values in replica.samples.items():
                    pooled.setdefault(metric, []).extend(values)
        return pooled

    def by_metric(self) -> dict[str, Sides]:
        candidate, baseline = self.side("candidate"), self.side("baseline")
        return {m: Sides(candidate.get(m, []), baseline.get(m, [])) for m in sorted({*candidate, *baseline})}

    @property
    def incidents(self) -> tuple[Incident, ...]:
        return tuple(
            Incident(self.cycle, r.replica_id, r.side, str(r.incident.get("reason", "unspecified")))
            for r in self.replicas
            if r.incident
        )


def json_number(value: Any) -> float | None:
    """A float JSON can carry: None for missing, infinite or NaN values."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _summary(values: Sequence[float] | None, fn: Any) -> float | None:
    return fn(values) if values else None

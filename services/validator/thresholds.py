"""The judgement configuration of a soak: what counts as better, worse or the same.

A ``Thresholds`` value is data, stored in every verdict, so a verdict can be
re-judged later on the same raw samples with the same (or stricter) settings.
It is read from JSON or YAML (``threshold_file.load_thresholds``); a file only names what it changes, everything else
keeps the defaults below::

    pass_score: 0.6
    metrics:
      latency_ms: {min_effect: 0.03}
      tokens_per_s: {direction: higher, group: performance, weight: 1}
      retrieval_mrr: {min_effect: 0.1}      # an encoder's tolerance on retrieval
    collapse_max_distinct_share: 0.2

Per metric:

* ``direction`` — ``lower`` or ``higher`` is better;
* ``min_effect`` — the smallest change that matters in practice; a
  statistically significant change below it is judged "same". Measured as the
  Hodges-Lehmann shift relative to the baseline median
  (``effect_measure: relative_shift``), as the rank-biserial correlation
  (``rank_biserial``), which suits counts such as errors whose median is 0,
  or as the shift itself in the metric's units (``absolute_shift``), which
  suits scores in [0, 1] such as retrieval recall@1 and MRR;
* ``alpha`` — significance level of each one-sided test (and of the KS test);
* ``critical`` — a significant, material regression vetoes the whole run;
* ``group`` and ``weight`` — how the metric feeds the score;
* ``shape_check`` — also run the KS test and judge the tail at
  ``tail_quantile``, so a wider spread with an unchanged median is caught;
* ``kinds`` — adapter kinds (``mntp``, ``rl``) the metric is expected for; an
  expected metric with no samples makes the run inconclusive, never a pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

from shared.contracts.collapse import MAX_DISTINCT_SHARE, MAX_SPREAD

DIRECTIONS = ("lower", "higher")
RETRIEVAL_RECALL, RETRIEVAL_MRR = "retrieval_recall_at_1", "retrieval_mrr"
EFFECT_MEASURES = ("relative_shift", "rank_biserial", "absolute_shift")
KINDS = ("mntp", "rl")


@dataclass(frozen=True)
class MetricSpec:
    direction: str
    min_effect: float = 0.02
    alpha: float = 0.01
    critical: bool = False
    group: str = "quality"
    weight: float = 1.0
    effect_measure: str = "relative_shift"
    shape_check: bool = False
    tail_quantile: float = 0.95
    kinds: tuple[str, ...] = KINDS

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {self.direction!r}")
        if self.effect_measure not in EFFECT_MEASURES:
            raise ValueError(f"effect_measure must be one of {EFFECT_MEASURES}, not {self.effect_measure!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must lie strictly between 0 and 1, not {self.alpha}")
        if self.min_effect < 0.0:
            raise ValueError("min_effect must not be negative")
        if self.weight < 0.0:
            raise ValueError("weight must not be negative")
        if not 0.5 <= self.tail_quantile < 1.0:
            raise ValueError("tail_quantile must lie in [0.5, 1)")
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown adapter kinds {sorted(unknown)}; known: {KINDS}")
        # YAML and JSON give lists; a tuple keeps the spec immutable.
        object.__setattr__(self, "kinds", tuple(self.kinds))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kinds"] = list(self.kinds)
        return data


def default_metrics() -> dict[str, MetricSpec]:
    return {
        # The training objective itself: a worse held-out loss is never traded
        # for speed.
        "mntp_loss": MetricSpec("lower", min_effect=0.01, critical=True, group="quality", weight=2.0, kinds=("mntp",)),
        "mntp_accuracy": MetricSpec("higher", min_effect=0.01, group="quality", weight=1.0, kinds=("mntp",)),
        "reward": MetricSpec("higher", min_effect=0.02, critical=True, group="quality", weight=3.0, kinds=("rl",)),
        # An encoder must not find related text worse than its baseline: a gate, not a score (weight 0).
        # Both lie in [0, 1] and may be 0 on the baseline, so a change is measured in their own units:
        # ``min_effect`` is the tolerance, the loss of recall@1 or MRR still taken as "no worse".
        # Judged when the soak measured it (MNTP soaks do), so older raw data re-judges as it was.
        RETRIEVAL_RECALL: MetricSpec("higher", min_effect=0.1, critical=True, group="quality", weight=0.0,
                                     effect_measure="absolute_shift", kinds=()),
        RETRIEVAL_MRR: MetricSpec("higher", min_effect=0.1, critical=True, group="quality", weight=0.0,
                                  effect_measure="absolute_shift", kinds=()),
        # Users feel the tail of latency, so a wider spread counts even when the
        # median holds.
        "latency_ms": MetricSpec("lower", min_effect=0.05, group="performance", weight=2.0, shape_check=True),
        "rss_mb": MetricSpec("lower", min_effect=0.05, group="performance", weight=1.0),
        # Most episodes have no error, so the median shift is 0 even when
        # errors appear; the rank-biserial correlation still sees them.
        "errors": MetricSpec(
            "lower", min_effect=0.05, critical=True, group="reliability", weight=1.0, effect_measure="rank_biserial"
        ),
    }


def default_groups() -> dict[str, float]:
    return {"quality": 0.6, "performance": 0.25, "reliability": 0.15}


SCALARS = ("pass_score", "marginal_score", "consecutive_failures", "min_samples", "collapse_max_spread",
           "collapse_max_distinct_share")


@dataclass(frozen=True)
class Thresholds:
    """Metric scores are better 1, same 0.5, worse 0; a group scores the weighted
    mean of its metrics with data, the run the weighted mean of its groups.
    ``pass_score`` above 0.5 means "no worse everywhere" is not enough: the
    candidate must win somewhere. Between ``marginal_score`` and ``pass_score``
    the verdict is inconclusive; below, fail."""

    metrics: Mapping[str, MetricSpec] = field(default_factory=default_metrics)
    groups: Mapping[str, float] = field(default_factory=default_groups)
    pass_score: float = 0.55
    marginal_score: float = 0.45
    consecutive_failures: int = 3
    min_samples: int = 10
    # An RL policy has collapsed, and fails whatever its mean reward, when its median reward spread
    # within an episode and its median share of distinct answers to a prompt are both below these
    # (``shared.contracts.collapse``, the rule the trainer applies too).
    collapse_max_spread: float = MAX_SPREAD
    collapse_max_distinct_share: float = MAX_DISTINCT_SHARE

    def __post_init__(self) -> None:
        if not 0.0 <= self.marginal_score <= self.pass_score <= 1.0:
            raise ValueError("need 0 <= marginal_score <= pass_score <= 1")
        if self.consecutive_failures < 1:
            raise ValueError("consecutive_failures must be at least 1")
        if self.min_samples < 2:
            raise ValueError("min_samples must be at least 2")
        missing = {spec.group for spec in self.metrics.values()} - set(self.groups)
        if missing:
            raise ValueError(f"metrics name groups without a weight: {sorted(missing)}")
        if any(w < 0 for w in self.groups.values()):
            raise ValueError("group weights must not be negative")
        if self.collapse_max_spread < 0 or not 0.0 <= self.collapse_max_distinct_share <= 1.0:
            raise ValueError("need collapse_max_spread >= 0 and collapse_max_distinct_share in [0, 1]")

    @classmethod
    def default(cls) -> "Thresholds":
        return cls()

    def metrics_for(self, kind: str) -> list[str]:
        return [name for name, spec in self.metrics.items() if kind in spec.kinds]

    def with_metric(self, name: str, **changes: Any) -> "Thresholds":
        metrics = dict(self.metrics)
        metrics[name] = replace(metrics[name], **changes)
        return replace(self, metrics=metrics)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": {name: spec.to_dict() for name, spec in self.metrics.items()},
            "groups": dict(self.groups),
            "pass_score": self.pass_score,
            "marginal_score": self.marginal_score,
            "consecutive_failures": self.consecutive_failures,
            "min_samples": self.min_samples,
            "collapse_max_spread": self.collapse_max_spread,
            "collapse_max_distinct_share": self.collapse_max_distinct_share,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: "Thresholds | None" = None) -> "Thresholds":
        """Overlay ``data`` on ``base`` (the defaults): a metric entry changes only
        the fields it names; a metric unknown to ``base`` needs a direction."""
        base = base or cls()
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown threshold settings: {sorted(unknown)}")
        metrics = dict(base.metrics)
        spec_fields = {f.name for f in fields(MetricSpec)}
        for name, overrides in (data.get("metrics") or {}).items():
            overrides = dict(overrides or {})
            bad = set(overrides) - spec_fields
            if bad:
                raise ValueError(f"metric {name}: unknown settings {sorted(bad)}")
            if "kinds" in overrides:
                overrides["kinds"] = tuple(overrides["kinds"])
            if name in metrics:
                metrics[name] = replace(metrics[name], **overrides)
            else:
                if "direction" not in overrides:
                    raise ValueError(f"metric {name}: a new metric needs a direction")
                metrics[name] = MetricSpec(**overrides)
        groups = {**base.groups, **(data.get("groups") or {})}
        scalars = {k: data[k] for k in SCALARS if k in data}
        return replace(base, metrics=metrics, groups=groups, **scalars)

    @classmethod
    def restore(cls, data: Mapping[str, Any]) -> "Thresholds":
        """Exactly the thresholds stored in a verdict, without today's defaults."""
        return cls.from_dict(data, base=cls(metrics={}, groups={}))

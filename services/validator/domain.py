"""The validator's rules: soak verdicts and the validation run aggregate. No I/O.

A soak runs a candidate adapter on R candidate replicas and R baseline replicas
(the adapter in production, or the base model when none is) for C cycles of E
evaluation episodes each. The replica runner writes what it measured as *raw
data*; every verdict is computed from raw data by pure functions, so a stored
run can be re-judged (``rejudge``) with the same or other thresholds.

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

Judgement, from the bottom up:

* ``judge_metric`` — one metric, candidate vs baseline: better, worse, same
  or no_data (see ``stats`` and ``thresholds``);
* ``judge_cycle`` — all metrics of one cycle: a critical metric judged worse
  vetoes (fail); otherwise the weighted score decides pass, marginal or fail;
  a critical metric without data makes the cycle inconclusive;
* ``judge_run`` — all cycles: the pooled samples are judged as one cycle; a
  long soak (at least ``consecutive_failures`` cycles) fails only after that
  many consecutive failing cycles, because one bad cycle on a shared machine
  is weather, not climate.

The aggregate (``initial_state``/``evolve``/``decide``) starts a run on a
usable ``training.completed`` or a ``StartDriftSoak`` command, records each
cycle (``CycleFinished``) and closes the run (``RunFinished`` or
``AbandonRun``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from shared.contracts.envelope import NewEvent, iso
from services.validator.stats import DEFAULT_MIN_N, SampleComparison, compare_samples
from services.validator.thresholds import KINDS, MetricSpec, Thresholds
from shared.contracts.values import parse_time

SIDES = ("candidate", "baseline")
METRIC_SCORES = {"better": 1.0, "same": 0.5, "worse": 0.0}

# ---------------------------------------------------------------------------
# One metric
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricVerdict:
    """``effect`` is oriented so that positive means better, in the spec's
    effect measure (relative shift or rank-biserial correlation)."""

    metric: str
    outcome: str  # better | worse | same | no_data
    reason: str
    critical: bool
    comparison: SampleComparison
    effect: float | None = None

    @property
    def n_candidate(self) -> int:
        return self.comparison.n_candidate

    @property
    def n_baseline(self) -> int:
        return self.comparison.n_baseline

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "outcome": self.outcome,
            "reason": self.reason,
            "critical": self.critical,
            "effect": _json_number(self.effect),
            **self.comparison.to_dict(),
        }


def judge_metric(
    name: str,
    candidate_samples: Iterable[float],
    baseline_samples: Iterable[float],
    spec: MetricSpec,
    *,
    min_samples: int = DEFAULT_MIN_N,
) -> MetricVerdict:
    """Better or worse only when significant at ``spec.alpha`` *and* at least
    ``spec.min_effect`` large; a significant but immaterial change is "same"."""
    comparison = compare_samples(
        candidate_samples,
        baseline_samples,
        direction=spec.direction,
        min_n=min_samples,
        # two one-sided tests at alpha agree with a two-sided interval at 1 - 2 alpha
        confidence=max(1.0 - 2.0 * spec.alpha, 0.5),
        tail_quantile=spec.tail_quantile,
    )
    c = comparison
    if c.no_data:
        reason = (
            f"{name}: no data (candidate n={c.n_candidate}, baseline n={c.n_baseline}, "
            f"at least {c.min_n} needed on each side)"
        )
        return MetricVerdict(name, "no_data", reason, spec.critical, comparison)

    better_sign = -1.0 if spec.direction == "lower" else 1.0
    raw_effect = c.relative_shift if spec.effect_measure == "relative_shift" else c.rank_biserial
    effect = better_sign * raw_effect
    location_worse = c.p_worse < spec.alpha and effect < 0 and -effect >= spec.min_effect
    location_better = c.p_better < spec.alpha and effect > 0 and effect >= spec.min_effect

    tail_effect = better_sign * c.relative_tail_shift
    shape_changed = spec.shape_check and c.p_ks < spec.alpha
    tail_worse = shape_changed and tail_effect < 0 and -tail_effect >= spec.min_effect
    tail_better = shape_changed and tail_effect > 0 and tail_effect >= spec.min_effect

    location = _describe_location(c, spec, effect)
    if location_worse:
        outcome, reason = "worse", f"{name} worse: {location}"
    elif tail_worse:
        outcome = "worse"
        reason = f"{name} worse in the tail: {_describe_tail(c, spec)}; location: {location}"
    elif location_better:
        outcome, reason = "better", f"{name} better: {location}"
    elif tail_better:
        outcome = "better"
        reason = f"{name} better in the tail: {_describe_tail(c, spec)}; location: {location}"
    else:
        outcome = "same"
        reason = f"{name} same: {location}"
        if spec.shape_check:
            reason += f"; shape: KS D={c.ks_statistic:.3f}, p={c.p_ks:.2g}"
    return MetricVerdict(name, outcome, reason, spec.critical, comparison, effect)


def _describe_location(c: SampleComparison, spec: MetricSpec, effect: float) -> str:
    if spec.effect_measure == "rank_biserial":
        size = f"rank-biserial r={c.rank_biserial:+.3f}"
    else:
        size = f"{_pct(c.relative_shift)} of baseline median {c.baseline_median:.4g}"
    p_dir = min(c.p_better, c.p_worse)
    significant = p_dir < spec.alpha
    material = abs(effect) >= spec.min_effect
    verdict = (
        "significant and material" if significant and material
        else "significant but below the minimum effect" if significant
        else "not significant"
    )
    return (
        f"shift {c.shift:+.4g} ({size}), {c.confidence:.0%} CI [{c.shift_ci_low:.4g}, {c.shift_ci_high:.4g}], "
        f"one-sided p={p_dir:.2g} vs alpha {spec.alpha}, minimum effect {spec.min_effect:g} ({verdict}; "
        f"n={c.n_candidate} vs {c.n_baseline})"
    )


def _describe_tail(c: SampleComparison, spec: MetricSpec) -> str:
    return (
        f"p{c.tail_quantile * 100:.0f} {c.candidate_tail:.4g} vs {c.baseline_tail:.4g} "
        f"({_pct(c.relative_tail_shift)}), KS D={c.ks_statistic:.3f} p={c.p_ks:.2g} < {spec.alpha}"
    )


def _pct(value: float) -> str:
    return f"{value:+.1%}" if math.isfinite(value) else ("+inf" if value > 0 else "-inf")


# ---------------------------------------------------------------------------
# One cycle
# ---------------------------------------------------------------------------


class Sides(NamedTuple):
    candidate: Sequence[float]
    baseline: Sequence[float]


@dataclass(frozen=True)
class CycleVerdict:
    cycle: int | None  # None for the pooled judgement of a whole run
    outcome: str  # pass | marginal | fail | inconclusive
    score: float | None
    group_scores: Mapping[str, float]
    metrics: Mapping[str, MetricVerdict]
    vetoes: tuple[str, ...]
    reason: str

    @property
    def failing(self) -> bool:
        return self.outcome == "fail"

    def to_dict(self) -> dict[str, Any]:
        return {
            "cycle": self.cycle,
            "outcome": self.outcome,
            "score": self.score,
            "group_scores": dict(self.group_scores),
            "metrics": {name: mv.to_dict() for name, mv in self.metrics.items()},
            "vetoes": list(self.vetoes),
            "reason": self.reason,
        }


def judge_cycle(
    samples_by_metric: Mapping[str, Sides | tuple[Sequence[float], Sequence[float]]],
    thresholds: Thresholds,
    *,
    kind: str | None = None,
    cycle: int | None = None,
) -> CycleVerdict:
    """``samples_by_metric`` maps a metric to its (candidate, baseline) samples.

    With ``kind`` every metric expected for that adapter kind is judged, and a
    missing one counts as no data; without it only the metrics present are."""
    names = [
        name
        for name, spec in thresholds.metrics.items()
        if name in samples_by_metric or (kind is not None and kind in spec.kinds)
    ]
    metrics: dict[str, MetricVerdict] = {}
    for name in names:
        candidate, baseline = samples_by_metric.get(name, ((), ()))
        metrics[name] = judge_metric(
            name, candidate, baseline, thresholds.metrics[name], min_samples=thresholds.min_samples
        )

    vetoes = tuple(n for n, mv in metrics.items() if mv.critical and mv.outcome == "worse")
    blind = tuple(n for n, mv in metrics.items() if mv.critical and mv.outcome == "no_data")
    score, group_scores = _score(metrics, thresholds)
    label = f"cycle {cycle}" if cycle is not None else "all cycles"

    if vetoes:
        outcome = "fail"
        head = f"{label}: fail, critical {'metric' if len(vetoes) == 1 else 'metrics'} worse: " + "; ".join(
            metrics[n].reason for n in vetoes
        )
    elif blind:
        outcome = "inconclusive"
        head = f"{label}: inconclusive, no data for critical " + ", ".join(blind)
    elif score is None:
        outcome = "inconclusive"
        head = f"{label}: inconclusive, no metric had enough samples"
    elif score >= thresholds.pass_score:
        outcome = "pass"
        head = f"{label}: pass, score {score:.3f} >= {thresholds.pass_score}"
    elif score >= thresholds.marginal_score:
        outcome = "marginal"
        head = f"{label}: marginal, score {score:.3f} between {thresholds.marginal_score} and {thresholds.pass_score}"
    else:
        outcome = "fail"
        head = f"{label}: fail, score {score:.3f} < {thresholds.marginal_score}"
    return CycleVerdict(cycle, outcome, score, group_scores, metrics, vetoes, head + _tally(metrics))


def _score(metrics: Mapping[str, MetricVerdict], thresholds: Thresholds) -> tuple[float | None, dict[str, float]]:
    by_group: dict[str, list[tuple[float, float]]] = {}
    for name, mv in metrics.items():
        if mv.outcome == "no_data":
            continue
        spec = thresholds.metrics[name]
        by_group.setdefault(spec.group, []).append((spec.weight, METRIC_SCORES[mv.outcome]))
    group_scores: dict[str, float] = {}
    for group, pairs in by_group.items():
        weight = sum(w for w, _ in pairs)
        if weight > 0:
            group_scores[group] = sum(w * s for w, s in pairs) / weight
    total = sum(thresholds.groups[g] for g in group_scores)
    if total <= 0:
        return None, group_scores
    return sum(thresholds.groups[g] * s for g, s in group_scores.items()) / total, group_scores


def _tally(metrics: Mapping[str, MetricVerdict]) -> str:
    parts = []
    for outcome in ("worse", "better", "same", "no_data"):
        names = [n for n, mv in metrics.items() if mv.outcome == outcome]
        if names:
            parts.append(f"{outcome.replace('_', ' ')}: {', '.join(names)}")
    return f" ({'; '.join(parts)})" if parts else ""


# ---------------------------------------------------------------------------
# Raw data of a run
# ---------------------------------------------------------------------------


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
            "rss_mb": _json_number(rss),
            "cpu_percent": _json_number(load.get("cpu_percent")),
            "latency_ms": _json_number(latency),
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


# ---------------------------------------------------------------------------
# A whole run
# ---------------------------------------------------------------------------

VERDICT_ORDER = {"fail": 0, "inconclusive": 1, "pass": 2}


@dataclass(frozen=True)
class Verdict:
    outcome: str  # pass | fail | inconclusive
    reason: str
    score: float | None
    pooled: CycleVerdict
    cycles: tuple[CycleVerdict, ...]
    longest_failing_streak: int
    sample_sizes: Mapping[str, Mapping[str, int]]  # side -> metric -> n (pooled)
    replicas: Mapping[str, Mapping[str, int]]  # side -> {"replicas", "with_incident"}
    incidents: tuple[Incident, ...]
    thresholds: Thresholds

    @property
    def metrics(self) -> Mapping[str, MetricVerdict]:
        return self.pooled.metrics

    @property
    def vetoes(self) -> tuple[str, ...]:
        return self.pooled.vetoes

    def to_payload(self) -> dict[str, Any]:
        return {
            "verdict": self.outcome,
            "explanation": self.reason,
            "score": self.score,
            "metrics": {name: mv.to_dict() for name, mv in self.pooled.metrics.items()},
            "vetoes": list(self.pooled.vetoes),
            "cycles": [
                {"cycle": c.cycle, "outcome": c.outcome, "score": c.score, "vetoes": list(c.vetoes)}
                for c in self.cycles
            ],
            "cycles_judged": len(self.cycles),
            "failing_streak": self.longest_failing_streak,
            "sample_sizes": {side: dict(sizes) for side, sizes in self.sample_sizes.items()},
            "replicas": {side: dict(counts) for side, counts in self.replicas.items()},
            "incidents": [i.to_dict() for i in self.incidents],
            "thresholds": self.thresholds.to_dict(),
        }


def longest_failing_streak(outcomes: Iterable[str]) -> int:
    """Inconclusive cycles neither extend nor break a streak: a cycle lost to a
    crash says nothing about the candidate either way."""
    longest = current = 0
    for outcome in outcomes:
        if outcome == "fail":
            current += 1
            longest = max(longest, current)
        elif outcome != "inconclusive":
            current = 0
    return longest


def _longest_failing_cycles(verdicts: Sequence[CycleVerdict]) -> list[CycleVerdict]:
    best: list[CycleVerdict] = []
    current: list[CycleVerdict] = []
    for verdict in verdicts:
        if verdict.outcome == "fail":
            current.append(verdict)
            if len(current) > len(best):
                best = list(current)
        elif verdict.outcome != "inconclusive":
            current = []
    return best


def current_failing_streak(outcomes: Sequence[str]) -> int:
    streak = 0
    for outcome in reversed(outcomes):
        if outcome == "fail":
            streak += 1
        elif outcome != "inconclusive":
            break
    return streak


def judge_run(cycles: Sequence[CycleSamples], thresholds: Thresholds, *, kind: str | None = None) -> Verdict:
    ordered = sorted(cycles, key=lambda c: c.cycle)
    cycle_verdicts = tuple(judge_cycle(c.by_metric(), thresholds, kind=kind, cycle=c.cycle) for c in ordered)

    pooled_sides = CycleSamples(0, tuple(r for c in ordered for r in c.replicas))
    pooled = judge_cycle(pooled_sides.by_metric(), thresholds, kind=kind, cycle=None)
    incidents = tuple(i for c in ordered for i in c.incidents)
    sample_sizes = {
        "candidate": {n: mv.n_candidate for n, mv in pooled.metrics.items()},
        "baseline": {n: mv.n_baseline for n, mv in pooled.metrics.items()},
    }
    replicas = {
        side: {
            "replicas": len({r.replica_id for c in ordered for r in c.replicas if r.side == side}),
            "with_incident": len({i.replica_id for i in incidents if i.side == side}),
        }
        for side in SIDES
    }

    limit = thresholds.consecutive_failures
    streak = longest_failing_streak(v.outcome for v in cycle_verdicts)
    long_soak = len(cycle_verdicts) >= limit

    if not ordered:
        outcome, head = "inconclusive", "inconclusive: no cycle was recorded"
    elif long_soak and streak >= limit:
        run_of_failures = _longest_failing_cycles(cycle_verdicts)
        outcome = "fail"
        head = (
            f"fail: {streak} consecutive failing cycles "
            f"({', '.join(str(v.cycle) for v in run_of_failures)}) reached the limit of {limit}; "
            f"latest: {run_of_failures[-1].reason}"
        )
    elif pooled.outcome == "fail" and long_soak:
        outcome = "inconclusive"
        head = (
            f"inconclusive: the pooled samples fail but no {limit} consecutive cycles failed "
            f"(longest streak {streak}); {pooled.reason}"
        )
    elif pooled.outcome == "fail":
        outcome, head = "fail", f"fail: {pooled.reason}"
    elif pooled.outcome == "inconclusive":
        outcome, head = "inconclusive", f"inconclusive: {pooled.reason}"
    elif pooled.outcome == "marginal":
        outcome, head = "inconclusive", f"inconclusive (marginal): {pooled.reason}"
    else:
        outcome, head = "pass", f"pass: {pooled.reason}"

    reason = (
        f"{head}. {len(cycle_verdicts)} cycles judged, longest failing streak {streak}. "
        f"{_sample_size_sentence(sample_sizes, replicas, incidents)}"
    )
    return Verdict(
        outcome, reason, pooled.score, pooled, cycle_verdicts, streak, sample_sizes, replicas, incidents, thresholds
    )


def rejudge(raw_data: Mapping[str, Any], thresholds: Thresholds) -> Verdict:
    """Judge stored raw data (format in the module docstring) again."""
    if "cycles" not in raw_data:
        raise ValueError("raw data lacks 'cycles'")
    kind = raw_data.get("kind")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"raw data kind must be one of {KINDS}, not {kind!r}")
    return judge_run([CycleSamples.from_raw(c) for c in raw_data["cycles"]], thresholds, kind=kind)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _sample_size_sentence(
    sample_sizes: Mapping[str, Mapping[str, int]],
    replicas: Mapping[str, Mapping[str, int]],
    incidents: Sequence[Incident],
) -> str:
    def sizes(side: str) -> str:
        values = sample_sizes[side]
        if not values:
            return "no samples"
        distinct = set(values.values())
        if len(distinct) == 1:
            return f"n={distinct.pop()} per metric"
        return ", ".join(f"{m} n={n}" for m, n in values.items())

    text = (
        f"Sample sizes: candidate {sizes('candidate')} from {_count(replicas['candidate']['replicas'], 'replica')}, "
        f"baseline {sizes('baseline')} from {_count(replicas['baseline']['replicas'], 'replica')}."
    )
    reduced = [
        m for m in sample_sizes["candidate"]
        if sample_sizes["candidate"][m] != sample_sizes["baseline"].get(m)
    ]
    if reduced:
        text += " Unequal sample sizes: " + ", ".join(
            f"{m} candidate {sample_sizes['candidate'][m]} vs baseline {sample_sizes['baseline'].get(m, 0)}"
            for m in reduced
        ) + "."
    if incidents:
        text += f" {len(incidents)} incident{'s' if len(incidents) > 1 else ''}: " + "; ".join(
            i.describe() for i in incidents
        ) + "."
    return text


# ---------------------------------------------------------------------------
# The validation run aggregate
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SoakPlan:
    replicas: int = 3
    cycles: int = 6
    episodes: int = 20
    # A drift run with no result after this long is presumed dead and is closed
    # as inconclusive when the next drift run is due, so it cannot block it.
    drift_stale_after_s: float = 6 * 3600.0
    # The advice this plan was sized to (see ``fitted``): the ``scaling.recommended`` event and
    # the replica processes it allowed. A run started on the plan names them, for the audit.
    advice_event_id: str | None = None
    advised_processes: int | None = None

    def fitted(self, replica_processes: int | None, min_samples: int, advice_event_id: str | None = None) -> SoakPlan:
        """This plan sized to the replica processes the energy service says the node can run at
        once (``scaling.recommended``'s ``validator_replicas``, from the event ``advice_event_id``;
        None: no advice, as planned).

        Every candidate replica has a baseline twin running beside it, so a soak of R replicas
        per side is 2R processes: R is at most half the advice, and at least one of each side
        (an advice of 0, an energy budget used up or no memory to spare, gets that smallest
        soak: a candidate already trained is still judged, on the fewest processes). Fewer
        replicas run more episodes each, so every cycle still has the samples a verdict needs.
        Fit the configured plan: a fitted one fitted again keeps its replicas but not its advice.
        """
        advised = replica_processes is not None
        replicas = max(1, min(self.replicas, replica_processes // 2)) if advised else self.replicas
        return replace(self, replicas=replicas, episodes=max(self.episodes, -(-min_samples // replicas)),
                       advice_event_id=advice_event_id if advised else None, advised_processes=replica_processes)

    def sizing(self) -> dict[str, Any] | None:
        """What sized this plan, as ``validation.started`` records it: None when it runs as configured."""
        if self.advised_processes is None:
            return None
        return {"event_id": self.advice_event_id, "validator_replicas": self.advised_processes}


@dataclass(frozen=True)
class Baseline:
    kind: str = "base"  # production | base
    adapter_sha256: str | None = None
    adapter_uri: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "adapter_sha256": self.adapter_sha256, "adapter_uri": self.adapter_uri}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Baseline":
        return cls(data.get("kind", "base"), data.get("adapter_sha256"), data.get("adapter_uri"))


@dataclass(frozen=True)
class ValidationRun:
    validation_id: str
    adapter_sha256: str
    adapter_uri: str
    baseline: Baseline
    kind: str
    purpose: str  # candidate | drift
    cycle_id: str | None
    replicas: int
    cycles: int
    episodes: int
    started_at: datetime | None = None
    status: str = "running"  # running | completed
    cycle_outcomes: Mapping[int, str] = field(default_factory=dict)
    verdict: str | None = None

    @property
    def active(self) -> bool:
        return self.status == "running"


@dataclass(frozen=True)
class ValidatorState:
    runs: Mapping[str, ValidationRun] = field(default_factory=dict)
    production: Mapping[str, Baseline] = field(default_factory=dict)  # adapter kind -> adapter in production
    plan: SoakPlan = field(default_factory=SoakPlan)
    thresholds: Thresholds = field(default_factory=Thresholds)


@dataclass(frozen=True)
class StartDriftSoak:
    """Soak the adapter in production again, to catch drift over time."""

    adapter_sha256: str
    adapter_uri: str
    kind: str
    requested_at: datetime
    baseline: Baseline = field(default_factory=Baseline)
    validation_id: str | None = None
    cycle_id: str | None = None


@dataclass(frozen=True)
class CycleFinished:
    validation_id: str
    cycle: int
    replicas: Sequence[ReplicaResult | Mapping[str, Any]]


@dataclass(frozen=True)
class RunFinished:
    validation_id: str
    raw_data: Mapping[str, Any]
    raw_data_uri: str


@dataclass(frozen=True)
class AbandonRun:
    """The runner lost the run (node gone, replicas unrecoverable)."""

    validation_id: str
    reason: str


def initial_state(plan: SoakPlan | None = None, thresholds: Thresholds | None = None) -> ValidatorState:
    return ValidatorState(plan=plan or SoakPlan(), thresholds=thresholds or Thresholds())


def evolve(state: ValidatorState, event: Any) -> ValidatorState:
    """Folds the validator's own events, and ``adapter.promoted`` to know the
    baseline of the next candidate run (the adapter in production per kind)."""
    payload = event.payload
    if event.type == "validation.started":
        started = payload.get("started_at")
        run = ValidationRun(
            validation_id=payload["validation_id"],
            adapter_sha256=payload["adapter_sha256"],
            adapter_uri=payload["adapter_uri"],
            baseline=Baseline.from_dict(payload["baseline"]),
            kind=payload["kind"],
            purpose=payload["purpose"],
            cycle_id=payload.get("cycle_id"),
            replicas=payload["replicas"],
            cycles=payload["cycles"],
            episodes=payload["episodes"],
            started_at=parse_time(started) if started else getattr(event, "occurred_at", None),
        )
        return replace(state, runs={**state.runs, run.validation_id: run})
    if event.type == "validation.cycle_completed":
        run = state.runs.get(payload["validation_id"])
        if run is None:
            return state
        outcomes = {**run.cycle_outcomes, int(payload["cycle"]): payload["outcome"]}
        return replace(state, runs={**state.runs, run.validation_id: replace(run, cycle_outcomes=outcomes)})
    if event.type == "validation.completed":
        run = state.runs.get(payload["validation_id"])
        if run is None:
            return state
        closed = replace(run, status="completed", verdict=payload["verdict"])
        return replace(state, runs={**state.runs, run.validation_id: closed})
    if event.type == "adapter.promoted":
        kind = payload.get("kind", "mntp")
        promoted = Baseline("production", payload["adapter_sha256"], payload.get("adapter_uri"))
        return replace(state, production={**state.production, kind: promoted})
    return state


def decide(command_or_event: Any, state: ValidatorState) -> list[NewEvent]:
    if isinstance(command_or_event, StartDriftSoak):
        return _start_drift_soak(command_or_event, state)
    if isinstance(command_or_event, CycleFinished):
        return _finish_cycle(command_or_event, state)
    if isinstance(command_or_event, RunFinished):
        return _finish_run(command_or_event, state)
    if isinstance(command_or_event, AbandonRun):
        run = _known_run(state, command_or_event.validation_id)
        return [_abandoned(run, command_or_event.reason, state.thresholds)] if run.active else []
    if getattr(command_or_event, "type", None) == "training.completed":
        return _on_training_completed(command_or_event, state)
    return []


def _on_training_completed(event: Any, state: ValidatorState) -> list[NewEvent]:
    payload = event.payload
    # A fallback artefact proves the pipeline ran, not that an adapter learned
    # anything: soaking it would only measure the base model twice.
    if payload.get("status") != "trained" or payload.get("fallback"):
        return []
    sha = payload.get("adapter_sha256")
    uri = payload.get("adapter_uri")
    if not sha or not uri:
        raise ValueError("training.completed with status trained lacks adapter_sha256 or adapter_uri")
    kind = payload.get("kind", "mntp")
    if kind not in KINDS:
        raise ValueError(f"training.completed kind must be one of {KINDS}, not {kind!r}")
    if any(r.adapter_sha256 == sha and r.purpose == "candidate" for r in state.runs.values()):
        return []
    occurred = getattr(event, "occurred_at", None)
    return [
        _started(
            validation_id=f"val-{sha[:16]}",
            adapter_sha256=sha,
            adapter_uri=uri,
            baseline=state.production.get(kind, Baseline("base")),
            kind=kind,
            purpose="candidate",
            cycle_id=payload.get("cycle_id"),
            started_at=occurred,
            plan=state.plan,
        )
    ]


def _start_drift_soak(cmd: StartDriftSoak, state: ValidatorState) -> list[NewEvent]:
    if cmd.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {cmd.kind!r}")
    validation_id = cmd.validation_id or (
        f"drift-{cmd.adapter_sha256[:12]}-{cmd.requested_at.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}"
    )
    if validation_id in state.runs or blocking_drift_run(state, cmd.adapter_sha256, cmd.requested_at):
        return []
    events: list[NewEvent] = []
    for run in state.runs.values():
        if run.purpose == "drift" and run.adapter_sha256 == cmd.adapter_sha256 and run.active:
            silent = (
                f"no result {(cmd.requested_at - run.started_at).total_seconds():.0f} s after start"
                if run.started_at else "no start time recorded"
            )
            events.append(_abandoned(run, f"{silent}; superseded by {validation_id}", state.thresholds))
    events.append(
        _started(
            validation_id=validation_id,
            adapter_sha256=cmd.adapter_sha256,
            adapter_uri=cmd.adapter_uri,
            baseline=cmd.baseline,
            kind=cmd.kind,
            purpose="drift",
            cycle_id=cmd.cycle_id,
            started_at=cmd.requested_at,
            plan=state.plan,
        )
    )
    return events


def blocking_drift_run(state: ValidatorState, adapter_sha256: str, now: datetime) -> ValidationRun | None:
    """The drift run that keeps a new one for this adapter from starting, if any.

    Only a live run blocks: a completed run never does, whatever its verdict,
    and a run silent for longer than ``drift_stale_after_s`` is presumed dead."""
    for run in state.runs.values():
        if run.purpose == "drift" and run.adapter_sha256 == adapter_sha256 and run.active:
            if not _stale(run, now, state.plan):
                return run
    return None


def _stale(run: ValidationRun, now: datetime, plan: SoakPlan) -> bool:
    if run.started_at is None:
        return True
    return (now - run.started_at).total_seconds() >= plan.drift_stale_after_s


def _finish_cycle(cmd: CycleFinished, state: ValidatorState) -> list[NewEvent]:
    run = _known_run(state, cmd.validation_id)
    if not run.active or cmd.cycle in run.cycle_outcomes:
        return []
    replicas = tuple(r if isinstance(r, ReplicaResult) else ReplicaResult.from_dict(r) for r in cmd.replicas)
    samples = CycleSamples(cmd.cycle, replicas)
    verdict = judge_cycle(samples.by_metric(), state.thresholds, kind=run.kind, cycle=cmd.cycle)
    outcomes = {**run.cycle_outcomes, cmd.cycle: verdict.outcome}
    streak = current_failing_streak([outcomes[c] for c in sorted(outcomes)])
    limit = state.thresholds.consecutive_failures
    payload = {
        "validation_id": run.validation_id,
        "cycle": cmd.cycle,
        "outcome": verdict.outcome,
        "score": verdict.score,
        "group_scores": dict(verdict.group_scores),
        "metrics": {name: mv.to_dict() for name, mv in verdict.metrics.items()},
        "vetoes": list(verdict.vetoes),
        "reason": verdict.reason,
        "replicas": [r.load_summary() for r in replicas],
        "incidents": [i.to_dict() for i in samples.incidents],
        "failing_streak": streak,
        # the run's fate is sealed; the runner may stop and send RunFinished
        "stop_early": run.cycles >= limit and streak >= limit,
    }
    return [NewEvent("validation.cycle_completed", run.validation_id, payload)]


def _finish_run(cmd: RunFinished, state: ValidatorState) -> list[NewEvent]:
    run = _known_run(state, cmd.validation_id)
    if not run.active:
        return []
    raw = cmd.raw_data
    if raw.get("validation_id") != run.validation_id:
        raise ValueError(f"raw data belongs to {raw.get('validation_id')!r}, not {run.validation_id!r}")
    if raw.get("adapter_sha256") != run.adapter_sha256:
        raise ValueError("raw data measured another adapter than the run's candidate")
    verdict = rejudge({**raw, "kind": raw.get("kind", run.kind)}, state.thresholds)
    payload = {**_run_identity(run), "raw_data_uri": cmd.raw_data_uri, **verdict.to_payload()}
    return [NewEvent("validation.completed", run.validation_id, payload)]


def _abandoned(run: ValidationRun, reason: str, thresholds: Thresholds) -> NewEvent:
    payload = {
        **_run_identity(run),
        "raw_data_uri": None,
        "verdict": "inconclusive",
        "explanation": f"inconclusive: abandoned, {reason}",
        "score": None,
        "sample_sizes": {"candidate": {}, "baseline": {}},
        "thresholds": thresholds.to_dict(),
    }
    return NewEvent("validation.completed", run.validation_id, payload)


def _run_identity(run: ValidationRun) -> dict[str, Any]:
    return {
        "validation_id": run.validation_id,
        "adapter_sha256": run.adapter_sha256,
        "adapter_uri": run.adapter_uri,
        "baseline": run.baseline.to_dict(),
        "kind": run.kind,
        "purpose": run.purpose,
        "cycle_id": run.cycle_id,
    }


def _started(
    *,
    validation_id: str,
    adapter_sha256: str,
    adapter_uri: str,
    baseline: Baseline,
    kind: str,
    purpose: str,
    cycle_id: str | None,
    started_at: datetime | None,
    plan: SoakPlan,
) -> NewEvent:
    payload = {
        "validation_id": validation_id,
        "cycle_id": cycle_id,
        "adapter_sha256": adapter_sha256,
        "adapter_uri": adapter_uri,
        "baseline": baseline.to_dict(),
        "replicas": plan.replicas,
        "cycles": plan.cycles,
        "episodes": plan.episodes,
        "kind": kind,
        "purpose": purpose,
        "started_at": iso(started_at) if started_at else None,
        "sized_by": plan.sizing(),
    }
    return NewEvent("validation.started", validation_id, payload)


def _known_run(state: ValidatorState, validation_id: str) -> ValidationRun:
    run = state.runs.get(validation_id)
    if run is None:
        raise ValueError(f"unknown validation run {validation_id!r}")
    return run


# ---------------------------------------------------------------------------
# Drift soak schedule
# ---------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def next_drift_soak(
    now: datetime,
    last_started: datetime | None,
    interval_s: float,
    jitter_fraction: float,
    rng_seed: int | str,
) -> datetime:
    """When the next drift soak is due; a result <= ``now`` means "start now".

    Jitter spreads soaks of many nodes over time so they do not all load the
    machines at once; the seed (say, the node name) makes it repeatable, so
    asking again gives the same answer until a new run starts.

    The schedule depends only on when the last run *started*, never on how it
    ended: a failing or dead run never blocks or delays later ones.
    """
    if interval_s <= 0:
        raise ValueError("interval_s must be positive")
    if not 0.0 <= jitter_fraction < 1.0:
        raise ValueError("jitter_fraction must lie in [0, 1)")
    if now.tzinfo is None or (last_started is not None and last_started.tzinfo is None):
        raise ValueError("times must carry a timezone")
    if last_started is None:
        # No history: anchor to the interval grid so repeated calls agree.
        slots = math.floor((now - _EPOCH).total_seconds() / interval_s)
        anchor = _EPOCH + timedelta(seconds=slots * interval_s)
        rng = random.Random(f"{rng_seed}:{anchor.isoformat()}")
        due = anchor + timedelta(seconds=rng.uniform(0.0, jitter_fraction * interval_s))
    else:
        rng = random.Random(f"{rng_seed}:{last_started.astimezone(timezone.utc).isoformat()}")
        due = last_started + timedelta(seconds=interval_s * (1.0 + rng.uniform(-jitter_fraction, jitter_fraction)))
    return max(due, now)


# ---------------------------------------------------------------------------


def _json_number(value: Any) -> float | None:
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


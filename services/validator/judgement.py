"""The soak's judgement: the raw data of a run (``samples``) in, a verdict out. No I/O.

Every verdict is computed from raw data by the pure functions here, so a stored
run can be re-judged (``rejudge``) with the same or other thresholds.

Judgement, from the bottom up:

* ``judge_metric`` — one metric, candidate vs baseline: better, worse, same
  or no_data (see ``stats`` and ``thresholds``);
* ``judge_cycle`` — all metrics of one cycle: a critical metric judged worse
  vetoes (fail); otherwise the weighted score decides pass, marginal or fail;
  a critical metric without data makes the cycle inconclusive; an RL
  candidate whose policy collapsed (``policy_collapse``) fails, whatever its reward;
* ``judge_run`` — all cycles: the pooled samples are judged as one cycle; a
  long soak (at least ``consecutive_failures`` cycles) fails only after that
  many consecutive failing cycles, because one bad cycle on a shared machine
  is weather, not climate;
* ``rejudge`` — ``judge_run`` on stored raw data (format in ``samples``), as
  the aggregate (``domain``) and ``neurons validate rejudge`` call it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from services.validator.samples import SIDES, CycleSamples, Incident, Sides, json_number
from services.validator.stats import DEFAULT_MIN_N, SampleComparison, compare_samples
from services.validator.thresholds import KINDS, RETRIEVAL_MRR, RETRIEVAL_RECALL, MetricSpec, Thresholds
from shared.contracts.collapse import policy_collapsed

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
            "effect": json_number(self.effect),
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
    raw_effect = {"relative_shift": c.relative_shift, "rank_biserial": c.rank_biserial,
                  "absolute_shift": c.shift}[spec.effect_measure]
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
    elif spec.effect_measure == "absolute_shift":
        size = f"absolute, baseline median {c.baseline_median:.4g}"
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
# A collapsed policy
# ---------------------------------------------------------------------------

COLLAPSE_VETO = "policy_collapsed"
# per episode, from an RL replica: the spread (population std) of its completions' rewards and
# the share of its completions that are distinct
REWARD_SPREAD, DISTINCT_SHARE = "reward_spread", "distinct_share"


def policy_collapse(
    samples_by_metric: Mapping[str, Sides | tuple[Sequence[float], Sequence[float]]], thresholds: Thresholds
) -> str | None:
    """Why the candidate's policy has collapsed, or None when it has not or was not measured.

    A policy that gives (nearly) the same answer whatever it is asked has no reward spread and few
    distinct answers; its mean reward may still be high (a reward it games), so collapse fails the
    run on its own. The rule is the trainer's (``shared.contracts.collapse``), applied to the medians
    over the soak's episodes, so one unlucky episode does not count."""
    spread = list(samples_by_metric.get(REWARD_SPREAD, ((), ()))[0])
    distinct = list(samples_by_metric.get(DISTINCT_SHARE, ((), ()))[0])
    if not spread or not distinct:
        return None
    median_spread, median_distinct = statistics.median(spread), statistics.median(distinct)
    if not policy_collapsed(median_spread, median_distinct, max_spread=thresholds.collapse_max_spread,
                            max_distinct_share=thresholds.collapse_max_distinct_share):
        return None
    return (f"policy collapsed: median reward spread {median_spread:.3g} < {thresholds.collapse_max_spread:g} "
            f"and median distinct answers {median_distinct:.0%} < {thresholds.collapse_max_distinct_share:.0%} "
            f"of a prompt's completions (n={len(spread)} episodes)")


# ---------------------------------------------------------------------------
# One cycle
# ---------------------------------------------------------------------------


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
    collapse = policy_collapse(samples_by_metric, thresholds)

    if collapse:
        outcome, vetoes = "fail", (COLLAPSE_VETO, *vetoes)
        head = f"{label}: fail, {collapse}" + "".join(f"; {metrics[n].reason}" for n in vetoes[1:])
    elif vetoes:
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
    # what the candidate and baseline measured beyond the compared metrics: "retrieval", "policy"
    measured: Mapping[str, Any] = field(default_factory=dict)

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
            **{key: dict(value) for key, value in self.measured.items()},
        }


def _mean(values: Sequence[float]) -> float | None:
    return json_number(statistics.fmean(values)) if values else None


def measured_summaries(samples_by_metric: Mapping[str, Sides], pooled: CycleVerdict) -> dict[str, Any]:
    """The retrieval of an encoder and the answers of a policy, mean per side over all episodes,
    as ``validation.completed`` carries them; a family the soak did not measure is left out."""
    def side(names: Mapping[str, str], index: int) -> dict[str, Any] | None:
        columns = {key: list(samples_by_metric.get(metric, ((), ()))[index]) for key, metric in names.items()}
        if not any(columns.values()):
            return None
        return {**{key: _mean(values) for key, values in columns.items()},
                "episodes": max(len(values) for values in columns.values())}

    measured: dict[str, Any] = {}
    retrieval = {"recall_at_1": RETRIEVAL_RECALL, "mrr": RETRIEVAL_MRR}
    if any(samples_by_metric.get(m) for m in retrieval.values()):
        measured["retrieval"] = {"candidate": side(retrieval, 0), "baseline": side(retrieval, 1)}
    policy = {"reward_mean": "reward", "reward_spread": REWARD_SPREAD, "distinct_share": DISTINCT_SHARE}
    if any(samples_by_metric.get(m) for m in (REWARD_SPREAD, DISTINCT_SHARE)):
        collapsed = COLLAPSE_VETO in pooled.vetoes
        measured["policy"] = {"candidate": side(policy, 0), "baseline": side(policy, 1), "collapsed": collapsed,
                              "collapse_reason": pooled.reason if collapsed else None}
    return measured


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

    pooled_sides = CycleSamples(0, tuple(r for c in ordered for r in c.replicas)).by_metric()
    pooled = judge_cycle(pooled_sides, thresholds, kind=kind, cycle=None)
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
    elif COLLAPSE_VETO in pooled.vetoes:  # however long the soak: a collapsed policy is no candidate
        outcome, head = "fail", f"fail: {pooled.reason}"
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
        outcome, reason, pooled.score, pooled, cycle_verdicts, streak, sample_sizes, replicas, incidents, thresholds,
        measured_summaries(pooled_sides, pooled),
    )


def rejudge(raw_data: Mapping[str, Any], thresholds: Thresholds) -> Verdict:
    """Judge stored raw data (format in ``samples``) again."""
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

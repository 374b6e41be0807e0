"""When a policy has collapsed: one answer for every prompt, whatever it is sampled from.

A reinforcement-learning loop can raise its mean reward by learning to give
the same completion every time. The trainer judges a finished run with this
rule and the validator judges a soak's samples with it, so both call the same
sampled behaviour collapsed.

A policy has collapsed when the spread (population standard deviation) of
its rewards falls below ``MAX_SPREAD`` *and* the share of distinct answers
within a group of completions of the same prompt falls below
``MAX_DISTINCT_SHARE``. Either alone is no proof: equal rewards come from
varied answers when a reward is coarse, and few distinct answers come from
short completions on a narrow prompt.
"""

from __future__ import annotations

from typing import Iterable, Sequence

# Rewards lie in [0, 1]; below this standard deviation they no longer rank the answers of a group.
MAX_SPREAD = 0.05
# In a group of 8 completions, one answer is 0.125 and two answers 0.25: fewer than two is collapse.
MAX_DISTINCT_SHARE = 0.25


def distinct_share(groups: Iterable[Sequence[str]]) -> float:
    """The mean, over groups of completions of one prompt each, of (distinct completions / completions).

    1.0 when every completion differs; 1 / group size when a group is one answer
    repeated. Completions are compared after stripping surrounding whitespace.
    """
    shares = [len({answer.strip() for answer in group}) / len(group) for group in groups if len(group)]
    if not shares:
        raise ValueError("distinct_share needs at least one non-empty group")
    return sum(shares) / len(shares)


def policy_collapsed(spread: float, distinct_share: float, *, max_spread: float = MAX_SPREAD,
                     max_distinct_share: float = MAX_DISTINCT_SHARE) -> bool:
    """Whether rewards of spread ``spread`` over answers with this ``distinct_share`` mean a collapsed policy."""
    return float(spread) < max_spread and float(distinct_share) < max_distinct_share

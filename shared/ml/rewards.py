"""Verifiable rewards for RL research loops: plain functions of (prompt, completion).

Each returns a float in [0, 1] computed from the text alone, so any node (and
any auditor) recomputes the same reward. Register new ones with ``@reward``;
``get_reward(name, **params)`` binds parameters from a run's configuration.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

RewardFn = Callable[..., float]
REWARDS: dict[str, RewardFn] = {}

_INTEGER = re.compile(r"-?\d+")
_SUM = re.compile(r"(-?\d+)\s*([+\-*])\s*(-?\d+)")


def reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def register(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return register


def get_reward(name: str, **params: Any) -> Callable[[str, str], float]:
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
    return functools.partial(REWARDS[name], **params)


@reward("length_target")
def length_target(prompt: str, completion: str, target: int = 20) -> float:
    """1 when the stripped completion has ``target`` characters, falling off as the ratio of the lengths."""
    length = len(completion.strip())
    return 1.0 - abs(length - target) / max(length, target, 1)


@reward("contains_keyword")
def contains_keyword(prompt: str, completion: str, keyword: str = "neurons") -> float:
    return 1.0 if keyword.lower() in completion.lower() else 0.0


@reward("digits_only")
def digits_only(prompt: str, completion: str) -> float:
    """The share of non-space characters that are ASCII digits (0 for an empty completion)."""
    chars = [c for c in completion if not c.isspace()]
    if not chars:
        return 0.0
    return sum(c in "0123456789" for c in chars) / len(chars)


@reward("arithmetic")
def arithmetic(prompt: str, completion: str) -> float:
    """1 when the first integer of the completion is the value of the prompt's ``a + b`` (or -, *)."""
    problem = _SUM.search(prompt)
    answer = _INTEGER.search(completion)
    if problem is None or answer is None:
        return 0.0
    a, op, b = int(problem[1]), problem[2], int(problem[3])
    expected = a + b if op == "+" else a - b if op == "-" else a * b
    return 1.0 if int(answer[0]) == expected else 0.0

"""Verifiable rewards for RL research loops: plain functions of (prompt, completion).

Each returns a float in [0, 1] computed from the text alone, so any node (and
any auditor) recomputes the same reward. Register new ones with ``@reward``;
``get_reward(name, **params)`` binds parameters from a run's configuration.

Each reward also brings its own prompt set, fixed text every node builds the
same: a research loop without a dataset trains on it, and a run records the
set's name (``prompt_set_name``) so its adapter is soaked on the same prompts
(``reward_prompts``).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

RewardFn = Callable[..., float]
REWARDS: dict[str, RewardFn] = {}
PROMPTS: dict[str, tuple[str, ...]] = {}
# The version of the built-in prompt sets; a change of their text is a new version.
PROMPT_SET_VERSION = 1

_INTEGER = re.compile(r"-?\d+")
_SUM = re.compile(r"(-?\d+)\s*([+\-*])\s*(-?\d+)")


def reward(name: str, prompts: Sequence[str] = ()) -> Callable[[RewardFn], RewardFn]:
    """Register a reward under ``name``, with the prompts a loop without a dataset trains on."""

    def register(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        PROMPTS[name] = tuple(prompts)
        return fn

    return register


def get_reward(name: str, **params: Any) -> Callable[[str, str], float]:
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
    return functools.partial(REWARDS[name], **params)


def prompt_set_name(reward_name: str) -> str:
    """The name a run records for the prompt set of ``reward_name``: ``reward:<name>:v<version>``."""
    return f"reward:{reward_name}:v{PROMPT_SET_VERSION}"


def reward_prompts(name: str) -> list[str]:
    """The prompts of a reward (by reward name, or by the prompt set name a run recorded)."""
    if name.startswith("reward:"):
        _, reward_name, version = name.split(":", 2)
        if version != f"v{PROMPT_SET_VERSION}":
            raise KeyError(f"prompt set {name!r}: this version knows v{PROMPT_SET_VERSION} only")
        name = reward_name
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
    if not PROMPTS[name]:
        raise KeyError(f"reward {name!r} has no prompt set; give the run a dataset")
    return list(PROMPTS[name])


_TOPICS = ("the sea", "a city at night", "a quiet library", "the first snow", "a train station", "an old bridge",
           "a mountain path", "a busy kitchen", "the desert wind", "a summer garden", "a small harbour",
           "the northern lights", "a forest stream", "a market square", "an empty beach", "a rainy morning")


def _length_prompts() -> list[str]:
    return [f"{verb} {topic}:" for verb in ("Describe", "Name a colour of") for topic in _TOPICS]


def _keyword_prompts() -> list[str]:
    return [f"Say something about {topic}:" for topic in _TOPICS] + \
           [f"Tell me about the neurons of {topic}:" for topic in _TOPICS]


def _digits_prompts() -> list[str]:
    return [f"Write a number for {topic}:" for topic in _TOPICS] + \
           [f"How many steps to {topic}?" for topic in _TOPICS]


def _arithmetic_prompts() -> list[str]:
    # 27 small problems, each pair with all three operations
    return [f"What is {a} {op} {b}?" for a, b in zip(range(2, 11), range(9, 0, -1)) for op in "+-*"]


@reward("length_target", _length_prompts())
def length_target(prompt: str, completion: str, target: int = 20) -> float:
    """1 when the stripped completion has ``target`` characters, falling off as the ratio of the lengths."""
    length = len(completion.strip())
    return 1.0 - abs(length - target) / max(length, target, 1)


@reward("contains_keyword", _keyword_prompts())
def contains_keyword(prompt: str, completion: str, keyword: str = "neurons") -> float:
    return 1.0 if keyword.lower() in completion.lower() else 0.0


@reward("digits_only", _digits_prompts())
def digits_only(prompt: str, completion: str) -> float:
    """The share of non-space characters that are ASCII digits (0 for an empty completion)."""
    chars = [c for c in completion if not c.isspace()]
    if not chars:
        return 0.0
    return sum(c in "0123456789" for c in chars) / len(chars)


@reward("arithmetic", _arithmetic_prompts())
def arithmetic(prompt: str, completion: str) -> float:
    """1 when the first integer of the completion is the value of the prompt's ``a + b`` (or -, *)."""
    problem = _SUM.search(prompt)
    answer = _INTEGER.search(completion)
    if problem is None or answer is None:
        return 0.0
    a, op, b = int(problem[1]), problem[2], int(problem[3])
    expected = a + b if op == "+" else a - b if op == "-" else a * b
    return 1.0 if int(answer[0]) == expected else 0.0

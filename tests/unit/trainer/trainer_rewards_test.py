"""Each verifiable reward, on hand-written completions."""

from __future__ import annotations

import pytest

from shared.ml.rewards import REWARDS, arithmetic, contains_keyword, digits_only, get_reward, length_target, reward


def test_length_target_peaks_at_the_target_and_falls_off_as_a_ratio():
    assert length_target("p", "x" * 20, target=20) == 1.0
    assert length_target("p", "  " + "x" * 20 + "\n", target=20) == 1.0  # surrounding space is not length
    assert length_target("p", "x" * 40, target=20) == pytest.approx(0.5)
    assert length_target("p", "x" * 10, target=20) == pytest.approx(0.5)
    assert length_target("p", "", target=20) == 0.0


def test_contains_keyword_ignores_case():
    assert contains_keyword("p", "The Neurons platform", keyword="neurons") == 1.0
    assert contains_keyword("p", "nothing here", keyword="neurons") == 0.0


def test_digits_only_is_the_share_of_digits():
    assert digits_only("p", "12 34") == 1.0
    assert digits_only("p", "1a") == 0.5
    assert digits_only("p", "   ") == 0.0


@pytest.mark.parametrize("prompt,completion,expected", [
    ("What is 3 + 4?", " 7", 1.0),
    ("What is 3 + 4?", "It is 8", 0.0),
    ("Compute 12-20", "-8.", 1.0),
    ("Compute 6 * 7", "42 is the answer, not 41", 1.0),
    ("No problem here", "7", 0.0),
    ("What is 3 + 4?", "seven", 0.0),
])
def test_arithmetic_checks_the_first_integer(prompt, completion, expected):
    assert arithmetic(prompt, completion) == expected


def test_registry_binds_parameters_and_rejects_unknown_names():
    assert {"length_target", "contains_keyword", "digits_only", "arithmetic"} <= set(REWARDS)
    score = get_reward("length_target", target=3)
    assert score("prompt", "abc") == 1.0
    with pytest.raises(KeyError):
        get_reward("nope")
    with pytest.raises(ValueError):
        reward("digits_only")(lambda p, c: 0.0)

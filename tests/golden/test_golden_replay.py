"""A recorded cycle, replayed through the services' domains, still leads to the same decisions and read models."""

import difflib
import json
from pathlib import Path

import pytest

from tests.golden.replay import dumps, replay

HERE = Path(__file__).resolve().parent


def test_the_recorded_cycle_replays_to_the_same_events_and_read_models():
    actual = replay(HERE / "cycle_audit.jsonl")
    expected = json.loads((HERE / "expected.json").read_text())
    if actual != expected:
        diff = difflib.unified_diff(dumps(expected).splitlines(), dumps(actual).splitlines(),
                                    "expected.json", "replay", lineterm="", n=5)
        pytest.fail("the replay differs from expected.json:\n" + "\n".join(diff), pytrace=False)

"""A recorded cycle, replayed through the services' domains, still leads to the same decisions and read models."""

import difflib
import json
from pathlib import Path

import pytest

from shared.contracts.trust import check_binding, decision_subject, verify_decision
from tests.golden.replay import dumps, read_events, recording_keyring, replay, resign

HERE = Path(__file__).resolve().parent


def test_the_recorded_cycle_replays_to_the_same_events_and_read_models():
    actual = replay(HERE / "cycle_audit.jsonl")
    expected = json.loads((HERE / "expected.json").read_text())
    if actual != expected:
        diff = difflib.unified_diff(dumps(expected).splitlines(), dumps(actual).splitlines(),
                                    "expected.json", "replay", lineterm="", n=5)
        pytest.fail("the replay differs from expected.json:\n" + "\n".join(diff), pytrace=False)


def test_re_signing_adds_the_subject_and_changes_nothing_else():
    recorded = read_events(HERE / "cycle_audit.jsonl")
    resigned = resign(recorded)
    requests = {e.payload["request_id"]: e.payload for e in recorded if e.type == "approval.requested"}
    fields = {"approval.decision_submitted": "signed", "approval.granted": "decision"}

    changed = [(before, after) for before, after in zip(recorded, resigned, strict=True) if before != after]

    assert [before.type for before, _ in changed] == ["approval.decision_submitted", "approval.granted"]
    for before, after in changed:
        old, new = before.payload[fields[before.type]], after.payload[fields[before.type]]
        assert "subject" not in old  # the format from before subjects were signed
        assert verify_decision(old, recording_keyring(), now=before.occurred_at).reason == "malformed"
        assert {k: v for k, v in new.items() if k not in ("signature", "subject")} == \
            {k: v for k, v in old.items() if k != "signature"}
        request = requests[old["request_id"]]
        assert new["subject"] == decision_subject(request["kind"], request["subject"])
        assert verify_decision(new, recording_keyring(), now=before.occurred_at).ok
        assert check_binding(new, decisions="grant", subject=decision_subject(request["kind"], request["subject"]))
        assert {k: v for k, v in after.payload.items() if k != fields[before.type]} == \
            {k: v for k, v in before.payload.items() if k != fields[before.type]}

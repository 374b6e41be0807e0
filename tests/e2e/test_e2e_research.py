"""A research loop as operators run it: six services as processes, the real broker, the tiny model.

One MNTP cycle puts a first adapter in production; a research loop on it is asked for by one operator
and granted by another, trains with its own reward, is soaked against the adapter it started from with
that reward and its sampling settings, and its adapter is promoted to the `research` channel, leaving
production as it was."""

import json
import re

import pytest

from tests.e2e.cycle_support import CYCLE, prepare, start
from tests.support import wait_until

# The research loop's own settings: the soak must use the same reward, temperature and completion length.
RESEARCH = {"reward": "length_target", "steps": 8, "learning_rate": 0.02, "temperature": 0.9, "max_new_tokens": 6}
# On a shared test machine the replicas' latency and memory are weather: they may not decide the verdict.
# The reward, the errors, a collapse and an encoder's retrieval still do, as in production.
THRESHOLDS = {"pass_score": 0.5, "metrics": {"latency_ms": {"min_effect": 10.0}, "rss_mb": {"min_effect": 10.0}}}


def events(platform, event_type: str, **payload) -> list[dict]:
    return [e for e in platform.archived(event_type)
            if all(e["payload"].get(k) == v for k, v in payload.items())]


def first(platform, event_type: str, timeout: float, **payload) -> dict:
    return wait_until(lambda: next(iter(events(platform, event_type, **payload)), None), timeout=timeout,
                      message=f"{event_type} {payload}")


@pytest.mark.slow
def test_a_research_loop_is_granted_trained_soaked_on_its_reward_and_promoted_to_research(platform, tmp_path):
    prepare(platform, tmp_path)
    platform.enroll("erin", "approver")  # grants the research loop and its promotion; alice asked for both
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text(json.dumps(THRESHOLDS))
    platform.env["NEURONS_VALIDATION_THRESHOLDS"] = str(thresholds)
    start(platform, tmp_path)
    cycle = json.loads(platform.cli(*CYCLE, timeout=600).stdout)
    assert cycle["outcome"] == "promoted", cycle
    parent = cycle["adapter_id"]
    # the encoder's soak measured its retrieval, on both sides
    retrieval = first(platform, "validation.completed", 10, validation_id=cycle["validation_id"])["payload"]["retrieval"]
    assert retrieval["candidate"]["episodes"] > 0 and retrieval["baseline"]["recall_at_1"] is not None, retrieval

    settings = [arg for name, value in RESEARCH.items() for arg in ("--set", f"{name}={value}")]
    asked = platform.cli("research", "request", "--operator", "alice", *settings, timeout=120).stdout
    loop = re.search(r"proposed (\S+) \(rl\)", asked)
    assert loop, asked
    loop_id = loop[1]
    platform.cli("approve", f"apr-research-{loop_id}", "--operator", "erin", timeout=120)

    trained = first(platform, "training.completed", 600, cycle_id=loop_id)["payload"]
    assert trained["status"] == "trained" and trained["warm_start"] == parent, trained
    started = first(platform, "validation.started", 60, cycle_id=loop_id)["payload"]
    assert started["baseline"] == {"kind": "parent", "adapter_sha256": parent,
                                   "adapter_uri": f"artefact://sha256/{parent}"}
    assert started["evaluation"] == {k: RESEARCH[k] for k in ("reward", "temperature", "max_new_tokens")}
    verdict = first(platform, "validation.completed", 600, cycle_id=loop_id)["payload"]
    assert not verdict["explanation"].startswith("inconclusive: abandoned"), verdict["explanation"]
    policy = verdict["policy"]
    assert policy["candidate"]["episodes"] > 0 and policy["baseline"]["reward_mean"] is not None, policy
    assert verdict["verdict"] == "pass", verdict["explanation"]
    assert policy["collapsed"] is False

    request = first(platform, "approval.requested", 60, subject_id=verdict["validation_id"])["payload"]
    assert request["kind"] == "promotion" and request["subject"]["channel"] == "research", request
    platform.cli("approve", request["request_id"], "--operator", "erin", timeout=120)
    promoted = first(platform, "adapter.promoted", 120, channel="research")["payload"]
    assert promoted["adapter_sha256"] == trained["adapter_sha256"] and promoted["approver"] == "erin"
    assert [e["payload"]["adapter_sha256"] for e in events(platform, "adapter.promoted", channel="production")] \
        == [parent]  # production still serves what it served

    shown = platform.cli("validate", "show", verdict["validation_id"]).stdout
    assert "against parent" in shown and "not collapsed" in shown and "reward curve" in shown, shown

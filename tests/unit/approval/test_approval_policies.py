"""Approval policies: built-in defaults, files that extend or replace them, evaluation."""

from __future__ import annotations

import json

import pytest

from shared.contracts.policies import (
    FALLBACK_POLICY,
    PolicyError,
    PolicySet,
    authorises,
    default_policies,
    evaluate,
    policies_from_dict,
    request_view,
)
from shared.policy_file import load_policies


def cycle(energy_wh, training_kind="mntp", steps=200):
    return request_view("cycle", {"training_kind": training_kind, "energy_estimate_wh": energy_wh,
                                  "config": {"steps": steps}}, "evolution")


def test_defaults_auto_approve_small_mntp_cycles_only():
    policies = default_policies()

    assert evaluate(policies, cycle(49.9)).auto_approve is True
    assert evaluate(policies, cycle(49.9)).policy_name == "auto-mntp-under-energy"
    assert evaluate(policies, cycle(50.0)).auto_approve is False
    assert evaluate(policies, cycle(10.0, training_kind="rl")).policy_name == "cycle-needs-approver"
    assert evaluate(policies, cycle(None)).auto_approve is False  # no estimate, no evidence it is small


def test_research_and_promotion_need_a_human_by_default():
    policies = default_policies()

    assert evaluate(policies, request_view("research", {"training_kind": "rl"}, "bob")).auto_approve is False
    assert evaluate(policies, request_view("promotion", {}, "validator")).policy_name == "promotion-needs-approver"


def test_a_request_no_policy_matches_needs_a_human():
    decision = evaluate(PolicySet(()), cycle(1.0))

    assert decision.auto_approve is False
    assert decision.policy_name == FALLBACK_POLICY


def test_a_yaml_file_overrides_a_default_by_name_and_keeps_the_others(tmp_path):
    path = tmp_path / "policies.yaml"
    path.write_text(
        "policies:\n"
        "  - name: auto-mntp-under-energy\n"
        "    kind: cycle\n"
        "    action: auto_approve\n"
        "    when: {training_kind: mntp, energy_wh_below: 10, steps_at_most: 100}\n"
    )

    policies = load_policies(path)

    assert evaluate(policies, cycle(9.0, steps=100)).auto_approve is True
    assert evaluate(policies, cycle(9.0, steps=101)).auto_approve is False
    assert evaluate(policies, cycle(20.0)).auto_approve is False
    assert "research-needs-approver" in policies.names()


def test_a_json_file_can_drop_the_defaults(tmp_path):
    path = tmp_path / "policies.json"
    path.write_text(json.dumps({"include_defaults": False, "policies": [
        {"name": "promote-when-validator-asks", "kind": "promotion", "action": "auto_approve",
         "when": {"requested_by": "validator"}}]}))

    policies = load_policies(path)

    assert policies.names() == {"promote-when-validator-asks"}
    assert evaluate(policies, request_view("promotion", {}, "validator")).auto_approve is True


def test_no_path_means_the_defaults():
    assert load_policies(None) == default_policies()


@pytest.mark.parametrize("entry", [
    {"name": "yolo-research", "kind": "research", "action": "auto_approve"},
    {"name": "x", "kind": "cycle", "action": "auto_approve", "when": {"moon_phase": "full"}},
    {"name": "x", "kind": "cycle", "action": "auto_approve", "when": {"energy_wh_below": "lots"}},
    {"name": "x", "kind": "deploy", "action": "auto_approve"},
    {"name": "x", "kind": "cycle", "action": "maybe"},
    {"name": "x", "kind": "cycle", "action": "auto_approve", "unless": {}},
])
def test_a_policy_that_cannot_be_enforced_is_refused_at_load(entry):
    with pytest.raises(PolicyError):
        policies_from_dict({"policies": [entry]})


def test_a_missing_policy_file_is_an_error(tmp_path):
    with pytest.raises(PolicyError):
        load_policies(tmp_path / "nope.yaml")


def test_authorises_only_the_policy_that_would_approve_the_request():
    policies = default_policies()

    assert authorises(policies, "auto-mntp-under-energy", cycle(5.0)) is True
    assert authorises(policies, "auto-mntp-under-energy", cycle(500.0)) is False
    assert authorises(policies, "cycle-needs-approver", cycle(500.0)) is False
    assert authorises(policies, "no-such-policy", cycle(5.0)) is False

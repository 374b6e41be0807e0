"""The research loop's pure rules: collapse, the adapter's own shape, the reward's prompt set, what an RL step reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from services.evolution.search import RESEARCH_SPACE, research_settings
from services.trainer.domain import JobFinished, JobProgressed, handle, initial_state
from shared.contracts.collapse import MAX_DISTINCT_SHARE, MAX_SPREAD, distinct_share, policy_collapsed
from shared.contracts.schemas import validate_payload
from shared.ml.config import MntpConfig, RlConfig, adopt_adapter_shape, adapter_shape
from shared.ml.rewards import PROMPTS, REWARDS, get_reward, prompt_set_name, reward_prompts

SHA = "a" * 64


def test_distinct_share_is_the_mean_share_of_different_answers_per_group():
    assert distinct_share([["a", "b", "c", "d"]]) == 1.0
    assert distinct_share([["a", "a", "a", "a"]]) == 0.25
    assert distinct_share([["a", " a\n", "b", "b"], ["x", "y", "z", "w"]]) == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError):
        distinct_share([])


def test_a_policy_has_collapsed_only_when_rewards_and_answers_both_stop_varying():
    assert policy_collapsed(0.0, 1 / 8)  # one answer, one reward
    assert not policy_collapsed(0.0, 1.0)  # varied answers a coarse reward scores alike
    assert not policy_collapsed(0.3, 1 / 8)  # few answers, still ranked apart
    assert not policy_collapsed(MAX_SPREAD, 0.0) and not policy_collapsed(0.0, MAX_DISTINCT_SHARE)  # strictly below
    assert policy_collapsed(0.05, 0.5, max_spread=0.1, max_distinct_share=0.6)


def test_the_adapter_being_continued_keeps_its_own_rank_alpha_and_targets():
    saved = {"r": 4, "lora_alpha": 8, "target_modules": ["v_proj", "q_proj", "o_proj", "k_proj"], "lora_dropout": 0.05}
    assert adapter_shape(saved) == {"lora_rank": 4, "lora_alpha": 8,
                                    "target_modules": ["k_proj", "o_proj", "q_proj", "v_proj"]}
    config = RlConfig(lora_dropout=0.0)
    changed = adopt_adapter_shape(config, saved)
    assert (config.lora_rank, config.lora_alpha) == (4, 8)
    assert config.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert config.lora_dropout == 0.0  # a training setting, not the adapter's shape
    assert changed == ["lora_rank 8 -> 4", "lora_alpha 16 -> 8",
                       "target_modules ['q_proj', 'v_proj', 'lm_head'] -> ['k_proj', 'o_proj', 'q_proj', 'v_proj']"]
    same = MntpConfig(lora_rank=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert adopt_adapter_shape(same, saved) == []


def test_rl_config_regularises_by_default_and_reads_the_older_kl_name():
    config = RlConfig()
    assert config.kl_beta > 0 and config.clip_eps == 0.2 and config.policy_updates >= 1
    assert RlConfig.from_dict({"kl_coef": 0.5}).kl_beta == 0.5
    assert RlConfig.from_dict({"kl_coef": 0.5, "kl_beta": 0.1}).kl_beta == 0.1
    for bad in ({"kl_beta": -0.1}, {"clip_eps": 1.0}, {"policy_updates": 0}, {"learning_rate": 0}):
        with pytest.raises(ValueError):
            RlConfig.from_dict(bad)


def test_every_reward_brings_a_prompt_set_its_own_reward_can_score():
    for name in REWARDS:
        prompts = reward_prompts(name)
        assert len(prompts) >= 16 and len(set(prompts)) == len(prompts)
        assert reward_prompts(prompt_set_name(name)) == prompts == list(PROMPTS[name])
    assert prompt_set_name("arithmetic") == "reward:arithmetic:v1"
    score = get_reward("arithmetic")
    first = reward_prompts("arithmetic")[0]  # What is 2 + 9?
    assert score(first, "11") == 1.0
    with pytest.raises(KeyError):
        reward_prompts("reward:arithmetic:v0")
    with pytest.raises(KeyError):
        reward_prompts("nope")


@dataclass
class Event:
    type: str
    aggregate_id: str
    payload: dict[str, Any] = field(default_factory=dict)


def _running_rl_job():
    """A research loop on an adapter alone: no dataset, a warm start."""
    state, events = handle(Event("training.requested", "job-1", {
        "job_id": "job-1", "cycle_id": "cycle-1", "kind": "rl", "model": "tiny", "dataset": None,
        "config": {"steps": 4}, "warm_start": SHA, "hardware_plan": None, "requested_by": "operator"}),
        initial_state())
    assert [e.type for e in events] == ["training.started"]
    return state


def test_an_rl_step_reports_its_kl_and_distinct_share_and_an_mntp_step_does_not():
    state = _running_rl_job()
    point = {"step": 1, "total_steps": 4, "learning_rate": 0.02, "tokens_per_s": 50.0, "loss": 0.1,
             "reward_mean": 0.6, "reward_std": 0.2, "kl": 0.013, "distinct_share": 0.875}
    state, events = handle(JobProgressed("job-1", point), state)
    payload = events[0].payload
    assert (payload["kl"], payload["distinct_share"], payload["reward_std"]) == (0.013, 0.875, 0.2)
    validate_payload("training.progressed", 1, payload)
    _, events = handle(JobProgressed("job-1", {**point, "step": 2, "kl": None, "distinct_share": None}), state)
    assert "kl" not in events[0].payload and "distinct_share" not in events[0].payload  # as before these fields


def test_a_research_loop_completion_carries_its_curve_summary_collapse_and_prompt_set():
    state = _running_rl_job()
    metrics = {"before": {"reward_mean": 0.58, "reward_std": 0.1, "distinct_share": 1.0, "samples": 64},
               "after": {"reward_mean": 0.8, "reward_std": 0.0, "distinct_share": 0.125, "samples": 64},
               "reward_mean_first": 0.55, "reward_mean_last": 0.8, "kl_final": 0.4, "distinct_share_final": 0.125,
               "collapsed": True}
    _, events = handle(JobFinished("job-1", {
        "adapter_uri": f"artefact://sha256/{'b' * 64}", "adapter_sha256": "b" * 64, "status": "trained",
        "fallback_reason": None, "metrics": metrics, "duration_s": 3.0, "energy": None,
        "base_model": {"name": "tiny", "checksum": "c" * 64}, "prompt_set": "reward:length_target:v1"}), state)
    payload = events[0].payload
    assert payload["metrics"]["collapsed"] is True and payload["metrics"]["kl_final"] == 0.4
    assert payload["metrics"]["distinct_share_after"] == 0.125 and payload["prompt_set"] == "reward:length_target:v1"
    assert payload["dataset_uri"] is None
    validate_payload("training.completed", 1, payload)


def test_research_settings_learn_at_rl_rates_and_leave_the_shape_to_the_adapter():
    settings = research_settings({"learning_rate": 1e-5, "lora_rank": 8, "lora_alpha": 16, "steps": 100}, None)
    low, high = RESEARCH_SPACE.params[0].low, RESEARCH_SPACE.params[0].high
    assert low <= settings["learning_rate"] <= high and low <= 2e-2 <= high
    assert not {"lora_rank", "lora_alpha", "target_modules"} & set(settings)
    assert settings["kl_beta"] > 0 and settings["clip_eps"] == 0.2 and settings["steps"] == 100
    assert research_settings({}, {"learning_rate": 0.01, "steps": 30}) == {
        "learning_rate": 0.01, "kl_beta": 0.04, "clip_eps": 0.2, "policy_updates": 2, "steps": 30}
    assert research_settings({}, None)["learning_rate"] == 5e-3
    assert research_settings({"learning_rate": 1.0}, None)["learning_rate"] == high
    RlConfig.from_dict(settings)  # a configuration the trainer runs as it is

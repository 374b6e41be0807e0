"""The RL research loop raises a verifiable reward on the tiny model, near the policy it started from."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from peft import PeftModel

from shared.ml.grpo import StartingPolicy, completion_logprobs, grpo_loss
from shared.ml.models import load_model
from shared.ml.rl import RlConfig, group_advantages, train_rl
from tests.integration.trainer.resume_support import crash_then_resume, same_adapter


def test_group_advantages_are_relative_to_the_group():
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.3, 0.3, 0.3, 0.3]])
    advantages = group_advantages(rewards)
    assert torch.allclose(advantages.mean(dim=1), torch.zeros(2), atol=1e-6)
    assert advantages[0, 0] > 0 > advantages[0, 1]
    assert torch.equal(advantages[1], torch.zeros(4))  # equal rewards teach nothing


# The adapter covers the output head, which shares its weights with the embedding.
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_mean_reward_rises_on_length_target(model_cache, tmp_path):
    config = RlConfig(model="tiny", steps=40, learning_rate=3e-2, reward="length_target",
                      reward_params={"target": 20}, group_size=8, prompts_per_step=4, max_new_tokens=8, seed=0)
    prompts = [f"Item {i}:" for i in range(16)]
    points = []
    result = train_rl(config, prompts, tmp_path / "rl", model_cache, progress=points.append)

    rewards = [p["reward_mean"] for p in points]
    assert len(rewards) == 40
    assert all({"reward_std", "kl", "distinct_share", "tokens_per_s"} <= set(p) for p in points)
    quarter = len(rewards) // 4
    first, last = statistics.fmean(rewards[:quarter]), statistics.fmean(rewards[-quarter:])
    print(f"rl length_target reward: first quarter {first:.3f}, last quarter {last:.3f}, "
          f"final kl {points[-1]['kl']:.3f}")
    # The KL penalty (default kl_beta) trades some reward for staying near the starting policy.
    assert last > first + 0.15
    assert result.metrics["after"]["reward_mean"] > result.metrics["before"]["reward_mean"]
    assert points[0]["kl"] == pytest.approx(0.0, abs=1e-6) and points[-1]["kl"] > 0  # a fresh adapter: the base
    metrics = result.metrics
    assert (metrics["reward_mean_first"], metrics["reward_mean_last"]) == (rewards[0], rewards[-1])
    assert (metrics["kl_final"], metrics["distinct_share_final"]) == (points[-1]["kl"], points[-1]["distinct_share"])
    assert metrics["collapsed"] is False and metrics["after"]["distinct_share"] > 0.5
    assert result.summary["prompt_set"] is None  # prompts given: none of a reward's sets

    # The adapter (output head included, its frozen base weights not) reloads exactly.
    from safetensors.torch import load_file

    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert any("lm_head.lora_B" in k for k in saved) and not any("embed_tokens" in k for k in saved)
    reloaded = PeftModel.from_pretrained(load_model("tiny", model_cache).model, str(result.adapter_dir)).eval()
    ids = torch.tensor([[101, 202, 303]])
    with torch.no_grad():
        assert torch.equal(result.model.eval()(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def _rollout_on(model, tokenizer):
    from shared.ml.grpo import sample_rollout

    return sample_rollout(model, tokenizer, ["Item 1:", "Item 22:"], group_size=3, max_new_tokens=4, temperature=1.0)


def _loss(model, rollout, starting, kl_beta, clip_eps=0.2, sampled=None, advantages=None):
    reference = starting.logprobs(model, rollout, 1.0)  # first: it swaps weights the policy's graph would need
    logprobs = completion_logprobs(model, rollout, 1.0)
    sampled = logprobs.detach() if sampled is None else sampled
    advantages = torch.linspace(-1, 1, 6) if advantages is None else advantages
    return grpo_loss(logprobs, sampled, reference, advantages, rollout.completion_mask, clip_eps, kl_beta)


def _move(model, std=0.5):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)


def test_the_kl_penalty_is_towards_the_policy_the_run_started_from(model_cache):
    from shared.ml.lora import attach_lora

    loaded = load_model("tiny", model_cache)
    torch.manual_seed(0)
    model = attach_lora(loaded.model, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"])
    _move(model)  # a warm start: an adapter that already moved the base model
    starting = StartingPolicy.capture(model)
    rollout = _rollout_on(model, loaded.tokenizer)
    # At the start the policy is the starting policy: the penalty adds exactly nothing...
    loss, kl = _loss(model, rollout, starting, kl_beta=0.5)
    assert kl == 0.0 and torch.equal(loss, _loss(model, rollout, starting, kl_beta=0.0)[0])
    with torch.no_grad(), model.disable_adapter():  # ...though the policy is far from the base model
        base = completion_logprobs(model, rollout, 1.0)
    assert not torch.allclose(base, starting.logprobs(model, rollout, 1.0))
    # ...and once the adapter moves on, the penalty is positive; the starting weights stay as they were.
    before = {name: weight.clone() for name, weight in starting.weights.items()}
    _move(model)
    loss, kl = _loss(model, rollout, starting, kl_beta=0.5)
    assert kl > 0 and loss > _loss(model, rollout, starting, kl_beta=0.0)[0]
    assert all(torch.equal(before[name], weight) for name, weight in starting.weights.items())


def test_the_ratio_to_the_sampling_policy_is_clipped(model_cache):
    from shared.ml.lora import attach_lora

    loaded = load_model("tiny", model_cache)
    torch.manual_seed(1)
    model = attach_lora(loaded.model, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"])
    rollout = _rollout_on(model, loaded.tokenizer)
    starting = StartingPolicy.capture(model)
    with torch.no_grad():
        sampled = completion_logprobs(model, rollout, 1.0)
    # The policy has since made every sampled token 1.5 times likelier than when it was sampled: past
    # 1 + clip_eps, a completion with a positive advantage is pulled no further, one with a negative still is.
    params = [p for p in model.parameters() if p.requires_grad]
    likelier = sampled - torch.log(torch.tensor(1.5))

    def gradient(advantages, clip_eps):
        loss, _ = _loss(model, rollout, starting, 0.0, clip_eps, sampled=likelier, advantages=advantages)
        return [g for g in torch.autograd.grad(loss, params, allow_unused=True) if g is not None]

    assert all(torch.count_nonzero(g) == 0 for g in gradient(torch.ones(6), clip_eps=0.2))
    assert any(torch.count_nonzero(g) > 0 for g in gradient(torch.ones(6), clip_eps=0.0))  # 0: no clipping
    assert any(torch.count_nonzero(g) > 0 for g in gradient(-torch.ones(6), clip_eps=0.2))


def test_the_loss_stays_finite_when_a_token_was_pushed_far_from_its_sampling_and_starting_policies():
    logprobs = torch.tensor([[-200.0, -0.1], [-0.5, -300.0]], requires_grad=True)
    sampled, starting = torch.tensor([[-1.0, -0.2], [-0.4, -1.0]]), torch.tensor([[-2.0, -0.3], [-0.6, -2.0]])
    loss, kl = grpo_loss(logprobs, sampled, starting, torch.tensor([1.0, -1.0]), torch.ones(2, 2, dtype=torch.bool),
                         clip_eps=0.2, kl_beta=0.04)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(kl) and torch.isfinite(logprobs.grad).all()


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_a_research_loop_continues_an_adapter_of_another_rank_on_its_reward_prompts(model_cache, texts, tmp_path):
    """MNTP at rank 4, then RL warm-started from it with the default rank 8: the adapter stays rank 4."""
    from services.trainer.worker import run
    from shared.ml.mntp import MntpConfig, train_mntp

    mntp = train_mntp(MntpConfig(model="tiny", steps=2, batch_size=4, max_length=32, lora_rank=4, lora_alpha=8,
                                 checkpoint_every=0, device="cpu", precision="float32"), texts, tmp_path / "mntp",
                      model_cache)
    assert RlConfig().lora_rank == 8
    outcome = run({"job_id": "job-rl", "kind": "rl", "dataset_path": None, "dataset_sha256": None,
                   "config": {"model": "tiny", "steps": 3, "group_size": 4, "prompts_per_step": 2, "eval_prompts": 2,
                              "max_new_tokens": 4, "checkpoint_every": 2},
                   "out_dir": str(tmp_path / "rl"), "cache_dir": str(model_cache), "resume_from": None,
                   "warm_start_dir": str(mntp.adapter_dir)})

    adapter = json.loads((tmp_path / "rl" / "adapter" / "adapter_config.json").read_text())
    summary = json.loads((tmp_path / "rl" / "adapter" / "training_summary.json").read_text())
    assert outcome["status"] == "trained" and adapter["r"] == 4 and adapter["lora_alpha"] == 8
    assert summary["lora"]["rank"] == summary["config"]["lora_rank"] == 4
    assert summary["config"]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert outcome["prompt_set"] == summary["prompt_set"] == "reward:length_target:v1"
    assert summary["records"]["prompts"] == 32
    # The penalty holds the loop to the adapter it continues: the first step's policy is that adapter.
    assert outcome["curve"][0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert {"reward_mean_first", "reward_mean_last", "kl_final", "distinct_share_final", "collapsed"} <= set(
        outcome["metrics"])


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_rl_resume_continues_from_the_checkpoint_step(model_cache, tmp_path):
    config = RlConfig(model="tiny", steps=6, learning_rate=3e-2, reward="length_target",
                      reward_params={"target": 20}, group_size=4, prompts_per_step=2, max_new_tokens=6,
                      eval_prompts=4, checkpoint_every=3, seed=3)
    prompts = [f"Item {i}:" for i in range(8)]
    resumed, resumed_points = crash_then_resume(train_rl, config, prompts, tmp_path / "crashed", model_cache, crash_at=4)
    assert resumed.resumed_from_step == 3
    assert [p["step"] for p in resumed_points] == [4, 5, 6]
    assert [p["checkpoint_step"] for p in resumed_points] == [3, 3, 3]

    straight_points = []
    straight = train_rl(config, prompts, tmp_path / "straight", model_cache, progress=straight_points.append)
    # Rollout sampling, optimiser and scheduler state are restored: the same rewards, the same adapter.
    assert [p["reward_mean"] for p in resumed_points] == [p["reward_mean"] for p in straight_points[3:]]
    assert same_adapter(resumed.adapter_dir, straight.adapter_dir)
    assert resumed.metrics == straight.metrics
    assert [p["step"] for p in resumed.curve] == [1, 2, 3, 4, 5, 6]

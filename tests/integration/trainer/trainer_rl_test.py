"""The RL research loop raises a verifiable reward on the tiny model."""

from __future__ import annotations

import statistics

import pytest
import torch
from peft import PeftModel

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
    assert len(rewards) == 40 and all("reward_std" in p and "tokens_per_s" in p for p in points)
    quarter = len(rewards) // 4
    first, last = statistics.fmean(rewards[:quarter]), statistics.fmean(rewards[-quarter:])
    print(f"rl length_target reward: first quarter {first:.3f}, last quarter {last:.3f}")
    assert last > first + 0.2
    assert result.metrics["after"]["reward_mean"] > result.metrics["before"]["reward_mean"]

    # The adapter (output head included, its frozen base weights not) reloads exactly.
    from safetensors.torch import load_file

    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert any("lm_head.lora_B" in k for k in saved) and not any("embed_tokens" in k for k in saved)
    reloaded = PeftModel.from_pretrained(load_model("tiny", model_cache).model, str(result.adapter_dir)).eval()
    ids = torch.tensor([[101, 202, 303]])
    with torch.no_grad():
        assert torch.equal(result.model.eval()(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_kl_penalty_is_zero_while_the_adapter_is_untrained(model_cache):
    from shared.ml.lora import attach_lora
    from shared.ml.rl import policy_loss, sample_rollout

    loaded = load_model("tiny", model_cache)
    torch.manual_seed(0)
    model = attach_lora(loaded.model, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"])
    rollout = sample_rollout(model, loaded.tokenizer, ["Item 1:", "Item 22:"], group_size=3, max_new_tokens=4, temperature=1.0)
    advantages = torch.linspace(-1, 1, 6)
    # A fresh LoRA (B = 0) is the reference model, so the KL term adds exactly nothing...
    assert torch.equal(policy_loss(model, rollout, advantages, 1.0, kl_coef=0.5),
                       policy_loss(model, rollout, advantages, 1.0, kl_coef=0.0))
    # ...and once the adapter moves, the penalty is positive.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    assert policy_loss(model, rollout, advantages, 1.0, kl_coef=0.5) > policy_loss(model, rollout, advantages, 1.0, kl_coef=0.0)


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

"""The group-relative policy optimisation objective: rollouts, advantages, the clipped and regularised loss.

For each prompt a group of completions is sampled; each completion's advantage
is its reward relative to its group ((r - mean) / (std + eps)). The loss per
completion token is the PPO-style clipped surrogate

    -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A) + kl_beta * KL

where ``ratio`` compares the policy being updated with the one that sampled the
rollout (its log-probabilities taken when the rollout was sampled) and ``KL``
is the k3 estimator of KL(policy || starting policy): the policy the run
started from, the warm-start adapter or the base model. Without the penalty a
high learning rate finds one answer the reward likes and gives it to every
prompt; the penalty keeps the policy near what it could already say.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from shared.contracts.collapse import distinct_share

EPS = 1e-4
# exp(20) is about 5e8: far outside any trust region, still finite in float32.
MAX_LOG_RATIO = 20.0


@dataclass
class Rollout:
    prompts: list[str]  # one per completion
    sequences: torch.Tensor  # (N, prompt_len + completion_len)
    prompt_len: int
    attention_mask: torch.Tensor  # real prompt tokens and completion tokens up to the first EOS
    completion_mask: torch.Tensor  # (N, completion_len)
    completions: list[str]

    def groups(self, group_size: int) -> list[list[str]]:
        """The completions, one list per prompt."""
        return [self.completions[i : i + group_size] for i in range(0, len(self.completions), group_size)]

    def distinct_share(self, group_size: int) -> float:
        return distinct_share(self.groups(group_size))


def sample_rollout(model: Any, tokenizer: Any, prompts: Sequence[str], group_size: int, max_new_tokens: int,
                   temperature: float) -> Rollout:
    """``group_size`` sampled completions per prompt, grouped consecutively."""
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        sequences = model.generate(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=group_size,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    model.train(was_training)
    prompt_len = encoded["input_ids"].shape[1]
    completion = sequences[:, prompt_len:]
    is_eos = completion == tokenizer.eos_token_id
    # Keep tokens up to and including the first EOS; what follows is padding.
    completion_mask = (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0
    attention = torch.cat([encoded["attention_mask"].repeat_interleave(group_size, dim=0), completion_mask.long()], dim=1)
    texts = [
        tokenizer.decode(row[mask], skip_special_tokens=True) for row, mask in zip(completion, completion_mask)
    ]
    return Rollout(
        prompts=[p for p in prompts for _ in range(group_size)],
        sequences=sequences,
        prompt_len=prompt_len,
        attention_mask=attention,
        completion_mask=completion_mask,
        completions=texts,
    )


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(r - mean) / (std + eps) within each group (row); a group of equal rewards teaches nothing."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + EPS)


def completion_logprobs(model: Any, rollout: Rollout, temperature: float) -> torch.Tensor:
    """(N, completion_len): the log-probability of each sampled completion token under ``model``."""
    completion_len = rollout.sequences.shape[1] - rollout.prompt_len
    # Left padding shifts positions; give the same positions generate() used.
    positions = (rollout.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(
        input_ids=rollout.sequences,
        attention_mask=rollout.attention_mask,
        position_ids=positions,
        logits_to_keep=completion_len + 1,
    ).logits[:, :-1]
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    tokens = rollout.sequences[:, rollout.prompt_len :]
    return logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def grpo_loss(logprobs: torch.Tensor, sampled: torch.Tensor, starting: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float, kl_beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to minimise and the mean KL to the starting policy (detached).

    ``logprobs``: the policy being updated; ``sampled``: the policy that sampled
    the rollout; ``starting``: the policy the run started from; all (N, T) per
    completion token. ``advantages``: (N,). ``clip_eps`` 0 turns clipping off.
    Token terms are averaged per completion, then over completions.
    """
    mask = mask.float()
    lengths = mask.sum(dim=1).clamp(min=1.0)
    # Log-ratios are bounded before exp: a token pushed far down by the previous update of the
    # same rollout must not overflow to inf and turn the whole gradient into NaN.
    ratio = torch.exp((logprobs - sampled.detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    advantage = advantages.unsqueeze(1)
    surrogate = ratio * advantage
    if clip_eps > 0:
        surrogate = torch.min(surrogate, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantage)
    # k3 estimator of KL(policy || starting policy): non-negative, unbiased, zero where they agree.
    delta = (starting.detach() - logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    kl = torch.exp(delta) - delta - 1.0
    per_token = -surrogate + kl_beta * kl
    loss = ((per_token * mask).sum(dim=1) / lengths).mean()
    kl_mean = ((kl * mask).sum(dim=1) / lengths).mean()
    # each token's term is >= 0; float rounding near zero must not report a negative divergence
    return loss, kl_mean.detach().clamp(min=0.0)


class StartingPolicy:
    """The policy a run started from, kept as the adapter's trainable weights at the start.

    A fresh LoRA starts with B = 0, so its starting policy is exactly the base
    model; a warm start's is the adapter it continues. The weights are swapped
    in for one no-grad forward pass and swapped back.
    """

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights

    @classmethod
    def capture(cls, model: Any) -> "StartingPolicy":
        return cls({name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad})

    def state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps, so a resumed run is held to the same start."""
        return self.weights

    def logprobs(self, model: Any, rollout: Rollout, temperature: float) -> torch.Tensor:
        """The starting policy's log-probabilities of the rollout's completion tokens.

        Call it before the policy's own forward pass of the step: the swap writes
        the weights in place, which a graph built before it could not differentiate.
        """
        with torch.no_grad(), self._swapped_in(model):
            return completion_logprobs(model, rollout, temperature)

    @contextmanager
    def _swapped_in(self, model: Any) -> Iterator[None]:
        params = dict(model.named_parameters())
        current = {name: params[name].detach().clone() for name in self.weights}
        try:
            for name, weight in self.weights.items():
                params[name].copy_(weight)
            yield
        finally:
            for name, weight in current.items():
                params[name].copy_(weight)

"""Reinforcement-learning research loop: group-relative policy optimisation on a LoRA adapter.

Each step samples ``group_size`` completions for each of ``prompts_per_step``
prompts, scores them with a verifiable reward, turns rewards into advantages
relative to their group ((r - mean) / (std + eps)) and takes one policy-gradient
step on the completion tokens' log-probabilities, optionally with a KL penalty
towards the base model (the same network with the adapter switched off).

Every ``checkpoint_every`` steps the adapter, the optimiser, the scheduler and
the random state are saved (``checkpoint.py``); a run resumed from a checkpoint
samples the same rollouts and ends with the same adapter as one never stopped.
The loop runs on the CPU in float32: its rollouts are short and sampled token
by token on the host (MNTP runs on a GPU where there is one, ``placement.py``).

Written directly on peft rather than TRL's GRPOTrainer: TRL computes
log-probabilities from ``lm_head.weight`` and so refuses adapters on the output
head, and without one a small model's policy barely moves.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from shared.ml.checkpoint import checkpoint_adapter, load_checkpoint, resume, save_checkpoint
from shared.ml.config import RlConfig
from shared.ml.lora import attach_configured_lora, lora_settings
from shared.ml.models import load_model, offline, torch_threads
from shared.ml.placement import resolve
from shared.ml.result import TrainingResult, finish_trained
from shared.ml.rewards import get_reward

__all__ = ["RlConfig", "Rollout", "evaluate_policy", "group_advantages", "sample_rollout", "train_rl"]

log = logging.getLogger("neurons.trainer.rl")

Progress = Callable[[dict[str, Any]], None]
Score = Callable[[str, str], float]
EPS = 1e-4


@dataclass
class Rollout:
    prompts: list[str]  # one per completion
    sequences: torch.Tensor  # (N, prompt_len + completion_len)
    prompt_len: int
    attention_mask: torch.Tensor  # real prompt tokens and completion tokens up to the first EOS
    completion_mask: torch.Tensor  # (N, completion_len)
    completions: list[str]


def sample_rollout(model: Any, tokenizer: Any, prompts: Sequence[str], group_size: int, max_new_tokens: int, temperature: float) -> Rollout:
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


def policy_loss(model: Any, rollout: Rollout, advantages: torch.Tensor, temperature: float, kl_coef: float) -> torch.Tensor:
    mask = rollout.completion_mask.float()
    lengths = mask.sum(dim=1).clamp(min=1.0)
    logprobs = completion_logprobs(model, rollout, temperature)
    per_sequence = (logprobs * mask).sum(dim=1) / lengths
    loss = -(advantages * per_sequence).mean()
    if kl_coef > 0:
        with torch.no_grad(), model.disable_adapter():
            reference = completion_logprobs(model, rollout, temperature)
        # k3 estimator of KL(policy || reference): non-negative, unbiased.
        delta = reference - logprobs
        kl = ((torch.exp(delta) - delta - 1.0) * mask).sum(dim=1) / lengths
        loss = loss + kl_coef * kl.mean()
    return loss


def evaluate_policy(
    model: Any, tokenizer: Any, prompts: Sequence[str], score: Score, config: RlConfig, seed: int
) -> dict[str, float]:
    """Mean and spread of the reward of sampled completions, with sampling fixed by ``seed``."""
    rewards: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), config.prompts_per_step):
            chunk = list(prompts[start : start + config.prompts_per_step])
            rollout = sample_rollout(model, tokenizer, chunk, config.group_size, config.max_new_tokens, config.temperature)
            rewards.extend(score(p, c) for p, c in zip(rollout.prompts, rollout.completions))
    return {
        "reward_mean": statistics.fmean(rewards),
        "reward_std": statistics.pstdev(rewards),
        "samples": len(rewards),
    }


class WarmupConstant:
    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0


def train_rl(
    config: RlConfig | dict[str, Any],
    prompts: Sequence[str],
    out_dir: Path,
    cache_dir: Path,
    progress: Progress | None = None,
    warm_start_adapter: Path | None = None,
    dataset_sha256: str | None = None,
    resume_from: Path | None = None,
) -> TrainingResult:
    """Train a LoRA adapter on a verifiable reward; the adapter and summary land in ``out_dir/adapter``.

    ``resume_from`` is a checkpoint folder written by an earlier run with the
    same configuration; training continues at its step.
    """
    config = config if isinstance(config, RlConfig) else RlConfig.from_dict(config)
    with torch_threads(config.model, config.threads):
        return _train_rl(config, prompts, out_dir, cache_dir, progress, warm_start_adapter, dataset_sha256, resume_from)


def _train_rl(
    config: RlConfig,
    prompts: Sequence[str],
    out_dir: Path,
    cache_dir: Path,
    progress: Progress | None,
    warm_start_adapter: Path | None,
    dataset_sha256: str | None,
    resume_from: Path | None,
) -> TrainingResult:
    offline()
    prompts = [p for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError("no prompts")
    score = get_reward(config.reward, **config.reward_params)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    context = f"model={config.model} reward={config.reward} dataset={(dataset_sha256 or '-')[:12]}"

    loaded = load_model(config.model, cache_dir)
    tokenizer = loaded.tokenizer
    state = load_checkpoint(Path(resume_from)) if resume_from else None
    torch.manual_seed(config.seed)
    adapter_source = checkpoint_adapter(Path(resume_from)) if state else warm_start_adapter
    model = attach_configured_lora(loaded.model, config, adapter_source)
    model.train()
    order = list(prompts)
    random.Random(config.seed).shuffle(order)
    eval_prompts = order[: config.eval_prompts]
    before = state["extra"]["metrics_before"] if state else evaluate_policy(
        model, tokenizer, eval_prompts, score, config, seed=config.seed + 1)
    log.info("rl %s: reward %.3f ± %.3f before training", context, before["reward_mean"], before["reward_std"])

    run = _RlRun(config, context, model, tokenizer, score, order, before)
    if state:
        run.restore(state, resume_from)
    run.train(out_dir / "checkpoint", progress)

    after = evaluate_policy(model, tokenizer, eval_prompts, score, config, seed=config.seed + 1)
    log.info("rl %s: reward %.3f -> %.3f", context, before["reward_mean"], after["reward_mean"])
    return finish_trained(
        kind="rl", model=model, out_dir=out_dir, config=config, lora=lora_settings(model),
        info=loaded.info, dataset_sha256=dataset_sha256,
        records={"prompts": len(prompts), "eval_prompts": len(eval_prompts)}, before=before, after=after,
        curve=run.curve, tokens=run.tokens,
        tokens_per_s=run.tokens / run.train_seconds if run.train_seconds > 0 else 0.0,
        duration_s=time.perf_counter() - started, resumed_from_step=run.start_step if state else None,
        warm_start=str(warm_start_adapter) if warm_start_adapter and not state else None,
        placement=resolve("cpu", "float32").describe(),
    )


class _RlRun:
    """The policy-gradient steps of a run, and its record across steps and restarts."""

    def __init__(
        self,
        config: RlConfig,
        context: str,
        model: Any,
        tokenizer: Any,
        score: Score,
        order: list[str],
        before: dict[str, float],
    ) -> None:
        self.config, self.context = config, context
        self.model, self.tokenizer, self.score, self.order = model, tokenizer, score, order
        self.before = before
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupConstant(config.warmup_steps))
        self.curve: list[dict[str, Any]] = []
        self.tokens, self.train_seconds, self.start_step = 0, 0.0, 0
        # The latest checkpoint, reported with progress.
        self.saved_step: int | None = None

    def restore(self, state: dict[str, Any], resume_from: Path | None) -> None:
        """Go on from a checkpoint: its step, optimiser, scheduler, curve, tokens and training time."""
        config, context = self.config, self.context
        self.start_step, changed = resume(state, self.optimizer, self.scheduler, config)
        self.saved_step = self.start_step
        self.curve = list(state["extra"]["curve"])
        self.tokens = int(state["extra"]["tokens"])
        self.train_seconds = float(state["extra"]["train_seconds"])
        if changed:
            log.warning("rl %s: resuming with a changed configuration (%s)", context, ", ".join(changed))
        log.info("rl %s: resuming at step %d of %d from %s", context, self.start_step, config.steps, resume_from)

    def train(self, checkpoint_dir: Path, progress: Progress | None) -> None:
        """Steps ``start_step``..``steps-1``, reporting every progress_every steps and checkpointing."""
        config = self.config
        window_tokens, window_start = 0, time.perf_counter()
        for step in range(self.start_step, config.steps):
            step_started = time.perf_counter()
            loss, rewards, lr, tokens = self.step(step)
            self.tokens += tokens
            window_tokens += tokens
            self.train_seconds += time.perf_counter() - step_started

            done = step + 1
            point = {
                "step": done,
                "loss": float(loss.detach()),
                "reward_mean": float(rewards.mean()),
                "reward_std": float(rewards.std(unbiased=False)),
                "learning_rate": lr,
            }
            self.curve.append(point)
            if done % config.progress_every == 0 or done == config.steps:
                self.report(point, window_tokens, time.perf_counter() - window_start, progress)
                window_tokens, window_start = 0, time.perf_counter()
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                self.checkpoint(checkpoint_dir, done)

    def step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, float, int]:
        """One policy-gradient step: the loss, the rewards, the learning rate used and the tokens sampled."""
        config, order = self.config, self.order
        chosen = [order[(step * config.prompts_per_step + i) % len(order)] for i in range(config.prompts_per_step)]
        rollout = sample_rollout(self.model, self.tokenizer, chosen, config.group_size, config.max_new_tokens,
                                 config.temperature)
        rewards = torch.tensor([self.score(p, c) for p, c in zip(rollout.prompts, rollout.completions)],
                               dtype=torch.float32)
        advantages = group_advantages(rewards.view(-1, config.group_size)).view(-1)
        loss = policy_loss(self.model, rollout, advantages, config.temperature, config.kl_coef)
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, rewards, lr, int(rollout.attention_mask.sum())

    def report(self, point: dict[str, Any], window_tokens: int, seconds: float, progress: Progress | None) -> None:
        config = self.config
        tokens_per_s = window_tokens / seconds if seconds > 0 else 0.0
        log.info(
            "rl %s: step %d/%d reward %.3f ± %.3f loss %.4f %.0f tokens/s",
            self.context, point["step"], config.steps, point["reward_mean"], point["reward_std"], point["loss"],
            tokens_per_s,
        )
        if progress is not None:
            progress({**point, "total_steps": config.steps, "tokens_per_s": tokens_per_s, "tokens": self.tokens,
                      "checkpoint_step": self.saved_step})

    def checkpoint(self, checkpoint_dir: Path, done: int) -> None:
        extra = {"metrics_before": self.before, "curve": self.curve, "tokens": self.tokens,
                 "train_seconds": self.train_seconds, "config": self.config.to_dict()}
        save_checkpoint(checkpoint_dir, self.model, self.optimizer, self.scheduler, done, extra)
        self.saved_step = done
        log.info("rl %s: checkpoint at step %d", self.context, done)

"""Reinforcement-learning research loop: group-relative policy optimisation on a LoRA adapter.

Each step samples ``group_size`` completions for each of ``prompts_per_step``
prompts, scores them with a verifiable reward, turns rewards into advantages
relative to their group and takes ``policy_updates`` optimiser steps on the
clipped, KL-regularised objective of ``grpo.py``: the ratio is to the policy
that sampled the rollout, the KL penalty to the policy the run started from
(the warm-start adapter, or the base model).

Every step reports the reward's mean and spread, the KL to the starting
policy and the share of distinct completions within a group; the run ends
with the curve's summary and whether the policy collapsed to one answer
(``shared.contracts.collapse``). Without a dataset the loop trains on the
reward's own prompt set and records its name.

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
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from shared.contracts.collapse import distinct_share, policy_collapsed
from shared.ml.checkpoint import checkpoint_adapter, load_checkpoint, resume, save_checkpoint
from shared.ml.config import RlConfig
from shared.ml.grpo import (Rollout, StartingPolicy, completion_logprobs, group_advantages, grpo_loss,
                            sample_rollout)
from shared.ml.lora import attach_configured_lora, lora_settings
from shared.ml.models import load_model, offline, torch_threads
from shared.ml.placement import resolve
from shared.ml.result import TrainingResult, finish_trained, write_summary
from shared.ml.rewards import get_reward, prompt_set_name, reward_prompts

__all__ = ["RlConfig", "Rollout", "StartingPolicy", "curve_summary", "evaluate_policy", "group_advantages",
           "sample_rollout", "train_rl"]

log = logging.getLogger("neurons.trainer.rl")

Progress = Callable[[dict[str, Any]], None]
Score = Callable[[str, str], float]


def evaluate_policy(
    model: Any, tokenizer: Any, prompts: Sequence[str], score: Score, config: RlConfig, seed: int
) -> dict[str, float]:
    """Mean and spread of the reward of sampled completions, and their share of distinct answers per prompt,
    with sampling fixed by ``seed``."""
    rewards: list[float] = []
    groups: list[list[str]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), config.prompts_per_step):
            chunk = list(prompts[start : start + config.prompts_per_step])
            rollout = sample_rollout(model, tokenizer, chunk, config.group_size, config.max_new_tokens, config.temperature)
            rewards.extend(score(p, c) for p, c in zip(rollout.prompts, rollout.completions))
            groups.extend(rollout.groups(config.group_size))
    return {
        "reward_mean": statistics.fmean(rewards),
        "reward_std": statistics.pstdev(rewards),
        "distinct_share": distinct_share(groups),
        "samples": len(rewards),
    }


def curve_summary(curve: Sequence[dict[str, Any]], after: dict[str, Any]) -> dict[str, Any]:
    """What ``training.completed`` says of a run's curve, and whether its policy collapsed.

    The first and last steps' mean reward, the last step's KL to the starting
    policy and share of distinct answers; ``collapsed`` judges the evaluation
    after training (more samples, fixed sampling) by ``policy_collapsed``.
    """
    first, last = (curve[0], curve[-1]) if curve else ({}, {})
    return {
        "reward_mean_first": first.get("reward_mean"),
        "reward_mean_last": last.get("reward_mean"),
        "kl_final": last.get("kl"),
        "distinct_share_final": last.get("distinct_share"),
        "collapsed": policy_collapsed(after["reward_std"], after["distinct_share"]),
    }


class WarmupConstant:
    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0


def train_rl(
    config: RlConfig | dict[str, Any],
    prompts: Sequence[str] | None,
    out_dir: Path,
    cache_dir: Path,
    progress: Progress | None = None,
    warm_start_adapter: Path | None = None,
    dataset_sha256: str | None = None,
    resume_from: Path | None = None,
) -> TrainingResult:
    """Train a LoRA adapter on a verifiable reward; the adapter and summary land in ``out_dir/adapter``.

    ``prompts`` None: the reward's own prompt set, whose name the summary
    records as ``prompt_set``. ``warm_start_adapter`` is continued with its own
    rank, alpha and target modules. ``resume_from`` is a checkpoint folder
    written by an earlier run with the same configuration; training continues at its step.
    """
    config = config if isinstance(config, RlConfig) else RlConfig.from_dict(config)
    prompt_set = None
    if prompts is None:
        prompts, prompt_set = reward_prompts(config.reward), prompt_set_name(config.reward)
    with torch_threads(config.model, config.threads):
        return _train_rl(config, prompts, prompt_set, out_dir, cache_dir, progress, warm_start_adapter,
                         dataset_sha256, resume_from)


def _train_rl(
    config: RlConfig,
    prompts: Sequence[str],
    prompt_set: str | None,
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
    context = f"model={config.model} reward={config.reward} prompts={prompt_set or (dataset_sha256 or '-')[:12]}"

    loaded = load_model(config.model, cache_dir)
    tokenizer = loaded.tokenizer
    state = load_checkpoint(Path(resume_from)) if resume_from else None
    torch.manual_seed(config.seed)
    adapter_source = checkpoint_adapter(Path(resume_from)) if state else warm_start_adapter
    model = attach_configured_lora(loaded.model, config, adapter_source)
    model.train()
    starting = _starting_policy(model, state)
    order = list(prompts)
    random.Random(config.seed).shuffle(order)
    eval_prompts = order[: config.eval_prompts]
    before = state["extra"]["metrics_before"] if state else evaluate_policy(
        model, tokenizer, eval_prompts, score, config, seed=config.seed + 1)
    log.info("rl %s: reward %.3f ± %.3f before training", context, before["reward_mean"], before["reward_std"])

    run = _RlRun(config, context, model, tokenizer, score, order, before, starting)
    if state:
        run.restore(state, resume_from)
    run.train(out_dir / "checkpoint", progress)

    after = evaluate_policy(model, tokenizer, eval_prompts, score, config, seed=config.seed + 1)
    summary = curve_summary(run.curve, after)
    log.log(logging.WARNING if summary["collapsed"] else logging.INFO,
            "rl %s: reward %.3f -> %.3f, spread %.3f, distinct answers %.2f%s", context, before["reward_mean"],
            after["reward_mean"], after["reward_std"], after["distinct_share"],
            ": the policy collapsed to one answer" if summary["collapsed"] else "")
    result = finish_trained(
        kind="rl", model=model, out_dir=out_dir, config=config, lora=lora_settings(model),
        info=loaded.info, dataset_sha256=dataset_sha256,
        records={"prompts": len(prompts), "eval_prompts": len(eval_prompts)}, before=before, after=after,
        curve=run.curve, tokens=run.tokens,
        tokens_per_s=run.tokens / run.train_seconds if run.train_seconds > 0 else 0.0,
        duration_s=time.perf_counter() - started, resumed_from_step=run.start_step if state else None,
        warm_start=str(warm_start_adapter) if warm_start_adapter and not state else None,
        placement=resolve("cpu", "float32").describe(),
    )
    result.metrics.update(summary)  # the same dict as the summary's metrics
    result.summary["prompt_set"] = prompt_set
    write_summary(result.adapter_dir, result.summary)
    return result


def _starting_policy(model: Any, state: dict[str, Any] | None) -> StartingPolicy:
    """The policy to stay near: the adapter as attached, or, on resume, the one the run first started from."""
    if state and state["extra"].get("starting_policy"):
        return StartingPolicy(state["extra"]["starting_policy"])
    if state:
        log.warning("the checkpoint keeps no starting policy (an earlier version wrote it): "
                    "the KL penalty holds the run near the checkpoint's adapter")
    return StartingPolicy.capture(model)


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
        starting: StartingPolicy,
    ) -> None:
        self.config, self.context = config, context
        self.model, self.tokenizer, self.score, self.order = model, tokenizer, score, order
        self.before, self.starting = before, starting
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
            point, tokens = self.step(step)
            self.tokens += tokens
            window_tokens += tokens
            self.train_seconds += time.perf_counter() - step_started
            self.curve.append(point)
            done = point["step"]
            if done % config.progress_every == 0 or done == config.steps:
                self.report(point, window_tokens, time.perf_counter() - window_start, progress)
                window_tokens, window_start = 0, time.perf_counter()
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                self.checkpoint(checkpoint_dir, done)

    def step(self, step: int) -> tuple[dict[str, Any], int]:
        """Sample a rollout, score it and update the policy on it: the step's point on the curve, the tokens sampled."""
        config, order = self.config, self.order
        chosen = [order[(step * config.prompts_per_step + i) % len(order)] for i in range(config.prompts_per_step)]
        rollout = sample_rollout(self.model, self.tokenizer, chosen, config.group_size, config.max_new_tokens,
                                 config.temperature)
        rewards = torch.tensor([self.score(p, c) for p, c in zip(rollout.prompts, rollout.completions)],
                               dtype=torch.float32)
        advantages = group_advantages(rewards.view(-1, config.group_size)).view(-1)
        starting = self.starting.logprobs(self.model, rollout, config.temperature)
        lr = self.optimizer.param_groups[0]["lr"]
        sampled, first_loss, first_kl = None, 0.0, 0.0
        for update in range(config.policy_updates):
            logprobs = completion_logprobs(self.model, rollout, config.temperature)
            # The first update sees the very policy that sampled the rollout: its log-probabilities are the old ones.
            sampled = logprobs.detach() if sampled is None else sampled
            loss, kl = grpo_loss(logprobs, sampled, starting, advantages, rollout.completion_mask,
                                 config.clip_eps, config.kl_beta)
            if update == 0:
                first_loss, first_kl = float(loss.detach()), float(kl)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        point = {"step": step + 1, "loss": first_loss, "reward_mean": float(rewards.mean()),
                 "reward_std": float(rewards.std(unbiased=False)), "kl": first_kl,
                 "distinct_share": rollout.distinct_share(config.group_size), "learning_rate": lr}
        return point, int(rollout.attention_mask.sum())

    def report(self, point: dict[str, Any], window_tokens: int, seconds: float, progress: Progress | None) -> None:
        config = self.config
        tokens_per_s = window_tokens / seconds if seconds > 0 else 0.0
        log.info(
            "rl %s: step %d/%d reward %.3f ± %.3f kl %.4f distinct %.2f loss %.4f %.0f tokens/s",
            self.context, point["step"], config.steps, point["reward_mean"], point["reward_std"], point["kl"],
            point["distinct_share"], point["loss"], tokens_per_s,
        )
        if progress is not None:
            progress({**point, "total_steps": config.steps, "tokens_per_s": tokens_per_s, "tokens": self.tokens,
                      "checkpoint_step": self.saved_step})

    def checkpoint(self, checkpoint_dir: Path, done: int) -> None:
        extra = {"metrics_before": self.before, "curve": self.curve, "tokens": self.tokens,
                 "train_seconds": self.train_seconds, "config": self.config.to_dict(),
                 "starting_policy": self.starting.state()}
        save_checkpoint(checkpoint_dir, self.model, self.optimizer, self.scheduler, done, extra)
        self.saved_step = done
        log.info("rl %s: checkpoint at step %d", self.context, done)

"""Training configurations, one dataclass per method (importable without torch).

A configuration travels in ``training.requested`` as a JSON object; keys this
version does not know are ignored with a warning, so an orchestrator that
searches a wider space never breaks an older trainer.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from shared.ml import placement

log = logging.getLogger("neurons.trainer.config")

C = TypeVar("C", bound="_Config")


class _Config:
    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any] | None) -> C:
        data = dict(data or {})
        for old, new in getattr(cls, "_renamed", {}).items():
            if old in data:
                data.setdefault(new, data[old])
                del data[old]
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            log.warning("%s: ignoring unknown keys %s", cls.__name__, unknown)
        config = cls(**{k: v for k, v in data.items() if k in known})
        config.check()  # type: ignore[attr-defined]
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


# The settings that give a LoRA adapter its shape. An adapter that training
# continues keeps its own: its ``adapter_config.json`` wins over a configuration's.
ADAPTER_SHAPE = ("lora_rank", "lora_alpha", "target_modules")


def adapter_shape(adapter_config: dict[str, Any]) -> dict[str, Any]:
    """The shape settings (``ADAPTER_SHAPE``) of a peft ``adapter_config.json``'s content."""
    targets = adapter_config.get("target_modules")
    shape = {"lora_rank": adapter_config.get("r"), "lora_alpha": adapter_config.get("lora_alpha"),
             # peft writes a list, or one pattern as a string
             "target_modules": sorted(targets) if isinstance(targets, (list, tuple, set)) else targets}
    return {name: value for name, value in shape.items() if value is not None}


def adopt_adapter_shape(config: Any, adapter_config: dict[str, Any]) -> list[str]:
    """Set ``config``'s rank, alpha and target modules to those of the adapter it continues.

    Returns the settings that changed, so a caller can say so.
    """
    changed = []
    for name, value in adapter_shape(adapter_config).items():
        current = getattr(config, name)
        if name == "target_modules" and isinstance(current, list) and isinstance(value, list):
            same = sorted(current) == value
        else:
            same = current == value
        if not same:
            changed.append(f"{name} {current} -> {value}")
            setattr(config, name, value)
    return changed


@dataclass
class MntpConfig(_Config):
    """Masked next-token prediction with LoRA, as in LLM2Vec."""

    model: str = "tiny"
    steps: int = 20
    learning_rate: float = 5e-4
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    mask_ratio: float = 0.2
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 128
    warmup_steps: int = 2
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_fraction: float = 0.1
    checkpoint_every: int = 50  # 0 turns checkpoints off
    progress_every: int = 10
    threads: int = 0  # torch intra-op threads; 0: 1 for the tiny model, torch's default otherwise
    # Where to compute (auto, cpu, cuda, cuda:N) and the base weights' precision (auto, float32,
    # bfloat16); auto is resolved by the node that runs the job (``placement.resolve``).
    device: str = "auto"
    precision: str = "auto"

    def check(self) -> None:
        _positive(self, "steps", "lora_rank", "batch_size", "grad_accum", "max_length", "progress_every")
        placement.check(self.device, self.precision)
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must lie in [0, 1), got {self.eval_fraction}")
        if self.max_length < 4:
            raise ValueError("max_length must be at least 4 tokens")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be positive")
        self.target_modules = _targets(self.target_modules)


@dataclass
class RlConfig(_Config):
    """Group-relative policy optimisation with a verifiable reward."""

    _renamed = {"kl_coef": "kl_beta"}  # the name an earlier version used

    model: str = "tiny"
    steps: int = 40
    learning_rate: float = 2e-2
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0  # dropout would make sampled and scored policies differ
    # lm_head is included so a small model can move probability between
    # individual tokens; attention-only adapters barely move a random model's policy.
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj", "lm_head"])
    reward: str = "length_target"
    reward_params: dict[str, Any] = field(default_factory=dict)
    group_size: int = 8
    prompts_per_step: int = 4
    max_new_tokens: int = 8
    temperature: float = 1.0
    # The update: a PPO-style clipped ratio to the policy that sampled the rollout
    # (``clip_eps``; 0 turns clipping off), ``policy_updates`` optimiser steps per
    # rollout, and a KL penalty of weight ``kl_beta`` towards the policy the run
    # started from (the warm-start adapter, or the base model).
    kl_beta: float = 0.04
    clip_eps: float = 0.2
    policy_updates: int = 1
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    seed: int = 0
    eval_prompts: int = 8
    progress_every: int = 1
    checkpoint_every: int = 10  # 0 turns checkpoints off
    threads: int = 0  # as MntpConfig.threads

    def check(self) -> None:
        _positive(self, "steps", "lora_rank", "group_size", "prompts_per_step", "max_new_tokens", "progress_every")
        if self.group_size < 2:
            raise ValueError("group_size must be at least 2: advantages are relative within a group")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if self.kl_beta < 0:
            raise ValueError(f"kl_beta must not be negative, got {self.kl_beta}")
        if not 0.0 <= self.clip_eps < 1.0:
            raise ValueError(f"clip_eps must lie in [0, 1), got {self.clip_eps}")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be positive")
        _positive(self, "policy_updates")
        self.target_modules = _targets(self.target_modules)


def _targets(targets: Any) -> Any:
    # one string is a pattern for peft, a list a set of module names
    return targets if isinstance(targets, str) else list(targets)


def _positive(config: Any, *names: str) -> None:
    for name in names:
        if int(getattr(config, name)) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")

"""Sizing jobs to the hardware: micro-batch, gradient accumulation and replicas.

Pure: no clock, no files, no environment. From one node's hardware profile
(cores, load, memory, GPUs), the model's size and the energy budget left,
``recommend_scaling`` gives the ``scaling.recommended`` figures, each with the
reasons that produced it. ``services.energy.domain`` turns them into the event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class ScalingConfig:
    """The rules of thumb behind ``scaling.recommended``; every figure is in its reasons."""

    target_batch: int = 32
    max_micro_batch: int = 64
    seq_len: int = 256
    # Share of memory left free for the OS, the tokenizer, the data pipeline.
    memory_headroom: float = 0.2
    # Weights: fp32 on CPU, bf16 on GPU.
    cpu_bytes_per_param: int = 4
    gpu_bytes_per_param: int = 2
    # LoRA trains ~1% of the weights; each trained weight holds fp32 weight,
    # gradient and two Adam moments (16 bytes).
    lora_fraction: float = 0.01
    # Activation bytes per token per model parameter at 2 bytes per value,
    # fitted on SmolLM2-135M with MNTP logits; scaled by bytes per value.
    activation_bytes_per_token_per_param: float = 0.005
    # Inference keeps no activations for backward: about a third of training.
    inference_activation_share: float = 1 / 3
    cores_per_trainer: int = 4
    cores_per_validator: int = 1
    max_trainer_replicas: int = 8
    max_validator_replicas: int = 8
    default_model_params: int = 135_000_000


@dataclass(frozen=True)
class _Node:
    """What the profile says about the node's cores and GPUs."""

    cores: int
    load_1m: float
    free_cores: int
    gpus: tuple[Mapping[str, Any], ...]
    memory_available: float

    @classmethod
    def of(cls, profile: Mapping[str, Any]) -> "_Node":
        cores = int(profile.get("cores") or 1)
        load_1m = float((profile.get("load_avg") or [0.0])[0])
        return cls(
            cores=cores,
            load_1m=load_1m,
            # Cores already busy with other work are not ours; keep one so work can run at all.
            free_cores=max(1, cores - math.floor(load_1m)),
            gpus=tuple(g for g in profile.get("gpus") or () if g.get("memory_total_bytes")),
            memory_available=float(profile.get("memory_available_bytes") or 0),
        )

    @property
    def on_gpu(self) -> bool:
        return bool(self.gpus)

    @property
    def core_note(self) -> str:
        return f"{self.cores} cores, 1-min load {self.load_1m:.2f} -> {self.free_cores} free"

    def usable_ram(self, config: ScalingConfig) -> float:
        return self.memory_available * (1 - config.memory_headroom)

    def usable_gpu_memory(self, config: ScalingConfig) -> list[float]:
        return [_gpu_free(g) * (1 - config.memory_headroom) for g in self.gpus]


@dataclass(frozen=True)
class _Footprint:
    """Bytes one job of this model needs on this node."""

    bytes_per_param: int
    weights: float
    # Weights plus the LoRA weights' fp32 value, gradient and two Adam moments.
    fixed: float
    # Training activations for one sample.
    per_sample: float
    # A validator: weights and inference activations for one sample.
    per_validator: float

    @classmethod
    def of(cls, model_params: int, on_gpu: bool, config: ScalingConfig) -> "_Footprint":
        bpp = config.gpu_bytes_per_param if on_gpu else config.cpu_bytes_per_param
        weights = model_params * bpp
        per_sample = config.seq_len * model_params * config.activation_bytes_per_token_per_param * bpp / 2
        return cls(
            bytes_per_param=bpp,
            weights=weights,
            fixed=weights + model_params * config.lora_fraction * 16,
            per_sample=per_sample,
            per_validator=weights + per_sample * config.inference_activation_share,
        )


@dataclass(frozen=True)
class _Budget:
    """The energy left in the tightest budget window, if any."""

    remaining_wh: float | None
    window: str | None

    def cap(self, per_job: float | None, what: str, notes: list[str]) -> int | None:
        """How many more jobs the window still pays for; None when it sets no cap."""
        if self.remaining_wh is None:
            notes.append("no energy budget configured")
            return None
        if self.remaining_wh <= 0:
            notes.append(f"energy budget {self.window} is used up")
            return 0
        if per_job is None or per_job <= 0:
            notes.append(
                f"{self.remaining_wh:.1f} Wh left in budget {self.window}; no measured {what} yet to size against"
            )
            return None
        cap = math.floor(self.remaining_wh / per_job)
        notes.append(f"{self.remaining_wh:.1f} Wh left in budget {self.window} / {per_job:.2f} Wh per {what} -> {cap}")
        return cap


def recommend_scaling(
    profile: Mapping[str, Any],
    *,
    model_params: int,
    remaining_wh: float | None = None,
    binding_window: str | None = None,
    wh_per_training: float | None = None,
    wh_per_validation: float | None = None,
    config: ScalingConfig = ScalingConfig(),
) -> dict[str, Any]:
    """Micro-batch, gradient accumulation and replica counts for one node, with reasons."""
    node = _Node.of(profile)
    footprint = _Footprint.of(model_params, node.on_gpu, config)
    budget = _Budget(remaining_wh, binding_window)
    reasons: dict[str, list[str]] = {
        "micro_batch": [],
        "gradient_accumulation": [],
        "trainer_replicas": [],
        "validator_replicas": [],
    }
    trainers, device_memory = _trainer_replicas(
        node, footprint, budget, wh_per_training, config, reasons["trainer_replicas"]
    )
    share = device_memory if node.on_gpu else device_memory / max(1, trainers)
    micro_batch = _micro_batch(share, footprint, model_params, config, reasons["micro_batch"])
    accumulation = max(1, math.ceil(config.target_batch / micro_batch))
    reasons["gradient_accumulation"].append(
        f"target batch {config.target_batch} / micro-batch {micro_batch} -> {accumulation} accumulation step(s)"
    )
    validators = _validator_replicas(node, footprint, budget, wh_per_validation, config, reasons["validator_replicas"])
    return {
        "model_params": int(model_params),
        "device": "cuda" if node.on_gpu else "cpu",
        "micro_batch": micro_batch,
        "gradient_accumulation": accumulation,
        "effective_batch": micro_batch * accumulation,
        "trainer_replicas": trainers,
        "validator_replicas": validators,
        "reasons": reasons,
        "inputs": {
            "cores": node.cores,
            "free_cores": node.free_cores,
            "memory_available_bytes": int(profile.get("memory_available_bytes") or 0),
            "gpu_count": len(node.gpus),
            "remaining_wh": remaining_wh,
            "binding_window": binding_window,
            "wh_per_training": wh_per_training,
            "wh_per_validation": wh_per_validation,
        },
    }


def _trainer_replicas(
    node: _Node,
    footprint: _Footprint,
    budget: _Budget,
    wh_per_training: float | None,
    config: ScalingConfig,
    notes: list[str],
) -> tuple[int, float]:
    """Trainers the node holds, and the memory of the device they train on."""
    one_sample = footprint.fixed + footprint.per_sample
    if node.on_gpu:
        usable = node.usable_gpu_memory(config)
        by_hardware = sum(1 for u in usable if u >= one_sample)
        notes.append(
            f"{by_hardware} of {len(node.gpus)} GPUs fit the model ({_gib(one_sample)} for weights, "
            f"LoRA state and one sample); one trainer per GPU"
        )
        by_cores = node.free_cores
        notes.append(f"{node.core_note}; one core drives each GPU")
        device_memory = max(usable) if usable else 0.0
    else:
        usable_total = node.usable_ram(config)
        by_hardware = math.floor(usable_total / one_sample) if one_sample else 0
        notes.append(
            f"{_gib(usable_total)} usable RAM ({config.memory_headroom:.0%} headroom) / "
            f"{_gib(one_sample)} per trainer at micro-batch 1 -> {by_hardware}"
        )
        by_cores = max(1, node.free_cores // config.cores_per_trainer)
        notes.append(f"{node.core_note}; {config.cores_per_trainer} cores per trainer -> {by_cores}")
        device_memory = usable_total
    trainers = _capped(
        [by_hardware, by_cores, config.max_trainer_replicas],
        budget.cap(wh_per_training, "training", notes),
        config.max_trainer_replicas,
        notes,
    )
    return trainers, device_memory


def _micro_batch(
    share: float, footprint: _Footprint, model_params: int, config: ScalingConfig, notes: list[str]
) -> int:
    """The micro-batch that fits the memory one trainer gets; accumulation makes up the rest."""
    per_sample = footprint.per_sample
    fits = math.floor((share - footprint.fixed) / per_sample) if per_sample else config.max_micro_batch
    limit = min(config.max_micro_batch, config.target_batch)
    if fits < 1:
        notes.append(
            f"memory is tight: {_gib(share)} per trainer, {_gib(footprint.fixed + per_sample)} needed for one sample; "
            "trying micro-batch 1"
        )
        return 1
    micro_batch = _floor_pow2(min(fits, limit))
    notes.append(
        f"{model_params / 1e6:.0f}M params x {footprint.bytes_per_param} B = {_gib(footprint.weights)} weights; "
        f"{_gib(per_sample)} activations per sample at {config.seq_len} tokens; "
        f"{_gib(share)} per trainer fits {fits} samples"
    )
    if fits > limit:
        notes.append(f"capped at {limit} (target batch / max micro-batch)")
    notes.append(f"rounded down to a power of two: {micro_batch}")
    return micro_batch


def _validator_replicas(
    node: _Node,
    footprint: _Footprint,
    budget: _Budget,
    wh_per_validation: float | None,
    config: ScalingConfig,
    notes: list[str],
) -> int:
    """Validators the node holds: inference only, so lighter than a trainer."""
    per_validator = footprint.per_validator
    if node.on_gpu:
        by_memory = sum(math.floor(u / per_validator) for u in node.usable_gpu_memory(config))
        notes.append(
            f"{_gib(per_validator)} per replica (weights + inference activations); "
            f"fits {by_memory} across {len(node.gpus)} GPUs"
        )
    else:
        usable_total = node.usable_ram(config)
        by_memory = math.floor(usable_total / per_validator) if per_validator else 0
        notes.append(f"{_gib(usable_total)} usable RAM / {_gib(per_validator)} per replica -> {by_memory}")
    by_cores = max(1, node.free_cores // config.cores_per_validator)
    notes.append(f"{node.core_note}; {config.cores_per_validator} core(s) per replica -> {by_cores}")
    return _capped(
        [by_memory, by_cores, config.max_validator_replicas],
        budget.cap(wh_per_validation, "validation", notes),
        config.max_validator_replicas,
        notes,
    )


def _capped(caps: list[int], energy_cap: int | None, maximum: int, notes: list[str]) -> int:
    """The tightest of the hardware caps and the energy cap, noted when it is the maximum."""
    if energy_cap is not None:
        caps.append(energy_cap)
    replicas = max(0, min(caps))
    if replicas == maximum:
        notes.append(f"capped at {maximum}")
    return replicas


def _gpu_free(gpu: Mapping[str, Any]) -> float:
    free = gpu.get("memory_free_bytes")
    return float(gpu["memory_total_bytes"] if free is None else free)


def _floor_pow2(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"

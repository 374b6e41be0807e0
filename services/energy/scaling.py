"""Sizing jobs to the hardware: micro-batch, gradient accumulation and replicas.

Pure: no clock, no files, no environment. From one node's hardware profile
(cores, load, memory, GPUs), the model's size, the energy budget left and what
the node was observed to do (``Observed``: the soaks' replica memory, latency
and incidents from ``validation.cycle_completed``, the trainer's measured
joules per step from ``training.completed``), ``recommend_scaling`` gives the
``scaling.recommended`` figures, each with the reasons that produced it; a
reason names every observation it used. ``services.energy.domain`` turns them
into the event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from statistics import median
from typing import Any, Mapping

from shared.contracts.values import number

# Soak cycles and training jobs remembered for sizing: enough to smooth one odd
# cycle, few enough to follow a change of model or hardware.
OBSERVATIONS_KEPT = 20


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
    # A soak episode slower than this (median over the replicas) means the
    # replicas starve each other: fewer run at once.
    target_replica_latency_ms: float = 10_000.0


@dataclass(frozen=True)
class Observed:
    """What this node was seen to do, newest last: soak cycles' replica processes and training jobs.

    A soak cycle (``validation.cycle_completed``): ``processes`` replicas ran
    at once (both sides), the largest resident memory among them
    (``peak_rss_mb``), their median episode latency (``latency_ms``) and how
    many ended in an incident. A training job (``training.completed``): its
    measured joules over its steps. Each is kept once (by soak cycle, by job).
    """

    soak_cycles: tuple[Mapping[str, Any], ...] = ()
    training_jobs: tuple[Mapping[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"soak_cycles": [dict(c) for c in self.soak_cycles],
                "training_jobs": [dict(j) for j in self.training_jobs]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "Observed":
        data = data or {}
        return cls(tuple(dict(c) for c in data.get("soak_cycles") or ()),
                   tuple(dict(j) for j in data.get("training_jobs") or ()))

    def peak_rss_bytes(self) -> float | None:
        peaks = [c["peak_rss_mb"] for c in self.soak_cycles if c.get("peak_rss_mb") is not None]
        return max(peaks) * 2**20 if peaks else None

    def latency(self) -> tuple[float, int] | None:
        """The median episode latency over the soak cycles kept, and the replica processes they ran."""
        timed = [c for c in self.soak_cycles if c.get("latency_ms") is not None]
        if not timed:
            return None
        return median(c["latency_ms"] for c in timed), int(median(c["processes"] for c in timed))

    def joules_per_step(self) -> tuple[float, int] | None:
        """The median measured joules per training step, and the median steps of a job."""
        if not self.training_jobs:
            return None
        return (median(j["joules"] / j["steps"] for j in self.training_jobs),
                int(median(j["steps"] for j in self.training_jobs)))


def observe(observed: Observed, event: Any) -> Observed:
    """``observed`` with what a soak cycle's or a training job's event showed; others change nothing."""
    payload = event.payload or {}
    if event.type == "validation.cycle_completed":
        record = _soak_cycle(payload)
        if record is None or any(c["key"] == record["key"] for c in observed.soak_cycles):
            return observed
        return replace(observed, soak_cycles=(observed.soak_cycles + (record,))[-OBSERVATIONS_KEPT:])
    if event.type == "training.completed":
        record = _training_job(payload, event.aggregate_id)
        if record is None or any(j["key"] == record["key"] for j in observed.training_jobs):
            return observed
        return replace(observed, training_jobs=(observed.training_jobs + (record,))[-OBSERVATIONS_KEPT:])
    return observed


def _soak_cycle(payload: Mapping[str, Any]) -> dict[str, Any] | None:
    replicas = [r for r in payload.get("replicas") or () if isinstance(r, Mapping)]
    if not replicas:
        return None
    rss = [number(r.get("rss_mb")) for r in replicas if number(r.get("rss_mb")) is not None]
    latency = [number(r.get("latency_ms")) for r in replicas if number(r.get("latency_ms")) is not None]
    incidents = [str(r["incident"]) for r in replicas if r.get("incident")]
    return {"key": f"{payload.get('validation_id')}#{payload.get('cycle')}", "processes": len(replicas),
            "peak_rss_mb": max(rss) if rss else None, "latency_ms": median(latency) if latency else None,
            "incidents": len(incidents), "incident": incidents[0] if incidents else None}


def _training_job(payload: Mapping[str, Any], aggregate_id: str) -> dict[str, Any] | None:
    energy = payload.get("energy") if isinstance(payload.get("energy"), Mapping) else {}
    joules, steps = number(energy.get("joules")), number(payload.get("steps"))
    if joules is None or joules <= 0 or not steps or steps <= 0:
        return None
    return {"key": str(payload.get("job_id") or aggregate_id), "joules": joules, "steps": int(steps)}


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
    observed: Observed | None = None,
) -> dict[str, Any]:
    """Micro-batch, gradient accumulation and replica counts for one node, with reasons."""
    observed = observed or Observed()
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
        node, footprint, budget, wh_per_training, config, reasons["trainer_replicas"], observed
    )
    share = device_memory if node.on_gpu else device_memory / max(1, trainers)
    micro_batch = _micro_batch(share, footprint, model_params, config, reasons["micro_batch"])
    accumulation = max(1, math.ceil(config.target_batch / micro_batch))
    reasons["gradient_accumulation"].append(
        f"target batch {config.target_batch} / micro-batch {micro_batch} -> {accumulation} accumulation step(s)"
    )
    validators = _validator_replicas(node, footprint, budget, wh_per_validation, config, reasons["validator_replicas"],
                                     observed)
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
            "observed": _observed_inputs(observed),
        },
    }


def _observed_inputs(observed: Observed) -> dict[str, Any]:
    """The observations the advice used, as ``inputs.observed`` records them."""
    latency, per_step = observed.latency(), observed.joules_per_step()
    peak = observed.peak_rss_bytes()
    return {
        "soak_cycles": len(observed.soak_cycles),
        "replica_peak_rss_mb": None if peak is None else round(peak / 2**20, 1),
        "replica_latency_ms": None if latency is None else round(latency[0], 1),
        "incidents_last_soak_cycle": observed.soak_cycles[-1]["incidents"] if observed.soak_cycles else None,
        "training_jobs": len(observed.training_jobs),
        "joules_per_step": None if per_step is None else round(per_step[0], 3),
    }


def _trainer_replicas(
    node: _Node,
    footprint: _Footprint,
    budget: _Budget,
    wh_per_training: float | None,
    config: ScalingConfig,
    notes: list[str],
    observed: Observed,
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
    energy_caps = [budget.cap(wh_per_training, "training", notes), _steps_cap(budget, observed, notes)]
    trainers = _capped(
        [by_hardware, by_cores, config.max_trainer_replicas],
        min((c for c in energy_caps if c is not None), default=None),
        config.max_trainer_replicas,
        notes,
    )
    return trainers, device_memory


def _steps_cap(budget: _Budget, observed: Observed, notes: list[str]) -> int | None:
    """Training jobs the budget left pays for at the measured joules per step; None when it sets no cap."""
    measured = observed.joules_per_step()
    if measured is None:
        notes.append("no training job measured yet: no joules per step to size against")
        return None
    per_step, steps = measured
    seen = (f"measured {per_step:.3g} J per step (median of {len(observed.training_jobs)} training job(s), "
            f"{steps} steps a job)")
    if budget.remaining_wh is None or budget.remaining_wh <= 0:
        notes.append(seen)
        return None
    steps_left = math.floor(budget.remaining_wh * 3600 / per_step)
    cap = steps_left // steps
    notes.append(f"{seen}: {budget.remaining_wh:.1f} Wh left pay for {steps_left} steps -> {cap} job(s)")
    return cap


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
    observed: Observed,
) -> int:
    """Validators the node holds: inference only, so lighter than a trainer; what the soaks showed
    (memory, latency, incidents) outranks the model of it."""
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
        [by_memory, by_cores, config.max_validator_replicas, *_observed_validator_caps(node, observed, config, notes)],
        budget.cap(wh_per_validation, "validation", notes),
        config.max_validator_replicas,
        notes,
    )


def _observed_validator_caps(node: _Node, observed: Observed, config: ScalingConfig, notes: list[str]) -> list[int]:
    """The replica caps the soaks' observations set: measured memory, latency, incidents."""
    if not observed.soak_cycles:
        notes.append("no soak observed yet: replica memory and latency as modelled")
        return []
    caps = []
    cycles = len(observed.soak_cycles)
    peak = observed.peak_rss_bytes()
    if peak:
        usable = node.usable_ram(config)
        caps.append(math.floor(usable / peak))
        notes.append(f"observed peak replica memory {peak / 2**20:.0f} MiB over the last {cycles} soak cycle(s): "
                     f"{_gib(usable)} usable RAM / {_gib(peak)} -> {caps[-1]}")
    latency = observed.latency()
    if latency is not None:
        ms, processes = latency
        if ms > config.target_replica_latency_ms:
            caps.append(max(1, math.floor(processes * config.target_replica_latency_ms / ms)))
            notes.append(f"observed median episode latency {ms:.0f} ms with {processes} replica processes, above "
                         f"the {config.target_replica_latency_ms:.0f} ms target -> {caps[-1]}")
        else:
            notes.append(f"observed median episode latency {ms:.0f} ms with {processes} replica processes, within "
                         f"the {config.target_replica_latency_ms:.0f} ms target")
    last = observed.soak_cycles[-1]
    if last["incidents"]:
        caps.append(max(1, last["processes"] - last["incidents"]))
        notes.append(f"{last['incidents']} of {last['processes']} replica processes ended in an incident in the "
                     f"last soak cycle ({last['incident']}) -> {caps[-1]}")
    return caps


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

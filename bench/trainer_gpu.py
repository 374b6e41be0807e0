"""The trainer's MNTP step on a GPU in bf16, against a bare loop on the same device, with model FLOPs utilisation.

The platform side is the trainer's own ``MntpLoop`` on a model placed as a
training job places it (``placement.place``: base weights in bfloat16, LoRA
weights in float32): each step builds its batch on the host (``MaskedBatches``),
copies it over, and runs ``logits_at``, the cross entropy, gradient clipping,
AdamW and the ``WarmupLinear`` schedule, and calls its progress callback (each
timed run is one step, so that reads the loss back every step). The bare side
(``BareLoop``) runs forward, backward and an AdamW step on the same batches,
built and copied to the device beforehand. With ``compile`` the decoder, which
both sides share, is compiled once with ``torch.compile``.

Model FLOPs utilisation is ``6 * parameters * tokens/s / peak``, with the
peak bf16 dense tensor throughput of the device from ``PEAK_BF16_DENSE``.
The 6 counts a full backward; LoRA skips the base weights' gradients and
MNTP projects only masked positions onto the vocabulary, so the hardware
does less than this counts, as is usual for the figure.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

from bench.figure import Figure

log = logging.getLogger("neurons.bench.trainer_gpu")

NAME = "trainer.gpu"
TARGET = 0.95

# (name contains, peak bf16 dense FLOP/s, what the figure is); the first match wins.
PEAK_BF16_DENSE: tuple[tuple[str, float, str], ...] = (
    ("GH200", 989e12, "GH200 (H100 SXM tensor cores), bf16 dense"),
    ("H200", 989e12, "H200 SXM, bf16 dense (same tensor cores as H100 SXM)"),
    ("H100 PCIe", 756e12, "H100 PCIe, bf16 dense"),
    ("H100 NVL", 835e12, "H100 NVL, bf16 dense, per GPU"),
    ("H100", 989e12, "H100 SXM, bf16 dense"),
    ("B200", 2250e12, "B200, bf16 dense"),
    ("A100", 312e12, "A100, bf16 dense"),
    ("L40S", 362e12, "L40S, bf16 dense"),
    ("L4", 121e12, "L4, bf16 dense"),
)


def peak_flops(device_name: str) -> tuple[float | None, str]:
    for needle, peak, source in PEAK_BF16_DENSE:
        if needle in device_name:
            return peak, source
    return None, f"no peak known for {device_name!r}"


def measure(cache_dir: Path, model: str = "smollm2", steps: int = 30, batch: int = 16, seq_len: int = 512,
            compile: bool = False, device: str = "cuda", dtype: str = "bfloat16", warmup: int = 3) -> Figure:
    result = bench_step(cache_dir, model, steps, batch, seq_len, compile, device, dtype, warmup)
    name = f"{NAME}.compiled" if compile else NAME
    r = result["ratio"]
    mfu = result["mfu"]
    return Figure(
        name=name, value=result["platform_tokens_per_s"], unit="tokens/s", baseline=result["bare_tokens_per_s"],
        ratio=r, target=f"ratio >= {TARGET}", passed=r >= TARGET, samples=steps,
        notes=(f"MntpLoop vs bare loop on {result['device_name']}, model {model}, batch {batch} x {seq_len}, "
               f"{dtype} weights, {'torch.compile on the decoder' if compile else 'eager'}; {steps} alternating "
               f"steps per side after {warmup} warm-up, median step; MFU "
               + (f"{mfu:.1%} of {result['peak_flops'] / 1e12:.0f} TFLOP/s ({result['peak_source']})"
                  if mfu is not None else f"unknown: {result['peak_source']}")),
        extra={"tokens_per_s": result["platform_tokens_per_s"], "mfu": mfu, "bare_mfu": result["bare_mfu"],
               "peak_flops": result["peak_flops"], "peak_source": result["peak_source"],
               "parameters": result["parameters"], "model": model, "batch": batch, "seq_len": seq_len,
               "device": result["device_name"], "dtype": dtype, "compiled": compile},
    )


def bench_step(cache_dir: Path, model: str, steps: int, batch: int, seq_len: int, compile: bool, device: str,
               dtype: str, warmup: int) -> dict[str, Any]:
    import torch

    from shared.ml import BareLoop
    from shared.ml import MntpConfig
    from shared.ml import attach_configured_lora
    from shared.ml import MaskedBatches, MntpLoop
    from shared.ml import load_model, mask_token_id, offline
    from shared.ml import place, resolve

    offline()
    placement = resolve(device, dtype)
    device_name = placement.device_name

    def sync() -> None:
        if placement.on_cuda:
            torch.cuda.synchronize(placement.device)

    loaded = load_model(model, cache_dir)
    tokenizer = loaded.tokenizer
    parameters = int(loaded.info["num_parameters"])
    config = MntpConfig(model=model, steps=warmup + steps, batch_size=batch, max_length=seq_len, checkpoint_every=0,
                        device=str(placement.device), precision=placement.precision)
    torch.manual_seed(config.seed)
    peft_model = attach_configured_lora(place(loaded.model, placement), config)
    peft_model.train()
    if compile:
        # in place: both sides call the same compiled decoder
        peft_model.get_base_model().get_decoder().compile()

    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(3, len(tokenizer), (batch * 8, seq_len), generator=generator).tolist()
    batches = MaskedBatches(sequences, batch, tokenizer.pad_token_id, mask_token_id(tokenizer), config.mask_ratio,
                            config.seed)
    loop = MntpLoop(peft_model, batches, config)  # the trainer's loop, on the model's device

    def report(*_: Any) -> None:  # a job's progress callback; one step per run, so the loss is read every step
        pass

    def platform_step(index: int) -> int:
        before = loop.tokens
        loop.run(index, index + 1, report)
        return loop.tokens - before

    # The bare loop: the same batches, made beforehand and already on the device.
    bare_loop = BareLoop(peft_model, batches, warmup + steps, config.learning_rate, placement.device)

    started = time.perf_counter()
    for index in range(warmup):  # first calls allocate, and compile when asked
        platform_step(index)
        bare_loop.step(index)
    sync()
    warmup_s = time.perf_counter() - started

    rates: dict[str, list[float]] = {"platform": [], "bare": []}
    for offset in range(steps):
        index = warmup + offset
        for side in ("platform", "bare") if offset % 2 == 0 else ("bare", "platform"):
            sync()
            begun = time.perf_counter()
            tokens = platform_step(index) if side == "platform" else bare_loop.step(index)
            sync()
            rates[side].append(tokens / (time.perf_counter() - begun))

    platform = statistics.median(rates["platform"])
    bare = statistics.median(rates["bare"])
    peak, source = peak_flops(device_name) if placement.on_cuda else (None, "no peak for a CPU")
    mfu = 6 * parameters * platform / peak if peak else None
    bare_mfu = 6 * parameters * bare / peak if peak else None
    log.info("gpu bench %s on %s (%s%s): platform %.0f tokens/s, bare %.0f tokens/s, warm-up %.1fs",
             model, device_name, dtype, ", compiled" if compile else "", platform, bare, warmup_s)
    return {"platform_tokens_per_s": platform, "bare_tokens_per_s": bare, "ratio": platform / bare,
            "mfu": mfu, "bare_mfu": bare_mfu, "peak_flops": peak, "peak_source": source,
            "parameters": parameters, "device_name": device_name, "warmup_s": warmup_s}

"""The energy meter's cost per training step: begin, snapshot and end of one window against one step.

The step is the trainer's ``MntpLoop`` on the tiny model (the cheapest real
step there is, so the hardest case for the meter). ``measure_overhead`` times
the steps and the meter's calls apart, so the fraction does not rest on the
difference of two noisy step timings.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.figure import Figure

NAME = "energy"
TARGET = 0.01


def measure(cache_dir: Path, steps: int = 40, batch: int = 8, seq_len: int = 64) -> Figure:
    import torch

    from shared.ml import MntpConfig
    from shared.ml import attach_configured_lora
    from shared.ml import MaskedBatches, MntpLoop
    from shared.ml import load_model, mask_token_id, offline
    from shared.energy_meter import EnergyMeter, measure_overhead

    offline()
    loaded = load_model("tiny", cache_dir)
    tokenizer = loaded.tokenizer
    config = MntpConfig(model="tiny", steps=steps + 1, batch_size=batch, max_length=seq_len, checkpoint_every=0)
    torch.manual_seed(config.seed)
    model = attach_configured_lora(loaded.model, config)
    model.train()
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(3, len(tokenizer), (batch * 8, seq_len), generator=generator).tolist()
    batches = MaskedBatches(sequences, batch, tokenizer.pad_token_id, mask_token_id(tokenizer), config.mask_ratio,
                            config.seed)
    loop = MntpLoop(model, batches, config)
    loop.run(0, 1)  # warm-up: first calls allocate
    step_times: list[float] = []
    position = {"step": 1}

    def step() -> None:
        started = time.perf_counter()
        loop.run(position["step"], position["step"] + 1)
        position["step"] += 1
        step_times.append(time.perf_counter() - started)

    meter = EnergyMeter()
    fraction = measure_overhead(step, steps=steps, meter=meter)
    step_ms = sum(step_times) / len(step_times) * 1000
    meter_ms = fraction * step_ms
    return Figure(
        name=NAME, value=meter_ms, unit="ms per step", baseline=step_ms, ratio=fraction,
        target=f"ratio < {TARGET}", passed=fraction < TARGET, samples=steps,
        notes=(f"meter begin + snapshot + end ({', '.join(meter.methods) or 'no source'}) against one MntpLoop "
               f"step of the tiny model, batch {batch} x {seq_len}, CPU; ratio = meter time / step time over "
               f"{steps} of each" + (f"; {'; '.join(meter.notes)}" if meter.notes else "")),
        extra={"methods": meter.methods},
    )

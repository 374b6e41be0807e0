"""Crashing a training run mid-way and resuming it from its checkpoint, for the MNTP and RL tests."""

from __future__ import annotations

from pathlib import Path

import pytest


class Crash(RuntimeError):
    pass


def crash_then_resume(train, config, data, out_dir: Path, model_cache: Path, crash_at: int):
    """Run ``train`` until a crash right after step ``crash_at``, then resume it from its checkpoint.

    Returns the resumed run's result and the progress points it reported.
    """
    def crash(point):
        if point["step"] == crash_at:
            raise Crash("simulated crash")

    with pytest.raises(Crash):
        train(config, data, out_dir, model_cache, progress=crash)
    checkpoint = out_dir / "checkpoint"
    assert (checkpoint / "trainer_state.pt").exists()
    points: list[dict] = []
    resumed = train(config, data, out_dir, model_cache, progress=points.append, resume_from=checkpoint)
    return resumed, points


def same_adapter(first: Path, second: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    a = load_file(str(first / "adapter_model.safetensors"))
    b = load_file(str(second / "adapter_model.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

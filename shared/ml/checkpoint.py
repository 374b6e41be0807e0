"""Training checkpoints: enough state to continue a run exactly where it stopped.

``<out_dir>/checkpoint/`` holds ``adapter/`` (peft format) and
``trainer_state.pt`` (step, optimizer, scheduler, RNG states and the run's
bookkeeping). A new checkpoint is written beside the old one and swapped in,
so a crash while writing leaves the previous checkpoint usable.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

from shared.ml.lora import save_adapter
from shared.ml.placement import model_device

log = logging.getLogger("neurons.trainer.checkpoint")

STATE_FILE = "trainer_state.pt"
ADAPTER = "adapter"


def save_checkpoint(
    folder: Path, peft_model: Any, optimizer: Any, scheduler: Any, step: int, extra: dict[str, Any]
) -> Path:
    import torch

    folder = Path(folder)
    staging = folder.with_name(folder.name + ".new")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    save_adapter(peft_model, staging / ADAPTER)
    device = model_device(peft_model)
    torch.save(
        {
            "step": int(step),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            # dropout on a GPU draws from that GPU's generator
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "python_rng": random.getstate(),
            "extra": extra,
        },
        staging / STATE_FILE,
    )
    previous = folder.with_name(folder.name + ".old")
    if folder.exists():
        if previous.exists():
            shutil.rmtree(previous)
        folder.rename(previous)
    staging.rename(folder)
    if previous.exists():
        shutil.rmtree(previous)
    return folder


def load_checkpoint(folder: Path) -> dict[str, Any]:
    import torch

    folder = Path(folder)
    path = folder / STATE_FILE
    if not path.exists() or not (folder / ADAPTER / "adapter_model.safetensors").exists():
        raise FileNotFoundError(f"{folder} is not a training checkpoint (needs {ADAPTER}/ and {STATE_FILE})")
    # on the host first: the optimiser's state follows its parameters to their device when loaded,
    # so a run checkpointed on a GPU resumes on another node's GPU, or on a CPU
    return torch.load(path, weights_only=True, map_location="cpu")


def restore_rng(state: dict[str, Any], device: Any = None) -> None:
    """Put back the random state; a GPU's goes to ``device`` when the run goes on on a GPU."""
    import torch

    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    cuda_rng = state.get("cuda_rng")
    if cuda_rng is None:
        return
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(cuda_rng, device)
    else:
        log.warning("the checkpoint holds a GPU's random state and the run goes on on %s: "
                    "dropout will not draw what the uninterrupted run would have", device or "the CPU")


def resume(state: dict[str, Any], optimizer: Any, scheduler: Any, config: Any,
           device: Any = None) -> tuple[int, list[str]]:
    """Put a run back where its checkpoint ``state`` left it: optimiser, scheduler and random state
    (a GPU's on ``device``).

    Returns the step to continue from and the configuration keys whose values
    differ from those the checkpoint was written with.
    """
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state, device)
    current = config.to_dict()
    changed = sorted(k for k, v in state["extra"].get("config", {}).items() if current.get(k) != v)
    return int(state["step"]), changed


def checkpoint_adapter(folder: Path) -> Path:
    return Path(folder) / ADAPTER

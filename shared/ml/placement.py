"""Where a training run computes and in which precision: the CPU in float32, or a CUDA GPU in bfloat16.

A configuration names ``device`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``)
and ``precision`` (``auto``, ``float32`` or ``bfloat16``). ``auto`` is resolved
on the node that runs the job, so one request suits a GPU node and a CPU node
alike: the first CUDA GPU torch sees, else the CPU; bfloat16 on a GPU that
computes in it natively (compute capability 8.0 and up), else float32. The
base model's weights take that precision; its float32 buffers (the rotary
embedding's frequencies) stay float32, as transformers keeps them when it
loads a model in bfloat16. The LoRA weights stay float32 (peft keeps an
adapter in float32 over a bfloat16 base), so a saved adapter is float32
wherever it was trained.

``check`` needs no torch (configurations are checked where torch may be
missing); ``resolve`` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

DEVICE = re.compile(r"(auto|cpu|cuda(:\d+)?)")
PRECISIONS = ("auto", "float32", "bfloat16")


class PlacementError(ValueError):
    """The device or precision asked for is not available on this node."""


def check(device: str, precision: str) -> None:
    """ValueError saying what to write when ``device`` or ``precision`` is not one this module knows."""
    if not isinstance(device, str) or DEVICE.fullmatch(device) is None:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


@dataclass(frozen=True)
class Placement:
    device: Any  # torch.device
    dtype: Any  # torch.dtype of the base weights
    device_name: str

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def precision(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> dict[str, str]:
        """What a training summary records of where the run computed."""
        return {"device": str(self.device), "device_name": self.device_name, "precision": self.precision}


def summary_line(where: dict[str, str] | None) -> str:
    """A recorded placement (``Placement.describe``) as people read it: "cpu, float32 base weights"."""
    if not where:
        return "-"
    device = where["device"] if where["device_name"] == where["device"] else f"{where['device_name']} ({where['device']})"
    return f"{device}, {where['precision']} base weights"


def resolve(device: str = "auto", precision: str = "auto") -> Placement:
    """The device and base-weight dtype for ``device`` and ``precision`` on this node;
    PlacementError when a GPU (or bfloat16 on it) is asked for and not there."""
    import torch

    check(device, precision)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise PlacementError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA GPU "
                                 "on this node; use device=auto or device=cpu")
        count = torch.cuda.device_count()
        index = target.index if target.index is not None else torch.cuda.current_device()
        if index >= count:
            raise PlacementError(f"device {device!r} asked for, but this node has {count} CUDA GPU(s) "
                                 f"(cuda:0 to cuda:{count - 1})")
        target = torch.device("cuda", index)
        name = torch.cuda.get_device_name(target)
        native_bf16 = torch.version.hip is not None or torch.cuda.get_device_capability(target) >= (8, 0)
    else:
        name, native_bf16 = "cpu", True
    if precision == "auto":
        precision = "bfloat16" if target.type == "cuda" and native_bf16 else "float32"
    elif precision == "bfloat16" and not native_bf16:
        raise PlacementError(f"precision bfloat16 asked for, but {name} has no bfloat16 arithmetic of its own "
                             "(compute capability below 8.0); use precision=float32")
    return Placement(target, getattr(torch, precision), name)


def place(model: Any, placement: Placement) -> Any:
    """``model`` (a base model, before LoRA is attached) on the placement's device, its floating-point
    parameters in the placement's dtype; buffers keep theirs."""
    model.to(device=placement.device)
    for parameter in model.parameters():  # each once: tied weights are one parameter
        if parameter.is_floating_point() and parameter.dtype != placement.dtype:
            parameter.data = parameter.data.to(placement.dtype)  # what Module.to does to a parameter
    return model


def model_device(model: Any) -> Any:
    """The device of ``model``'s parameters (the CPU for a model without any)."""
    import torch

    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")

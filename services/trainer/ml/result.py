"""What a training run leaves behind: the adapter folder and its summary.

Every run, trained or fallback, writes ``<out_dir>/adapter/`` with
``adapter_model.safetensors``, ``adapter_config.json`` and
``training_summary.json``; ``TrainingResult`` points at it and repeats the
numbers a ``training.completed`` event carries.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUMMARY_FILE = "training_summary.json"
ADAPTER_DIR = "adapter"


@dataclass
class TrainingResult:
    kind: str  # mntp | rl
    status: str  # trained | fallback
    adapter_dir: Path
    summary: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)  # {"before": {...}, "after": {...}}
    curve: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    duration_s: float = 0.0
    tokens_per_s: float = 0.0
    base_model: dict[str, Any] = field(default_factory=dict)  # name, checksum
    fallback_reason: str | None = None
    resumed_from_step: int | None = None
    # The trained PeftModel, in memory, for callers that go on using it (None for fallbacks).
    model: Any = field(default=None, repr=False, compare=False)

    @property
    def summary_path(self) -> Path:
        return self.adapter_dir / SUMMARY_FILE


def write_summary(adapter_dir: Path, summary: dict[str, Any]) -> Path:
    path = Path(adapter_dir) / SUMMARY_FILE
    # Sorted keys and a fixed layout keep the file byte-stable for equal content.
    path.write_text(json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


def software_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "safetensors", "neurons"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions

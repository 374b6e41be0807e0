"""What a training run leaves behind: the adapter folder and its summary.

Every run, trained or fallback, writes ``<out_dir>/adapter/`` with
``adapter_model.safetensors``, ``adapter_config.json`` and
``training_summary.json``; ``TrainingResult`` points at it and repeats the
numbers a ``training.completed`` event carries.
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.ml.lora import save_adapter

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


def finish_trained(
    *,
    kind: str,
    model: Any,
    out_dir: Path,
    config: Any,
    lora: dict[str, Any],
    info: dict[str, Any],
    dataset_sha256: str | None,
    records: dict[str, int],
    before: dict[str, Any],
    after: dict[str, Any],
    curve: list[dict[str, Any]],
    tokens: int,
    tokens_per_s: float,
    duration_s: float,
    resumed_from_step: int | None,
    warm_start: str | None,
    placement: dict[str, str],
) -> TrainingResult:
    """Save the adapter with its summary in ``out_dir/adapter`` and say what the run produced (MNTP and RL alike)."""
    adapter_dir = Path(out_dir) / ADAPTER_DIR
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    save_adapter(model, adapter_dir)
    base_model = {"name": info["name"], "checksum": info["checksum"]}
    summary = {
        "kind": kind,
        "status": "trained",
        "fallback_reason": None,
        "config": config.to_dict(),
        "lora": lora,
        "dataset_sha256": dataset_sha256,
        "records": records,
        "base_model": {**base_model, "num_parameters": info["num_parameters"], "source": info["source"]},
        "metrics": {"before": before, "after": after},
        "loss_curve": curve,
        "energy": None,
        "software": software_versions(),
        "placement": placement,
        "steps": config.steps,
        "tokens": tokens,
        "tokens_per_s": tokens_per_s,
        "duration_s": duration_s,
        "resumed_from_step": resumed_from_step,
        "warm_start": warm_start,
    }
    write_summary(adapter_dir, summary)
    return TrainingResult(kind=kind, status="trained", adapter_dir=adapter_dir, summary=summary,
                          metrics=summary["metrics"], curve=curve, steps=config.steps, tokens=tokens,
                          duration_s=duration_s, tokens_per_s=tokens_per_s, base_model=base_model,
                          resumed_from_step=resumed_from_step, model=model)

"""One training job in its own process: `python -m services.trainer.worker SPEC.json`.

The trainer service starts this so its event loop stays responsive. The worker
speaks JSON lines on stdout: ``{"event": "progress", ...}`` every few steps,
then one ``{"event": "result", ...}`` or ``{"event": "error", ...}``. It dies
with its parent (PR_SET_PDEATHSIG), so a killed trainer never leaves a second
job training the same cycle; the restarted trainer resumes from the last
checkpoint instead.

Spec: job_id, kind (mntp|rl), config, dataset_path (null: an RL loop trains on
its reward's own prompt set), dataset_sha256, out_dir, cache_dir, resume_from
(checkpoint folder or null), warm_start_dir (or null; training continues that
adapter with its own rank, alpha and target modules).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path

from shared.energy_meter import EnergyMeter
from shared.processes import die_with_parent


def emit(kind: str, **fields) -> None:
    sys.stdout.write(json.dumps({"event": kind, **fields}, default=str) + "\n")
    sys.stdout.flush()


def run(spec: dict) -> dict:
    from shared.ml import DatasetError, load_jsonl
    from shared.ml import ml_stack_available, write_fallback_artefact

    meter = EnergyMeter()
    stage = "dataset"
    if not spec.get("dataset_path") and spec["kind"] != "rl":
        raise DatasetError(f"a {spec['kind']} job needs a dataset")
    texts = load_jsonl(Path(spec["dataset_path"])) if spec.get("dataset_path") else None
    out_dir = Path(spec["out_dir"])
    config = dict(spec["config"])
    available, reason = ml_stack_available()
    with meter.window("training") as window:
        if not available:
            stage = "fallback"
            result = write_fallback_artefact({**config, "kind": spec["kind"]}, spec.get("dataset_sha256"), out_dir, reason)
        else:
            stage = "train"

            def progress(point: dict) -> None:
                emit("progress", **point, energy_j=window.so_far())

            resume = Path(spec["resume_from"]) if spec.get("resume_from") else None
            warm = Path(spec["warm_start_dir"]) if spec.get("warm_start_dir") else None
            if spec["kind"] == "rl":
                from shared.ml import train_rl

                prompts = [t.split(". ")[0][:160] for t in texts] if texts is not None else None
                result = train_rl(config, prompts, out_dir, Path(spec["cache_dir"]), progress=progress,
                                  warm_start_adapter=warm, dataset_sha256=spec.get("dataset_sha256"),
                                  resume_from=resume)
            else:
                from shared.ml import train_mntp

                result = train_mntp(config, texts, out_dir, Path(spec["cache_dir"]), progress=progress,
                                    resume_from=resume, warm_start_adapter=warm,
                                    dataset_sha256=spec.get("dataset_sha256"))
    energy = window.reading.to_dict() if window.reading is not None else None
    return {
        "status": result.status,
        "fallback_reason": result.fallback_reason,
        "adapter_dir": str(result.adapter_dir),
        "metrics": result.metrics,
        "curve": result.curve,
        "steps": result.steps,
        "tokens": result.tokens,
        "tokens_per_s": result.tokens_per_s,
        "duration_s": result.duration_s,
        "base_model": result.base_model,
        "resumed_from_step": result.resumed_from_step,
        "placement": result.summary.get("placement"),
        "prompt_set": result.summary.get("prompt_set"),
        "energy": energy,
        "stage": stage,
    }


def main(argv: list[str]) -> int:
    die_with_parent()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    spec = json.loads(Path(argv[0]).read_text())
    started = time.monotonic()
    try:
        emit("result", **run(spec), wall_s=time.monotonic() - started)
        return 0
    except Exception as exc:  # the service turns this into training.failed
        emit("error", stage=_stage(exc), error=f"{exc.__class__.__name__}: {exc}",
             trace=traceback.format_exc(limit=5))
        return 1


def _stage(exc: Exception) -> str:
    from shared.ml import DatasetError

    return "dataset" if isinstance(exc, (DatasetError, FileNotFoundError)) else "train"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

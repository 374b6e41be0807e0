"""`neurons train --local`: train an adapter here and now, without the bus."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import typer

from shared.ml import summary_line
from shared.settings import Settings


def train(
    local: bool = typer.Option(False, "--local", help="train in this process (no broker, no services)"),
    model: str = typer.Option("tiny", "--model", help="tiny, smollm2 or a local Hugging Face folder"),
    steps: int = typer.Option(20, "--steps", min=1),
    kind: str = typer.Option("mntp", "--kind", help="mntp or rl"),
    dataset: Path | None = typer.Option(None, "--dataset", help="JSONL file (default: the demo dataset)"),
    set_: list[str] = typer.Option([], "--set", help="override a setting: NAME=VALUE (repeatable)"),
    out: Path | None = typer.Option(None, "--out", help="job folder (default var/jobs/local-<time>)"),
    as_json: bool = typer.Option(False, "--json", help="print only the JSON summary"),
) -> None:
    """Train a LoRA adapter locally, with a progress bar; the artefact lands in the content-addressed store."""
    if not local:
        raise typer.BadParameter("training through the platform starts with `neurons cycle request`; "
                                 "add --local to train here", param_hint="--local")
    if kind not in ("mntp", "rl"):
        raise typer.BadParameter("choose mntp or rl", param_hint="--kind")
    from cli.cycle_cmds import _parse_config
    from shared.artefacts import ArtefactStore
    from shared.energy_meter import EnergyMeter
    from shared.ml import MntpConfig, RlConfig, dataset_sha256, load_jsonl

    config = {"model": model, "steps": steps, **_parse_config(set_)}
    (RlConfig if kind == "rl" else MntpConfig).from_dict(config)  # a bad setting: one line, before any work
    settings = Settings.from_env()
    if dataset is None:
        dataset = _demo_dataset(settings)
    texts = load_jsonl(dataset)
    sha = dataset_sha256(dataset)
    job_dir = out or settings.var_dir / "jobs" / f"local-{time.strftime('%Y%m%dT%H%M%S')}"
    meter = EnergyMeter()

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[status]}"), TimeRemainingColumn()]
    with Progress(*columns, disable=as_json, transient=False) as bar, meter.window("training") as window:
        task = bar.add_task(f"{kind} {model}", total=steps, status="loading model")
        result = _train_here(kind, config, texts, sha, job_dir, settings, _bar_progress(bar, task, window))
        bar.update(task, completed=steps)
    energy = window.reading.to_dict() if window.reading else None
    from shared.adapter_signing import sign_adapter
    from shared.keys import model_signing_key_path

    key = model_signing_key_path(settings)  # signed like the trainer's when this platform has its key
    stored = ArtefactStore(settings.artefact_dir).put_adapter(
        result.adapter_dir, {"energy": energy}, sign=(lambda folder: sign_adapter(folder, key)) if key.exists() else None)
    summary = {"artefact_dir": str(stored.path), "adapter_sha256": stored.sha256, "adapter_uri": stored.uri,
               "status": result.status, "fallback_reason": result.fallback_reason,
               "metrics": {"before": result.metrics.get("before"), "after": result.metrics.get("after")},
               "energy": energy, "steps": result.steps, "tokens_per_s": result.tokens_per_s,
               "placement": result.summary.get("placement")}
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    _print_summary(summary)


def _demo_dataset(settings: Settings) -> Path:
    from shared.ml import build_demo_dataset

    dataset = settings.var_dir / "datasets" / "demo.jsonl"
    if not dataset.exists():
        build_demo_dataset(dataset)
    return dataset


def _bar_progress(bar: Any, task: Any, window: Any) -> Callable[[dict], None]:
    """A training progress callback that moves the bar and shows loss or reward, speed and energy so far."""

    def progress(point: dict) -> None:
        loss = point.get("loss")
        reward = point.get("reward_mean")
        figure = f"loss {loss:.4f}" if loss is not None else f"reward {reward:.3f}" if reward is not None else ""
        joules = window.so_far()
        energy = f" {joules:.0f} J" if joules is not None else ""
        bar.update(task, completed=point["step"],
                   status=f"{figure} {point.get('tokens_per_s', 0):.0f} tok/s{energy}")

    return progress


def _train_here(kind: str, config: dict, texts: list, sha: str, job_dir: Path, settings: Settings,
                progress: Callable[[dict], None]) -> Any:
    """Train with the ML stack, or write the deterministic fallback artefact where it is missing."""
    available, reason = _ml_stack()
    if not available:
        from shared.ml import write_fallback_artefact

        return write_fallback_artefact({**config, "kind": kind}, sha, job_dir, reason)
    if kind == "rl":
        from shared.ml import train_rl

        return train_rl(config, [t.split(". ")[0][:160] for t in texts], job_dir, settings.model_cache_dir,
                        progress=progress, dataset_sha256=sha)
    from shared.ml import train_mntp

    return train_mntp(config, texts, job_dir, settings.model_cache_dir, progress=progress, dataset_sha256=sha)


def _print_summary(summary: dict) -> None:
    before, after = summary["metrics"]["before"] or {}, summary["metrics"]["after"] or {}
    energy = summary["energy"]
    typer.echo(f"adapter  {summary['adapter_sha256']} ({summary['status']})")
    typer.echo(f"folder   {summary['artefact_dir']}")
    if summary["placement"]:
        typer.echo(f"trained  on {summary_line(summary['placement'])}")
    if before and after and "loss" in before:
        typer.echo(f"held-out masked loss {before['loss']:.4f} -> {after['loss']:.4f}, "
                   f"accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}")
    if energy:
        typer.echo(f"energy   {energy.get('joules')} J ({energy.get('method')})")


def _ml_stack():
    from shared.ml import ml_stack_available

    return ml_stack_available()

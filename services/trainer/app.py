"""Trainer wiring: a training request becomes a job in a worker process; its lines become events.

The jobs (status, config, checkpoint) are rows of the trainer's state, saved
in the same transaction as the events that change them, so a redelivered
request never trains twice and a job completes once. A trainer killed
mid-job resumes on restart from the job's last checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from services.trainer import domain
from shared.adapter_signing import sign_adapter, verify_adapter_with
from shared.artefacts import SharedArtefacts
from shared.decider import Decider
from shared.keys import model_signing_key_path
from shared.paths import UnsafePath, contained, file_uri_path, model_spec
from shared.service import HandlerContext, Service
from shared.tracing import continued, current_traceparent

ROOT = Path(__file__).resolve().parents[2]
service = Service("trainer", reads=["training", "dataset"])
running: dict[str, asyncio.subprocess.Process] = {}


def _from_rows_of_before(ctx: HandlerContext) -> domain.TrainerState | None:
    # before the decider's rows, jobs and datasets were rows of kinds "jobs" and "datasets", a job's trace in it
    jobs, datasets = ctx.state.all("jobs"), ctx.state.all("datasets")
    if not jobs and not datasets:
        return None
    for job_id, job in jobs.items():
        if job.get("traceparent"):
            ctx.state.put("traces", job_id, job.pop("traceparent"))
        ctx.state.delete("jobs", job_id)
    for dataset_id in datasets:
        ctx.state.delete("datasets", dataset_id)
    return domain.TrainerState(jobs=jobs, datasets=datasets)


# one row per job and one per dataset
trainer = Decider(domain, from_rows=domain.TrainerState.from_rows, upgrade=_from_rows_of_before)


@service.handles("dataset.registered")
def on_dataset(event, ctx: HandlerContext):
    trainer.run(ctx, event)


@service.handles("training.requested")
def on_requested(event, ctx: HandlerContext):
    job_id = event.payload["job_id"]
    # trained only on a grant for this cycle and configuration that verifies here (shared.contracts.chain)
    config = domain.TrainerConfig(trust=service.trust.state, keyring=service.trust.keyring())
    if any(e.type == "training.started" for e in trainer.run(ctx, event, config)):
        ctx.state.put("traces", job_id, current_traceparent())  # the job's events continue the request's trace
        ctx.later(lambda: _run_job(job_id))


@service.on_start
async def resume_jobs(svc: Service) -> None:
    with svc.transaction() as ctx:
        state = trainer.state(ctx)
        resumed = domain.jobs_to_resume(state)
        for job_id in resumed:
            try:
                step = _checkpoint_step(_job_dir(job_id))
            except UnsafePath:  # a job id that leaves var/jobs: _run_job fails the job
                step = None
            trainer.run(ctx, domain.ResumeJob(job_id, step), correlation_id=state.jobs[job_id]["cycle_id"])
    await svc.flush_outbox()
    for job_id in resumed:
        svc.log.info("resuming job %s", job_id)
        svc.spawn(_run_job(job_id))


def _job_dir(job_id: str) -> Path:
    """var/jobs/<job id>; UnsafePath for an id that would lead anywhere else."""
    return contained(service.settings.var_dir / "jobs", job_id)


def _checkpoint_step(job_dir: Path) -> int | None:
    from shared.ml import CHECKPOINT_STATE_FILE, load_checkpoint

    if not (job_dir / "checkpoint" / CHECKPOINT_STATE_FILE).exists():
        return None
    try:
        return int(load_checkpoint(job_dir / "checkpoint")["step"])
    except Exception:  # an unreadable checkpoint means starting over, not failing the job
        return None


async def _emit(job_id: str, message) -> list:
    with service.transaction() as ctx:
        job = trainer.state(ctx).jobs[job_id]
        with continued(ctx.state.get("traces", job_id)):
            sealed = trainer.run(ctx, message, correlation_id=job["cycle_id"])
    await service.flush_outbox()
    return sealed


async def _run_job(job_id: str) -> None:
    with service.transaction() as ctx:
        job = trainer.state(ctx).jobs[job_id]
    stage = "request"
    try:  # what the request names stays under var/: the job's folder, the model, the dataset
        job_dir = _job_dir(job_id)
        model = model_spec(job["model"], service.settings.model_cache_dir, configured=service.settings.model)
        stage = "dataset"
        dataset_file = (file_uri_path(job["dataset"].get("uri") or "", service.settings.var_dir / "datasets")
                        if job.get("dataset") else None)
    except UnsafePath as exc:
        await _emit(job_id, domain.JobFailed(job_id, stage, f"refused: {exc}"))
        return
    job_dir.mkdir(parents=True, exist_ok=True)
    artefacts = SharedArtefacts.for_settings(service.settings)
    warm_dir = None
    try:
        if job.get("warm_start"):
            warm = artefacts.get(job["warm_start"])  # fetched from the shared store if this node lacks it
            verify_adapter_with(warm, service.settings)  # signed by the trainer, unchanged since
            warm_dir = str(warm)
        if dataset_file is not None:
            dataset_path = str(dataset_file)
        else:  # a research loop on an adapter alone: prompts from text every machine has
            from shared.ml import build_demo_dataset

            dataset_path = str(job_dir / "prompts.jsonl")
            build_demo_dataset(Path(dataset_path), records=64)
    except Exception as exc:
        await _emit(job_id, domain.JobFailed(job_id, "artefacts", f"{exc.__class__.__name__}: {exc}"))
        return
    checkpoint = job_dir / "checkpoint"
    config = {**job["config"], "model": model}
    # about ten progress reports per job, whatever its length: bars move, loss curves have points
    config.setdefault("progress_every", max(1, min(10, int(config.get("steps") or 10) // 10)))
    if os.environ.get("NEURONS_CHECKPOINT_EVERY"):
        config["checkpoint_every"] = int(os.environ["NEURONS_CHECKPOINT_EVERY"])
    spec = {"job_id": job_id, "kind": job["kind"], "config": config,
            "dataset_path": dataset_path, "dataset_sha256": (job.get("dataset") or {}).get("sha256"), "out_dir": str(job_dir),
            "cache_dir": str(service.settings.model_cache_dir),
            "resume_from": str(checkpoint) if _checkpoint_step(job_dir) is not None else None,
            "warm_start_dir": warm_dir}
    spec_path = job_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    log_path = job_dir / "worker.log"
    with open(log_path, "ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.trainer.worker", str(spec_path), cwd=str(ROOT),
            env={**os.environ, "NEURONS_VAR": str(service.settings.var_dir)},
            stdout=asyncio.subprocess.PIPE, stderr=log, limit=2**24)
        running[job_id] = proc
        outcome = None
        try:
            assert proc.stdout is not None
            async for line in proc.stdout:
                try:
                    report = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if report.get("event") == "progress":
                    await _emit(job_id, domain.JobProgressed(job_id, report))
                elif report.get("event") in ("result", "error"):
                    outcome = report
            await proc.wait()
        finally:
            running.pop(job_id, None)
    if outcome is None or outcome["event"] == "error":
        error = (outcome or {}).get("error") or f"worker exited with {proc.returncode}; see {log_path}"
        await _emit(job_id, domain.JobFailed(job_id, (outcome or {}).get("stage", "train"), error))
        return
    try:  # stored and signed before training.completed says where it is
        completed = _completion(outcome, artefacts)
    except Exception as exc:
        await _emit(job_id, domain.JobFailed(job_id, "artefacts", f"{exc.__class__.__name__}: {exc}"))
        return
    await _emit(job_id, domain.JobFinished(job_id, completed))


def _completion(outcome: dict, artefacts: SharedArtefacts) -> dict:
    """Store the adapter by sha256, signed (and share it), and say what training.completed carries."""
    key = model_signing_key_path(service.settings)
    stored = artefacts.local.put_adapter(Path(outcome["adapter_dir"]), {"energy": outcome.get("energy")},
                                         sign=lambda folder: sign_adapter(folder, key))
    if artefacts.remote is not None:
        artefacts.share(stored.sha256)
    metrics = outcome.get("metrics") or {}
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    flat = {f"{k}_before": v for k, v in before.items() if isinstance(v, (int, float))}
    flat.update({f"{k}_after": v for k, v in after.items() if isinstance(v, (int, float))})
    return {
        "status": outcome["status"], "fallback_reason": outcome.get("fallback_reason"),
        "adapter_uri": stored.uri, "adapter_sha256": stored.sha256,
        "metrics": {"before": before, "after": after, **flat},
        "duration_s": float(outcome.get("wall_s") or outcome.get("duration_s") or 0.0),
        "energy": outcome.get("energy"),
        "base_model": (outcome.get("base_model") or {}).get("name") or "unknown",
        "base_model_checksum": (outcome.get("base_model") or {}).get("checksum"),
        "steps": int(outcome.get("steps") or 0), "tokens": int(outcome.get("tokens") or 0),
        "tokens_per_s": outcome.get("tokens_per_s"), "resumed_from_step": outcome.get("resumed_from_step"),
        "loss_curve": outcome.get("curve") or [], "placement": outcome.get("placement"),
    }

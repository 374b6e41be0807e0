"""Trainer wiring: a training request becomes a job in a worker process; its lines become events.

The jobs (status, config, checkpoint) are rows of the trainer's state, saved
in the same transaction as the events that change them, so a redelivered
request never trains twice and a job completes once. A trainer killed
mid-job resumes on restart from the job's last checkpoint.

At most ``trainer_replicas`` jobs (the latest ``scaling.recommended`` for this
node; one without advice) train at once. A request beyond them waits in a queue
(rows of kind "queue", first in first out) and says so (``training.queued``,
with its position); it starts when a running job ends (``services.trainer.queue``).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
import os
import sys
from pathlib import Path

from services.trainer import domain, queue
from shared.adapter_signing import sign_adapter, verify_adapter_with
from shared.artefacts import SharedArtefacts
from shared.decider import Decider
from shared.metrics import record_training
from shared.keys import model_signing_key_path
from shared.paths import UnsafePath, contained, file_uri_path, model_spec
from shared.service import HandlerContext, Service
from shared.tracing import continued, current_traceparent

ROOT = Path(__file__).resolve().parents[2]
service = Service("trainer", reads=["training", "dataset", "scaling"])
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


def _trust() -> domain.TrainerConfig:
    # trained only on a grant for this cycle and configuration that verifies here (shared.contracts.chain)
    return domain.TrainerConfig(trust=service.trust.state, keyring=service.trust.keyring())


@service.handles("training.requested")
def on_requested(event, ctx: HandlerContext):
    job_id = event.payload["job_id"]
    waiting = ctx.state.all("queue")
    if job_id in waiting:
        return  # already waiting its turn: a redelivered request
    config, state = _trust(), trainer.state(ctx)
    would_start = any(e.type == "training.started" for e in domain.decide(event, domain.evolve(state, event), config))
    advice = ctx.state.get("advice", "scaling")
    if would_start and not queue.may_start(_running(state), len(waiting), queue.capacity(advice)):
        _enqueue(ctx, event, waiting, state, advice)
        return
    if any(e.type == "training.started" for e in trainer.run(ctx, event, config)):
        ctx.state.put("traces", job_id, current_traceparent())  # the job's events continue the request's trace
        ctx.later(lambda: _run_job(job_id))


@service.handles("scaling.recommended")
def on_scaling(event, ctx: HandlerContext):
    """The latest advice for this node sets how many jobs train at once (``trainer_replicas``)."""
    if event.payload.get("node") not in (None, service.settings.node):
        return
    ctx.state.put("advice", "scaling", {"trainer_replicas": event.payload.get("trainer_replicas"),
                                        "event_id": event.event_id})
    ctx.later(_start_waiting)  # more room: waiting jobs start


# --- the queue: at most trainer_replicas jobs at once, the others wait in order (services.trainer.queue) ---


@dataclass(frozen=True)
class _Request:
    """A waiting job's ``training.requested``, handed to the decider again when its turn comes."""

    payload: dict
    type: str = "training.requested"

    @property
    def aggregate_id(self) -> str:
        return self.payload["job_id"]


def _running(state: domain.TrainerState) -> int:
    return sum(1 for job in state.jobs.values() if job["status"] == domain.RUNNING)


def _enqueue(ctx: HandlerContext, event, waiting: dict, state: domain.TrainerState, advice: dict | None) -> None:
    request = event.payload
    trainer.fold(ctx, event)  # the job is known from now on, waiting
    ctx.state.put("queue", request["job_id"], queue.entry(request, waiting, ctx.now))
    ctx.state.put("traces", request["job_id"], current_traceparent())
    running = [job_id for job_id, job in state.jobs.items() if job["status"] == domain.RUNNING]
    trainer.record(ctx, [queue.queued_event(request, len(waiting) + 1, running, advice, ctx.now)],
                   correlation_id=request["cycle_id"])


def _admit_waiting(ctx: HandlerContext) -> list[str]:
    """Start the waiting jobs the free slots allow, first in first; the ids of those that started."""
    started, config = [], _trust()
    while True:
        waiting = ctx.state.all("queue")
        ready = queue.to_start(waiting, _running(trainer.state(ctx)), queue.capacity(ctx.state.get("advice", "scaling")))
        if not ready:
            return started
        job_id = ready[0]
        request = waiting[job_id]["request"]
        ctx.state.delete("queue", job_id)
        with continued(ctx.state.get("traces", job_id)):
            sealed = trainer.run(ctx, _Request(request), config, correlation_id=request["cycle_id"])
        if any(e.type == "training.started" for e in sealed):
            started.append(job_id)


async def _start_waiting() -> None:
    with service.transaction() as ctx:
        started = _admit_waiting(ctx)
    await service.flush_outbox()
    for job_id in started:
        service.spawn(_run_job(job_id))


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
    await _start_waiting()  # jobs that were waiting when the trainer stopped, if there is room


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
    record_training(service.metrics, sealed, job["kind"])  # throughput, loss, joules (shared.metrics)
    if any(e.type in ("training.completed", "training.failed") for e in sealed):
        await _start_waiting()  # a slot is free: the next waiting job starts
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
                        if (job.get("dataset") or {}).get("uri") else None)
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
        # none: a research loop on an adapter alone trains on its reward's own prompt set
        dataset_path = str(dataset_file) if dataset_file is not None else None
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
        # the rest of the run's metrics too: an RL run's curve summary and collapse flag
        "metrics": {**metrics, "before": before, "after": after, **flat},
        "prompt_set": outcome.get("prompt_set"),
        "duration_s": float(outcome.get("wall_s") or outcome.get("duration_s") or 0.0),
        "energy": outcome.get("energy"),
        "base_model": (outcome.get("base_model") or {}).get("name") or "unknown",
        "base_model_checksum": (outcome.get("base_model") or {}).get("checksum"),
        "steps": int(outcome.get("steps") or 0), "tokens": int(outcome.get("tokens") or 0),
        "tokens_per_s": outcome.get("tokens_per_s"), "resumed_from_step": outcome.get("resumed_from_step"),
        "loss_curve": outcome.get("curve") or [], "placement": outcome.get("placement"),
    }

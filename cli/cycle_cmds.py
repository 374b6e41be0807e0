"""`neurons cycle request|run` and `neurons research request`."""

from __future__ import annotations

import json
import uuid

import typer

from cli.bus_client import command_event, publish_and_wait, run, signer_for
from shared.contracts.envelope import NewEvent
from shared.settings import Settings

cycle_app = typer.Typer(no_args_is_help=True, help="Self-training cycles.")
research_app = typer.Typer(no_args_is_help=True, help="Reinforcement-learning research loops.")


def _parse_config(items: list[str]) -> dict:
    config = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"{item!r}: write NAME=VALUE, e.g. steps=40", param_hint="--set")
        name, value = item.split("=", 1)
        try:
            config[name] = json.loads(value)
        except json.JSONDecodeError:
            config[name] = value
    return config


def request(kind: str, operator: str, dataset: str | None, settings_: list[str], warm_start: str | None,
            adapter: str | None, timeout: float, force_gates: list[str] | None = None) -> None:
    settings = Settings.from_env()
    signer = signer_for(settings, operator)
    command_id = f"req-{uuid.uuid4().hex[:12]}"
    payload = {"operator_id": operator, "dataset_id": dataset, "config": _parse_config(settings_) or None,
               "warm_start": warm_start, "adapter_sha256": adapter}
    if force_gates:  # an admin's say over a gate; evolution refuses it from anyone else
        payload["force_gates"] = sorted(set(force_gates))
    event = command_event(NewEvent(f"{kind}.requested", command_id, payload), correlation_id=command_id,
                          operator=operator)

    def answers(e) -> bool:
        if e.type == f"{kind}.request_refused":
            return e.payload.get("command_id") == command_id
        return e.type in (f"{kind}.proposed", "cycle.deferred") and \
            (e.payload.get("trigger") or {}).get("command_id") == command_id

    outcome = run(publish_and_wait(settings, event, [kind, "cycle"], answers, timeout, signer=signer))
    if outcome is None:
        typer.echo("neurons: no answer from the evolution service; is it running (`neurons status`)?", err=True)
        raise typer.Exit(1)
    if outcome.type.endswith("request_refused"):
        typer.echo(f"neurons: refused: {outcome.payload['reason']}", err=True)
        raise typer.Exit(1)
    p = outcome.payload
    if outcome.type == "cycle.deferred":
        typer.echo(f"deferred {p['cycle_id']}: gate {p['gate']}: {p['reason']} (retry at {p['retry_at']})")
    else:
        typer.echo(f"proposed {p['cycle_id']} ({p['kind']}): {json.dumps(p.get('config'))}; "
                   f"approval request follows")


@cycle_app.command("request")
def cycle_request(
    operator: str = typer.Option(..., "--operator", envvar="NEURONS_OPERATOR",
                                  help="who asks: the request is signed with this operator's key"),
    dataset: str | None = typer.Option(None, "--dataset", help="dataset id (default: the latest registered)"),
    set_: list[str] = typer.Option([], "--set", help="override a setting: NAME=VALUE (repeatable)"),
    warm_start: str | None = typer.Option(None, "--warm-start", help="adapter sha256 to start from"),
    force_gate: list[str] = typer.Option([], "--force-gate", help="admins only: start it although this gate is "
                                         "closed (hardware)"),
    timeout: float = typer.Option(30.0),
) -> None:
    """Ask evolution for an MNTP self-training cycle now (still gated, but for a gate an admin forces)."""
    from services.evolution.gates import FORCEABLE_GATES

    for gate in force_gate:
        if gate not in FORCEABLE_GATES:
            raise typer.BadParameter(f"{gate!r}: only {', '.join(FORCEABLE_GATES)} may be forced",
                                     param_hint="--force-gate")
    request("cycle", operator, dataset, set_, warm_start, None, timeout, force_gate)


@research_app.command("request")
def research_request(
    operator: str = typer.Option(..., "--operator", envvar="NEURONS_OPERATOR", help="who asks (signs the request)"),
    adapter: str | None = typer.Option(None, "--adapter", help="adapter sha256 (default: the one in production)"),
    dataset: str | None = typer.Option(None, "--dataset"),
    set_: list[str] = typer.Option([], "--set", help="override a setting: NAME=VALUE (repeatable)"),
    timeout: float = typer.Option(30.0),
) -> None:
    """Ask for an RL research loop on an adapter; a human approver must grant it."""
    request("research", operator, dataset, set_, None, adapter, timeout)


# --- `neurons cycle explain` ------------------------------------------------------------

# what explains a cycle: the gates' answers, how its settings were chosen, the approvals, its results, its end
_EXPLAINED = ("cycle.requested", "research.requested", "cycle.request_refused", "research.request_refused",
              "cycle.deferred", "cycle.proposed", "research.proposed", "approval.granted", "approval.rejected",
              "approval.refused", "approval.expired", "training.failed", "validation.completed",
              "cycle.evaluated", "cycle.rescored", "cycle.completed")


def _number(value) -> str:
    return "-" if value is None else f"{value:.6g}"


def _result_line(result: dict) -> str:
    reports = ", ".join(result.get("energy_reports") or ())
    source = f"energy reports {reports}" if reports else "the trainer's own reading"
    return (f"chosen by {result['role']} {result.get('cycle_id') or result['individual_id']} "
            f"({result.get('kind') or 'mntp'}): verdict {result.get('verdict') or '-'}"
            f"{' (' + result['validation_id'] + ')' if result.get('validation_id') else ''}, "
            f"fitness {_number(result.get('fitness'))}, {_number(result.get('energy_wh'))} Wh "
            f"measured by {source}")


def _proposal_lines(p: dict) -> list[str]:
    config = json.dumps(p.get("config"), sort_keys=True)
    estimate = _number(p.get("energy_estimate_wh"))
    lines = [f"proposed at {p['proposed_at']}: {p['kind']} with {config}, estimated {estimate} Wh"]
    explicit = (p.get("trigger") or {}).get("config") or {}
    if explicit:
        lines.append(f"set by the operator: {json.dumps(explicit, sort_keys=True)}")
    rationale = p.get("rationale")
    if p["kind"] != "mntp":
        lines.append("settings: the research loop's configuration, the operator's settings on top")
    elif rationale is None:
        lines.append("settings chosen by: not recorded (proposed before proposals carried their rationale)")
    else:
        lines.append(f"settings chosen by {rationale['method']}: {rationale['reason']}")
        lines += [_result_line(result) for result in rationale.get("results") or ()]
    return lines


def _trigger_line(p: dict) -> str:
    trigger = p.get("trigger") or {}
    what = {"schedule": f"the schedule (slot {trigger.get('slot')})",
            "dataset": f"dataset {trigger.get('dataset_id')}",
            "operator": f"{p.get('requested_by')}'s request {trigger.get('command_id')}"}.get(trigger.get("type"))
    return f"cycle {p['cycle_id']} ({p['kind']}), started by {what or 'an unknown trigger'}"


def explain_lines(events: list) -> list[str]:
    """One line per fact about a cycle, in the order the events occurred."""
    gated = [e.payload for e in events if e.type in ("cycle.deferred", "cycle.proposed", "research.proposed")]
    lines = [_trigger_line(gated[0])] if gated else []
    for e in events:
        p = e.payload
        if e.type in ("cycle.requested", "research.requested"):
            lines.append(f"requested by {p.get('operator_id')} at {e.occurred_at.isoformat()} (command {e.aggregate_id})")
        elif e.type.endswith("request_refused"):
            lines.append(f"request refused: {p['reason']}")
        elif e.type == "cycle.deferred":
            lines.append(f"deferred at {p['deferred_at']} (attempt {p.get('attempt', 1)}): gate {p['gate']}: "
                         f"{p['reason']}; retry at {p['retry_at']}")
        elif e.type in ("cycle.proposed", "research.proposed"):
            lines += _proposal_lines(p)
        elif e.type == "approval.granted":
            lines.append(f"approval granted ({p['kind']}) by {p['actor']}")
        elif e.type == "approval.rejected":
            lines.append(f"approval rejected ({p['kind']}) by {p['actor']}: {p.get('reason') or 'no reason given'}")
        elif e.type == "approval.refused":
            lines.append(f"decision refused for {p['request_id']}: {p['reason']}: {p['detail']}")
        elif e.type == "approval.expired":
            lines.append(f"approval expired ({p['kind']}) at {p['expired_at']}: nobody decided in time")
        elif e.type == "training.failed":
            lines.append(f"training failed at {p.get('stage')}: {p.get('error')}")
        elif e.type == "validation.completed":
            lines.append(f"verdict {p['verdict']} ({p['validation_id']}): {p['explanation']}")
        elif e.type == "cycle.evaluated":
            lines.append(f"scored: verdict {p['verdict']}, fitness {_number(p['fitness'])} "
                         f"({_number(p.get('energy_wh'))} Wh measured)")
        elif e.type == "cycle.rescored":
            because = p["because"]
            lines.append(f"rescored after {because['type']} of {because.get('job_id')}: fitness "
                         f"{_number(p['previous_fitness'])} -> {_number(p['fitness'])} "
                         f"({_number(p['energy_wh'])} Wh measured)")
        elif e.type == "cycle.completed":
            reason = f": {p['reason']}" if p.get("reason") else ""
            lines.append(f"ended {p['outcome']}{reason} (fitness {_number(p.get('fitness'))})")
    return lines


def cycle_events(settings: Settings, cycle_id: str) -> list:
    """The archived events about ``cycle_id`` (or the request a command id names), as they occurred."""
    from sqlalchemy import or_
    from sqlmodel import Session, select

    from services.registry.audit import registry_engine
    from shared.archive import ArchivedEvent
    from shared.contracts.envelope import Envelope

    with Session(registry_engine(settings)) as session:
        def rows(ids: set[str]) -> list[ArchivedEvent]:
            return list(session.exec(select(ArchivedEvent).where(or_(
                ArchivedEvent.correlation_id.in_(ids), ArchivedEvent.aggregate_id.in_(ids))).order_by(
                ArchivedEvent.occurred_at, ArchivedEvent.id)))

        found = rows({cycle_id}) + _started_by(session, cycle_id)
        # a cycle id and the command that asked for it, or a command id and the cycle it started
        gated = [Envelope.from_json(r.envelope_json).payload for r in found
                 if r.type in ("cycle.deferred", "cycle.proposed", "research.proposed")]
        ids = {cycle_id} | {p["cycle_id"] for p in gated}
        ids |= {(p.get("trigger") or {}).get("command_id") for p in gated} - {None}
        for c in {p["cycle_id"] for p in gated}:
            ids |= {f"apr-cycle-{c}", f"apr-research-{c}", f"job-{c}"}
        return [e for e in (Envelope.from_json(r.envelope_json) for r in rows(ids)) if e.type in _EXPLAINED]


def _started_by(session, command_id: str) -> list:
    """The gates' answers to the cycle an operator's command ``command_id`` asked for."""
    from sqlmodel import select

    from shared.archive import ArchivedEvent
    from shared.contracts.envelope import Envelope

    candidates = session.exec(select(ArchivedEvent).where(
        ArchivedEvent.type.in_(("cycle.deferred", "cycle.proposed", "research.proposed")),
        ArchivedEvent.envelope_json.contains(command_id)))
    return [r for r in candidates
            if (Envelope.from_json(r.envelope_json).payload.get("trigger") or {}).get("command_id") == command_id]


@cycle_app.command("explain")
def cycle_explain(cycle_id: str = typer.Argument(..., help="a cycle id (cyc-…, res-…) or the request's command id")) -> None:
    """Why a cycle ran with its settings (the past results that chose them), or why it was deferred or refused."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    try:
        events = cycle_events(Settings.from_env(), cycle_id)
    except (OperationalError, ProgrammingError):
        events = []
    if not events:
        typer.echo(f"neurons: no cycle {cycle_id!r} in the registry's archive; give a cycle id as "
                   "`neurons cycle request` printed it (cyc-… or res-…), with the services up (`neurons status`)",
                   err=True)
        raise typer.Exit(1)
    for line in explain_lines(events):
        typer.echo(line)

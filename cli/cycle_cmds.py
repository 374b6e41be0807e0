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
            adapter: str | None, timeout: float) -> None:
    settings = Settings.from_env()
    signer = signer_for(settings, operator)
    command_id = f"req-{uuid.uuid4().hex[:12]}"
    payload = {"operator_id": operator, "dataset_id": dataset, "config": _parse_config(settings_) or None,
               "warm_start": warm_start, "adapter_sha256": adapter}
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
    timeout: float = typer.Option(30.0),
) -> None:
    """Ask evolution for an MNTP self-training cycle now (still gated)."""
    request("cycle", operator, dataset, set_, warm_start, None, timeout)


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

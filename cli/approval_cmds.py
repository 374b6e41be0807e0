"""`neurons operator keygen`, `neurons approve|reject`, `neurons approvals list`."""

from __future__ import annotations

import json
import secrets
from datetime import timedelta
from pathlib import Path

import typer

from cli.bus_client import command_event, publish_and_wait, run
from shared.contracts.envelope import NewEvent, utcnow
from shared.settings import Settings
from shared.contracts.trust import KeyringError, sign_decision
from shared.keys import generate_operator, load_private_key, load_keyring

operator_app = typer.Typer(no_args_is_help=True, help="Operators who may sign decisions.")
approvals_app = typer.Typer(no_args_is_help=True, help="Approval requests and their evidence.")

OUTCOMES = ("approval.granted", "approval.rejected", "approval.refused")


@operator_app.command("keygen")
def keygen(
    name: str = typer.Argument(..., help="operator id, e.g. alice"),
    role: list[str] = typer.Option(["approver"], "--role", help="requester, approver or admin (repeatable)"),
) -> None:
    """Create an Ed25519 key pair: the private key (mode 0600) and the public key in the keyring."""
    settings = Settings.from_env()
    try:
        private_path, public = generate_operator(name, role, settings.keyring_path, settings.operator_key_dir)
    except KeyringError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"operator {name} ({', '.join(role)})")
    typer.echo(f"private key {private_path} (keep it secret: it signs decisions)")
    typer.echo(f"public key  {public} added to {settings.keyring_path}")


@operator_app.command("list")
def list_operators() -> None:
    keyring = load_keyring(Settings.from_env().keyring_path)
    for operator in keyring.operators.values():
        typer.echo(f"{operator.operator_id:<20} {','.join(operator.roles)}")


def _key_path(settings: Settings, operator: str, key: Path | None) -> Path:
    path = key or settings.operator_key_dir / f"{operator}.pem"
    if not path.exists():
        raise typer.BadParameter(f"no private key for {operator} at {path}; pass --key FILE or run "
                                 f"`neurons operator keygen {operator}`", param_hint="--operator")
    return path


def submit(settings: Settings, request_id: str, decision: str, operator: str, key: Path | None,
           reason: str | None, valid_for: timedelta = timedelta(minutes=10), timeout_s: float = 60.0,
           via: str = "cli"):
    """Sign ``decision`` on ``request_id`` and wait for the approval service's answer."""
    now = utcnow()
    signed = sign_decision(request_id, decision, operator, load_private_key(_key_path(settings, operator, key)),
                           issued_at=now, expires_at=now + valid_for, nonce=secrets.token_hex(16), reason=reason)
    event = command_event(
        NewEvent("approval.decision_submitted", f"sub-{signed['nonce']}",
                 {"request_id": request_id, "signed": dict(signed), "submitted_via": via}),
        correlation_id=request_id, operator=operator)

    def answers(e) -> bool:
        return e.type in OUTCOMES and e.payload.get("request_id") == request_id and (
            (e.payload.get("decision") or {}).get("nonce") == signed["nonce"]
            or (e.payload.get("submitted") or e.payload.get("submitted_decision") or {}).get("nonce") == signed["nonce"])

    return run(publish_and_wait(settings, event, ["approval"], answers, timeout_s))


def _report(outcome) -> None:
    if outcome is None:
        typer.echo("neurons: no answer from the approval service within the timeout; is it running (`neurons status`)?", err=True)
        raise typer.Exit(1)
    if outcome.type == "approval.refused":
        typer.echo(f"neurons: refused: {outcome.payload.get('reason')}: {outcome.payload.get('detail', '')}".rstrip(": "), err=True)
        raise typer.Exit(1)
    typer.echo(f"{outcome.type.split('.')[1]}: {outcome.payload['request_id']} (event {outcome.event_id})")


def approve(
    request_id: str = typer.Argument(..., help="the approval request id (see `neurons approvals list --pending`)"),
    operator: str = typer.Option(..., "--operator", help="operator id in the keyring"),
    key: Path | None = typer.Option(None, "--key", help="private key file (default: the operator's key under NEURONS_OPERATOR_KEYS)"),
    timeout: float = typer.Option(60.0, help="seconds to wait for the approval service"),
) -> None:
    """Sign and submit a grant."""
    _report(submit(Settings.from_env(), request_id, "grant", operator, key, None, timeout_s=timeout))


def reject(
    request_id: str = typer.Argument(...),
    operator: str = typer.Option(..., "--operator"),
    reason: str = typer.Option(..., "--reason", help="why; kept in the audit trail"),
    key: Path | None = typer.Option(None, "--key"),
    timeout: float = typer.Option(60.0),
) -> None:
    """Sign and submit a rejection."""
    _report(submit(Settings.from_env(), request_id, "reject", operator, key, reason, timeout_s=timeout))


@approvals_app.command("list")
def list_approvals(
    pending: bool = typer.Option(False, "--pending", help="only requests still waiting for a decision"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Requests with their kind, subject, evidence, policy and state."""
    from services.registry.queries import approval_requests

    rows = approval_requests(Settings.from_env(), pending_only=pending)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    for row in rows:
        typer.echo(f"{row['request_id']:<48} {row['kind']:<10} {row['status']:<9} expires {row.get('expires_at')}")

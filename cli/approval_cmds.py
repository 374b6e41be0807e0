"""`neurons operator init-admin|enroll|revoke|list`, `neurons approve|reject`, `neurons approvals list`."""

from __future__ import annotations

import json
import secrets
from datetime import timedelta
from pathlib import Path

import typer

from cli.bus_client import check_may_publish, command_event, publish_and_wait, publish_signed, run, signer_for
from shared.contracts.envelope import NewEvent, utcnow
from shared.settings import Settings
from shared.contracts.trust import ROLES, KeyringError, decision_subject, sign_decision
from shared.keys import init_admin, load_anchors, new_operator_key, operator_key_path, operator_signer

operator_app = typer.Typer(no_args_is_help=True, help="Operators: their keys, enrolled on the log by an admin.")
approvals_app = typer.Typer(no_args_is_help=True, help="Approval requests and their evidence.")

OUTCOMES = ("approval.granted", "approval.rejected", "approval.refused")


def _admin_signer(settings: Settings, admin: str | None):
    """The admin who signs an enrolment: ``--admin``, else the one anchored admin whose key is here."""
    if admin is None:
        admins = [name for name in load_anchors(settings.trust_path)["admins"]
                  if operator_key_path(settings, name).exists()]
        if len(admins) != 1:
            raise typer.BadParameter("name the admin who signs: --admin NAME (first admin: "
                                     "`neurons operator init-admin NAME`)", param_hint="--admin")
        admin = admins[0]
    return signer_for(settings, admin)


def _publish_operator_event(settings: Settings, event: NewEvent, signer) -> None:
    envelope = command_event(event, operator=signer.principal.split(":", 1)[1])
    run(publish_signed(settings, envelope, signer))


def enrol(settings: Settings, name: str, roles: list[str], admin_signer, label: str | None = None) -> str:
    """Make ``name``'s key pair here and publish its enrolment, signed by ``admin_signer``."""
    try:
        signer = new_operator_key(settings, name)
    except KeyringError as exc:
        raise typer.BadParameter(str(exc)) from None
    _publish_operator_event(settings, NewEvent("operator.enrolled", name, {
        "operator_id": name, "public_key": signer.public_key, "key_id": signer.key_id, "roles": list(roles),
        "label": label}), admin_signer)
    return signer.key_id


@operator_app.command("init-admin")
def init_admin_cmd(
    name: str = typer.Argument(..., help="the first admin's operator id, e.g. root"),
    label: str | None = typer.Option(None, "--label", help="a note kept with the anchor, e.g. 'demo only'"),
) -> None:
    """Create the first admin once: a key pair, anchored in the trust file, and its enrolment on the log."""
    settings = Settings.from_env()
    try:
        signer = init_admin(settings, name, label)
    except KeyringError as exc:
        typer.echo(f"neurons: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"admin {name} anchored in {settings.trust_path} (key {signer.key_id})")
    typer.echo(f"private key {operator_key_path(settings, name)} (keep it secret: it enrols operators)")
    try:
        _publish_operator_event(settings, NewEvent("operator.enrolled", name, {
            "operator_id": name, "public_key": signer.public_key, "key_id": signer.key_id, "roles": ["admin"],
            "label": label}), signer)
    except RuntimeError as exc:  # no broker yet: the anchor is what counts, the log learns of it later
        typer.echo(f"not on the log yet ({exc}); `neurons operator enroll` works once the platform runs")


@operator_app.command("service-keys")
def service_keys_cmd(
    out: Path | None = typer.Option(None, "--dir", help="write trust.json and services/<name>.pem under this folder "
                                    "(default: NEURONS_TRUST and NEURONS_SERVICE_KEYS)"),
) -> None:
    """Make the services' private keys that are missing and anchor their public keys in the trust file."""
    from shared.keys import ensure_service_keys

    settings = Settings.from_env()
    if out is not None:
        settings = settings.with_(trust_path=out / "trust.json", service_key_dir=out / "services", service_key=None)
    made = ensure_service_keys(settings)
    typer.echo(f"service keys under {settings.service_key_dir} ({', '.join(made) or 'none new'}); "
               f"public keys anchored in {settings.trust_path}")


@operator_app.command("enroll")
def enroll_cmd(
    name: str = typer.Argument(..., help="operator id, e.g. alice"),
    role: list[str] = typer.Option(["approver"], "--role", help="requester, approver or admin (repeatable)"),
    admin: str | None = typer.Option(None, "--admin", help="the admin who signs the enrolment"),
) -> None:
    """Create an operator's Ed25519 key pair here (mode 0600) and enrol its public key, signed by an admin."""
    settings = Settings.from_env()
    unknown = [r for r in role if r not in ROLES]
    if unknown:
        raise typer.BadParameter(f"unknown role {unknown[0]!r}; choose from {', '.join(ROLES)}", param_hint="--role")
    signer = _admin_signer(settings, admin)
    key_id = enrol(settings, name, role, signer)
    typer.echo(f"operator {name} ({', '.join(role)}) enrolled by {signer.principal} with key {key_id}")
    typer.echo(f"private key {operator_key_path(settings, name)} (keep it secret: it signs as {name})")


@operator_app.command("revoke")
def revoke_cmd(
    name: str = typer.Argument(...),
    key_id: str | None = typer.Option(None, "--key-id", help="the key to revoke (default: the key enrolled here)"),
    admin: str | None = typer.Option(None, "--admin"),
    reason: str | None = typer.Option(None, "--reason"),
) -> None:
    """Revoke an operator's key: what it signs from now on is refused."""
    settings = Settings.from_env()
    signer = _admin_signer(settings, admin)
    if key_id is None:
        path = operator_key_path(settings, name)
        if not path.exists():
            raise typer.BadParameter(f"no key of {name} here; pass --key-id", param_hint="--key-id")
        key_id = operator_signer(settings, name).key_id
    _publish_operator_event(settings, NewEvent("operator.revoked", name, {
        "operator_id": name, "key_id": key_id, "reason": reason}), signer)
    typer.echo(f"revoked key {key_id} of {name}")


@operator_app.command("list")
def list_operators() -> None:
    """Operators as the log enrolled them, with their keys and roles."""
    settings = Settings.from_env()
    from shared.trust_view import TrustView

    view = TrustView(settings)
    run(view.read_once())
    for operator_id, record in sorted(view.state.operator_keys().items()):
        typer.echo(f"{operator_id:<20} {','.join(record.roles):<24} key {record.key_id} since {record.valid_from or 'anchor'}")


def ensure_demo_operators(settings: Settings, operators: dict[str, list[str]], say) -> None:
    """The demo's operators, enrolled by a demo admin (labelled so): never a deployment's."""
    if not load_anchors(settings.trust_path)["admins"]:
        signer = init_admin(settings, "demo-admin", "DEMO admin made by `neurons demo`; not for production")
        _publish_operator_event(settings, NewEvent("operator.enrolled", "demo-admin", {
            "operator_id": "demo-admin", "public_key": signer.public_key, "key_id": signer.key_id,
            "roles": ["admin"], "label": "DEMO"}), signer)
        say("created the DEMO admin (demo only: a deployment runs `neurons operator init-admin` once)")
    for name, roles in operators.items():
        if not operator_key_path(settings, name).exists():
            enrol(settings, name, roles, _admin_signer(settings, None), label="DEMO")
            say(f"enrolled the DEMO operator {name} ({', '.join(roles)}; demo only: real operators keep their own keys)")


def request_subject(settings: Settings, request_id: str, timeout_s: float = 15.0) -> dict:
    """What a decision on ``request_id`` signs (``decision_subject``), from its ``approval.requested`` on the log."""
    requested = run(publish_and_wait(settings, None, ["approval"], lambda e: e.type == "approval.requested"
                                     and e.payload.get("request_id") == request_id, timeout_s, from_beginning=True))
    if requested is None:
        raise typer.BadParameter(f"no approval request {request_id} on the log (see `neurons approvals list`)",
                                 param_hint="REQUEST_ID")
    return decision_subject(requested.payload["kind"], requested.payload.get("subject") or {})


def submit(settings: Settings, request_id: str, decision: str, operator: str, key: Path | None,
           reason: str | None, valid_for: timedelta = timedelta(minutes=10), timeout_s: float = 60.0,
           via: str = "cli", subject: dict | None = None):
    """Sign ``decision`` on ``request_id`` (and what it is about: ``subject``, looked up when not
    given) and wait for the approval service's answer."""
    now = utcnow()
    signer = signer_for(settings, operator, key)
    check_may_publish(settings, operator, signer, "approval.decision_submitted")
    if subject is None:
        subject = request_subject(settings, request_id)
    signed = sign_decision(request_id, decision, operator, signer.private_key,
                           issued_at=now, expires_at=now + valid_for, nonce=secrets.token_hex(16), reason=reason,
                           subject=subject)
    event = command_event(
        NewEvent("approval.decision_submitted", f"sub-{signed['nonce']}",
                 {"request_id": request_id, "signed": dict(signed), "submitted_via": via}),
        correlation_id=request_id, operator=operator)

    def answers(e) -> bool:
        return e.type in OUTCOMES and e.payload.get("request_id") == request_id and (
            (e.payload.get("decision") or {}).get("nonce") == signed["nonce"]
            or (e.payload.get("submitted") or e.payload.get("submitted_decision") or {}).get("nonce") == signed["nonce"])

    return run(publish_and_wait(settings, event, ["approval"], answers, timeout_s, signer=signer))


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

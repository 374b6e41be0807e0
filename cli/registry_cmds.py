"""`neurons profiles ...`, `neurons adapters ...`, `neurons audit at`, `neurons validate show`.

Reads come from the registry's read models; changes are published as command
events, and the command waits for the registry's answer, so a refusal is
reported here as one line on stderr with exit status 1.
"""

from __future__ import annotations

import json
import secrets
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import typer

from cli.bus_client import check_may_publish, command_event, publish_and_wait, run, signer_for
from cli.cycle_run import sizing_note
from services.registry import queries
from shared.contracts.envelope import Envelope, NewEvent, utcnow
from shared.settings import Settings
from shared.contracts.trust import KeyringError, decision_subject, parse_time, sign_decision
from shared.keys import load_private_key

profiles_app = typer.Typer(no_args_is_help=True, help="Personality profiles and the adapter each one serves.")
adapters_app = typer.Typer(no_args_is_help=True, help="Adapters in service per channel, their lineage and history.")


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"neurons: {message}", err=True)
    # SystemExit rather than typer.Exit: the status must reach the shell however the command is mounted.
    raise SystemExit(code)


def _echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "-"


def _pairs(values: list[str], option: str) -> dict[str, Any]:
    """KEY=VALUE options; VALUE is read as JSON when it is JSON (8, true, ["a"]), else as text."""
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=option)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _wait_for_answer(settings: Settings, envelope: Envelope, aggregate: str, timeout: float,
                     key: Path | None = None) -> Envelope:
    """Publish an operator's command, signed with their key, and wait for the registry's answer."""
    operator = envelope.producer.service.split(":", 1)[1]
    signer = signer_for(settings, operator, key)
    check_may_publish(settings, operator, signer, envelope.type)
    answer = run(publish_and_wait(settings, envelope, [aggregate], lambda e: e.causation_id == envelope.event_id,
                                  timeout_s=timeout, signer=signer))
    if answer is None:
        _fail(f"no answer from the registry within {timeout:.0f} s; is it running (`neurons status`)?")
    return answer


# --- profiles -----------------------------------------------------------------------


def _print_profile(profile: dict[str, Any]) -> None:
    typer.echo(f"profile      {profile['profile_id']}  (version {profile['version']})")
    typer.echo(f"channel      {profile['channel']}")
    typer.echo(f"adapter      {profile['active_adapter_sha256'] or '- (base model)'}")
    typer.echo(f"style        {profile['interaction_style']}")
    typer.echo(f"traits       {json.dumps(profile['traits'], sort_keys=True)}")
    typer.echo(f"context      {json.dumps(profile['context_preferences'], sort_keys=True)}")
    if profile.get("updated_at"):
        typer.echo(f"updated      {profile['updated_at']} by {profile.get('updated_by') or '-'}")


def _profile_outcome(answer: Envelope, as_json: bool) -> None:
    p = answer.payload
    if answer.type == "profile.update_refused":
        _fail(f"profile {p['profile_id']} not {'created' if p['command'] == 'create' else 'updated'}: "
              f"{p['reason']}: {p['detail']}")
    if as_json:
        _echo_json(p)
        return
    verb = "created" if answer.type == "profile.created" else "updated"
    typer.echo(f"profile {p['profile_id']} {verb}: version {p['version']}, channel {p['channel']}, "
               f"adapter {_short(p.get('active_adapter_sha256'))}")


@profiles_app.command("create")
def create_profile(
    profile_id: str = typer.Argument(..., help="profile id, e.g. support-en"),
    channel: str = typer.Option("production", "--channel", help="the channel whose adapter the profile serves"),
    trait: list[str] = typer.Option([], "--trait", help="KEY=VALUE (repeatable), e.g. tone=warm"),
    style: str = typer.Option("", "--style", help="interaction style, e.g. 'concise, asks before acting'"),
    context: list[str] = typer.Option([], "--context", help="context preference KEY=VALUE (repeatable)"),
    by: str = typer.Option(..., "--operator", "--by", envvar="NEURONS_OPERATOR", help="who asks (signs the request)"),
    timeout: float = typer.Option(60.0, "--timeout", help="seconds to wait for the registry"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create a profile at version 1 serving its channel's adapter."""
    settings = Settings.from_env()
    event = command_event(NewEvent("profile.create_requested", f"pcmd-{uuid.uuid4().hex[:16]}", {
        "profile_id": profile_id, "traits": _pairs(trait, "--trait"), "interaction_style": style,
        "context_preferences": _pairs(context, "--context"), "channel": channel,
        "requested_by": by}), correlation_id=f"profile-{profile_id}", operator=by)
    _profile_outcome(_wait_for_answer(settings, event, "profile", timeout), as_json)


@profiles_app.command("update")
def update_profile(
    profile_id: str = typer.Argument(...),
    expected_version: int = typer.Option(..., "--expected-version", "--version", min=1,
                                         help="the version you are changing (`neurons profiles show`)"),
    trait: list[str] = typer.Option([], "--trait", help="KEY=VALUE to set (repeatable)"),
    drop_trait: list[str] = typer.Option([], "--drop-trait", help="trait to remove (repeatable)"),
    style: str = typer.Option(None, "--style"),
    context: list[str] = typer.Option([], "--context", help="context preference KEY=VALUE (repeatable)"),
    channel: str = typer.Option(None, "--channel", help="move the profile to another channel"),
    by: str = typer.Option(..., "--operator", "--by", envvar="NEURONS_OPERATOR", help="who asks (signs the request)"),
    timeout: float = typer.Option(60.0, "--timeout"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Change a profile; refused when someone changed it since EXPECTED_VERSION."""
    settings = Settings.from_env()
    changes: dict[str, Any] = {}
    if style is not None:
        changes["interaction_style"] = style
    if channel is not None:
        changes["channel"] = channel
    if trait or drop_trait or context:
        # Traits and context travel whole: merge onto what the profile held at the expected version.
        with queries.registry_session(settings) as session:
            current = queries.profile(session, profile_id)
        if current is None:
            _fail(f"no profile {profile_id} (see `neurons profiles list`)")
        if current["version"] < expected_version:
            _fail(f"the registry shows {profile_id} at version {current['version']}, not yet {expected_version}; "
                  "retry in a moment")
        if trait or drop_trait:
            traits = {k: v for k, v in current["traits"].items() if k not in drop_trait}
            changes["traits"] = {**traits, **_pairs(trait, "--trait")}
        if context:
            changes["context_preferences"] = {**current["context_preferences"], **_pairs(context, "--context")}
    if not changes:
        raise typer.BadParameter("nothing to change: give --trait, --drop-trait, --style, --context or --channel")
    event = command_event(NewEvent("profile.update_requested", f"pcmd-{uuid.uuid4().hex[:16]}", {
        "profile_id": profile_id, "expected_version": expected_version, "changes": changes,
        "requested_by": by}), correlation_id=f"profile-{profile_id}", operator=by)
    _profile_outcome(_wait_for_answer(settings, event, "profile", timeout), as_json)


@profiles_app.command("show")
def show_profile(profile_id: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """A profile as the registry holds it, with its version and live adapter."""
    with queries.registry_session(Settings.from_env()) as session:
        profile = queries.profile(session, profile_id)
    if profile is None:
        _fail(f"no profile {profile_id} (see `neurons profiles list`)")
    if as_json:
        _echo_json(profile)
    else:
        _print_profile(profile)


@profiles_app.command("list")
def list_profiles(channel: str = typer.Option(None, "--channel"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Every profile: channel, version and adapter."""
    with queries.registry_session(Settings.from_env()) as session:
        rows = queries.profiles(session, channel)
    if as_json:
        _echo_json(rows)
        return
    for row in rows:
        typer.echo(f"{row['profile_id']:<28} v{row['version']:<4} {row['channel']:<14} "
                   f"{_short(row['active_adapter_sha256'])}")


# --- adapters ------------------------------------------------------------------------------


@adapters_app.command("manifest")
def manifest(as_json: bool = typer.Option(False, "--json")) -> None:
    """What serves each channel, and every known adapter with its lineage and approvals."""
    with queries.registry_session(Settings.from_env()) as session:
        data = queries.manifest(session)
    if as_json:
        _echo_json(data)
        return
    if not data["channels"]:
        typer.echo("no adapter in service: the base model answers on every channel")
    for name, channel in data["channels"].items():
        typer.echo(f"{name:<14} {channel['adapter_sha256']}  since {channel['since']}  "
                   f"{channel['via'].replace('_', ' ')} by {channel['approver'] or channel['operator_id']}")
    typer.echo(f"{len(data['adapters'])} adapters known (`neurons adapters show SHA` for one)")


@adapters_app.command("show")
def show_adapter(sha: str = typer.Argument(..., help="sha256 or a unique prefix"),
                 as_json: bool = typer.Option(False, "--json")) -> None:
    """One adapter: lineage (data, base model, configuration), metrics, energy, verdict, approvals."""
    with queries.registry_session(Settings.from_env()) as session:
        view = queries.adapter_view(session, queries.resolve_adapter(session, sha) or sha)
    if view is None:
        _fail(f"no adapter {sha}")
    if as_json:
        _echo_json(view)
        return
    lineage, validation = view["lineage"], view["validation"]
    typer.echo(f"adapter      {view['adapter_sha256']}  ({view['kind'] or '?'}, {view['status'] or 'training not seen'})")
    typer.echo(f"artefact     {view['adapter_uri']}")
    typer.echo(f"base model   {lineage['base_model'] or '-'}  sha256 {lineage['base_model_sha256'] or '-'}")
    typer.echo(f"dataset      {lineage['dataset_id'] or '-'}  sha256 {lineage['dataset_sha256'] or '-'}")
    typer.echo(f"config       {json.dumps(lineage['config'], sort_keys=True)}")
    typer.echo(f"verdict      {validation['verdict'] or '-'}  ({validation['validation_id'] or 'not validated'})")
    energy = view["energy"] or {}
    typer.echo(f"energy       {energy.get('wh', '-')} Wh, {energy.get('gco2e', '-')} gCO2e")
    for approval in view["approvals"]:
        typer.echo(f"approval     {approval['request_id']}  {approval['status']} by "
                   f"{approval['operator_id'] or approval['actor'] or '-'}")
    for step in view["channel_events"]:
        typer.echo(f"{step['action']:<12} {step['channel']} at {step['at']} by {step['operator_id'] or '-'}")


@adapters_app.command("history")
def history(channel: str = typer.Argument("production"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Every promotion, rollback and refusal on a channel, oldest first."""
    with queries.registry_session(Settings.from_env()) as session:
        rows = queries.channel_history(session, channel)
    if as_json:
        _echo_json(rows)
        return
    for row in rows:
        typer.echo(f"{row['at']}  {row['action']:<18} {_short(row['adapter_sha256'])}  "
                   f"by {row['operator_id'] or '-'}  {row['reason'] or row['approval_request_id'] or ''}".rstrip())


def _operator_key(settings: Settings, operator: str, key: Path | None) -> Path:
    key_dir = getattr(settings, "operator_key_dir", None) or settings.var_dir / "keys" / "operators"
    path = key or Path(key_dir) / f"{operator}.pem"
    if not path.exists():
        raise typer.BadParameter(f"no private key for {operator} at {path}; pass --key FILE", param_hint="--operator")
    return path


@adapters_app.command("rollback")
def rollback(
    channel: str = typer.Argument(..., help="channel to roll back, e.g. production"),
    to: str = typer.Option(..., "--to", help="sha256 (or unique prefix) of an adapter that served the channel before"),
    operator: str = typer.Option(..., "--operator", envvar="NEURONS_OPERATOR", help="an operator with the admin role"),
    key: Path = typer.Option(None, "--key", help="private key file (default: the operator's key)"),
    reason: str = typer.Option(None, "--reason", help="why; kept in the audit trail"),
    timeout: float = typer.Option(60.0, "--timeout"),
) -> None:
    """Put a previously served adapter back on CHANNEL, signed by an admin."""
    settings = Settings.from_env()
    sha = to.lower()
    if len(sha) != 64:
        with queries.registry_session(settings) as session:
            sha = queries.resolve_adapter(session, sha) or ""
        if not sha:
            raise typer.BadParameter(f"{to!r} names no single known adapter; give the full sha256", param_hint="--to")
    now, nonce = utcnow(), secrets.token_hex(16)
    try:
        signed = sign_decision(f"rollback-{channel}-{nonce[:12]}", "rollback", operator,
                               load_private_key(_operator_key(settings, operator, key)), issued_at=now,
                               expires_at=now + timedelta(minutes=10), nonce=nonce, reason=reason,
                               extra={"channel": channel, "adapter_sha256": sha},
                               subject=decision_subject("rollback", {"channel": channel, "adapter_sha256": sha}))
    except KeyringError as exc:
        _fail(str(exc), 2)
    event = command_event(NewEvent("adapter.rollback_requested", f"rb-{nonce}", {
        "channel": channel, "adapter_sha256": sha, "signed": signed, "submitted_via": "cli"}),
        correlation_id=signed["request_id"], operator=operator)
    answer = _wait_for_answer(settings, event, "adapter", timeout, key)
    p = answer.payload
    if answer.type == "adapter.rollback_refused":
        _fail(f"rollback of {channel} refused: {p['reason']}: {p['detail']}")
    typer.echo(f"{channel} rolled back to {p['adapter_sha256']} (was {_short(p['previous_adapter_sha256'])}) "
               f"by {p['operator_id']}")


# --- audit at, validate show ------------------------------------------------------------------


def audit_at(
    at: str = typer.Argument(..., help="the moment, ISO-8601 with its zone, e.g. 2025-03-04T14:03:00Z"),
    profile: str = typer.Option(None, "--profile", help="the profile to ask about"),
    channel: str = typer.Option(None, "--channel", help="the channel to ask about (default production)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Replay the archive up to AT: which adapter served, who approved it, on what evidence."""
    from services.registry.audit import audit_at as replay_at

    if profile and channel:
        raise typer.BadParameter("ask about a profile or a channel, not both", param_hint="--profile")
    try:
        moment = parse_time(at.replace("Z", "+00:00") if at.endswith("Z") else at)
    except ValueError as exc:
        raise typer.BadParameter(f"{at!r}: {exc}", param_hint="AT") from None
    answer = replay_at(Settings.from_env(), moment, profile=profile, channel=channel)
    if as_json:
        _echo_json(answer)
        return
    subject = f"profile {profile} (channel {answer['channel']})" if profile else f"channel {answer['channel']}"
    if answer["adapter_sha256"] is None:
        typer.echo(f"at {answer['at']}: {subject}: {answer.get('why')}")
        return
    typer.echo(f"at {answer['at']}: {subject} served adapter {answer['adapter_sha256']}")
    step = answer.get("put_in_service") or {}
    if step:
        typer.echo(f"  {step['action'].replace('_', ' ')} at {step['at']} by {step['operator_id'] or '-'}")
    promotion = answer.get("promotion")
    if promotion:
        typer.echo(f"  approved by {promotion['operator_id'] or promotion['actor']} "
                   f"(request {promotion['request_id']}, decided {promotion['decided_at']})")
        for item in promotion["evidence"]:
            typer.echo(f"  evidence: {item.get('type')} {item.get('id') or ''}".rstrip())
    check = answer.get("signature_check")
    if check:
        typer.echo(f"  signature: {'valid' if check['ok'] else 'NOT VALID: ' + str(check['reason'])}")
    adapter = answer.get("serving") or {}
    lineage = adapter.get("lineage") or {}
    typer.echo(f"  trained on dataset {lineage.get('dataset_id') or '-'} (sha256 {lineage.get('dataset_sha256') or '-'}), "
               f"base model {lineage.get('base_model') or '-'}")
    energy = adapter.get("energy") or {}
    if energy:
        typer.echo(f"  energy {energy.get('wh')} Wh, {energy.get('gco2e')} gCO2e")


def validate_show(validation_id: str = typer.Argument(..., help="validation id, e.g. val-0123456789abcdef"),
                  as_json: bool = typer.Option(False, "--json")) -> None:
    """The observability snapshot of one soak run: totals, per-cycle records, load, energy, approvals."""
    with queries.registry_session(Settings.from_env()) as session:
        snap = queries.snapshot(session, validation_id)
    if snap is None:
        _fail(f"no validation {validation_id}")
    if as_json:
        _echo_json(snap)
        return
    totals = snap["totals"]
    typer.echo(f"validation   {snap['validation_id']}  ({snap['purpose']}, {snap['status']})")
    typer.echo(f"adapter      {snap['adapter_sha256']}  against {snap['baseline'].get('kind', '-')}")
    typer.echo(f"verdict      {snap['verdict'] or '-'}  score {snap['score']}  {snap['explanation'] or ''}".rstrip())
    rate = snap["success_rate"]
    typer.echo(f"cycles       {totals['cycles_done']}/{totals['cycles_planned'] or '?'}  passed {totals['cycles_passed']}"
               f"  failed {totals['cycles_failed']}  success rate {'-' if rate is None else f'{rate:.0%}'}")
    replicas = totals["replicas"]
    typer.echo(f"episodes     {totals['episodes']} on {replicas or '?'} replica{'s' * (replicas != 1)} per side, "
               f"{totals['incidents']} incidents{sizing_note(snap['sized_by'])}")
    energy = snap["energy"] or {}
    typer.echo(f"energy       {energy.get('wh', '-')} Wh")
    approval = snap["promotion_approval"]
    typer.echo(f"promotion    {approval['request_id'] + ' ' + approval['status'] if approval else '-'}")
    for line in learned_lines(snap):
        typer.echo(line)
    for record in snap["cycles"]:
        typer.echo(f"  cycle {record['cycle']:>3}  {record['outcome']:<12} score {record['score']}  {record['reason'] or ''}".rstrip())


def _figure(value: float | None, pattern: str = "{:.3f}") -> str:
    return "-" if value is None else pattern.format(value)


def learned_lines(snap: dict) -> list[str]:
    """What the soak measured of what the adapter learned: an encoder's retrieval, a policy's answers
    (baseline -> candidate) and the RL run's reward curve."""
    lines = []
    retrieval = snap.get("retrieval") or {}
    if retrieval:
        base, cand = retrieval.get("baseline") or {}, retrieval.get("candidate") or {}
        lines.append(f"retrieval    recall@1 {_figure(base.get('recall_at_1'))} -> {_figure(cand.get('recall_at_1'))}"
                     f"  MRR {_figure(base.get('mrr'))} -> {_figure(cand.get('mrr'))}  (baseline -> candidate)")
    policy = snap.get("policy") or {}
    if policy:
        base, cand = policy.get("baseline") or {}, policy.get("candidate") or {}
        lines.append(f"policy       reward {_figure(base.get('reward_mean'))} -> {_figure(cand.get('reward_mean'))}"
                     f"  spread {_figure(cand.get('reward_spread'))}"
                     f"  distinct answers {_figure(cand.get('distinct_share'), '{:.0%}')}"
                     f"  {'COLLAPSED' if policy.get('collapsed') else 'not collapsed'}")
    curve = snap.get("reward_curve") or []
    if curve:
        shown = curve if len(curve) <= 6 else curve[:: max(1, len(curve) // 5)][:5] + [curve[-1]]
        lines.append("reward curve " + "  ".join(
            f"{p['step']}: {_figure(p.get('reward_mean'))}±{_figure(p.get('reward_spread'), '{:.2f}')}"
            f" kl {_figure(p.get('kl'), '{:.3f}')} distinct {_figure(p.get('distinct_share'), '{:.0%}')}"
            for p in shown))
    return lines

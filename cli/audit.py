"""`neurons audit ...`: answer an auditor from the archive and the log."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer

from services.registry import audit
from shared.settings import Settings

app = typer.Typer(no_args_is_help=True, help="Export, replay, republish and verify the event history; show whose keys were trusted when.")


@app.command()
def export(out: Path = typer.Option(..., "--out", help="JSON-lines file to write")) -> None:
    """Write every archived event to a JSON-lines file."""
    count = audit.export(Settings.from_env(), out)
    typer.echo(f"exported {count} events to {out}")


@app.command()
def replay(from_log: bool = typer.Option(False, "--from-log", help="read the Kafka log at offset 0 instead of the archive")) -> None:
    """Rebuild the registry's read models from the archive (or the log)."""
    settings = Settings.from_env()
    if from_log:
        count, malformed = audit.replay_from_log(settings)
        typer.echo(f"replayed {count} events from the log ({malformed} malformed records skipped)")
    else:
        count = audit.replay_from_archive(settings)
        typer.echo(f"replayed {count} events from the archive")


@app.command()
def republish(force: bool = typer.Option(False, "--force", help="publish every archived event, even those the log holds")) -> None:
    """Restore the broker's log from the archive: every archived event the log lacks (all of them after a
    restart of the memory broker), in order per aggregate."""
    count = asyncio.run(audit.republish(Settings.from_env(), force=force))
    typer.echo(f"republished {count} events")


@app.command()
def verify(as_json: bool = typer.Option(False, "--json")) -> None:
    """Rebuild every projection into a scratch database and compare it with the live one, and check every
    archived event's signature and producer as of the time it occurred."""
    settings = Settings.from_env()
    report = audit.verify(settings)
    report["log"] = log_against_archive(settings)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        for name, table in report["tables"].items():
            typer.echo(f"{name:<28} {'same' if table['same'] else 'DIFFERS'}  rows live {table['live_rows']} rebuilt {table['rebuilt_rows']}")
        typer.echo("no difference" if report["projections_ok"] else f"differs: {', '.join(report['differs'])}")
        if not report["settled"]:
            typer.echo(f"events kept arriving while checking ({report['archived_meanwhile']} in the last try): "
                       "a difference may be one of them; run it again when the platform is quiet")
        _echo_signatures(report["signatures"])
        _echo_log(report["log"])
    if not report["ok"]:
        raise typer.Exit(1)


def log_against_archive(settings: Settings) -> dict:
    """The log read to its end (``shared.log_reader``) against the archive: how many events each holds
    and how many only one of them does. Informative: after a restart the embedded broker's log is empty
    until ``neurons audit republish``, and an event just published may not be archived yet."""
    from sqlmodel import Session, select

    from shared.archive import ArchivedEvent

    try:
        events, malformed = asyncio.run(audit.read_log(settings, timeout_s=3.0))
    except Exception as exc:  # no broker: the archive is checked all the same
        return {"read": False, "error": f"{type(exc).__name__}: {exc}"}
    on_log = {event.event_id for event in events}
    with Session(audit.registry_engine(settings)) as session:
        archived = set(session.exec(select(ArchivedEvent.event_id)).all())
    return {"read": True, "events": len(on_log), "malformed": malformed, "archived": len(archived),
            "not_archived": len(on_log - archived), "not_on_log": len(archived - on_log)}


def _echo_log(log: dict) -> None:
    if not log["read"]:
        typer.echo(f"log not read ({log['error']})")
        return
    typer.echo(f"log: {log['events']} events ({log['malformed']} malformed records), archive {log['archived']}; "
               f"{log['not_archived']} on the log not archived, {log['not_on_log']} archived not on the log"
               + (" (an empty broker: `neurons audit republish`)" if log["not_on_log"] and not log["events"] else ""))


def _echo_signatures(report: dict) -> None:
    counts = report["counts"]
    typer.echo(f"signatures of {report['events']} archived events, each checked as of when it occurred "
               f"(trust anchors {report['trust_path']}):")
    for kind, count in counts.items():
        if kind == audit.SIGNED or count:
            label = {audit.SIGNED: "signed and authorised",
                     audit.UPCAST: "upcast before archiving (not verifiable)"}.get(kind, kind)
            typer.echo(f"  {label:<42} {count}")
    for entry in report["failures"]:
        typer.echo(f"  FAILED {entry['outcome']}: archive row {entry['archive_id']} "
                   f"{entry.get('type', '?')} {entry.get('event_id', '')} at {entry.get('occurred_at', '?')}: "
                   f"{entry['detail']}")
    for entry in report["upcast"]:
        typer.echo(f"  upcast: {entry['type']} {entry['event_id']} (archived as v{entry['schema_version']}, "
                   f"signed by {entry['signed_by']} in an older version)")
    hidden = report["failed"] - len(report["failures"])
    if hidden > 0:
        typer.echo(f"  ... and {hidden} more failures (--json lists the first {len(report['failures'])})")
    typer.echo("every event signed and authorised" if report["ok"] else f"{report['failed']} events FAILED")


@app.command()
def trust(as_json: bool = typer.Option(False, "--json")) -> None:
    """Whose keys were trusted when (the anchors, operators enrolled and revoked on the log), and who may write what."""
    report = audit.trust_history(Settings.from_env())
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"trust anchors ({report['trust_path']}):")
    for name, entry in report["anchors"]["services"].items():
        typer.echo(f"  service:{name:<24} key {entry['key_id']}")
    for name, entry in report["anchors"]["admins"].items():
        label = f"  ({entry['label']})" if entry["label"] else ""
        typer.echo(f"  operator:{name:<23} key {entry['key_id']}  admin{label}")
    typer.echo("operator keys on the log (from the archive, in the order they occurred):")
    for entry in report["history"]:
        typer.echo("  " + _history_line(entry))
    if not report["history"]:
        typer.echo("  none")
    typer.echo("operator keys enrolled on the log, as they stand:")
    for key in report["operator_keys"]:
        state = f"revoked at {key['revoked_at']}" if key["revoked_at"] else "valid"
        typer.echo(f"  {key['principal']:<32} key {key['key_id']}  {','.join(key['roles']):<24} "
                   f"since {key['valid_from']}  {state}")
    typer.echo("who may write what:")
    for event_type, allowed in report["producers"].items():
        typer.echo(f"  {event_type:<34} {', '.join(allowed) or '-'}")


def _history_line(entry: dict) -> str:
    if entry["event"] == "operator.enrolled":
        what = (f"enrolled {entry['operator_id']} key {entry['key_id']} roles {','.join(entry['roles'])} "
                f"by {entry['by']}")
    else:
        why = f" ({entry['reason']})" if entry.get("reason") else ""
        what = f"revoked  {entry['operator_id']} key {entry['key_id']} by {entry['by']}{why}"
    if entry.get("refused"):
        return f"{entry['at']}  REFUSED {what}: {entry['refused']}: {entry['detail']}"
    if not entry["applied"]:
        return f"{entry['at']}  {what} (changed nothing: {entry['detail']})"
    return f"{entry['at']}  {what}"

"""`neurons audit ...`: answer an auditor from the archive and the log."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer

from services.registry import audit
from shared.settings import Settings

app = typer.Typer(no_args_is_help=True, help="Export, replay, republish and verify the event history.")


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
def republish(force: bool = typer.Option(False, "--force", help="publish even if the log is not empty")) -> None:
    """Restore an empty broker's log from the archive, in order per aggregate."""
    count = asyncio.run(audit.republish(Settings.from_env(), force=force))
    typer.echo(f"republished {count} events")


@app.command()
def verify(as_json: bool = typer.Option(False, "--json")) -> None:
    """Rebuild every projection into a scratch database and compare it with the live one."""
    report = audit.verify(Settings.from_env())
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        for name, table in report["tables"].items():
            typer.echo(f"{name:<28} {'same' if table['same'] else 'DIFFERS'}  rows live {table['live_rows']} rebuilt {table['rebuilt_rows']}")
        typer.echo("no difference" if report["ok"] else f"differs: {', '.join(report['differs'])}")
        if not report["settled"]:
            typer.echo(f"events kept arriving while checking ({report['archived_meanwhile']} in the last try): "
                       "a difference may be one of them; run it again when the platform is quiet")
    if not report["ok"]:
        raise typer.Exit(1)

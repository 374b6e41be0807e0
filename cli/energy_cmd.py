"""`neurons energy report`: measured energy per job and per day, from the archive."""

from __future__ import annotations

import json

import typer
from sqlmodel import Session, select

from services.energy.report import build_report, parse_since, to_csv
from services.registry.audit import registry_engine
from shared.archive import ArchivedEvent
from shared.contracts.envelope import Envelope
from shared.settings import Settings

app = typer.Typer(no_args_is_help=True, help="Energy used by training and validation jobs.")


@app.command()
def report(
    since: str = typer.Option("24h", help="how far back: 90m, 24h, 7d"),
    as_json: bool = typer.Option(False, "--json"),
    as_csv: bool = typer.Option(False, "--csv"),
) -> None:
    """Per-job rows, per-day totals and the measurement methods used."""
    try:
        window = parse_since(since)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None
    with Session(registry_engine(Settings.from_env())) as session:
        rows = session.exec(select(ArchivedEvent).where(ArchivedEvent.type == "energy.reported").order_by(ArchivedEvent.id)).all()
    records = []
    for row in rows:
        event = Envelope.from_json(row.envelope_json)
        records.append({"occurred_at": event.occurred_at, "payload": event.payload})
    data = build_report(records, since=window)
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    elif as_csv:
        typer.echo(to_csv(data), nl=False)
    else:
        _print_table(data)


def _print_table(data: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="energy per job")
    for column in ("job", "kind", "cycle", "Wh", "gCO2e", "method"):
        table.add_column(column)
    for job in data.get("jobs", []):
        table.add_row(str(job.get("job_id")), str(job.get("job_kind")), str(job.get("cycle_id") or "-"),
                      _fmt(job.get("wh")), _fmt(job.get("gco2e")),
                      job.get("method") or f"unmeasured: {job.get('reason')}")
    console = Console()
    console.print(table)
    totals = Table(title="per day")
    for column in ("day", "jobs", "Wh", "gCO2e"):
        totals.add_column(column)
    for day in data.get("days", []):
        totals.add_row(str(day.get("date")), str(day.get("jobs")), _fmt(day.get("wh")), _fmt(day.get("gco2e")))
    console.print(totals)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"

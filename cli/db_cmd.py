"""`neurons db upgrade|current`: the schema of every database the services use.

On SQLite each service has its own file under var/db; with NEURONS_DATABASE_URL
they all share one database. Either way each line names one database, the
services on it and the revision it is at.
"""

from __future__ import annotations

import typer

from shared import processes
from shared.settings import Settings

app = typer.Typer(no_args_is_help=True, help="Database schema: upgrade every database to the head revision.")


def _line(url: str, services: list[str], revision: str) -> str:
    return f"{revision:<14} {','.join(services):<22} {url}"


@app.command()
def upgrade() -> None:
    """Bring every database the services use to the head revision (safe to run from several places at once)."""
    for row in processes.upgrade_databases(Settings.from_env()):
        was = row["before"] or "none"
        change = "" if was == row["revision"] else f"  (was {was})"
        typer.echo(_line(row["url"], row["services"], row["revision"]) + change)


@app.command()
def current() -> None:
    """The revision each database is at, and the head revision this version of the platform needs."""
    from shared import db

    head = db.head_revision()
    behind = False
    for url, services in processes.databases(Settings.from_env()).items():
        revision = db.revision_of(db.engine_for(url, upgrade=False)) or "none"
        behind = behind or revision != head
        typer.echo(_line(db.shown(url), services, revision))
    typer.echo(f"head           {head}")
    if behind:
        raise typer.Exit(1)

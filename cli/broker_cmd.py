"""`neurons broker start|stop|status`: the embedded Tansu broker."""

from __future__ import annotations

import asyncio
import json

import typer

from shared import broker
from shared.settings import Settings
from shared.topics import ensure_topics

app = typer.Typer(no_args_is_help=True, help="Run the embedded Kafka-compatible broker.")


@app.command()
def start(port: int = typer.Option(0, help="loopback port (0: the one it had before when free, else a free one)")) -> None:
    """Start the broker, wait until it answers, create the topics."""
    settings = Settings.from_env()
    info = broker.start(settings, port=port or None)
    if info.note:
        typer.echo(f"neurons: {info.note}", err=True)
    created = asyncio.run(ensure_topics(settings))
    typer.echo(f"broker {info.state} at {info.bootstrap_servers} (pid {info.pid or '-'}, log {info.log or '-'})")
    if created:
        typer.echo(f"created {len(created)} topics")


@app.command()
def stop() -> None:
    """Stop the embedded broker (memory storage: its log is gone; the SQL archive keeps history)."""
    typer.echo("broker stopped" if broker.stop(Settings.from_env()) else "broker was not running")


@app.command()
def status(as_json: bool = typer.Option(False, "--json")) -> None:
    info = broker.status(Settings.from_env())
    if as_json:
        typer.echo(json.dumps(info.__dict__))
    else:
        typer.echo(f"broker {info.state} {info.bootstrap_servers or ''} pid {info.pid or '-'}")

"""`neurons data add|demo`: register curated datasets; `neurons train --local`: a quick experiment."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import typer

from cli.bus_client import command_event, publish_and_wait, run, signer_for
from shared.contracts.envelope import NewEvent
from shared.settings import Settings

data_app = typer.Typer(no_args_is_help=True, help="Curated training datasets.")


def register(settings: Settings, path: Path, name: str | None = None, quarantine: bool = False,
             reason: str | None = None, source: str = "operator", wait: bool = True,
             auto_cycle: bool = True, *, operator: str) -> dict:
    """Copy the dataset into var/datasets under its sha256 and publish dataset.registered, signed by ``operator``."""
    from shared.ml import DatasetError, inspect_dataset

    try:
        info = inspect_dataset(path)
    except (DatasetError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc), param_hint="FILE") from None
    if info["record_count"] == 0:
        raise typer.BadParameter(f"{path} holds no records", param_hint="FILE")
    target = settings.var_dir / "datasets" / f"{info['sha256']}.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        shutil.copyfile(path, target)
    dataset_id = f"ds-{info['sha256'][:12]}"
    payload = {"dataset_id": dataset_id, "name": name or Path(path).stem, "sha256": info["sha256"],
               "uri": f"file://{target}", "record_count": info["record_count"], "quarantined": quarantine,
               "quarantine_reason": reason if quarantine else None, "source": source, "auto_cycle": auto_cycle}
    signer = signer_for(settings, operator)
    event = command_event(NewEvent("dataset.registered", dataset_id, payload), correlation_id=dataset_id,
                          operator=operator)
    run(publish_and_wait(settings, event, ["dataset"], lambda e: e.event_id == event.event_id, 30 if wait else 0,
                         signer=signer))
    return payload


@data_app.command("add")
def add(
    file: Path = typer.Argument(..., help="JSONL file, one {\"text\": ...} object a line"),
    name: str | None = typer.Option(None, help="a readable name (default: the file name)"),
    quarantine: bool = typer.Option(False, "--quarantine", help="register it but never train on it"),
    reason: str | None = typer.Option(None, "--reason", help="why it is quarantined"),
    auto_cycle: bool = typer.Option(True, "--cycle/--no-cycle", help="let evolution start a cycle on it now"),
    as_json: bool = typer.Option(False, "--json"),
    operator: str = typer.Option(..., "--operator", envvar="NEURONS_OPERATOR", help="who registers it (signs the event)"),
) -> None:
    """Register a curated dataset (sha256, record count, quarantine flag)."""
    payload = register(Settings.from_env(), file, name, quarantine, reason, auto_cycle=auto_cycle, operator=operator)
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
    else:
        flag = " (quarantined)" if quarantine else ""
        typer.echo(f"registered {payload['dataset_id']}{flag}: {payload['record_count']} records, sha256 {payload['sha256']}")


@data_app.command("demo")
def demo(records: int = typer.Option(200, help="paragraphs to take"),
         out: Path | None = typer.Option(None, help="where to write the JSONL (default var/datasets/demo.jsonl)"),
         register_it: bool = typer.Option(True, "--register/--no-register"),
         operator: str | None = typer.Option(None, "--operator", envvar="NEURONS_OPERATOR",
                                             help="who registers it (signs the event); needed with --register")) -> None:
    """Build the demo dataset from the installed Python standard library's docstrings."""
    from shared.ml import build_demo_dataset

    settings = Settings.from_env()
    out = out or settings.var_dir / "datasets" / "demo.jsonl"
    info = build_demo_dataset(out, records=records)
    typer.echo(f"built {out}: {info['record_count']} records, sha256 {info['sha256']}")
    if register_it:
        if operator is None:
            raise typer.BadParameter("registering signs an event: pass --operator NAME (or --no-register)",
                                     param_hint="--operator")
        payload = register(settings, out, "stdlib-docstrings", source=info["source"], operator=operator)
        typer.echo(f"registered {payload['dataset_id']}")

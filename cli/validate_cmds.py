"""`neurons validate rejudge`: judge a finished soak again from its stored raw data."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from sqlmodel import Session, select

from services.registry.audit import registry_engine
from services.validator.judgement import rejudge as rejudge_raw
from services.validator.threshold_file import load_thresholds
from services.validator.thresholds import Thresholds
from shared.archive import ArchivedEvent
from shared.artefacts import SharedArtefacts
from shared.settings import Settings


def rejudge(
    validation_id: str = typer.Argument(..., help="the validation run id (see `neurons validate show`)"),
    thresholds: Path | None = typer.Option(None, "--thresholds", help="JSON or YAML file; default: the thresholds the run was judged with"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Re-run the judgement on the stored samples, without re-running the replicas."""
    settings = Settings.from_env()
    with Session(registry_engine(settings)) as session:
        row = session.exec(select(ArchivedEvent).where(ArchivedEvent.type == "validation.completed",
                                                       ArchivedEvent.aggregate_id == validation_id)).first()
    if row is None:
        raise typer.BadParameter(f"no finished validation {validation_id!r} in the archive", param_hint="VALIDATION_ID")
    payload = json.loads(row.envelope_json)["payload"]
    if not payload.get("raw_data_uri"):
        raise typer.BadParameter(f"{validation_id} kept no raw data (it was abandoned)", param_hint="VALIDATION_ID")
    raw = json.loads(SharedArtefacts.for_settings(settings).get(payload["raw_data_uri"]).read_text())
    if thresholds is not None:
        try:
            chosen = load_thresholds(thresholds)
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--thresholds") from None
    else:
        chosen = Thresholds.restore(payload["thresholds"]) if payload.get("thresholds") else Thresholds.default()
    verdict = rejudge_raw(raw, chosen).to_payload()
    if as_json:
        typer.echo(json.dumps({"validation_id": validation_id, "original_verdict": payload["verdict"], **verdict},
                              indent=2, default=str))
    else:
        typer.echo(f"{validation_id}: {verdict['verdict']} (was {payload['verdict']})")
        typer.echo(verdict.get("explanation", ""))

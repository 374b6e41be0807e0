"""`neurons bench`: the platform's throughput and latency side by side with bare baselines."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

FIGURE_HELP = "bus, signing, replay, promotion, serving, trainer, energy, learning"  # bench.runner.FIGURES


def bench(
    gpu: bool = typer.Option(False, "--gpu", help="also run the trainer figure on the CUDA GPU, bf16, eager and compiled"),
    only: list[str] = typer.Option([], "--only", help=f"run only this figure (repeatable or comma-separated): {FIGURE_HELP}"),
    quick: bool = typer.Option(False, "--quick", help="small sizes: a smoke run of every figure in well under a minute"),
    out: Path | None = typer.Option(None, "--out", help="report file (default var/bench/latest.json)"),
    as_json: bool = typer.Option(False, "--json", help="print the JSON report instead of the table"),
) -> None:
    """Measure every figure in one run, on a private broker, and write var/bench/latest.json."""
    from bench import runner

    try:
        figures = runner.selected(only)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--only") from None
    if gpu and not runner.cuda_available():
        typer.echo("neurons: --gpu: no CUDA GPU is present on this machine (torch sees none)", err=True)
        raise typer.Exit(2)

    from rich.console import Console

    from bench import report as table

    # Piped output (make, CI logs) gets room for the table instead of the 80 columns rich assumes.
    stream = sys.stderr if as_json else sys.stdout
    console = Console(stderr=as_json, width=None if stream.isatty() else 120)
    console.print(f"neurons bench: {', '.join(figures)}{' (quick)' if quick else ''}{' with GPU' if gpu else ''}")
    result = runner.run(figures, quick=quick, gpu=gpu, out=out,
                        announce=lambda line: console.print(f"  {line}", highlight=False))
    if as_json:
        import json

        typer.echo(json.dumps(result, indent=2))
    else:
        table.show(result, console)

"""The benchmark report as a table on the terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def machine_line(info: dict[str, Any]) -> str:
    gpu = info.get("gpu")
    parts = [f"{info.get('cores')} cores", info.get("cpu_model") or "unknown CPU"]
    if info.get("memory_gib"):
        parts.append(f"{info['memory_gib']} GiB")
    parts.append(f"GPU {gpu['name']}" if gpu else "no GPU")
    load = info.get("load_average_at_start")
    if load:
        parts.append(f"load {load[0]:.1f} at start")
    if info.get("torch"):
        parts.append(f"torch {info['torch']}")
    return ", ".join(parts)


def table(report: dict[str, Any]) -> Table:
    result = Table(title=f"neurons bench, {report['started_at']}, {report['duration_s']:.0f}s",
                   caption=machine_line(report["machine"]))
    for column, justify in (("figure", "left"), ("platform", "right"), ("baseline", "right"),
                            ("ratio | p50, p99", "right"), ("target", "left"), ("met", "center"),
                            ("samples", "right")):
        result.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for figure in report["figures"]:
        unit = figure["unit"]
        value, baseline = number(figure["value"], unit), number(figure["baseline"], unit)
        if "p99" in figure:
            compared = f"{number(figure['p50'])}, {number(figure['p99'])} {unit}" if figure["p99"] is not None else "-"
        else:
            compared = number(figure["ratio"])
        met = "[green]yes[/]" if figure["passed"] else ("[red]no[/]" if figure["value"] is not None else "[red]error[/]")
        result.add_row(figure["name"], value, baseline, compared, figure["target"], met, str(figure["samples"]))
    return result


def show(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(table(report))
    for figure in report["figures"]:
        extra = ""
        if figure.get("mfu") is not None:
            extra = f" [bold]MFU {figure['mfu']:.1%}[/]"
        console.print(f"[bold]{figure['name']}[/]{extra}: [dim]{figure['notes']}[/]", highlight=False)
    if report.get("path"):
        console.print(f"written to {report['path']}")

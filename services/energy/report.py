"""The ``neurons energy report`` table: per job, per day, and which methods measured it.

Built from ``energy.reported`` payloads and their timestamps, as replayed from
the log or the archive. Jobs with an unknown cost are listed and counted apart,
never summed as zero: a day's total says how many jobs it leaves out.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Mapping

from services.energy.domain import parse_span
from shared.contracts.values import iso

JOB_COLUMNS = [
    "at", "date", "job_kind", "job_id", "cycle_id", "joules", "wh", "gco2e",
    "method", "methods", "duration_s", "reason",
]
DAY_COLUMNS = ["date", "jobs", "measured_jobs", "unmeasured_jobs", "joules", "wh", "gco2e"]


def parse_since(text: str) -> timedelta:
    """``"24h"``, ``"7d"``, ``"90m"`` (also ``s`` and ``w``) for ``--since``."""
    try:
        return parse_span(text)
    except ValueError as exc:
        raise ValueError(f"--since: {exc}") from None


def build_report(
    records: Iterable[Any],
    *,
    since: timedelta | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The report over ``records``: ``(timestamp, payload)`` pairs, events, or
    ``{"occurred_at": ..., "payload": ...}`` dicts. ``now`` defaults to the clock."""
    now = now or datetime.now(timezone.utc)
    start = now - since if since is not None else None
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for at, payload in sorted((_unpack(r) for r in records), key=lambda r: r[0]):
        at = _job_time(payload, at)
        if (start is not None and at < start) or at > now:
            continue
        key = (str(payload.get("job_kind")), str(payload.get("job_id")))
        # Delivery is at-least-once: a job reported twice is counted once.
        if key in seen:
            continue
        seen.add(key)
        rows.append(_row(at, payload))
    rows.sort(key=lambda r: (r["at"], r["job_kind"], r["job_id"]))
    return {
        "generated_at": iso(now),
        "since": iso(start) if start else None,
        "until": iso(now),
        "jobs": rows,
        "days": _days(rows),
        "methods": _methods(rows),
        "totals": _totals(rows),
    }


def to_csv(report: Mapping[str, Any], table: str = "jobs") -> str:
    """One table of the report as CSV: ``jobs`` (default) or ``days``. Unknown values are empty."""
    if table not in ("jobs", "days"):
        raise ValueError(f"table must be 'jobs' or 'days'; got {table!r}")
    columns = JOB_COLUMNS if table == "jobs" else DAY_COLUMNS
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in report[table]:
        writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
    return out.getvalue()


def _unpack(record: Any) -> tuple[datetime, Mapping[str, Any]]:
    if isinstance(record, tuple):
        at, payload = record
    elif isinstance(record, Mapping):
        at, payload = record["occurred_at"], record["payload"]
    else:
        at, payload = record.occurred_at, record.payload
    return _as_time(at), payload


def _job_time(payload: Mapping[str, Any], fallback: datetime) -> datetime:
    # A job belongs to the day its work ended, as in the budgets.
    ended = (payload.get("window") or {}).get("ended_at")
    return _as_time(ended) if ended else fallback


def _row(at: datetime, p: Mapping[str, Any]) -> dict[str, Any]:
    methods = p.get("methods") or {}
    return {
        "at": iso(at),
        "date": at.date().isoformat(),
        "job_kind": p.get("job_kind"),
        "job_id": p.get("job_id"),
        "cycle_id": p.get("cycle_id"),
        "joules": p.get("joules"),
        "wh": p.get("wh"),
        "gco2e": p.get("gco2e"),
        "method": p.get("method") if p.get("joules") is not None else None,
        "methods": ",".join(f"{name}={m}" for name, m in sorted(methods.items())),
        "duration_s": p.get("duration_s"),
        "reason": p.get("reason"),
        "components": [dict(c) for c in p.get("components") or ()],
    }


def _sums(rows: list[dict[str, Any]]) -> dict[str, Any]:
    measured = [r for r in rows if r["joules"] is not None]
    return {
        "jobs": len(rows),
        "measured_jobs": len(measured),
        "unmeasured_jobs": len(rows) - len(measured),
        "joules": sum(r["joules"] for r in measured) if measured else None,
        "wh": sum(r["wh"] or 0.0 for r in measured) if measured else None,
        "gco2e": sum(r["gco2e"] or 0.0 for r in measured) if measured else None,
    }


def _days(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_day: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_day.setdefault(row["date"], []).append(row)
    return [{"date": day, **_sums(day_rows)} for day, day_rows in sorted(by_day.items())]


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return _sums(rows)


def _methods(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: jobs whose total it labels, and the components and joules it read."""
    methods: dict[str, dict[str, Any]] = {}

    def entry(method: str) -> dict[str, Any]:
        return methods.setdefault(method, {"jobs": 0, "components": 0, "joules": 0.0})

    for row in rows:
        if row["method"]:
            entry(row["method"])["jobs"] += 1
        for component in row["components"]:
            if component.get("method") and component.get("joules") is not None:
                e = entry(component["method"])
                e["components"] += 1
                e["joules"] += component["joules"]
    return dict(sorted(methods.items()))


def _as_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


"""Reading and writing the plain values events carry: UTC times and JSON numbers.

Every service reads timestamps and figures out of payloads; these are the one
way to do it, so "2026-01-01T00:00:00Z" and a figure of ``true`` mean the same
thing everywhere.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso(ts: datetime) -> str:
    """The form every event writes a time in: UTC, ISO-8601, ending in ``Z``."""
    if ts.tzinfo is not timezone.utc:
        ts = ts.astimezone(timezone.utc)
    return ts.isoformat().replace("+00:00", "Z")


def parse_time(value: str | datetime) -> datetime:
    """Parse an ISO-8601 timestamp that carries a timezone; return it in UTC. Raises ValueError otherwise."""
    ts = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if ts.tzinfo is None:
        raise ValueError(f"timestamp without timezone: {value!r}")
    return ts.astimezone(timezone.utc)


def time_or_none(value: Any) -> datetime | None:
    """A payload's optional time: None when absent or unreadable; a time without zone is taken as UTC."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if not value or not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def number(value: Any) -> float | None:
    """A payload's figure as a float; None for anything that is not a finite number (booleans included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None

"""How the read models store what they hold: JSON text, UTC times, rows by natural key.

Two builds of a projection from the same events must be equal row for row
(``neurons audit verify``), so JSON is written with sorted keys and every time
comes from an event, in UTC.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, TypeVar

from sqlalchemy import Column, Text
from sqlmodel import Field, Session, SQLModel

from shared.archive import FoldSession, new_row
from shared.signing import parse_time

Row = TypeVar("Row", bound=SQLModel)


def json_field(default: str = "{}", **kw):
    return Field(default=default, sa_column=Column(Text, nullable=False, default=default), **kw)


# json.dumps with arguments builds an encoder per call; this one gives the same text.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def dumps(value: Any) -> str:
    return _ENCODER.encode(value)


def loads(text: str | None, default: Any = None) -> Any:
    if not text:
        return default
    return json.loads(text)


def utc(value: datetime | str | None) -> datetime | None:
    """An event's time (a datetime or an ISO-8601 string with a zone) in UTC; None when absent or unreadable."""
    if value is None or value == "":
        return None
    try:
        ts = parse_time(value) if isinstance(value, str) else value
    except ValueError:
        return None
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


def iso_z(value: datetime | None) -> str | None:
    """A stored time as the ISO-8601 string the API and the CLI show."""
    value = utc(value)
    return value.isoformat().replace("+00:00", "Z") if value else None


def get_or_new(session: Session | FoldSession, model: type[Row], key: dict[str, Any]) -> tuple[Row, bool]:
    """The row with natural key ``key``, or a new one (``new_row``) already in the session
    (flushed, so the next event of the same batch finds it)."""
    ident = tuple(key.values()) if len(key) > 1 else next(iter(key.values()))
    row = session.get(model, ident)
    if row is not None:
        return row, False
    row = new_row(session, model, **key)
    session.add(row)
    session.flush()
    return row, True

"""How the read models store what they hold: JSON text, UTC times, rows by natural key.

Two builds of a projection from the same events must be equal row for row
(``neurons audit verify``), so JSON is written with sorted keys and every time
comes from an event, in UTC. A column a projection appends to (a loss curve,
soak records) is read with ``json_value`` and written with ``set_json``, so a
rebuild encodes it once instead of after every event.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any, TypeVar

from sqlalchemy import Column, Text
from sqlmodel import Field, Session, SQLModel

from shared.archive import FoldSession, new_row
from shared.contracts.envelope import loads as json_loads, orjson_compact
from shared.contracts.trust import parse_time

Row = TypeVar("Row", bound=SQLModel)


def json_field(default: str = "{}", **kw):
    return Field(default=default, sa_column=Column(Text, nullable=False, default=default), **kw)


# json.dumps with arguments builds an encoder per call; this one gives the same text.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def dumps(value: Any) -> str:
    """``value`` as compact JSON text with sorted keys; anything JSON has no value for is written as
    ``str`` gives it, and NaN and infinities as null (strict JSON, as the envelope writes them)."""
    out = orjson_compact(value)  # NaN and infinities: orjson writes null
    if out is not None:
        return out.decode()
    return _ENCODER.encode(_finite(value))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def loads(text: str | None, default: Any = None) -> Any:
    if not text:
        return default
    return json_loads(text)


def json_value(session: Session | FoldSession, row: Any, column: str, default: Any) -> Any:
    """The JSON a text column of ``row`` holds, decoded (``default`` when empty), to change and give
    back with ``set_json``. During a rebuild the decoded value is kept from one event to the next."""
    if isinstance(session, FoldSession):
        value = session.held(row, column, _NOTHING)
        if value is not _NOTHING:
            return value
    return loads(getattr(row, column), default)


def set_json(session: Session | FoldSession, row: Any, column: str, value: Any) -> None:
    """Store ``value`` in a JSON text column of ``row``: at once for a live session; during a
    rebuild when the row is written (a loss curve is written once, not after every point)."""
    if isinstance(session, FoldSession):
        session.hold(row, column, value, dumps)
    else:
        setattr(row, column, dumps(value))


_NOTHING = object()


def utc(value: datetime | str | None) -> datetime | None:
    """An event's time (a datetime or an ISO-8601 string with a zone) in UTC; None when absent or unreadable."""
    if type(value) is datetime and value.tzinfo is timezone.utc:
        return value
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

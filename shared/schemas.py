"""The contract: one JSON Schema (draft 2020-12) per event type and version.

``schemas/<type>.v<N>.json`` validates the payload of ``<type>`` at version N.
The highest N is the current version; publishers always write it. Readers meet
older versions in the log and archive: ``upcast`` walks a registered chain of
upcasters (one per step N -> N+1) until the payload is current.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
_NAME = re.compile(r"^(?P<type>[a-z_]+\.[a-z_]+)\.v(?P<version>\d+)\.json$")

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
_UPCASTERS: dict[tuple[str, int], Upcaster] = {}


class SchemaError(ValueError):
    """A payload that the contract does not accept; the reason is the message."""


class UnknownEventType(SchemaError):
    pass


@lru_cache(maxsize=1)
def registry() -> dict[tuple[str, int], Draft202012Validator]:
    validators: dict[tuple[str, int], Draft202012Validator] = {}
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        match = _NAME.match(path.name)
        if not match:
            continue
        schema = json.loads(path.read_text())
        Draft202012Validator.check_schema(schema)
        validators[(match["type"], int(match["version"]))] = Draft202012Validator(schema)
    return validators


def event_types() -> set[str]:
    return {etype for etype, _ in registry()}


def current_version(event_type: str) -> int:
    versions = [v for (t, v) in registry() if t == event_type]
    if not versions:
        raise UnknownEventType(f"unknown event type {event_type!r}")
    return max(versions)


def validate_payload(event_type: str, version: int, payload: dict[str, Any]) -> None:
    validator = registry().get((event_type, version))
    if validator is None:
        if event_type not in event_types():
            raise UnknownEventType(f"unknown event type {event_type!r}")
        raise SchemaError(f"no schema for {event_type} v{version}")
    try:
        validator.validate(payload)
    except ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "payload"
        raise SchemaError(f"{event_type} v{version}: {where}: {exc.message}") from None


def upcaster(event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register the step from ``from_version`` to ``from_version + 1``."""

    def register(fn: Upcaster) -> Upcaster:
        _UPCASTERS[(event_type, from_version)] = fn
        return fn

    return register


def upcast(event_type: str, version: int, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Bring an old payload to the current version, one registered step at a time."""
    _load_upcasters()
    target = current_version(event_type)
    while version < target:
        step = _UPCASTERS.get((event_type, version))
        if step is None:
            raise SchemaError(f"no upcaster from {event_type} v{version} to v{version + 1}")
        payload = step(dict(payload))
        version += 1
    return version, payload


def _load_upcasters() -> None:
    # The upcasters live in one module so every reader registers the same chain.
    from shared import upcasters  # noqa: F401

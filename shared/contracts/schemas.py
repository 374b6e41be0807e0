"""The contract: one JSON Schema (draft 2020-12) per event type and version.

``schemas/<type>.v<N>.json`` validates the payload of ``<type>`` at version N.
The highest N is the current version; publishers always write it. Readers meet
older versions in the log and archive: ``upcast`` walks a registered chain of
upcasters (one per step N -> N+1) until the payload is current.

``jsonschema`` is the reference validator: it decides, and its message is the
reason a payload is refused. A payload is first offered to the same schema
compiled by ``jsonschema_rs`` (draft 2020-12 too, formats not asserted, as
the reference does not assert them); what that one accepts the reference
accepts too, and only what it refuses goes on to the reference.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import jsonschema_rs
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from shared.contracts.upcasters import UPCASTERS

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
_NAME = re.compile(r"^(?P<type>[a-z_]+\.[a-z_]+)\.v(?P<version>\d+)\.json$")


class SchemaError(ValueError):
    """A payload that the contract does not accept; the reason is the message."""


class UnknownEventType(SchemaError):
    pass


@lru_cache(maxsize=1)
def _schemas() -> dict[tuple[str, int], dict[str, Any]]:
    """Every schema file, read once: the reference and the compiled validators both build on it."""
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        match = _NAME.match(path.name)
        if match:
            found[(match["type"], int(match["version"]))] = json.loads(path.read_text())
    return found


@lru_cache(maxsize=1)
def registry() -> dict[tuple[str, int], Draft202012Validator]:
    validators: dict[tuple[str, int], Draft202012Validator] = {}
    for key, schema in _schemas().items():
        Draft202012Validator.check_schema(schema)
        validators[key] = Draft202012Validator(schema)
    return validators


Acceptance = Callable[[dict[str, Any], bool], bool]  # (payload, read from JSON text) -> valid


@lru_cache(maxsize=1)
def compiled() -> dict[tuple[str, int], Acceptance]:
    """Per schema, a fast test: True means valid; False means only that the reference must decide."""
    registry()  # every schema is checked against the metaschema first
    return {key: _acceptance(jsonschema_rs.Draft202012Validator(schema, validate_formats=False, offline=True),
                             arrays=_has_array_type(schema))
            for key, schema in _schemas().items()}


@lru_cache(maxsize=1)
def event_types() -> frozenset[str]:
    return frozenset(current_versions())


@lru_cache(maxsize=1)
def current_versions() -> Mapping[str, int]:
    """The current version of every event type."""
    versions: dict[str, int] = {}
    for etype, version in registry():
        versions[etype] = max(version, versions.get(etype, 0))
    return MappingProxyType(versions)


def current_version(event_type: str) -> int:
    version = current_versions().get(event_type)
    if version is None:
        raise UnknownEventType(f"unknown event type {event_type!r}")
    return version


@lru_cache(maxsize=1)
def producers() -> Mapping[str, tuple[str, ...]]:
    """Who may publish each event type: the ``x-producers`` of its current schema.

    An entry is ``service:<name>`` (that service's key), ``operator:<role>``
    (an enrolled operator holding the role). The contract of who may write
    what; consumers enforce it (``shared.contracts.signing.authorise``) and
    the Kafka ACLs under ``deploy/`` are generated from it.
    """
    found: dict[str, tuple[str, ...]] = {}
    for etype, version in current_versions().items():
        found[etype] = tuple(_schemas()[(etype, version)].get("x-producers") or ())
    return MappingProxyType(found)


def validate_payload(event_type: str, version: int, payload: dict[str, Any], *, from_json: bool = False) -> None:
    """Raise SchemaError (UnknownEventType for a type no schema names) unless ``payload`` is valid.

    ``from_json``: the payload was just read from JSON text, so it holds only
    JSON values (no tuple, every key a string) and needs no look for them.
    """
    accepts = compiled().get((event_type, version))
    if accepts is not None and accepts(payload, from_json):
        return
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


# Where the compiled validator reads a payload differently from the reference:
# a tuple passes for an array (``_has_tuple`` sends such payloads to the
# reference), a key that is not a string makes it raise (the reference
# decides), and '$' in a pattern matches only at the very end, which is
# stricter than re.search and so only sends more payloads to the reference.


def _has_array_type(schema: Any) -> bool:
    """Whether any subschema anywhere in ``schema`` admits arrays by type."""
    if isinstance(schema, list):
        return any(_has_array_type(s) for s in schema)
    if not isinstance(schema, dict):
        return False
    kind = schema.get("type")
    if kind == "array" or (isinstance(kind, list) and "array" in kind):
        return True
    return any(_has_array_type(v) for v in schema.values() if isinstance(v, (dict, list)))


def _has_tuple(value: Any) -> bool:
    if isinstance(value, dict):
        for item in value.values():
            if _has_tuple(item):
                return True
        return False
    if isinstance(value, list):
        for item in value:
            if _has_tuple(item):
                return True
        return False
    return isinstance(value, tuple)


def _acceptance(validator: Any, arrays: bool) -> Acceptance:
    is_valid = validator.is_valid

    def accepts(payload: dict[str, Any], from_json: bool = False) -> bool:
        if arrays and not from_json and _has_tuple(payload):
            return False
        try:
            return is_valid(payload)
        except Exception:  # data it cannot read (a key that is not a string, say): the reference decides
            return False

    return accepts


def upcast(event_type: str, version: int, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Bring an old payload to the current version, one registered step at a time."""
    target = current_version(event_type)
    if version == target:
        return version, payload
    while version < target:
        step = UPCASTERS.get((event_type, version))
        if step is None:
            raise SchemaError(f"no upcaster from {event_type} v{version} to v{version + 1}")
        payload = step(dict(payload))
        version += 1
    return version, payload

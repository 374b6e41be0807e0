"""The contract: one JSON Schema (draft 2020-12) per event type and version.

``schemas/<type>.v<N>.json`` validates the payload of ``<type>`` at version N.
The highest N is the current version; publishers always write it. Readers meet
older versions in the log and archive: ``upcast`` walks a registered chain of
upcasters (one per step N -> N+1) until the payload is current.

``jsonschema`` is the reference validator: it decides, and its message is the
reason a payload is refused. A payload is first offered to a validator compiled
with ``fastjsonschema``; what that one accepts the reference accepts too, and
only what it refuses goes on to the reference. A schema that uses a keyword
outside the subset both libraries read alike gets no compiled validator.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import fastjsonschema
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


def _schemas() -> dict[tuple[str, int], dict[str, Any]]:
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


Acceptance = Callable[[dict[str, Any]], bool]


@lru_cache(maxsize=1)
def compiled() -> dict[tuple[str, int], Acceptance]:
    """Per schema, a fast test: True means valid; False means only that the reference must decide."""
    registry()  # every schema is checked against the metaschema first
    tests: dict[tuple[str, int], Acceptance] = {}
    for key, schema in _schemas().items():
        draft07 = _as_draft07(schema, root=True)
        if draft07 is not None:
            validate = fastjsonschema.compile(draft07, use_default=False, use_formats=False)
            tests[key] = _acceptance(validate, arrays=_has_array_type(schema))
    return tests


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


def validate_payload(event_type: str, version: int, payload: dict[str, Any]) -> None:
    accepts = compiled().get((event_type, version))
    if accepts is not None and accepts(payload):
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


# fastjsonschema implements draft-07. With formats off (jsonschema asserts no
# format either) and no defaults filled in, it reads the keywords below as
# draft 2020-12 does, with three differences that are handled: a keyword beside
# a $ref is ignored in draft-07 (so it moves into an allOf with the $ref); a
# tuple passes for an array (``_has_tuple`` sends such payloads to the
# reference); and '$' in a pattern matches only at the very end, which is
# stricter than re.search and so only sends more payloads to the reference, as
# long as '$' is the pattern's last character.
_ONE_SUBSCHEMA = ("additionalProperties", "items", "not", "if", "then", "else")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf")
_SUBSCHEMA_MAPS = ("properties", "$defs")
_ASSERTIONS = ("type", "required", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
               "exclusiveMaximum", "minItems", "maxItems", "minProperties", "maxProperties", "format")
_ANNOTATIONS = ("$schema", "$comment", "title", "description", "default", "examples", "deprecated", "readOnly",
                "writeOnly")
_SCALARS = (str, int, float, bool, type(None))


def _as_draft07(schema: Any, root: bool = False) -> Any:
    """``schema`` as fastjsonschema should compile it, or None when it uses a keyword outside the subset."""
    if isinstance(schema, bool):
        return schema
    if not isinstance(schema, dict):
        return None
    out: dict[str, Any] = {}
    for keyword, value in schema.items():
        if keyword in _ONE_SUBSCHEMA:
            value = _as_draft07(value)
            if value is None:
                return None
        elif keyword in _SUBSCHEMA_LISTS:
            if not isinstance(value, list):
                return None
            value = [_as_draft07(s) for s in value]
            if any(s is None for s in value):
                return None
        elif keyword in _SUBSCHEMA_MAPS:
            if not isinstance(value, dict):
                return None
            value = {name: _as_draft07(s) for name, s in value.items()}
            if any(s is None for s in value.values()):
                return None
        elif keyword == "$id":
            if not root:  # a nested $id moves the base that $refs resolve against
                return None
            continue  # every $ref is to this document's $defs, whatever its id
        elif keyword == "$ref":
            # only a whole $defs entry: a pointer deeper into this document could cross a rewritten node
            if not isinstance(value, str) or not value.startswith("#/$defs/") or "/" in value[len("#/$defs/"):]:
                return None
        elif keyword == "enum":
            if not isinstance(value, list) or not all(isinstance(v, _SCALARS) for v in value):
                return None
        elif keyword == "const":
            if not isinstance(value, _SCALARS):
                return None
        elif keyword == "pattern":
            if not isinstance(value, str) or "$" in value[:-1] or value.endswith("\\$"):
                return None
        elif keyword not in _ASSERTIONS and keyword not in _ANNOTATIONS:
            return None
        out[keyword] = value
    if "$ref" in out and len(out) > 1:
        out = {"allOf": [{"$ref": out.pop("$ref")}, out]}
    return out


def _has_array_type(schema: Any) -> bool:
    if isinstance(schema, list):
        return any(_has_array_type(s) for s in schema)
    if not isinstance(schema, dict):
        return False
    kind = schema.get("type")
    if kind == "array" or (isinstance(kind, list) and "array" in kind):
        return True
    return any(_has_array_type(v) for k, v in schema.items() if k in _ONE_SUBSCHEMA or k in _SUBSCHEMA_LISTS) or any(
        _has_array_type(s) for k in _SUBSCHEMA_MAPS for s in (schema.get(k) or {}).values())


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


def _acceptance(validate: Callable[[Any], Any], arrays: bool) -> Acceptance:
    def accepts(payload: dict[str, Any]) -> bool:
        if arrays and _has_tuple(payload):
            return False
        try:
            validate(payload)
        except Exception:  # refused, or data the generated code cannot handle: the reference decides
            return False
        return True

    return accepts


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

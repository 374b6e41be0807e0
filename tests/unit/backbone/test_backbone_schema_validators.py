"""The compiled validators against the reference (jsonschema, draft 2020-12), schema by schema.

Every schema gets valid examples built from the schema itself, plus the events
the benchmarks publish, and a mutation of each example for every keyword that
can refuse it. The compiled validator must never accept what the reference
refuses; on the examples and mutations below the two agree, except where the
compiled one is stricter by design (then the reference decides and the
payload is still accepted). ``validate_payload`` answers exactly as the
reference does, with the reference's reason.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from bench.events import cycle_events, dataset_registered, profile_create_requested
from shared.contracts import schemas

SCHEMA_FILES = sorted(Path(schemas.SCHEMA_DIR).glob("*.json"))
HEX64 = "0123456789abcdef" * 4
# A string matching each pattern the schemas use; a new pattern needs a sample here.
PATTERN_SAMPLES = {
    "^[0-9a-f]{64}$": HEX64,
    "^artefact://sha256/[0-9a-f]{64}$": f"artefact://sha256/{HEX64}",
    "^\\d{4}-\\d{2}-\\d{2}T\\d{2}:\\d{2}:\\d{2}": "2026-03-02T10:00:00Z",
    "^[a-z0-9][a-z0-9._-]{0,63}$": "ops.alice-1",
    "^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$": "Alice@example.org",
    "^(policy|operator):.+$": "operator:alice",
    "^operator:.+$": "operator:alice",
    "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$": "job-cyc-1a2b.3",
    "^/?(?:[^/.][^/]*|\\.[^/.][^/]*|\\.\\.[^/]+)(?:/(?:[^/.][^/]*|\\.[^/.][^/]*|\\.\\.[^/]+))*/?$": "/var/models/my-model",
    "^file://(?:/(?:[^/.][^/]*|\\.[^/.][^/]*|\\.\\.[^/]+))+$": "file:///var/datasets/demo.jsonl",
    "^[A-Za-z0-9+/]{43}=$": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",  # an Ed25519 public key, base64
    "^[0-9a-f]{16}$": "0123456789abcdef",  # a key id
}
WRONG_TYPE = {"string": 12345, "integer": "12", "number": "1.5", "boolean": 0, "null": "x", "object": [1],
              "array": {"a": 1}}


def key_of(path: Path) -> tuple[str, int]:
    name, version, _ = path.name.rsplit(".", 2)
    return name, int(version[1:])


def resolve(node: Any, root: dict) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        target: Any = root
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = {**{k: v for k, v in node.items() if k != "$ref"}, **target}
    return node


def example(node: Any, root: dict, full: bool) -> Any:
    """A value ``node`` accepts: every property when ``full``, the required ones otherwise."""
    node = resolve(node, root)
    if node is True or node == {}:
        return "anything"
    if "const" in node:
        return node["const"]
    if "enum" in node:
        return next((v for v in node["enum"] if v is not None), node["enum"][0])
    for combinator in ("oneOf", "anyOf"):
        if combinator in node:
            candidates = [example(alt, root, full) for alt in node[combinator]]
            check = Draft202012Validator({**node, "$defs": root.get("$defs", {})})
            return next(c for c in reversed(candidates) if check.is_valid(c))
    kinds = node.get("type", "object" if "properties" in node else "string")
    kind = next((k for k in ([kinds] if isinstance(kinds, str) else kinds) if k != "null"), "null")
    if kind == "object":
        props = node.get("properties", {})
        required = list(node.get("required", []))
        names = required + [name for name in props if name not in required] if full else required
        extra = node.get("additionalProperties", True)
        value = {name: example(props.get(name, extra), root, full) for name in names}
        if isinstance(extra, dict) and full:
            value["more"] = example(extra, root, full)
        for name in props:
            if len(value) >= node.get("minProperties", 0):
                break
            value[name] = example(props[name], root, full)
        return value
    if kind == "array":
        count = max(node.get("minItems", 0), 1 if full else 0)
        return [example(node.get("items", True), root, full) for _ in range(count)]
    if kind == "string":
        if "pattern" in node:
            assert node["pattern"] in PATTERN_SAMPLES, f"add a sample string for pattern {node['pattern']!r}"
            return PATTERN_SAMPLES[node["pattern"]]
        return "x" * max(node.get("minLength", 0), 1)
    if kind in ("integer", "number"):
        low = max(node.get("minimum", float("-inf")), node.get("exclusiveMinimum", float("-inf")))
        high = min(node.get("maximum", float("inf")), node.get("exclusiveMaximum", float("inf")))
        low = 0 if low == float("-inf") else low
        value = (low + high) / 2 if high != float("inf") else low + 1.5
        return int(value) if kind == "integer" and value == int(value) else (
            int(low) + 1 if kind == "integer" else value)
    if kind == "boolean":
        return True
    return None


def walk(value: Any, node: Any, root: dict, path: tuple = ()) -> Iterator[tuple[tuple, Any, Any]]:
    """Each (path, value, schema node) of an example, the node resolved through $ref and oneOf/anyOf."""
    node = resolve(node, root)
    if not isinstance(node, dict):
        return
    for combinator in ("oneOf", "anyOf"):
        for alt in node.get(combinator, ()):
            alt = resolve(alt, root)
            if Draft202012Validator({**alt, "$defs": root.get("$defs", {})}).is_valid(value):
                yield from walk(value, alt, root, path)
                break
    yield path, value, node
    if isinstance(value, dict):
        for name, item in value.items():
            sub = node.get("properties", {}).get(name, node.get("additionalProperties", True))
            yield from walk(item, sub, root, path + (name,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from walk(item, node.get("items", True), root, path + (index,))


def replaced(instance: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    out = copy.deepcopy(instance)
    target = out
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return out


def removed(instance: Any, path: tuple, name: str) -> Any:
    out = copy.deepcopy(instance)
    target = out
    for part in path:
        target = target[part]
    del target[name]
    return out


def mutations(instance: Any, root: dict) -> Iterator[tuple[str, Any, bool]]:
    """(what, payload, compiled validator may be stricter than the reference on it)."""
    for path, value, node in walk(instance, root, root):
        where = "/".join(map(str, path)) or "payload"
        kinds = node.get("type")
        kinds = [kinds] if isinstance(kinds, str) else (kinds or [])
        for name in node.get("required", ()):
            if isinstance(value, dict) and name in value:
                yield f"{where}: without {name}", removed(instance, path, name), False
        for kind in kinds:
            wrong = WRONG_TYPE[kind]
            if not any(Draft202012Validator({"type": k}).is_valid(wrong) for k in kinds):
                yield f"{where}: {kind} given {wrong!r}", replaced(instance, path, wrong), False
        if "integer" in kinds:
            yield f"{where}: true for an integer", replaced(instance, path, True), False
            if isinstance(value, int) and not isinstance(value, bool):
                yield f"{where}: {value}.0 for an integer", replaced(instance, path, float(value)), True
        if "array" in kinds and isinstance(value, list):
            yield f"{where}: a tuple for an array", replaced(instance, path, tuple(value)), False
        if "pattern" in node and isinstance(value, str):
            yield f"{where}: not matching", replaced(instance, path, "!" + value), False
            yield f"{where}: a newline after a match", replaced(instance, path, value + "\n"), True
        if "minLength" in node:
            yield f"{where}: too short", replaced(instance, path, "x" * (node["minLength"] - 1)), False
        for bound, delta in (("minimum", -1), ("exclusiveMinimum", 0), ("maximum", 1), ("exclusiveMaximum", 0)):
            if bound in node:
                yield f"{where}: {bound} crossed", replaced(instance, path, node[bound] + delta), False
        if "enum" in node:
            yield f"{where}: outside the enum", replaced(instance, path, "not-a-member"), False
            yield f"{where}: the enum's values as another type", replaced(instance, path, [node["enum"]]), False
        if "const" in node:
            yield f"{where}: not the const", replaced(instance, path, "other"), False
        if isinstance(value, dict) and node.get("additionalProperties") is not None:
            yield f"{where}: an extra property", replaced(instance, path, {**value, "zz_extra": [None]}), False
        if isinstance(value, list):
            if node.get("minItems"):
                yield f"{where}: too few items", replaced(instance, path, value[: node["minItems"] - 1]), False
            if "maxItems" in node:
                yield f"{where}: too many items", replaced(instance, path, value * (node["maxItems"] + 1)), False
            if value:
                yield f"{where}: an item of the wrong type", replaced(instance, path, [*value, object()]), False
        if "minProperties" in node and isinstance(value, dict):
            yield f"{where}: too few properties", replaced(instance, path, {}), False
        if "oneOf" in node or "anyOf" in node:
            yield f"{where}: matching no alternative", replaced(instance, path, 3.25), False


def bench_payloads() -> dict[tuple[str, int], list[dict]]:
    events = [dataset_registered(1), profile_create_requested("p-1", "web"), *cycle_events("schema-test")]
    found: dict[tuple[str, int], list[dict]] = {}
    for event in events:
        found.setdefault((event.type, event.schema_version), []).append(event.payload)
    return found


def reference_verdict(schema: dict, event_type: str, version: int, payload: Any) -> str | None:
    try:
        Draft202012Validator(schema).validate(payload)
    except ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "payload"
        return f"{event_type} v{version}: {where}: {exc.message}"
    return None


def platform_verdict(event_type: str, version: int, payload: Any) -> str | None:
    try:
        schemas.validate_payload(event_type, version, payload)
    except schemas.SchemaError as exc:
        return str(exc)
    return None


def test_every_schema_has_a_compiled_validator():
    assert set(schemas.compiled()) == set(schemas.registry())


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_compiled_and_reference_validators_agree(path):
    schema = json.loads(path.read_text())
    event_type, version = key_of(path)
    accepts = schemas.compiled()[(event_type, version)]
    valid = [example(schema, schema, full=True), example(schema, schema, full=False),
             *bench_payloads().get((event_type, version), [])]
    checked = 0
    for payload in valid:
        assert reference_verdict(schema, event_type, version, payload) is None, f"example not valid: {payload}"
        assert accepts(payload), f"compiled validator refuses a valid payload: {payload}"
        assert platform_verdict(event_type, version, payload) is None
        for what, mutated, stricter in mutations(payload, schema):
            expected = reference_verdict(schema, event_type, version, mutated)
            fast = accepts(mutated)
            assert not (fast and expected is not None), f"{what}: compiled accepts what the reference refuses"
            if not stricter:
                assert fast == (expected is None), f"{what}: compiled {fast}, reference {expected}"
            assert platform_verdict(event_type, version, mutated) == expected, what
            checked += 1
    assert checked > 0


def test_keywords_beside_a_ref_still_apply():
    import jsonschema_rs

    schema = {"type": "object", "properties": {"n": {"$ref": "#/$defs/num", "minimum": 5}},
              "$defs": {"num": {"type": "number"}}}
    check = schemas._acceptance(jsonschema_rs.Draft202012Validator(schema, validate_formats=False), arrays=False)
    assert check({"n": 6})
    assert not check({"n": 4})
    assert not check({"n": "six"})


def test_what_the_compiled_validator_reads_differently_goes_to_the_reference():
    import jsonschema_rs

    schema = {"type": "object", "properties": {"tags": {"type": "array"}, "code": {"pattern": "^x$"}}}
    check = schemas._acceptance(jsonschema_rs.Draft202012Validator(schema, validate_formats=False),
                                arrays=schemas._has_array_type(schema))
    reference = Draft202012Validator(schema)
    for payload in ({"tags": (1, 2)}, {1: "a"}, {"code": "x\n"}):
        assert not check(payload)  # the reference decides these
    assert not reference.is_valid({"tags": (1, 2)}) and reference.is_valid({"code": "x\n"})
    assert check({"tags": [1, 2], "code": "x"})

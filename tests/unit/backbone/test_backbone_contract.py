"""The contract: envelope, schemas, upcasting and decoding, without I/O."""

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from shared.contracts import schemas
from shared.bus import MalformedEvent, decode
from shared.contracts.envelope import Envelope, read_canonical
from tests.support import dataset_payload, make_event

SCHEMA_FILES = sorted((Path(schemas.SCHEMA_DIR)).glob("*.json"))
REQUIRED_FAMILIES = ["training", "cycle", "research", "approval", "validation", "energy", "hardware",
                     "scaling", "adapter", "profile", "dataset"]


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_every_schema_is_valid_draft_2020_12(path):
    schema = json.loads(path.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    assert schema.get("type") == "object"


def test_every_aggregate_family_has_schemas():
    families = {t.split(".")[0] for t in schemas.event_types()}
    missing = [f for f in REQUIRED_FAMILIES if f not in families]
    assert not missing, f"no schemas for {missing}"


def test_envelope_roundtrip_keeps_every_field():
    event = make_event("dataset.registered", "ds-1", dataset_payload(), sequence=4, correlation_id="cyc-9")
    again = Envelope.from_json(event.to_json())
    assert again == event
    assert again.occurred_at.tzinfo is not None
    assert set(json.loads(event.to_json())) == {
        "event_id", "type", "schema_version", "aggregate_type", "aggregate_id", "sequence", "occurred_at",
        "producer", "correlation_id", "causation_id", "payload"}


def test_old_version_is_upcast_on_read():
    old = make_event("dataset.registered", "ds-old",
                     {"dataset_id": "ds-old", "name": "legacy", "sha256": "cd" * 32, "uri": "file:///l", "records": 12},
                     version=1)
    read = decode(old.to_json())
    assert read.schema_version == 2
    assert read.payload["record_count"] == 12
    assert read.payload["quarantined"] is False
    assert "records" not in read.payload
    assert read.event_id == old.event_id


@pytest.mark.parametrize(
    "raw, kind, words",
    [
        (b"{not json", "bad_json", "not JSON"),
        (b"[1, 2]", "bad_envelope", "not a JSON object"),
        (json.dumps({"type": "dataset.registered"}).encode(), "bad_envelope", "bad envelope"),
    ],
)
def test_malformed_records_say_why(raw, kind, words):
    with pytest.raises(MalformedEvent) as err:
        decode(raw)
    assert err.value.kind == kind
    assert words in err.value.reason


def test_unknown_type_and_schema_violation_are_refused():
    good = make_event("dataset.registered", "ds-1", dataset_payload())
    unknown = json.loads(good.to_json())
    unknown["type"] = "dataset.exploded"
    with pytest.raises(MalformedEvent) as err:
        decode(json.dumps(unknown).encode())
    assert err.value.kind == "unknown_type"

    bad = json.loads(good.to_json())
    bad["payload"]["record_count"] = "three"
    with pytest.raises(MalformedEvent) as err:
        decode(json.dumps(bad).encode())
    assert err.value.kind == "schema_violation"
    assert "record_count" in err.value.reason


def _same_envelope(fast: Envelope, slow: Envelope) -> None:
    """Equal as the model sees it, and built the same way: field order, fields set, zone, producer."""
    assert fast == slow
    assert list(fast.__dict__) == list(slow.__dict__)
    assert fast.model_fields_set == slow.model_fields_set
    assert fast.__pydantic_extra__ == slow.__pydantic_extra__ and fast.__pydantic_private__ == slow.__pydantic_private__
    assert fast.occurred_at.tzinfo is slow.occurred_at.tzinfo
    assert fast.to_json() == slow.to_json() and repr(fast) == repr(slow)
    assert isinstance(fast.producer, type(slow.producer)) and fast.producer == slow.producer


def test_an_envelope_as_published_is_read_to_what_full_validation_gives():
    from bench.events import cycle_events

    for event in cycle_events("contract") + [make_event("dataset.registered", "ds-1", dataset_payload(), sequence=3)]:
        raw = event.to_json()
        assert read_canonical(raw) is not None  # the one-pass read, not the long way
        _same_envelope(Envelope.from_json(raw), Envelope.model_validate(json.loads(raw)))
        _same_envelope(decode(raw), Envelope.model_validate(json.loads(raw)))


def _variant(change):
    data = json.loads(make_event("dataset.registered", "ds-1", dataset_payload()).to_json())
    data["occurred_at"] = "2025-03-04T14:03:00.123456Z"
    change(data)
    return data


@pytest.mark.parametrize("change", [
    lambda d: d.update(event_id=d["event_id"].upper()),  # normalised to lower case
    lambda d: d.update(event_id="{" + d["event_id"] + "}"),
    lambda d: d.update(occurred_at="2025-03-04T16:03:00+02:00"),  # converted to UTC
    lambda d: d.update(occurred_at="2025-03-04T14:03:00.5Z"),
    lambda d: d.update(occurred_at="2025-03-04T14:03:00Z"),
    lambda d: d.update(occurred_at="2025-03-04 14:03:00Z"),
    lambda d: d["producer"].pop("version"),  # the default version
    lambda d: d.update(causation_id=None),
    lambda d: d.update(sequence="7"),  # lax: a numeric string is an int
    lambda d: d.update(schema_version=2.0),
    lambda d: d.update(schema_version=True),  # lax: a bool is an int
], ids=["upper-id", "braced-id", "offset", "short-fraction", "no-fraction", "space", "no-version", "no-cause",
        "str-sequence", "float-version", "bool-version"])
def test_an_envelope_in_another_form_is_normalised_as_full_validation_does(change):
    data = _variant(change)
    _same_envelope(Envelope.from_json(json.dumps(data)), Envelope.model_validate(data))


@pytest.mark.parametrize("text", [
    lambda raw: raw.replace(b'"payload":{', b'"payload":{"big":123456789012345678901234567890,'),
    lambda raw: raw.replace(b'"payload":{', b'"payload":{"k":1,"k":2,'),  # the last one counts
    lambda raw: raw.replace(b'"payload":{', b'"payload":{"s":"\\ud800\\u00e9",'),  # a lone surrogate
    lambda raw: raw.replace(b'"payload":{', b'"payload":{"f":[1E5,-0.0,1e-400,0.1e+2],'),
    lambda raw: b"\xef\xbb\xbf" + raw,  # a byte-order mark
    lambda raw: json.dumps(json.loads(raw), indent=2).encode(),
    lambda raw: raw.decode(),
    lambda raw: type("Text", (str,), {})(raw.decode()),  # a str subclass (numpy.str_, say)
], ids=["big-int", "duplicate-key", "surrogate", "floats", "bom", "indented", "str", "str-subclass"])
def test_json_text_in_any_form_reads_as_json_and_full_validation_do(text):
    raw = text(make_event("dataset.registered", "ds-1", dataset_payload()).to_json())
    slow = Envelope.model_validate(json.loads(raw))
    fast = Envelope.from_json(raw)
    _same_envelope(fast, slow)


def test_nan_and_infinity_in_a_payload_read_as_json_reads_them():
    raw = make_event("dataset.registered", "ds-1", dataset_payload()).to_json()
    raw = raw.replace(b'"payload":{', b'"payload":{"inf":-Infinity,"nan":NaN,')
    fast, slow = Envelope.from_json(raw), Envelope.model_validate(json.loads(raw))
    assert fast.payload["inf"] == float("-inf") and fast.payload["nan"] != fast.payload["nan"]
    assert repr(fast) == repr(slow) and fast.to_json() == slow.to_json()


@pytest.mark.parametrize("change", [
    lambda d: d.update(event_id="not-a-uuid"),
    lambda d: d.update(occurred_at="2025-13-04T14:03:00.000000Z"),  # shaped like a time, but no month 13
    lambda d: d.update(occurred_at="2025-03-04T14:03:00"),  # no zone
    lambda d: d.update(type="dataset"),
    lambda d: d.update(sequence=0),
    lambda d: d.update(aggregate_id=""),
    lambda d: d.update(extra=1),
    lambda d: d.pop("payload"),
    lambda d: d.update(payload=[1]),
    lambda d: d["producer"].update(node=3),
    lambda d: d["producer"].update(node=[1]),  # not hashable: must not break the look-up of known producers
    lambda d: d["producer"].update(region="eu"),
], ids=["bad-id", "month-13", "naive", "type-shape", "sequence-0", "empty-id", "extra", "no-payload",
        "list-payload", "int-node", "list-node", "producer-extra"])
def test_an_envelope_the_model_refuses_is_refused_with_the_models_reason(change):
    from pydantic import ValidationError

    data = _variant(change)
    with pytest.raises(ValidationError) as slow:
        Envelope.model_validate(data)
    assert read_canonical(json.dumps(data)) is None
    with pytest.raises(ValidationError) as fast:
        Envelope.from_json(json.dumps(data))
    assert fast.value.errors(include_context=False) == slow.value.errors(include_context=False)

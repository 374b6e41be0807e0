"""The contract: envelope, schemas, upcasting and decoding, without I/O."""

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from shared import schemas
from shared.bus import MalformedEvent, decode
from shared.envelope import Envelope
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

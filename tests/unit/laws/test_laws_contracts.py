"""Laws of the contracts: canonical bytes are stable, an envelope survives its bytes, and every upcaster
turns a payload valid at its old version into one valid at the current version."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.contracts import schemas
from shared.contracts.envelope import Envelope, NewEvent, Producer, loads, read_canonical, seal
from shared.contracts.trust import canonical_json
from shared.contracts.upcasters import UPCASTERS
from tests.unit.laws.law_support import laws

# --- JSON values ------------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(-(2**63), 2**64),  # beyond 64 bits, and the edges of both 64-bit ranges
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e-05, 2.5e-07, 1e16, 1e22, 5e-324, -0.0, 0.1, 1.7976931348623157e308, 123456789012345680.0]),
    st.text(max_size=12),
    st.sampled_from(["", "\x7f", "é", "☃", "\U0001f600", "\u2028", "\"\\/", "e-5,", "0.0000"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)
payloads = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


@laws(100)
@given(json_values)
def test_canonical_bytes_read_back_write_the_same_bytes(value):
    raw = canonical_json(value)
    assert canonical_json(json.loads(raw)) == raw
    assert canonical_json(loads(raw)) == raw  # the platform's own reader (orjson where it can) too


# --- envelopes --------------------------------------------------------------------------------------

names = st.text(st.characters(min_codepoint=ord("a"), max_codepoint=ord("z")), min_size=1, max_size=8)
event_types = st.builds(lambda a, b: f"{a}.{b}", names, names)
offsets = st.integers(-14 * 60, 14 * 60).map(lambda minutes: timezone(timedelta(minutes=minutes)))


@st.composite
def envelopes(draw) -> Envelope:
    return seal(
        NewEvent(draw(event_types), draw(st.text(min_size=1, max_size=12)), draw(payloads)),
        sequence=draw(st.integers(1, 2**63 - 1)),
        producer=Producer(service=draw(st.text(max_size=8)), node=draw(st.text(max_size=8)),
                          version=draw(st.sampled_from(["0.1.0", "ü"]))),
        correlation_id=draw(st.text(max_size=12)),
        causation_id=draw(st.none() | st.text(max_size=12)),
        schema_version=draw(st.integers(1, 9)),
        # years 2 to 9998: every offset's time has a UTC time (see the pinned decode test below)
        occurred_at=draw(st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31),
                                      timezones=st.just(timezone.utc) | offsets)),
        event_id=str(draw(st.uuids())),
    )


@laws(100)
@given(envelopes())
def test_an_envelope_read_back_from_its_bytes_is_equal_and_writes_the_same_bytes(envelope):
    raw = envelope.to_json()
    again = Envelope.from_json(raw)
    assert again == envelope
    assert again.to_json() == raw


@laws(100)
@given(envelopes())
def test_an_envelopes_bytes_are_its_dict_as_compact_sorted_json(envelope):
    # to_json writes with orjson where it can; the bytes must be json's, byte for byte
    assert envelope.to_json() == json.dumps(envelope.to_dict(), separators=(",", ":"), sort_keys=True).encode()


@laws(100)
@given(envelopes())
def test_the_fast_reader_reads_what_the_model_reads(envelope):
    raw = envelope.to_json()
    fast = read_canonical(raw)
    assert fast is not None  # what to_json writes is the canonical form
    assert fast == Envelope.model_validate(json.loads(raw))
    assert fast.to_dict() == Envelope.model_validate(json.loads(raw)).to_dict()


# --- upcasters -------------------------------------------------------------------------------------

hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
# a dataset's file:///… URI: plain names, none of them '.' or '..' (the schemas refuse those)
file_uris = st.lists(st.text(st.characters(blacklist_characters="/"), min_size=1, max_size=4)
                     .filter(lambda part: part not in (".", "..")), min_size=1, max_size=3) \
    .map(lambda parts: "file:///" + "/".join(parts))


def _old_dataset_registered(extra_names: st.SearchStrategy[str]) -> st.SearchStrategy[dict]:
    """A ``dataset.registered`` v1 payload: its required fields, and properties v1 did not name (v1 allows them)."""
    return st.builds(
        lambda required, extra: {**extra, **required},
        st.fixed_dictionaries({"dataset_id": st.text(min_size=1, max_size=8), "name": st.text(max_size=8),
                               "sha256": hex64, "uri": file_uris, "records": st.integers(0, 2**40)}),
        st.dictionaries(extra_names, json_values, max_size=3),
    )


def _properties(event_type: str, version: int) -> set[str]:
    return set(schemas.registry()[(event_type, version)].schema.get("properties", {}))


# Payloads valid at the old version of each upcast type, by (type, old version). A new upcaster needs one.
_V1_NAMES = _properties("dataset.registered", 1)
_V2_NAMES = _properties("dataset.registered", 2)
OLD_PAYLOADS = {
    ("dataset.registered", 1): _old_dataset_registered(
        st.text(max_size=8).filter(lambda name: name not in _V1_NAMES | _V2_NAMES)),
}
# The same, with properties v1 did not name but a later version does (any value, as v1 allowed it).
OLD_PAYLOADS_NAMING_LATER_FIELDS = {
    ("dataset.registered", 1): _old_dataset_registered(st.sampled_from(sorted(_V2_NAMES - _V1_NAMES))),
}
# Stored v1 payloads (tests/unit/backbone/test_backbone_contract.py reads one through the bus).
STORED = [("dataset.registered", 1, {"dataset_id": "ds-old", "name": "legacy", "sha256": "cd" * 32,
                                     "uri": "file:///l", "records": 12})]


def test_every_upcaster_has_a_generator_of_old_payloads():
    assert set(UPCASTERS) <= set(OLD_PAYLOADS), "add a strategy of old payloads for the new upcaster"


@pytest.mark.parametrize("key", sorted(UPCASTERS), ids=lambda key: f"{key[0]}.v{key[1]}")
def test_a_stored_old_payload_upcasts_to_a_valid_current_payload(key):
    for event_type, version, payload in STORED:
        if (event_type, version) == key:
            schemas.validate_payload(event_type, version, payload)
            current, upcast = schemas.upcast(event_type, version, dict(payload))
            assert current == schemas.current_version(event_type)
            schemas.validate_payload(event_type, current, upcast)


def _upcasts_to_a_valid_current_payload(event_type: str, version: int, payload: dict) -> None:
    schemas.validate_payload(event_type, version, payload)  # the generator's own check
    before = json.loads(json.dumps(payload))
    current, upcast = schemas.upcast(event_type, version, payload)
    assert current == schemas.current_version(event_type)
    schemas.validate_payload(event_type, current, upcast)
    assert payload == before  # reading an old event leaves the event as it was
    assert schemas.upcast(event_type, current, upcast) == (current, upcast)  # a current payload stays as it is


@pytest.mark.parametrize("key", sorted(UPCASTERS), ids=lambda key: f"{key[0]}.v{key[1]}")
@laws(60)
@given(data=st.data())
def test_every_upcaster_turns_an_old_payload_into_a_valid_current_one(key, data):
    _upcasts_to_a_valid_current_payload(*key, data.draw(OLD_PAYLOADS[key]))


@pytest.mark.parametrize("key", sorted(OLD_PAYLOADS_NAMING_LATER_FIELDS), ids=lambda key: f"{key[0]}.v{key[1]}")
@laws(20)
@given(data=st.data())
def test_an_old_payload_carrying_a_later_versions_field_name_upcasts_to_a_valid_current_one(key, data):
    _upcasts_to_a_valid_current_payload(*key, data.draw(OLD_PAYLOADS_NAMING_LATER_FIELDS[key]))


def test_the_event_type_names_are_what_the_envelope_accepts():
    # every schema's type is '<aggregate>.<what happened>', as Envelope requires
    for event_type in schemas.event_types():
        seal(NewEvent(event_type, "agg", {}), sequence=1, producer=Producer(service="s", node="n"),
             correlation_id="c", causation_id=None, schema_version=1, event_id=str(uuid.uuid4()))



@pytest.mark.parametrize("occurred_at", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_a_record_whose_time_has_no_utc_time_is_malformed(occurred_at):
    from shared.bus import MalformedEvent, decode

    envelope = seal(NewEvent("dataset.registered", "ds-1", {"dataset_id": "ds-1", "name": "n", "sha256": "a" * 64,
                                                             "uri": "u", "record_count": 1, "quarantined": False}),
                    sequence=1, producer=Producer(service="cli", node="n"), correlation_id="c", causation_id=None,
                    schema_version=2, event_id=str(uuid.uuid4()))
    raw = envelope.to_json().replace(envelope.to_dict()["occurred_at"].encode(), occurred_at.encode())
    with pytest.raises(MalformedEvent):
        decode(raw)

"""The envelope every event travels in (see DESIGN.md, Events).

Domain code returns ``NewEvent`` values (type, stream, payload); the service
runtime seals them into an ``Envelope`` with the sequence, the producer and the
correlation and causation ids.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any

import msgspec
import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.contracts.values import iso, utcnow  # noqa: F401  (the envelope's own clock and time form)

SOFTWARE_VERSION = "0.1.0"


_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)
# how json and orjson write a float with a negative exponent, as it ends a value: 1e-05, 2.5e-7
_NEGATIVE_EXPONENT = re.compile(rb"e-[0-9]+[,}\]]")
# Anything but plain JSON values (dict, list, str, int, float, bool, None) makes orjson raise.
_ORJSON = (orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATETIME
           | orjson.OPT_PASSTHROUGH_DATACLASS)


def _dumps(data: Any) -> bytes:
    """``json.dumps(data, separators=(",", ":"), sort_keys=True).encode()``, byte for byte.

    ``data`` is what ``model_dump(mode="json")`` returns. orjson writes the same
    bytes, faster, except for text that is not ASCII (json escapes it as
    \\uXXXX), DEL (json escapes it) and floats that json writes with a negative
    exponent (orjson writes 1e-05 as 0.00001 and 2.5e-07 as 2.5e-7); it refuses
    integers beyond 64 bits and keys that are not strings. Whenever its output
    could hold any of these, json writes it.
    """
    out = orjson_compact(data)
    return out if out is not None else _ENCODER.encode(data).encode()


def orjson_compact(data: Any) -> bytes | None:
    """orjson's bytes for ``data`` where they are ``json.dumps(data, separators=(",", ":"), sort_keys=True)``
    byte for byte (see ``_dumps``), else None."""
    try:
        out = orjson.dumps(data, option=_ORJSON)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return None
    if (out.isascii() and b"\x7f" not in out and b"0.0000" not in out
            and (b"e-" not in out or _NEGATIVE_EXPONENT.search(out) is None)):
        return out
    return None


# digits stay, every other byte becomes a space: a long number is a run of 0s
_DIGITS_ONLY = bytes(48 if 48 <= i <= 57 else 32 for i in range(256))
_LONG_NUMBER = b"0" * 19


def loads(raw: bytes | str) -> Any:
    """``json.loads(raw)``, parsed by orjson where it can.

    orjson reads valid JSON to the same values, faster; what it refuses (NaN
    and Infinity, text that is not JSON) goes to json, which accepts the first
    and raises its usual error for the rest. orjson reads an integer beyond 64
    bits as a float, so text with a run of 19 digits or more is json's too.
    """
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    if _LONG_NUMBER not in data.translate(_DIGITS_ONLY):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)


class Producer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    service: str
    node: str
    version: str = SOFTWARE_VERSION


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    type: str
    schema_version: int = Field(ge=1)
    aggregate_type: str
    aggregate_id: str = Field(min_length=1)
    sequence: int = Field(ge=1)
    occurred_at: datetime
    producer: Producer
    correlation_id: str
    causation_id: str | None = None
    payload: dict[str, Any]
    # the producer's signature block (shared.contracts.signing); None until published
    signature: dict[str, Any] | None = None

    @field_validator("event_id")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return str(uuid.UUID(value))

    @field_validator("occurred_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("occurred_at must carry a timezone (UTC)")
        try:
            return value.astimezone(timezone.utc)
        except OverflowError:
            raise ValueError("occurred_at is outside the years 1 to 9999 in UTC") from None

    @field_validator("type")
    @classmethod
    def _type_shape(cls, value: str) -> str:
        if value.count(".") != 1:
            raise ValueError("type must read '<aggregate>.<what happened>'")
        return value

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["occurred_at"] = iso(self.occurred_at)
        if data["signature"] is None:
            del data["signature"]  # the canonical bytes that get signed have no block
        return data

    def to_json(self) -> bytes:
        """``to_dict`` as compact JSON with sorted keys.

        The envelope's fields are plain JSON values already; the payload is
        too, nearly always, and then goes to orjson as it is. Anything else in
        it (a datetime, bytes, a set, a str subclass, an integer beyond 64
        bits: orjson refuses them all here) takes the way through
        ``model_dump``, which turns it into JSON values first.
        """
        producer = self.producer
        plain = {
            "aggregate_id": self.aggregate_id, "aggregate_type": self.aggregate_type,
            "causation_id": self.causation_id, "correlation_id": self.correlation_id, "event_id": self.event_id,
            "occurred_at": iso(self.occurred_at), "payload": self.payload,
            "producer": {"node": producer.node, "service": producer.service, "version": producer.version},
            "schema_version": self.schema_version, "sequence": self.sequence, "type": self.type,
        }
        if self.signature is not None:
            plain["signature"] = self.signature
        out = orjson_compact(plain)
        return out if out is not None else _dumps(self.to_dict())

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Envelope":
        """The envelope in JSON text ``raw``; ValidationError when it holds none (ValueError when it
        is no JSON). Text as ``to_json`` writes it is read directly (``read_canonical``)."""
        if cls is Envelope:
            envelope = read_canonical(raw)
            if envelope is not None:
                return envelope
        return cls.model_validate(loads(raw))

    def unsigned_json(self) -> bytes:
        """``to_json`` without the signature block: the bytes its signature covers."""
        if self.signature is None:
            return self.to_json()
        return self.model_copy(update={"signature": None}).to_json()

    def with_payload(self, payload: dict[str, Any], schema_version: int) -> "Envelope":
        return self.model_copy(update={"payload": payload, "schema_version": schema_version})


class _ProducerText(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    service: str
    node: str
    version: str


class _CanonicalText(msgspec.Struct, forbid_unknown_fields=True):
    """An envelope in the one form ``to_json`` writes: every field present and of its exact JSON
    type (a causation id is a string or null), the producer in full; ``read_canonical`` checks the
    rest. Each constraint is the model's own rule for that field, narrowed to the form the model
    would keep unchanged."""

    event_id: str
    type: str
    schema_version: Annotated[int, msgspec.Meta(ge=1)]
    aggregate_type: str
    aggregate_id: Annotated[str, msgspec.Meta(min_length=1)]
    sequence: Annotated[int, msgspec.Meta(ge=1)]
    occurred_at: str
    producer: _ProducerText
    correlation_id: str
    causation_id: str | None
    payload: dict[str, Any]
    signature: dict[str, Any] | None = None


_read_text = msgspec.json.Decoder(_CanonicalText).decode
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z").match
_CANONICAL_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{6})?Z\Z").match
_FIELD_NAMES = frozenset(Envelope.model_fields)  # every field is given, as model_validate records it
_UNSIGNED_FIELDS = _FIELD_NAMES - {"signature"}
# Producers are few (services times nodes): one frozen instance each, shared by their events.
_PRODUCERS: dict[_ProducerText, Producer] = {}
_MAX_PRODUCERS = 4096
_set = object.__setattr__


def read_canonical(raw: bytes | str) -> Envelope | None:
    """The envelope in ``raw`` when it is JSON text in the form ``to_json`` writes, else None.

    That is what every service publishes and what the archive holds. It is
    parsed and checked in one pass by msgspec (``_CanonicalText``) and the
    envelope is built from it directly, several times faster than parsing to
    a dict and validating the model; it equals, field for field, what
    ``Envelope.model_validate(json.loads(raw))`` returns. For anything else
    (other JSON, a time with an offset, NaN in the payload, text that is no
    JSON) the caller goes the long way, which normalises it or says why not.
    """
    if type(raw) is not bytes and type(raw) is not str:  # a subclass, a buffer: the long way, as before
        return None
    try:
        text = _read_text(raw)
    except (msgspec.MsgspecError, UnicodeError, RecursionError):
        return None
    kind, occurred_at = text.type, text.occurred_at
    if kind.count(".") != 1 or _CANONICAL_UUID(text.event_id) is None or _CANONICAL_TIME(occurred_at) is None:
        return None
    try:
        # fromisoformat reads the Z as timezone.utc, as the model's validator leaves it
        occurred_at = datetime.fromisoformat(occurred_at)
    except ValueError:  # shaped like a time but none (a 13th month): the model says why
        return None
    producer = text.producer
    made = _PRODUCERS.get(producer)
    if made is None:
        made = Producer(service=producer.service, node=producer.node, version=producer.version)
        if len(_PRODUCERS) < _MAX_PRODUCERS:
            _PRODUCERS[producer] = made
    envelope = Envelope.__new__(Envelope)
    # what BaseModel.model_construct sets, for a model with no extra fields and no private attributes
    _set(envelope, "__dict__", {  # in the model's field order, as model_validate fills it
        "event_id": text.event_id, "type": kind, "schema_version": text.schema_version,
        "aggregate_type": text.aggregate_type, "aggregate_id": text.aggregate_id, "sequence": text.sequence,
        "occurred_at": occurred_at, "producer": made, "correlation_id": text.correlation_id,
        "causation_id": text.causation_id, "payload": text.payload, "signature": text.signature,
    })
    _set(envelope, "__pydantic_fields_set__", set(_FIELD_NAMES if text.signature is not None else _UNSIGNED_FIELDS))
    _set(envelope, "__pydantic_extra__", None)
    _set(envelope, "__pydantic_private__", None)
    return envelope


@dataclass(frozen=True)
class NewEvent:
    """What a domain's ``decide`` returns: an event not yet sealed in an envelope."""

    type: str
    aggregate_id: str
    payload: dict[str, Any] = field(default_factory=dict)
    # Only set when the event starts a new flow (a timer, an operator command);
    # otherwise the runtime carries the correlation of the event being handled.
    correlation_id: str | None = None

    @property
    def aggregate_type(self) -> str:
        return self.type.split(".", 1)[0]


def seal(
    event: NewEvent,
    *,
    sequence: int,
    producer: Producer,
    correlation_id: str,
    causation_id: str | None,
    schema_version: int,
    occurred_at: datetime | None = None,
    event_id: str | None = None,
) -> Envelope:
    return Envelope(
        event_id=event_id or str(uuid.uuid4()),
        type=event.type,
        schema_version=schema_version,
        aggregate_type=event.aggregate_type,
        aggregate_id=event.aggregate_id,
        sequence=sequence,
        occurred_at=occurred_at or utcnow(),
        producer=producer,
        correlation_id=correlation_id,
        causation_id=causation_id,
        payload=event.payload,
    )

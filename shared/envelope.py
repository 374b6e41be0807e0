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
from operator import itemgetter
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

SOFTWARE_VERSION = "0.1.0"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso(ts: datetime) -> str:
    if ts.tzinfo is not timezone.utc:
        ts = ts.astimezone(timezone.utc)
    return ts.isoformat().replace("+00:00", "Z")


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

    @field_validator("event_id")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return str(uuid.UUID(value))

    @field_validator("occurred_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("occurred_at must carry a timezone (UTC)")
        return value.astimezone(timezone.utc)

    @field_validator("type")
    @classmethod
    def _type_shape(cls, value: str) -> str:
        if value.count(".") != 1:
            raise ValueError("type must read '<aggregate>.<what happened>'")
        return value

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["occurred_at"] = iso(self.occurred_at)
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
        out = orjson_compact(plain)
        return out if out is not None else _dumps(self.to_dict())

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Envelope":
        return cls.from_decoded(loads(raw))

    @classmethod
    def from_decoded(cls, data: Any) -> "Envelope":
        """The envelope in ``data``, a value just read from JSON text; ValidationError when it is none.

        An envelope as ``to_json`` writes it (every field present and of its
        exact type, the event id a lower-case UUID, the time in UTC with a
        Z, the producer in full) is what every service publishes and what the
        archive holds: its fields are checked here, each as the model would,
        and the envelope is built from them directly, several times faster
        than a full validation. Anything else goes through ``model_validate``,
        which normalises it (an upper-case id, another time zone) or refuses it.
        """
        if cls is Envelope and type(data) is dict:
            envelope = _canonical(data)
            if envelope is not None:
                return envelope
        return cls.model_validate(data)

    def with_payload(self, payload: dict[str, Any], schema_version: int) -> "Envelope":
        return self.model_copy(update={"payload": payload, "schema_version": schema_version})


_ORDER = tuple(Envelope.model_fields)  # the model's field order, as model_validate fills __dict__
_FIELDS = frozenset(_ORDER)
_FIELD_VALUES = itemgetter(*_ORDER)
# the exact types of the fields in the form to_json writes (a causation id is a string or null)
_NOT_TEXT = {"schema_version": int, "sequence": int, "producer": dict, "payload": dict}
_TYPES = tuple(_NOT_TEXT.get(name, str) for name in _ORDER)
_TYPES_NO_CAUSE = tuple(type(None) if name == "causation_id" else kind for name, kind in zip(_ORDER, _TYPES))
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_CANONICAL_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{6})?Z\Z")
_PRODUCER_KEYS = frozenset(("service", "node", "version"))
_PRODUCER_VALUES = itemgetter("service", "node", "version")
# Producers are few (services times nodes): one frozen instance each, shared by their events.
_PRODUCERS: dict[tuple[str, str, str], Producer] = {}
_MAX_PRODUCERS = 4096


def _canonical(data: dict[str, Any]) -> Envelope | None:
    """``data`` as an Envelope when it is in the form ``to_json`` writes, else None.

    Each check is the model's own rule for that field, narrowed to the one
    form the model would keep unchanged: so the envelope built here equals,
    field for field, what ``model_validate`` returns for the same data.
    """
    if data.keys() != _FIELDS:
        return None
    values = _FIELD_VALUES(data)
    kinds = tuple(map(type, values))
    if kinds != _TYPES and kinds != _TYPES_NO_CAUSE:
        return None
    fields = dict(zip(_ORDER, values))
    producer = fields["producer"]
    if not (_CANONICAL_UUID.match(fields["event_id"]) and fields["type"].count(".") == 1
            and fields["schema_version"] >= 1 and fields["aggregate_id"] and fields["sequence"] >= 1
            and _CANONICAL_TIME.match(fields["occurred_at"]) and producer.keys() == _PRODUCER_KEYS):
        return None
    key = _PRODUCER_VALUES(producer)
    if tuple(map(type, key)) != (str, str, str):
        return None
    made = _PRODUCERS.get(key)
    if made is None:
        made = Producer(service=key[0], node=key[1], version=key[2])
        if len(_PRODUCERS) < _MAX_PRODUCERS:
            _PRODUCERS[key] = made
    try:
        # fromisoformat reads the Z as timezone.utc, as the model's validator leaves it
        fields["occurred_at"] = datetime.fromisoformat(fields["occurred_at"])
    except ValueError:  # shaped like a time but none (a 13th month): the model says why
        return None
    fields["producer"] = made
    envelope = Envelope.__new__(Envelope)
    # what BaseModel.model_construct sets, for a model with no extra fields and no private attributes
    object.__setattr__(envelope, "__dict__", fields)
    object.__setattr__(envelope, "__pydantic_fields_set__", set(_ORDER))
    object.__setattr__(envelope, "__pydantic_extra__", None)
    object.__setattr__(envelope, "__pydantic_private__", None)
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

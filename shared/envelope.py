"""The envelope every event travels in (see DESIGN.md, Events).

Domain code returns ``NewEvent`` values (type, stream, payload); the service
runtime seals them into an ``Envelope`` with the sequence, the producer and the
correlation and causation ids.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

SOFTWARE_VERSION = "0.1.0"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso(ts: datetime) -> str:
    return ts.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


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
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Envelope":
        return cls.model_validate(json.loads(raw))

    def with_payload(self, payload: dict[str, Any], schema_version: int) -> "Envelope":
        return self.model_copy(update={"payload": payload, "schema_version": schema_version})


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

"""Personality profiles as they stand: traits, style, context preferences, channel and live adapter."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, Session, SQLModel

from services.registry.rows import dumps, get_or_new, json_field, utc
from shared.archive import Projection
from shared.contracts.envelope import Envelope


class PersonalityProfile(SQLModel, table=True):
    __tablename__ = "registry_profiles"
    profile_id: str = Field(primary_key=True)
    traits_json: str = json_field()
    interaction_style: str = ""
    context_preferences_json: str = json_field()
    channel: str = Field(default="production", index=True)
    active_adapter_sha256: str | None = None
    active_adapter_uri: str | None = None
    version: int = 1
    created_at: datetime | None = None
    updated_at: datetime | None = None
    updated_by: str | None = None
    adapter_updated_at: datetime | None = None


def apply_profiles(session: Session, event: Envelope) -> None:
    p, etype = event.payload, event.type
    if etype in ("profile.created", "profile.updated"):
        row, _ = get_or_new(session, PersonalityProfile, {"profile_id": p["profile_id"]})
        row.traits_json, row.context_preferences_json = dumps(p["traits"]), dumps(p["context_preferences"])
        row.interaction_style, row.channel, row.version = p["interaction_style"], p["channel"], p["version"]
        if row.active_adapter_sha256 != p.get("active_adapter_sha256"):
            row.adapter_updated_at = utc(event.occurred_at)
        row.active_adapter_sha256, row.active_adapter_uri = p.get("active_adapter_sha256"), p.get("active_adapter_uri")
        row.updated_at, row.updated_by = utc(p.get("created_at") or p.get("updated_at")), p.get("requested_by")
        if etype == "profile.created":
            row.created_at = utc(p["created_at"])
        session.add(row)
    elif etype == "profile.adapter_updated":
        row = session.get(PersonalityProfile, p["profile_id"])
        if row is None:
            return
        row.active_adapter_sha256, row.active_adapter_uri = p["adapter_sha256"], p["adapter_uri"]
        row.adapter_updated_at = utc(p.get("updated_at") or event.occurred_at)
        session.add(row)


PROFILES = Projection("profiles", [PersonalityProfile], apply_profiles)

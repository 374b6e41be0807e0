"""What the adapter runtime swaps to, for the channel or the profile it follows."""

from __future__ import annotations

from shared.adapter_runtime import Target, target_of
from tests.support import make_event

SHA, OLD = "5" * 64, "6" * 64


def promoted(channel: str):
    return make_event("adapter.promoted", channel, {
        "channel": channel, "adapter_sha256": SHA, "adapter_uri": f"artefact://sha256/{SHA}", "kind": "mntp",
        "cycle_id": None, "validation_id": None, "previous_adapter_sha256": OLD, "approval_request_id": "apr-1",
        "approver": "alice", "promoted_at": "2025-03-04T14:03:00Z"}, service="registry")


def test_a_channel_follower_takes_promotions_of_its_channel_only():
    event = promoted("production")
    target = target_of(event, channel="production")
    assert target == Target(SHA, f"artefact://sha256/{SHA}", f"adapter.promoted {event.event_id}")
    assert target_of(promoted("canary"), channel="production") is None
    assert target_of(promoted("production"), profile="p-1") is None


def test_a_profile_follower_takes_its_profiles_adapter():
    updated = make_event("profile.adapter_updated", "p-1", {
        "profile_id": "p-1", "channel": "production", "adapter_sha256": SHA, "adapter_uri": "artefact://sha256/" + SHA,
        "previous_adapter_sha256": OLD, "cause": "adapter.promoted", "version": 3,
        "updated_at": "2025-03-04T14:03:00Z"}, service="registry")
    created = make_event("profile.created", "p-2", {
        "profile_id": "p-2", "traits": {}, "interaction_style": "", "context_preferences": {}, "channel": "production",
        "active_adapter_sha256": None, "active_adapter_uri": None, "version": 1, "requested_by": "alice",
        "created_at": "2025-03-04T14:03:00Z"}, service="registry")

    assert target_of(updated, profile="p-1").sha256 == SHA
    assert target_of(updated, profile="p-2") is None
    assert target_of(created, profile="p-2") == Target(None, None, f"profile.created {created.event_id}")

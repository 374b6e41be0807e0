"""Profiles and rollbacks from the command line, against a running registry."""

from __future__ import annotations

import json

from tests.integration.registry.registry_events import promote, sha_of
from tests.support import await_until


def show(registry, profile_id: str) -> dict:
    return json.loads(registry.cli("profiles", "show", profile_id, "--json").stdout)


async def test_a_stale_profile_update_is_refused_with_one_clear_line(registry):
    registry.cli("profiles", "create", "stale-1", "--channel", "amber", "--trait", "tone=warm", "--style", "concise",
                 "--operator", "alice")
    updated = registry.cli("profiles", "update", "stale-1", "--expected-version", "1", "--style", "playful",
                           "--operator", "alice")
    assert "version 2" in updated.stdout

    stale = registry.cli("profiles", "update", "stale-1", "--expected-version", "1", "--style", "formal",
                         "--operator", "alice", check=False)

    assert stale.returncode == 1
    lines = stale.stderr.strip().splitlines()
    assert len(lines) == 1 and "stale_version" in lines[0] and "version 2" in lines[0], stale.stderr
    profile = show(registry, "stale-1")
    assert profile["version"] == 2 and profile["interaction_style"] == "playful"
    assert profile["traits"] == {"tone": "warm"}


async def test_a_promotion_updates_every_profile_on_that_channel(registry):
    for profile_id, channel in (("blue-1", "blue"), ("blue-2", "blue"), ("green-1", "green")):
        registry.cli("profiles", "create", profile_id, "--channel", channel, "--trait", "tone=dry", "--operator", "alice")
    sha = sha_of("blue-adapter")

    await promote(registry, sha, channel="blue")

    updates = await await_until(
        lambda: [e for e in registry.archived("profile.adapter_updated") if e["payload"]["adapter_sha256"] == sha]
        if len([e for e in registry.archived("profile.adapter_updated") if e["payload"]["adapter_sha256"] == sha]) >= 2
        else None, 30, message="both blue profiles updated")
    assert sorted(e["payload"]["profile_id"] for e in updates) == ["blue-1", "blue-2"]
    assert all(e["payload"]["cause"] == "adapter.promoted" for e in updates)
    await await_until(lambda: show(registry, "blue-2")["active_adapter_sha256"] == sha, 20, message="read model")
    assert show(registry, "blue-1")["active_adapter_sha256"] == sha
    assert show(registry, "green-1")["active_adapter_sha256"] is None


async def test_an_admin_rolls_a_channel_back_and_an_approver_may_not(registry):
    first, second = sha_of("red-first"), sha_of("red-second")
    await promote(registry, first, channel="red")
    await promote(registry, second, channel="red")

    refused = registry.cli("adapters", "rollback", "red", "--to", first, "--operator", "alice", check=False)
    done = registry.cli("adapters", "rollback", "red", "--to", first[:12], "--operator", "dave", "--reason", "drift")

    assert refused.returncode == 1 and "needs the role admin" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert f"red rolled back to {first}" in done.stdout
    await await_until(lambda: [c for c in json.loads(registry.cli("adapters", "manifest", "--json").stdout)["channels"].values()
                               if c["channel"] == "red" and c["adapter_sha256"] == first], 20, message="manifest")
    history = json.loads(registry.cli("adapters", "history", "red", "--json").stdout)
    # alice's command never left her machine: only admins may publish adapter.rollback_requested
    assert [h["action"] for h in history] == ["promoted", "promoted", "rolled_back"]
    assert history[-1]["operator_id"] == "dave" and history[-1]["reason"] == "drift"

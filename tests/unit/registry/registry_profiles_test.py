"""Personality profiles: creation, optimistic concurrency on updates."""

from __future__ import annotations

from tests.unit.registry.registry_givens import SHA_A, given, granted, profile_create, profile_update, requested, validated, when


def test_a_new_profile_starts_at_version_1_with_its_channels_adapter(config, sign):
    state = given(validated(SHA_A), requested(SHA_A), granted(SHA_A, sign(f"apr-promotion-val-{SHA_A[:16]}")),
                  config=config)

    state, [created] = when(profile_create("p-1"), state, config)

    assert created.type == "profile.created"
    assert created.payload["version"] == 1
    assert created.payload["active_adapter_sha256"] == SHA_A


def test_an_update_against_the_current_version_bumps_it(config):
    state = given(profile_create("p-1"), config=config)

    state, [updated] = when(profile_update("p-1", 1, interaction_style="playful"), state, config)

    assert updated.type == "profile.updated"
    assert updated.payload["version"] == 2 and updated.payload["changed"] == ["interaction_style"]
    assert updated.payload["traits"] == {"tone": "warm"}  # untouched fields travel whole
    assert state.profiles["p-1"].interaction_style == "playful"


def test_a_stale_update_is_refused_and_changes_nothing(config):
    state = given(profile_create("p-1"), profile_update("p-1", 1, interaction_style="playful"), config=config)

    after, [refused] = when(profile_update("p-1", 1, interaction_style="formal"), state, config)

    assert refused.type == "profile.update_refused"
    assert refused.payload["reason"] == "stale_version"
    assert refused.payload["expected_version"] == 1 and refused.payload["current_version"] == 2
    assert after.profiles == state.profiles


def test_an_update_of_an_unknown_profile_is_refused(config):
    _, [refused] = when(profile_update("ghost", 1, interaction_style="x"), given(config=config), config)

    assert refused.payload["reason"] == "unknown_profile"


def test_creating_a_profile_twice_is_refused(config):
    state = given(profile_create("p-1"), config=config)

    _, [refused] = when(profile_create("p-1"), state, config)

    assert refused.payload["reason"] == "already_exists" and refused.payload["command"] == "create"


def test_moving_a_profile_to_another_channel_picks_up_that_channels_adapter(config, sign):
    signed = sign(f"apr-promotion-val-{SHA_A[:16]}", extra={"channel": "canary"})
    state = given(validated(SHA_A), requested(SHA_A), granted(SHA_A, signed), profile_create("p-1"), config=config)
    assert state.profiles["p-1"].active_adapter_sha256 is None

    state, [updated] = when(profile_update("p-1", 1, channel="canary"), state, config)

    assert updated.payload["active_adapter_sha256"] == SHA_A

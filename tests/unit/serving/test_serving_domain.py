"""Serving's domain: the state folded from the log, routing, the persona, kinds and request bounds."""

from __future__ import annotations

import pytest

from services.serving import domain
from services.serving.domain import (CHAT, COMPLETIONS, EMBEDDINGS, RequestLimits, ServingError, ServingState,
                                     check_kind, check_request, evolve, route)
from shared.contracts import schemas
from tests.support import make_event

MNTP, RL, OLDER = "a" * 64, "b" * 64, "c" * 64
AT = "2026-11-24T14:03:00Z"


def event(etype: str, payload: dict):
    schemas.validate_payload(etype, schemas.current_version(etype), payload)  # only payloads the log can hold
    return make_event(etype, payload.get("profile_id") or payload["channel"], payload)


def profile_payload(profile_id="assistant", *, version=1, sha=None, channel="production", **changes) -> dict:
    payload = {"profile_id": profile_id, "traits": {"tone": "warm", "formality": "casual"},
               "interaction_style": "short answers, one example each", "context_preferences": {"domain": "python"},
               "channel": channel, "active_adapter_sha256": sha,
               "active_adapter_uri": f"neurons://artefacts/{sha}" if sha else None, "version": version,
               "requested_by": "alice", "created_at": AT}
    payload.update(changes)
    return payload


def created(**kwargs):
    return event("profile.created", profile_payload(**kwargs))


def updated(**kwargs):
    payload = profile_payload(**kwargs)
    payload["updated_at"] = payload.pop("created_at")
    return event("profile.updated", {**payload, "changed": ["interaction_style"]})


def promoted(sha: str, kind: str, channel="production", previous=None):
    return event("adapter.promoted", {
        "channel": channel, "adapter_sha256": sha, "adapter_uri": f"neurons://artefacts/{sha}", "kind": kind,
        "cycle_id": "cyc-1", "validation_id": "val-1", "previous_adapter_sha256": previous,
        "approval_request_id": f"apr-{sha[:8]}", "approver": "bob", "promoted_at": AT})


def rolled_back(sha: str, kind: str, previous: str, channel="production"):
    return event("adapter.rolled_back", {
        "channel": channel, "adapter_sha256": sha, "adapter_uri": f"neurons://artefacts/{sha}", "kind": kind,
        "previous_adapter_sha256": previous, "operator_id": "root", "request_id": "rb-1", "reason": "drift",
        "decision": {"scheme": "neurons-decision/v1", "request_id": "rb-1", "decision": "rollback",
                     "operator_id": "root", "issued_at": AT, "expires_at": AT, "nonce": "n-1", "reason": None,
                     "extra": {"channel": channel, "adapter_sha256": sha}, "signature": "sig"},
        "rolled_back_at": AT})


def adapter_updated(sha: str, profile_id="assistant", kind=None, cause="adapter.promoted", version=1):
    payload = {"profile_id": profile_id, "channel": "production", "adapter_sha256": sha,
               "adapter_uri": f"neurons://artefacts/{sha}", "previous_adapter_sha256": None, "cause": cause,
               "version": version, "updated_at": AT}
    if kind:
        payload["kind"] = kind
    return event("profile.adapter_updated", payload)


def fold(*events) -> ServingState:
    state = domain.initial_state()
    for e in events:
        state = evolve(state, e)
    return state


# --- evolve and route ------------------------------------------------------------------


def test_a_new_profile_is_served_by_the_base_model_until_its_channel_has_an_adapter():
    state = fold(created())

    served = route(state, "assistant")

    assert served.base and served.adapter_sha256 is None and served.kind is None
    assert (served.profile_id, served.profile_version, served.channel) == ("assistant", 1, "production")
    check_kind(served, EMBEDDINGS)  # the base model both embeds and generates
    check_kind(served, CHAT)


def test_a_promotion_moves_the_channel_and_the_profile_follows_with_the_kind():
    state = fold(created(), promoted(RL, "rl"), adapter_updated(RL))

    assert route(state, "assistant").adapter_sha256 == RL and route(state, "assistant").kind == "rl"
    assert route(state, "channel:production").adapter_sha256 == RL
    assert route(state, "channel:production").system_prompt is None  # a channel has no persona
    assert route(state, "assistant").adapter_uri == f"neurons://artefacts/{RL}"


def test_the_profile_learns_its_adapter_kind_when_the_promotion_arrives_after_it():
    # the profile and the adapter travel on different topics: either may come first
    state = fold(created(), adapter_updated(MNTP))
    assert route(state, "assistant").kind is None

    state = evolve(state, promoted(MNTP, "mntp"))

    assert route(state, "assistant").kind == "mntp"


def test_a_rollback_puts_the_previous_adapter_back():
    state = fold(created(), promoted(OLDER, "rl"), adapter_updated(OLDER), promoted(RL, "rl", previous=OLDER),
                 adapter_updated(RL))
    assert route(state, "assistant").adapter_sha256 == RL

    state = evolve(state, rolled_back(OLDER, "rl", previous=RL))
    state = evolve(state, adapter_updated(OLDER, cause="adapter.rolled_back"))

    assert route(state, "channel:production").adapter_sha256 == OLDER
    assert route(state, "assistant").adapter_sha256 == OLDER and route(state, "assistant").kind == "rl"


def test_profile_updates_change_the_persona_and_an_older_copy_changes_nothing():
    state = fold(created(sha=RL), updated(version=2, sha=RL, interaction_style="formal, thorough"))
    assert route(state, "assistant").profile_version == 2
    assert "formal, thorough" in route(state, "assistant").system_prompt

    assert evolve(state, created(sha=RL)) is state  # redelivered version 1


def test_an_adapter_update_keeps_the_profile_version():
    state = fold(created(), updated(version=3), adapter_updated(RL, kind="rl", version=3))

    served = route(state, "assistant")
    assert (served.profile_version, served.adapter_sha256, served.kind) == (3, RL, "rl")


def test_unknown_models_are_404_and_events_of_other_types_change_nothing():
    state = fold(created(), promoted(RL, "rl", channel="staging"))

    for model in ("nobody", "channel:nowhere", "channel:"):
        with pytest.raises(ServingError) as refused:
            route(state, model)
        assert (refused.value.status, refused.value.code, refused.value.param) == (404, "model_not_found", "model")
    assert route(state, "channel:staging").adapter_sha256 == RL
    assert evolve(state, make_event("dataset.registered", "ds-1", {})) is state
    assert evolve(state, adapter_updated(RL, profile_id="ghost")) is state  # a profile it never saw


def test_the_state_survives_its_rows():
    state = fold(created(), promoted(RL, "rl"), adapter_updated(RL), created(profile_id="other", channel="staging"))

    again = ServingState.from_rows(state.to_rows())

    assert again == state
    assert ServingState.from_rows({}) == domain.initial_state()
    assert set(state.to_rows()) == {"profile:assistant", "profile:other", "channel:production", f"kind:{RL}"}


# --- the persona ---------------------------------------------------------------------------


def test_the_system_prompt_holds_traits_style_and_preferences_in_a_stable_order():
    state = fold(created(traits={"formality": "casual", "tone": "warm", "languages": ["en", "fr"]}))

    prompt = route(state, "assistant").system_prompt

    assert prompt.splitlines() == [
        "You are the assistant of the profile 'assistant'.",
        'Your traits: formality: casual; languages: ["en", "fr"]; tone: warm.',
        "Interaction style: short answers, one example each",
        "Context preferences: domain: python.",
    ]


def test_an_empty_profile_still_has_a_persona_line():
    state = fold(created(traits={}, interaction_style=" ", context_preferences={}))

    assert route(state, "assistant").system_prompt == "You are the assistant of the profile 'assistant'."


# --- kinds ------------------------------------------------------------------------------------


def test_an_encoder_only_embeds_and_a_policy_only_generates():
    state = fold(created(), created(profile_id="policy", channel="research"), promoted(MNTP, "mntp"),
                 adapter_updated(MNTP), promoted(RL, "rl", channel="research"), adapter_updated(RL, "policy"))
    encoder, policy = route(state, "assistant"), route(state, "policy")

    check_kind(encoder, EMBEDDINGS)
    check_kind(policy, CHAT)
    check_kind(policy, COMPLETIONS)
    for served, endpoint, says in ((encoder, CHAT, "encoder"), (encoder, COMPLETIONS, "encoder"),
                                   (policy, EMBEDDINGS, "causal policy")):
        with pytest.raises(ServingError) as refused:
            check_kind(served, endpoint)
        assert (refused.value.status, refused.value.code) == (400, "adapter_kind_mismatch")
        assert says in refused.value.message and served.adapter_sha256 in refused.value.message


def test_an_adapter_of_unknown_kind_is_not_guessed():
    state = fold(created(), adapter_updated(MNTP))

    with pytest.raises(ServingError) as refused:
        check_kind(route(state, "assistant"), CHAT)
    assert (refused.value.status, refused.value.code) == (503, "adapter_kind_unknown")
    check_kind(route(state, "assistant").with_kind("mntp"), EMBEDDINGS)


# --- the model list ---------------------------------------------------------------------------


def test_the_model_list_names_profiles_then_channels_with_what_serves_them():
    state = fold(created(), promoted(RL, "rl"), adapter_updated(RL), created(profile_id="new", channel="staging"))

    listed = domain.models(state)

    assert [m["id"] for m in listed] == ["assistant", "new", "channel:production", "channel:staging"]
    assert all(m["object"] == "model" and m["owned_by"] == "neurons" for m in listed)
    first = listed[0]
    assert first["created"] == 1795528980  # the profile's creation, in epoch seconds
    assert first["neurons"] == {"channel": "production", "profile_version": 1, "adapter_sha256": RL,
                                "adapter_kind": "rl", "endpoints": [COMPLETIONS, CHAT]}
    assert listed[3]["neurons"]["adapter_sha256"] is None
    assert listed[3]["neurons"]["endpoints"] == [EMBEDDINGS, COMPLETIONS, CHAT]


# --- request bounds -----------------------------------------------------------------------------

LIMITS = RequestLimits(max_tokens=64, timeout_s=5, queue=2, max_texts=3, max_input_chars=100)


def refusal(endpoint: str, body) -> ServingError:
    with pytest.raises(ServingError) as refused:
        check_request(endpoint, body, LIMITS)
    return refused.value


def test_a_chat_request_is_bounded_and_defaulted():
    checked = check_request(CHAT, {"model": "assistant", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
        "stream": True, "stream_options": {"include_usage": True}, "stop": "\n"}, LIMITS)

    assert checked.messages == ({"role": "user", "content": "hi there"},)
    assert (checked.max_tokens, checked.temperature, checked.stop) == (64, 0.0, ("\n",))
    assert checked.stream and checked.include_usage
    assert check_request(CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                "max_completion_tokens": 7}, LIMITS).max_tokens == 7


@pytest.mark.parametrize("change, code, param", [
    ({"max_tokens": 0}, "invalid_max_tokens", "max_tokens"),
    ({"max_tokens": 65}, "invalid_max_tokens", "max_tokens"),
    ({"max_tokens": "10"}, "invalid_max_tokens", "max_tokens"),
    ({"max_tokens": True}, "invalid_max_tokens", "max_tokens"),
    ({"temperature": 3}, "invalid_value", "temperature"),
    ({"n": 2}, "unsupported_value", "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "invalid_value", "stop"),
    ({"stream": "yes"}, "invalid_value", "stream"),
    ({"messages": []}, "empty_input", "messages"),
    ({"messages": [{"role": "user", "content": ""}]}, "empty_input", "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "invalid_message", "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "invalid_message",
     "messages[0].content"),
    ({"model": ""}, "missing_model", "model"),
])
def test_chat_requests_a_client_must_fix_are_400(change, code, param):
    body = {"model": "assistant", "messages": [{"role": "user", "content": "hello"}], **change}

    refused = refusal(CHAT, body)

    assert (refused.status, refused.code, refused.param) == (400, code, param)


def test_completions_take_one_prompt():
    assert check_request(COMPLETIONS, {"model": "m", "prompt": ["once"]}, LIMITS).prompt == "once"
    assert refusal(COMPLETIONS, {"model": "m", "prompt": ["a", "b"]}).code == "invalid_prompt"
    assert refusal(COMPLETIONS, {"model": "m", "prompt": [1, 2]}).code == "invalid_prompt"
    assert refusal(COMPLETIONS, {"model": "m", "prompt": "   "}).code == "empty_input"
    too_long = refusal(COMPLETIONS, {"model": "m", "prompt": "x" * 101})
    assert (too_long.status, too_long.code) == (413, "input_too_large")


def test_embeddings_take_a_text_or_a_bounded_list_of_texts():
    assert check_request(EMBEDDINGS, {"model": "m", "input": "one"}, LIMITS).texts == ("one",)
    checked = check_request(EMBEDDINGS, {"model": "m", "input": ["a", "b"], "encoding_format": "base64"}, LIMITS)
    assert checked.texts == ("a", "b") and checked.encoding_format == "base64"
    assert refusal(EMBEDDINGS, {"model": "m", "input": []}).code == "empty_input"
    assert refusal(EMBEDDINGS, {"model": "m", "input": ["a", ""]}).code == "empty_input"
    assert refusal(EMBEDDINGS, {"model": "m", "input": ["a"] * 4}).code == "too_many_inputs"
    assert refusal(EMBEDDINGS, {"model": "m", "input": [[1, 2, 3]]}).code == "invalid_input"
    assert refusal(EMBEDDINGS, {"model": "m"}).code == "invalid_input"
    assert refusal(EMBEDDINGS, {"model": "m", "input": "a", "encoding_format": "int8"}).param == "encoding_format"
    assert refusal(EMBEDDINGS, {"model": "m", "input": "a", "dimensions": 0}).param == "dimensions"
    assert refusal(EMBEDDINGS, {"model": "m", "input": ["x" * 60, "y" * 60]}).status == 413
    assert refusal(EMBEDDINGS, ["not", "an", "object"]).code == "invalid_body"


def test_errors_read_as_openai_writes_them():
    assert domain.error_body(ServingError(404, "model_not_found", "no such model", "model")) == {
        "error": {"message": "no such model", "type": "invalid_request_error", "param": "model",
                  "code": "model_not_found"}}
    assert domain.error_body(ServingError(429, "queue_full", "busy"))["error"]["type"] == "rate_limit_error"
    assert domain.error_body(ServingError(503, "adapter_unavailable", "gone"))["error"]["type"] == \
        "service_unavailable_error"

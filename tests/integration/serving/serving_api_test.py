"""The serving API through the OpenAI client, against the running platform: the base model embeds and chats,
an MNTP adapter promoted through the registry embeds as the encoder does and refuses to chat."""

from __future__ import annotations

import openai
import pytest

from tests.integration.registry.registry_events import promote
from tests.integration.serving.serving_support import (adapter_loaded, await_serving, client, served_models,
                                                       stored_folder)
from tests.support import await_until

TEXTS = ["The registry promotes adapters that passed their soak.",
         "A cat sat on the mat and looked at the dog.",
         "Serving swaps adapters without dropping a request."]
QUESTION = [{"role": "user", "content": "Say something about the weather."}]


def _profile(plat, profile_id: str, channel: str) -> None:
    plat.cli("profiles", "create", profile_id, "--channel", channel, "--trait", "tone=dry", "--style", "concise",
             "--operator", "alice")


async def test_the_openai_client_embeds_chats_streams_and_lists_models_on_the_base_model(serving):
    _profile(serving, "plain", "plain")
    await await_serving(serving.settings, "plain", None)
    api = client(serving.settings)

    listed = {m.id: m for m in api.models.list().data}
    assert {"plain", "channel:plain"} <= set(listed)
    plain = listed["plain"].model_extra["neurons"]
    assert plain["channel"] == "plain" and plain["adapter_sha256"] is None and plain["profile_version"] == 1
    assert set(plain["endpoints"]) == {"/v1/embeddings", "/v1/completions", "/v1/chat/completions"}
    assert api.models.retrieve("plain").id == "plain"

    raw = api.embeddings.with_raw_response.create(model="plain", input=TEXTS)  # base64, as the client asks
    embeddings = raw.parse()
    assert raw.headers["x-neurons-adapter-sha256"] == "base" and raw.headers["x-neurons-profile"] == "plain"
    assert [d.index for d in embeddings.data] == [0, 1, 2]
    assert {len(d.embedding) for d in embeddings.data} == {64}  # the tiny model's hidden size
    assert embeddings.usage.prompt_tokens == embeddings.usage.total_tokens > len(TEXTS)

    raw = api.chat.completions.with_raw_response.create(model="plain", messages=QUESTION, max_tokens=8,
                                                        temperature=0)
    whole = raw.parse()
    assert raw.headers["x-neurons-adapter-sha256"] == "base" and raw.headers["x-neurons-profile-version"] == "1"
    assert whole.object == "chat.completion" and whole.model == "plain"
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 0 < whole.usage.completion_tokens <= 8 and whole.usage.prompt_tokens > 0
    assert whole.model_extra["neurons"] == {"adapter_sha256": None, "adapter_kind": None, "profile": "plain",
                                            "profile_version": 1, "channel": "plain"}

    chunks = list(api.chat.completions.create(model="plain", messages=QUESTION, max_tokens=8, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: streamed or not, the same answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.model_extra["neurons"]["profile"] == "plain" for c in chunks)

    with pytest.raises(openai.NotFoundError) as missing:
        api.embeddings.create(model="nobody", input="hello")
    assert missing.value.status_code == 404 and missing.value.code == "model_not_found"
    body = missing.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == "model"
    assert "nobody" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="nobody", messages=QUESTION, max_tokens=4)


async def test_an_mntp_adapter_embeds_as_the_encoder_and_refuses_to_chat(serving):
    import peft

    from shared.ml import embed_texts, load_model

    sha = serving.adapters["enc"]
    _profile(serving, "encoder", "enc")
    await promote(serving, sha, channel="enc", kind="mntp")
    await await_serving(serving.settings, "encoder", sha)
    loaded = await await_until(lambda: adapter_loaded(serving, sha), 30, message="serving.adapter_loaded")
    assert loaded[0]["kind"] == "mntp" and loaded[0]["latency_s"] >= 0 and loaded[0]["load_s"] >= 0
    assert served_models(serving.settings)["channel:enc"]["endpoints"] == ["/v1/embeddings"]
    api = client(serving.settings)

    raw = api.embeddings.with_raw_response.create(model="encoder", input=TEXTS, encoding_format="float")
    served = [d.embedding for d in raw.parse().data]
    assert raw.headers["x-neurons-adapter-sha256"] == sha
    assert raw.parse().model_extra["neurons"]["adapter_kind"] == "mntp"
    by_channel = [d.embedding for d in api.embeddings.create(model="channel:enc", input=TEXTS,
                                                             encoding_format="float").data]
    base = [d.embedding for d in api.embeddings.create(model="channel:plain", input=TEXTS,
                                                       encoding_format="float").data]

    # the same base model (the node's cache) and the same stored adapter, run here as LLM2Vec runs it
    loaded_model = load_model("tiny", serving.settings.model_cache_dir)
    expected_base, _ = embed_texts(loaded_model.model, loaded_model.tokenizer, TEXTS)
    adapted = peft.PeftModel.from_pretrained(loaded_model.model, str(stored_folder(serving.settings, sha)))
    expected, _ = embed_texts(adapted, loaded_model.tokenizer, TEXTS)

    def gap(a, b):
        return max(abs(x - y) for u, v in zip(a, b, strict=True) for x, y in zip(u, v, strict=True))

    assert gap(served, expected) <= 1e-4
    assert gap(by_channel, expected) <= 1e-4
    assert gap(base, expected_base) <= 1e-4
    assert gap(served, base) > 1e-2  # the adapter changes what the encoder says

    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(model="encoder", messages=QUESTION, max_tokens=4)
    assert refused.value.status_code == 400 and refused.value.code == "adapter_kind_mismatch"
    error = refused.value.response.json()["error"]
    assert error["param"] == "model" and error["type"] == "invalid_request_error"
    assert "mntp" in error["message"] and "/v1/embeddings" in error["message"]
    assert refused.value.response.headers["x-neurons-adapter-sha256"] == sha
    with pytest.raises(openai.BadRequestError) as streamed:
        api.chat.completions.create(model="encoder", messages=QUESTION, max_tokens=4, stream=True)
    assert streamed.value.code == "adapter_kind_mismatch"
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model="channel:enc", prompt="Once upon a time", max_tokens=4)

"""The serving API's HTTP layer, through FastAPI's TestClient and the official ``openai`` client.

The pool here is a small deterministic stand-in with the ``AdapterPool``
interface: it answers with the adapter's name and the prompt's last words, so
every test can see which adapter served and what prompt it was given.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest
from fastapi.testclient import TestClient

from services.serving import domain
from services.serving.api import ServingMetrics, binding_problem, create_app
from services.serving.domain import RequestLimits, ServingState, route as route_of
from services.serving.pool import AdapterUnavailable, Generation
from shared.settings import Settings
from tests.support import make_event

ENCODER, POLICY, NEWER, UNNAMED = "e" * 64, "f" * 64, "d" * 64, "9" * 64
AT = "2026-11-24T14:03:00Z"


# --- a pool with the AdapterPool interface, deterministic ----------------------------------------


@dataclass
class FakeStream:
    pieces: list[str]
    generation: Generation | None = None
    final: Generation | None = None

    def __iter__(self):
        yield from self.pieces
        self.generation = self.final


@dataclass
class FakePool:
    kinds: dict = field(default_factory=lambda: {ENCODER: "mntp", POLICY: "rl", NEWER: "rl", UNNAMED: "rl"})
    unavailable: dict = field(default_factory=dict)  # sha -> reason
    calls: list = field(default_factory=list)
    during_generation: object = None  # called inside generate: what happens while the model works
    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event | None = None  # when set, generate waits for it

    def ensure(self, sha, uri=None):
        self.calls.append(("ensure", sha))
        if sha in self.unavailable:
            raise AdapterUnavailable(self.unavailable[sha])
        return 0.0

    def kind_of(self, sha):
        return self.kinds.get(sha)

    def _generation(self, sha, prompt, max_tokens):
        words = (f"[{(sha or 'base')[:4]}] " + " ".join(prompt.split()[-3:])).split(" ")[:max_tokens]
        return Generation(" ".join(words), len(prompt.split()), len(words), "stop", sha, 0.5, 0.1)

    def generate(self, sha, prompt, *, max_tokens, temperature=0.0, stop=None):
        self.calls.append(("generate", sha, prompt, max_tokens))
        self.entered.set()
        if self.during_generation:
            self.during_generation()
        if self.release is not None:
            self.release.wait(10)
        return self._generation(sha, prompt, max_tokens)

    def stream(self, sha, prompt, *, max_tokens, temperature=0.0, stop=None):
        self.calls.append(("stream", sha, prompt, max_tokens))
        if self.during_generation:
            self.during_generation()
        generation = self._generation(sha, prompt, max_tokens)
        words = generation.text.split(" ")
        return FakeStream([w if i == 0 else " " + w for i, w in enumerate(words)], final=generation)

    def chat_prompt(self, messages):
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"

    def embed(self, sha, texts):
        self.calls.append(("embed", sha, list(texts)))
        return [[float(len(t)), float(i), 0.25] for i, t in enumerate(texts)], sum(len(t.split()) for t in texts)

    def status(self):
        return {"resident": []}


# --- the state, as the log would fold it ---------------------------------------------------------


def envelope(etype: str, payload: dict):
    return make_event(etype, payload.get("profile_id") or payload["channel"], payload)


def profile(profile_id: str, channel: str, sha: str | None, version: int = 1):
    return envelope("profile.created", {
        "profile_id": profile_id, "traits": {"tone": "warm"}, "interaction_style": "brief",
        "context_preferences": {}, "channel": channel, "active_adapter_sha256": sha,
        "active_adapter_uri": f"neurons://artefacts/{sha}" if sha else None, "version": version,
        "requested_by": "alice", "created_at": AT})


def promoted(channel: str, sha: str, kind: str):
    return envelope("adapter.promoted", {
        "channel": channel, "adapter_sha256": sha, "adapter_uri": f"neurons://artefacts/{sha}", "kind": kind,
        "cycle_id": None, "validation_id": None, "previous_adapter_sha256": None, "approval_request_id": "apr",
        "approver": "bob", "promoted_at": AT})


def adapter_updated(profile_id: str, channel: str, sha: str):
    return envelope("profile.adapter_updated", {
        "profile_id": profile_id, "channel": channel, "adapter_sha256": sha,
        "adapter_uri": f"neurons://artefacts/{sha}", "previous_adapter_sha256": None, "cause": "adapter.promoted",
        "version": 1, "updated_at": AT})


def fold(state: ServingState, *events) -> ServingState:
    for e in events:
        state = domain.evolve(state, e)
    return state


class StateHolder:
    def __init__(self, state: ServingState) -> None:
        self.state = state
        self.reads = 0

    def __call__(self) -> ServingState:
        self.reads += 1
        return self.state


@pytest.fixture
def states():
    return StateHolder(fold(domain.initial_state(),
                            promoted("production", POLICY, "rl"), promoted("encoders", ENCODER, "mntp"),
                            profile("assistant", "production", POLICY), profile("search", "encoders", ENCODER),
                            profile("fresh", "staging", None)))


@pytest.fixture
def pool():
    return FakePool()


@pytest.fixture
def settings(tmp_path):
    return Settings.from_env().with_(var_dir=tmp_path, api_host="127.0.0.1", api_token=None)


def make_client(settings, states, pool, limits=None, metrics=None):
    app = create_app(settings, states, pool, limits or RequestLimits(max_tokens=32, timeout_s=5), metrics)
    return TestClient(app)


@pytest.fixture
def client(settings, states, pool):
    with make_client(settings, states, pool) as test_client:
        yield test_client


def openai_client(test_client: TestClient, api_key: str = "not-needed"):
    """The official client, its HTTP requests handed to the TestClient (whichever httpx flavour it uses)."""
    openai = pytest.importorskip("openai")
    openai_http = sys.modules["openai._client"]  # the HTTP library it was built on: httpx, or httpx2 since 3.x
    http = getattr(openai_http, "httpx2", None) or openai_http.httpx

    def handler(request):
        answer = test_client.request(request.method, str(request.url), headers=dict(request.headers),
                                     content=request.read())
        headers = [(k, v) for k, v in answer.headers.multi_items() if k not in ("content-length", "content-encoding")]
        return http.Response(answer.status_code, headers=headers, content=answer.content)

    return openai.OpenAI(base_url="http://testserver/v1", api_key=api_key, max_retries=0,
                         http_client=http.Client(transport=http.MockTransport(handler)))


def sse(text: str) -> list:
    lines = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


# --- through the openai client --------------------------------------------------------------------


def test_a_chat_completion_is_answered_by_the_profile_adapter_with_its_persona(client, pool):
    ai = openai_client(client)

    answer = ai.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "say hello"}])

    assert answer.object == "chat.completion" and answer.model == "assistant"
    assert answer.choices[0].message.content == "[ffff] say hello assistant:" and answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == 4
    assert answer.neurons == {"adapter_sha256": POLICY, "adapter_kind": "rl", "profile": "assistant",
                              "profile_version": 1, "channel": "production"}
    [(_, sha, prompt, max_tokens)] = [c for c in pool.calls if c[0] == "generate"]
    assert sha == POLICY and max_tokens == 32  # the cap, when the request names none
    assert prompt.startswith("system: You are the assistant of the profile 'assistant'.")
    assert prompt.endswith("user: say hello\nassistant:")


def test_a_chat_completion_streams_as_openai_streams(client):
    ai = openai_client(client)

    chunks = list(ai.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "say hi"}],
                                             stream=True, stream_options={"include_usage": True}))

    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "[ffff] say hi assistant:"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert {c.neurons["adapter_sha256"] for c in chunks} == {POLICY}


def test_embeddings_come_from_the_encoder_in_either_encoding(client, pool):
    ai = openai_client(client)

    answer = ai.embeddings.create(model="search", input=["one text", "two"])  # the client asks for base64

    assert [d.embedding for d in answer.data] == [[8.0, 0.0, 0.25], [3.0, 1.0, 0.25]]
    assert answer.usage.prompt_tokens == 3 and answer.neurons["adapter_sha256"] == ENCODER
    raw = client.post("/v1/embeddings", json={"model": "search", "input": "alone"}).json()
    assert raw["object"] == "list" and raw["data"] == [{"object": "embedding", "index": 0,
                                                       "embedding": [5.0, 0.0, 0.25]}]
    assert raw["usage"] == {"prompt_tokens": 1, "total_tokens": 1} and raw["model"] == "search"


def test_the_model_list_names_profiles_and_channels(client):
    ai = openai_client(client)

    listed = ai.models.list()

    assert [m.id for m in listed.data] == ["assistant", "fresh", "search", "channel:encoders",
                                           "channel:production", "channel:staging"]
    assert all(m.owned_by == "neurons" for m in listed.data)
    assert ai.models.retrieve("channel:production").neurons["adapter_sha256"] == POLICY


def test_an_unknown_profile_is_an_openai_not_found_error(client):
    openai = pytest.importorskip("openai")
    ai = openai_client(client)

    with pytest.raises(openai.NotFoundError) as refused:
        ai.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "hi"}])

    assert refused.value.code == "model_not_found" and refused.value.param == "model"
    assert refused.value.type == "invalid_request_error"


def test_a_kind_mismatch_is_an_openai_bad_request(client, pool):
    openai = pytest.importorskip("openai")
    ai = openai_client(client)

    with pytest.raises(openai.BadRequestError) as refused:
        ai.chat.completions.create(model="search", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.code == "adapter_kind_mismatch" and "encoder" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        ai.embeddings.create(model="assistant", input="text")
    assert refused.value.code == "adapter_kind_mismatch"
    assert not [c for c in pool.calls if c[0] in ("generate", "embed")]  # refused before the model


def test_headers_name_the_adapter_and_the_profile_version(client):
    ai = openai_client(client)

    raw = ai.chat.completions.with_raw_response.create(model="assistant",
                                                       messages=[{"role": "user", "content": "hi"}])

    assert raw.headers["x-neurons-adapter-sha256"] == POLICY and raw.headers["x-neurons-profile-version"] == "1"
    channel = client.post("/v1/completions", json={"model": "channel:production", "prompt": "go"})
    assert channel.headers["x-neurons-adapter-sha256"] == POLICY and "x-neurons-profile-version" not in channel.headers
    base = client.post("/v1/embeddings", json={"model": "fresh", "input": "x"})
    assert base.status_code == 200 and base.headers["x-neurons-adapter-sha256"] == "base"
    assert base.json()["neurons"]["adapter_sha256"] is None


def test_the_token_is_the_openai_api_key(settings, states, pool):
    openai = pytest.importorskip("openai")
    with make_client(settings.with_(api_token="s3cret"), states, pool) as test_client:
        assert test_client.get("/v1/models").status_code == 401
        assert openai_client(test_client, api_key="s3cret").models.list().data
        with pytest.raises(openai.AuthenticationError):
            openai_client(test_client, api_key="wrong").models.list()
    assert binding_problem("0.0.0.0", None) and binding_problem("0.0.0.0", "t") is None
    with pytest.raises(ValueError):
        create_app(settings.with_(serving_host="0.0.0.0"), states, pool)


# --- the route is fixed when the request starts ------------------------------------------------------


def test_a_promotion_during_a_request_serves_the_next_request(client, states, pool):
    def promotion_lands():
        states.state = fold(states.state, promoted("production", NEWER, "rl"),
                            adapter_updated("assistant", "production", NEWER))
    pool.during_generation = promotion_lands

    first = client.post("/v1/chat/completions", json={"model": "assistant",
                                                      "messages": [{"role": "user", "content": "hi"}]})
    pool.during_generation = None
    second = client.post("/v1/chat/completions", json={"model": "assistant",
                                                       "messages": [{"role": "user", "content": "hi"}]})

    assert first.json()["neurons"]["adapter_sha256"] == POLICY == first.headers["x-neurons-adapter-sha256"]
    assert first.json()["choices"][0]["message"]["content"].startswith("[ffff]")
    assert second.json()["neurons"]["adapter_sha256"] == NEWER
    assert [c[1] for c in pool.calls if c[0] == "generate"] == [POLICY, NEWER]


def test_a_stream_keeps_its_adapter_through_a_swap(client, states, pool):
    pool.during_generation = lambda: setattr(states, "state", fold(
        states.state, adapter_updated("assistant", "production", NEWER)))
    body = {"model": "assistant", "prompt": "count to three", "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as answer:
        events = sse(answer.read().decode())

    assert events[-1] == "[DONE]"
    assert {e["neurons"]["adapter_sha256"] for e in events[:-1]} == {POLICY}
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "[ffff] count to three"
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert route_of(states.state, "assistant").adapter_sha256 == NEWER and states.reads == 1


# --- bounds and failures --------------------------------------------------------------------------------


def test_a_full_queue_is_429_at_once(settings, states, pool):
    pool.release = threading.Event()
    limits = RequestLimits(max_tokens=8, timeout_s=10, queue=0, concurrency=1)
    with make_client(settings, states, pool, limits) as test_client:
        body = {"model": "assistant", "messages": [{"role": "user", "content": "hi"}]}
        answers = []
        worker = threading.Thread(target=lambda: answers.append(test_client.post("/v1/chat/completions", json=body)))
        worker.start()
        assert pool.entered.wait(5)
        busy = test_client.post("/v1/chat/completions", json=body)
        status = test_client.get("/status").json()
        pool.release.set()
        worker.join(10)

    assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
    assert busy.headers["retry-after"] == "1"
    assert (status["running"], status["waiting"]) == (1, 0)
    assert answers[0].status_code == 200


def test_a_request_past_its_timeout_is_504_and_keeps_its_slot_until_the_model_is_done(settings, states, pool):
    pool.release = threading.Event()
    with make_client(settings, states, pool, RequestLimits(timeout_s=0.2, queue=0)) as test_client:
        late = test_client.post("/v1/completions", json={"model": "assistant", "prompt": "slow"})
        still = test_client.get("/status").json()["running"]
        pool.release.set()
        deadline = time.monotonic() + 5
        while test_client.get("/status").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        after = test_client.post("/v1/completions", json={"model": "assistant", "prompt": "quick"})

    assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
    assert still == 1 and after.status_code == 200


def test_an_adapter_that_cannot_be_loaded_is_503_with_the_reason(client, pool):
    pool.unavailable[POLICY] = "adapter_model.safetensors does not hash to its name"

    answer = client.post("/v1/chat/completions", json={"model": "assistant",
                                                       "messages": [{"role": "user", "content": "hi"}]})

    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "adapter_unavailable"
    assert "does not hash to its name" in answer.json()["error"]["message"]
    assert answer.headers["x-neurons-adapter-sha256"] == POLICY


def test_a_stream_whose_adapter_cannot_be_loaded_is_refused_before_the_first_byte(client, pool):
    pool.unavailable[POLICY] = "not signed"

    answer = client.post("/v1/completions", json={"model": "assistant", "prompt": "x", "stream": True})

    assert answer.status_code == 503 and answer.json()["error"]["code"] == "adapter_unavailable"


def test_the_kind_of_an_adapter_no_event_named_is_asked_of_the_pool(client, states, pool):
    states.state = fold(states.state, profile("late", "later", UNNAMED))  # its promotion not seen yet

    answer = client.post("/v1/completions", json={"model": "late", "prompt": "x"})
    refused = client.post("/v1/embeddings", json={"model": "late", "input": "x"})

    assert answer.status_code == 200 and answer.json()["neurons"]["adapter_kind"] == "rl"
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "adapter_kind_mismatch"


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "invalid_json"),
    (b'{"model": "assistant", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 33}', 400,
     "invalid_max_tokens"),
    (b'{"model": "assistant", "messages": []}', 400, "empty_input"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "missing_model"),
    (b'{"model": "assistant", "messages": [{"role": "user", "content": "' + b"x" * 40_000 + b'"}]}', 413,
     "input_too_large"),
])
def test_client_mistakes_are_4xx_in_openai_shape(client, body, status, code):
    answer = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})

    assert answer.status_code == status
    assert answer.json()["error"]["code"] == code and set(answer.json()["error"]) == {"message", "type", "param",
                                                                                      "code"}


def test_unknown_paths_answer_in_openai_shape_too(client):
    answer = client.get("/v1/engines")

    assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"


def test_metrics_count_requests_errors_and_tokens_per_profile_and_adapter(settings, states, pool):
    metrics = ServingMetrics()
    with make_client(settings, states, pool, metrics=metrics) as test_client:
        for _ in range(2):
            test_client.post("/v1/chat/completions", json={"model": "assistant",
                                                           "messages": [{"role": "user", "content": "hi"}]})
        test_client.post("/v1/embeddings", json={"model": "assistant", "input": "x"})
        test_client.post("/v1/embeddings", json={"model": "nobody", "input": "x"})
        text = test_client.get("/metrics").text

    assistant = metrics.read({"profile": "assistant", "adapter": POLICY})
    assert assistant["neurons_serving_requests_total"] == 3
    assert assistant["neurons_serving_completion_tokens_total"] == 8
    assert assistant["neurons_serving_errors_total"] == 1
    assert assistant["neurons_serving_time_to_first_token_seconds_count"] == 2
    assert assistant["neurons_serving_tokens_per_second"] == 8.0  # 4 tokens in 0.5 s
    assert "# TYPE neurons_serving_requests_total counter" in text
    assert (f'neurons_serving_requests_total{{adapter="{POLICY}",channel="production",'
            'endpoint="/v1/chat/completions",profile="assistant",service="serving",status="200"} 2.0') in text
    assert assistant["neurons_serving_request_duration_seconds_count"] == 3
    assert 'code="model_not_found"' in text and 'le="+Inf"' in text


def test_a_fault_of_the_model_is_a_500_in_openai_shape_and_an_untokenizable_text_a_400(client, pool):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert")

    def no_tokens(sha, texts):
        raise ValueError("text 0 has no token")

    pool.generate, pool.embed = broken, no_tokens

    failed = client.post("/v1/completions", json={"model": "assistant", "prompt": "x"})
    untokenizable = client.post("/v1/embeddings", json={"model": "search", "input": "\u200b"})

    assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
    assert "CUDA" not in failed.json()["error"]["message"]  # the detail stays in the serving log
    assert untokenizable.status_code == 400 and untokenizable.json()["error"]["code"] == "invalid_input"


def test_a_stream_that_fails_midway_ends_with_an_error_event(client, pool):
    def failing(sha, prompt, **kwargs):
        def pieces():
            yield "first"
            raise RuntimeError("out of memory")
        return pieces()

    pool.stream = failing

    answer = client.post("/v1/completions", json={"model": "assistant", "prompt": "x", "stream": True})

    events = sse(answer.text)
    assert answer.status_code == 200 and events[1]["choices"][0]["text"] == "first"
    assert events[-1]["error"]["code"] == "server_error" and "[DONE]" not in events

"""The serving pool: signed adapters made resident on one base model, evicted least recently used first,
refused when tampered with; generation, streaming and embeddings with the right adapter active."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from services.serving.pool import AdapterPool, AdapterUnavailable, Generation  # noqa: E402
from shared.adapter_signing import sign_adapter  # noqa: E402
from shared.artefacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SUMMARY, ArtefactStore  # noqa: E402
from shared.keys import ensure_service_keys, model_signing_key_path  # noqa: E402
from shared.ml import load_model  # noqa: E402
from shared.ml.encoder import embed_texts  # noqa: E402
from shared.ml.lora import save_adapter  # noqa: E402
from shared.settings import Settings  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
PROMPT = "The weather today is"


@pytest.fixture(scope="module")
def model_folder() -> Path:
    """The tiny model's folder, built once in the cache the trainer's tests share."""
    cache = Path(os.environ.get("NEURONS_TEST_MODEL_CACHE", REPO / "var" / "models"))
    cache.mkdir(parents=True, exist_ok=True)
    load_model("tiny", cache)
    return cache / "tiny"


@pytest.fixture(scope="module")
def settings(tmp_path_factory, model_folder) -> Settings:
    var = tmp_path_factory.mktemp("var")
    keys = var / "keys"
    settings = Settings.from_env().with_(var_dir=var, trust_path=keys / "trust.json", service_key_dir=keys / "services",
                                         service_key=None, operator_key_dir=keys / "operators", trace_file=None,
                                         otlp_endpoint=None, artefact_remote=None, model="tiny")
    settings.model_cache_dir.mkdir(parents=True)
    (settings.model_cache_dir / "tiny").symlink_to(model_folder)  # the node's model cache, without a rebuild
    ensure_service_keys(settings)  # the adapter-signing key among them, anchored in the trust file
    return settings


def _store_lora(settings: Settings, seed: int, kind: str | None, scratch: Path) -> str:
    """A LoRA with seeded non-zero weights, stored and signed as the trainer stores it; its sha256."""
    model = load_model("tiny", settings.model_cache_dir).model
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    lora = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    folder = scratch / f"adapter-{seed}"
    save_adapter(lora, folder)
    (folder / SUMMARY).write_text(json.dumps({"kind": kind} if kind else {}))
    stored = ArtefactStore(settings.artefact_dir).put_adapter(
        folder, sign=lambda f: sign_adapter(f, model_signing_key_path(settings)))
    return stored.sha256


@pytest.fixture(scope="module")
def adapters(settings, tmp_path_factory) -> list[str]:
    scratch = tmp_path_factory.mktemp("adapters")
    kinds = ["mntp", "rl", "mntp", None]
    return [_store_lora(settings, seed, kind, scratch) for seed, kind in enumerate(kinds, start=1)]


def _pool(settings, capacity: int = 4) -> AdapterPool:
    return AdapterPool.load(settings, capacity=capacity)


def test_adapters_become_resident_once_and_say_their_kind(settings, adapters):
    pool = _pool(settings)
    a, b, _, unknown = adapters
    assert pool.ensure(None, None) == 0.0 and pool.resident() == []
    assert pool.ensure(a, f"artefact://sha256/{a}") > 0.0
    assert pool.ensure(a, None) == 0.0
    pool.ensure(b, None)
    assert pool.resident() == [a, b]
    assert (pool.kind_of(a), pool.kind_of(b), pool.kind_of(None), pool.kind_of(unknown)) == ("mntp", "rl", None, None)
    assert pool.resident() == [a, b]  # asking for a kind loads nothing
    status = pool.status()
    assert [r["adapter_sha256"] for r in status["resident"]] == [a, b] and status["loads"] == 2
    assert status["base_model"] == "tiny" and status["capacity"] == 4


def test_least_recently_used_adapter_is_evicted(settings, adapters):
    pool = _pool(settings, capacity=2)
    a, b, c, _ = adapters
    pool.ensure(a, None)
    pool.ensure(b, None)
    pool.ensure(a, None)  # a used again: b is now the least recently used
    pool.ensure(c, None)
    assert pool.resident() == [a, c]
    assert sorted(pool.model.peft_config) == sorted([f"a{a}", f"a{c}"])
    assert pool.ensure(b, None) > 0.0  # loaded again
    assert pool.resident() == [c, b] and pool.status()["evictions"] == 2


def test_adapter_in_use_is_not_evicted(settings, adapters):
    pool = _pool(settings, capacity=1)
    a, b, _, _ = adapters
    pool.ensure(a, None)
    pool._pin(a)  # a request waiting with a
    pool.ensure(b, None)
    assert pool.resident() == [a, b]  # over capacity while a is held
    pool._unpin(a)
    assert pool.resident() == [b]


def test_tampered_adapter_is_refused_and_changes_nothing(settings, adapters):
    pool = _pool(settings)
    a, b, c, unknown = adapters
    pool.ensure(a, None)
    before = pool.resident()
    config = settings.artefact_dir / c / ADAPTER_CONFIG
    original = config.read_bytes()
    config.write_bytes(original.replace(b'"r": 4', b'"r": 5'))
    try:
        with pytest.raises(AdapterUnavailable, match=ADAPTER_CONFIG.replace(".", r"\.")) as refused:
            pool.ensure(c, None)
        assert "modified" in refused.value.reason
        with pytest.raises(AdapterUnavailable):
            pool.generate(c, PROMPT, max_tokens=2)
    finally:
        config.write_bytes(original)
    weights = settings.artefact_dir / unknown / ADAPTER_WEIGHTS
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        with pytest.raises(AdapterUnavailable, match=ADAPTER_WEIGHTS.replace(".", r"\.")):
            pool.ensure(unknown, None)
    finally:
        weights.write_bytes(original)
    with pytest.raises(AdapterUnavailable, match="not in the artefact store"):
        pool.ensure("0" * 64, None)
    with pytest.raises(AdapterUnavailable, match="names another artefact"):
        pool.ensure(b, f"artefact://sha256/{a}")
    assert pool.resident() == before and sorted(pool.model.peft_config) == [f"a{a}"]
    assert pool.status()["refused"] == 5
    assert pool.ensure(c, None) > 0.0  # intact again: it loads


def test_generate_honours_max_tokens_and_streams_the_same_text(settings, adapters):
    pool = _pool(settings)
    a = adapters[0]
    result = pool.generate(a, PROMPT, max_tokens=5)
    assert isinstance(result, Generation) and result.adapter_sha256 == a
    assert result.prompt_tokens == len(pool.tokenizer(PROMPT)["input_ids"])
    assert 0 < result.completion_tokens <= 5
    assert result.finish_reason == ("length" if result.completion_tokens == 5 else "stop")
    assert 0.0 <= result.first_token_s <= result.seconds
    assert pool.generate(a, PROMPT, max_tokens=1).completion_tokens == 1
    assert pool.generate(a, PROMPT, max_tokens=0).text == ""

    stream = pool.stream(a, PROMPT, max_tokens=5)
    pieces = list(stream)
    assert "".join(pieces) == stream.generation.text == result.text
    assert stream.generation.completion_tokens == result.completion_tokens


def test_stop_strings_end_the_text_before_them(settings, adapters):
    pool = _pool(settings)
    a = adapters[0]
    full = pool.generate(a, PROMPT, max_tokens=12).text
    # a stop string from the second half of the text, where it occurs for the first time
    starts = [i for i in range(len(full) // 2, len(full) - 2)
              if "\ufffd" not in full[: i + 2] and full.find(full[i : i + 2]) == i]
    if not starts:
        pytest.skip("the tiny model's continuation has no plain text to stop on")
    stop = full[starts[0] : starts[0] + 2]
    cut = pool.generate(a, PROMPT, max_tokens=12, stop=["never in the text", stop])
    assert cut.text == full[: starts[0]] and cut.text and cut.finish_reason == "stop"
    assert cut.completion_tokens <= 12
    streamed = pool.stream(a, PROMPT, max_tokens=12, stop=[stop])
    assert "".join(streamed) == cut.text and streamed.generation.text == cut.text


def test_concurrent_requests_with_different_adapters_match_sequential_runs(settings, adapters):
    pool = _pool(settings)
    shas = [adapters[0], adapters[1], None]
    for sha in shas:
        pool.ensure(sha, None)
    expected = {sha: pool.generate(sha, PROMPT, max_tokens=6).text for sha in shas}
    assert len(set(expected.values())) == 3  # each adapter answers its own way
    results: dict[tuple[int, int], str] = {}
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            for round_ in range(3):
                sha = shas[(index + round_) % 3]
                if round_ == 1:
                    results[index, round_] = "".join(pool.stream(sha, PROMPT, max_tokens=6))
                else:
                    results[index, round_] = pool.generate(sha, PROMPT, max_tokens=6).text
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert results == {(i, r): expected[shas[(i + r) % 3]] for i in range(3) for r in range(3)}


def test_pool_embeddings_are_the_encoders(settings, adapters):
    pool = _pool(settings)
    a, b, _, _ = adapters
    pool.ensure(b, None)
    pool.ensure(a, None)
    texts = ["an embedding request", "and a second, somewhat longer, text to embed"]
    vectors, tokens = pool.embed(a, texts)

    loaded = load_model("tiny", settings.model_cache_dir)
    reference = peft.PeftModel.from_pretrained(loaded.model, str(settings.artefact_dir / a))
    expected, expected_tokens = embed_texts(reference, loaded.tokenizer, texts)
    assert tokens == expected_tokens
    assert torch.allclose(torch.tensor(vectors), torch.tensor(expected), atol=1e-5)
    base_vectors, _ = pool.embed(None, texts)
    plain = load_model("tiny", settings.model_cache_dir)
    assert torch.allclose(torch.tensor(base_vectors),
                          torch.tensor(embed_texts(plain.model, plain.tokenizer, texts)[0]), atol=1e-5)
    assert not torch.allclose(torch.tensor(base_vectors), torch.tensor(vectors), atol=1e-4)


def test_chat_prompt_uses_the_template_or_plain_roles(settings):
    pool = _pool(settings)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    templated = pool.chat_prompt(messages)
    assert "Be brief." in templated and "Hi" in templated and templated.rstrip().endswith("assistant")
    pool.tokenizer.chat_template = None
    assert pool.chat_prompt(messages) == "system: Be brief.\nuser: Hi\nassistant:"


def test_a_closed_stream_stops_and_frees_the_model(settings, adapters):
    pool = _pool(settings)
    a = adapters[0]
    stream = pool.stream(a, PROMPT, max_tokens=200)
    next(iter(stream), None)
    stream.close()
    done = threading.Event()
    threading.Thread(target=lambda: (pool.generate(a, PROMPT, max_tokens=1), done.set()), daemon=True).start()
    assert done.wait(60)  # the closed stream let go of the model
    status = pool.status()
    assert status["in_use"] == {} and not status["busy"]

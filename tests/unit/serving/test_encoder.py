"""The encoder: an MNTP adapter (or the base model) embeds text with bidirectional attention, mean-pooled."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from shared.ml import MntpConfig, load_model, train_mntp  # noqa: E402
from shared.ml.encoder import embed_texts, last_hidden_states  # noqa: E402
from shared.ml.mntp import logits_at  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
TEXTS = [f"Sentence number {i} talks about the {w} that sat on the mat." for i, w in
         enumerate(["cat", "dog", "bird", "fish", "mouse", "horse", "cow", "goat"])]


@pytest.fixture(scope="module")
def model_cache() -> Path:
    # the tiny model's cache is shared across runs, as the trainer's tests share it
    path = Path(os.environ.get("NEURONS_TEST_MODEL_CACHE", REPO / "var" / "models"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def mntp_adapter(model_cache, tmp_path_factory) -> Path:
    """A real MNTP adapter: two steps on the tiny model."""
    config = MntpConfig(model="tiny", steps=2, batch_size=4, max_length=32, learning_rate=5e-2, warmup_steps=1,
                        progress_every=1, checkpoint_every=0, seed=3, device="cpu", precision="float32")
    return train_mntp(config, TEXTS, tmp_path_factory.mktemp("mntp"), model_cache).adapter_dir


def _tokens(tokenizer, texts):
    rows = tokenizer(texts)["input_ids"]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()
    return ids, mask


def test_base_and_mntp_adapter_embed_differently(model_cache, mntp_adapter):
    base = load_model("tiny", model_cache)
    texts = TEXTS[:3]
    base_vectors, base_tokens = embed_texts(base.model, base.tokenizer, texts)
    adapted = peft.PeftModel.from_pretrained(load_model("tiny", model_cache).model, str(mntp_adapter))
    vectors, tokens = embed_texts(adapted, base.tokenizer, texts)

    assert tokens == base_tokens == sum(len(ids) for ids in base.tokenizer(texts)["input_ids"])
    assert len(vectors) == 3 and all(len(v) == base.model.config.hidden_size for v in vectors)
    assert max(abs(a - b) for v, w in zip(vectors, base_vectors) for a, b in zip(v, w)) > 1e-4
    with adapted.disable_adapter():  # the adapter off: the base model's vectors again
        again, _ = embed_texts(adapted, base.tokenizer, texts)
    assert torch.allclose(torch.tensor(again), torch.tensor(base_vectors), atol=1e-5)


def test_embedding_is_deterministic_mean_pooled_and_independent_of_its_batch(model_cache, mntp_adapter):
    loaded = load_model("tiny", model_cache)
    model = peft.PeftModel.from_pretrained(loaded.model, str(mntp_adapter))
    model.train()
    alone, _ = embed_texts(model, loaded.tokenizer, ["a short one"])
    batched, _ = embed_texts(model, loaded.tokenizer, [TEXTS[0] + " " + TEXTS[1], "a short one"], batch_size=2)
    assert model.training  # the caller's mode is restored
    assert torch.allclose(torch.tensor(alone[0]), torch.tensor(batched[1]), atol=1e-5)
    assert embed_texts(model, loaded.tokenizer, ["a short one"])[0] == alone

    ids, mask = _tokens(loaded.tokenizer, ["a short one"])
    with torch.no_grad():
        model.eval()
        hidden = last_hidden_states(model, ids, mask)
    assert torch.allclose(hidden[0].mean(dim=0), torch.tensor(alone[0]), atol=1e-5)


def test_attention_is_bidirectional(model_cache):
    loaded = load_model("tiny", model_cache)
    model = loaded.model.eval()
    ids, mask = _tokens(loaded.tokenizer, ["The cat sat on the mat", "The dog ran far away"])
    assert ids[0, 0] == ids[1, 0]  # the same first token, different words after it
    with torch.no_grad():
        hidden = last_hidden_states(model, ids, mask)
        causal = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    assert not torch.allclose(hidden[0, 0], hidden[1, 0], atol=1e-4)  # the first token sees what follows
    assert torch.allclose(causal[0, 0], causal[1, 0], atol=1e-5)  # the causal model's does not


def test_encoder_runs_the_model_as_mntp_training_does(model_cache, mntp_adapter):
    loaded = load_model("tiny", model_cache)
    model = peft.PeftModel.from_pretrained(loaded.model, str(mntp_adapter)).eval()
    ids, mask = _tokens(loaded.tokenizer, TEXTS[:2] + ["short"])
    positions = torch.arange(ids.numel())
    with torch.no_grad():
        hidden = last_hidden_states(model, ids, mask)
        head = model.get_base_model().get_output_embeddings()
        trained = logits_at(model, ids, mask, positions)
    assert torch.allclose(head(hidden.flatten(0, 1)), trained, atol=1e-5)


def test_truncation_and_empty_texts(model_cache):
    loaded = load_model("tiny", model_cache)
    vectors, tokens = embed_texts(loaded.model, loaded.tokenizer, [TEXTS[0]], max_length=4)
    assert tokens == 4 and len(vectors) == 1
    assert embed_texts(loaded.model, loaded.tokenizer, []) == ([], 0)
    with pytest.raises(ValueError, match="text 1 has no token"):
        embed_texts(loaded.model, loaded.tokenizer, ["fine", ""])

"""Base models load offline, are cached, and the tiny one is the same everywhere."""

from __future__ import annotations

import json

import pytest

from shared.ml.models import MODEL_INFO, architecture, load_model, mask_token_id
from shared.artefacts import file_sha256


def test_tiny_model_is_identical_when_rebuilt(model_cache, tmp_path):
    cached = load_model("tiny", model_cache)
    # Reuse the cached SmolLM2 tokenizer when present; the weights are rebuilt from the seed.
    (tmp_path / "smollm2").symlink_to(model_cache / "smollm2") if (model_cache / "smollm2").exists() else None
    rebuilt = load_model("tiny", tmp_path)
    assert rebuilt.info["checksum"] == cached.info["checksum"]
    assert file_sha256(tmp_path / "tiny" / "model.safetensors") == cached.info["checksum"]
    assert 1_000_000 < cached.info["num_parameters"] < 10_000_000
    assert json.loads((tmp_path / "tiny" / MODEL_INFO).read_text())["name"] == "tiny"


def test_mask_token_is_the_underscore(model_cache):
    loaded = load_model("tiny", model_cache)
    tokenizer = loaded.tokenizer
    assert tokenizer.mask_token is None
    mask = mask_token_id(tokenizer)
    assert tokenizer.convert_ids_to_tokens(mask) == "_"
    assert tokenizer.pad_token_id is not None


def test_local_folder_spec_uses_the_folder(model_cache):
    folder = model_cache / "tiny"
    loaded = load_model(str(folder), model_cache)
    assert loaded.info["checksum"] == load_model("tiny", model_cache).info["checksum"]
    assert architecture(str(folder))["hidden_size"] == architecture("tiny")["hidden_size"]


def test_training_keeps_freed_buffers_where_the_allocator_is_glibc():
    import platform

    from shared.ml.models import keep_freed_memory, torch_threads

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    with torch_threads("tiny") as threads:
        assert threads == 1
    # torch_threads applied it; a second call finds it applied and says so
    assert keep_freed_memory() is True

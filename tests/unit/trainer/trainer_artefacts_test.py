"""The content-addressed artefact store on its local backend."""

from __future__ import annotations

import json

import pytest

from shared.artefacts import (
    ArtefactCorrupted,
    ArtefactError,
    ArtefactNotFound,
    ArtefactStore,
    file_sha256,
    sha256_from_uri,
    uri_for,
)


def _adapter(folder, weights=b"weights-1"):
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "training_summary.json").write_text(json.dumps({"status": "trained", "energy": None}))
    return folder


def test_an_adapter_is_stored_under_the_sha256_of_its_weights(tmp_path):
    store = ArtefactStore(tmp_path / "store")
    source = _adapter(tmp_path / "run")
    stored = store.put_adapter(source, {"energy": {"joules": 42.0}})

    assert stored.sha256 == file_sha256(source / "adapter_model.safetensors")
    assert stored.uri == f"artefact://sha256/{stored.sha256}" and sha256_from_uri(stored.uri) == stored.sha256
    assert stored.path == tmp_path / "store" / stored.sha256
    assert sorted(p.name for p in stored.path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "training_summary.json"]
    summary = store.summary(stored.sha256)
    assert summary["energy"] == {"joules": 42.0} and summary["adapter_sha256"] == stored.sha256
    assert store.get(stored.uri) == stored.path and store.verify(stored.sha256)


def test_stored_artefacts_are_immutable(tmp_path):
    store = ArtefactStore(tmp_path / "store")
    first = store.put_adapter(_adapter(tmp_path / "a"), {"energy": {"joules": 1.0}})
    again = store.put_adapter(_adapter(tmp_path / "b"), {"energy": {"joules": 2.0}})
    assert again == first
    assert store.summary(first.sha256)["energy"] == {"joules": 1.0}


def test_corruption_is_detected_on_read(tmp_path):
    store = ArtefactStore(tmp_path / "store")
    stored = store.put_adapter(_adapter(tmp_path / "run"))
    (stored.path / "adapter_model.safetensors").write_bytes(b"tampered")
    assert not store.verify(stored.sha256)
    with pytest.raises(ArtefactCorrupted):
        store.get(stored.sha256)


def test_blobs_are_stored_by_content(tmp_path):
    store = ArtefactStore(tmp_path / "store")
    sha, uri = store.put_file(b"raw validation data", "samples.jsonl")
    path = store.get(uri)
    assert path.name == "samples.jsonl" and path.read_bytes() == b"raw validation data"
    assert path.parent == tmp_path / "store" / "blobs" / sha
    source = tmp_path / "report.json"
    source.write_text("{}")
    assert store.put_file(source, "report.json") == (file_sha256(source), uri_for(file_sha256(source)))
    assert store.put_file(b"raw validation data", "other-name.jsonl") == (sha, uri)


def test_missing_and_malformed_names(tmp_path):
    store = ArtefactStore(tmp_path / "store")
    missing = "0" * 64
    assert not store.exists(missing) and not store.verify(missing)
    with pytest.raises(ArtefactNotFound):
        store.get(missing)
    with pytest.raises(ValueError):
        store.get("not-a-digest")
    with pytest.raises(ValueError):
        sha256_from_uri("s3://bucket/x")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    with pytest.raises(ArtefactError):
        store.put_adapter(tmp_path / "half")

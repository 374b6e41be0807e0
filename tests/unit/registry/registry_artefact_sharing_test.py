"""Artefacts shared between nodes through an fsspec store: fetched by sha256, checked, kept."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from shared.artefacts import (
    ADAPTER_WEIGHTS,
    ArtefactCorrupted,
    ArtefactNotFound,
    ArtefactStore,
    SharedArtefacts,
    remote_store,
)


def adapter_folder(root: Path, seed: int) -> Path:
    folder = root / f"adapter-{seed}"
    folder.mkdir(parents=True)
    (folder / ADAPTER_WEIGHTS).write_bytes(bytes([seed]) * 4096)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "seed": seed}))
    (folder / "training_summary.json").write_text(json.dumps({"status": "trained"}))
    return folder


def node(tmp_path: Path, name: str, shared_url: str) -> SharedArtefacts:
    return SharedArtefacts(ArtefactStore(tmp_path / name / "artefacts"),
                           remote_store(shared_url, tmp_path / name / "cache"))


@pytest.fixture(params=["file", "memory"])
def shared_url(request, tmp_path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'shared-store'}"
    return f"memory://neurons-{uuid.uuid4().hex[:8]}/artefacts"


def test_a_node_fetches_what_it_lacks_by_sha256_and_checks_it(tmp_path, shared_url):
    node_a, node_b = node(tmp_path, "a", shared_url), node(tmp_path, "b", shared_url)
    stored = node_a.local.put_adapter(adapter_folder(tmp_path, 7))
    assert not node_b.local.exists(stored.sha256)

    node_a.share(stored.uri)
    folder = node_b.get(stored.uri)

    assert folder.is_relative_to(tmp_path / "b" / "artefacts")
    assert (folder / ADAPTER_WEIGHTS).read_bytes() == bytes([7]) * 4096
    assert json.loads((folder / "adapter_config.json").read_text())["seed"] == 7
    assert node_b.local.verify(stored.sha256)


def test_blobs_travel_too(tmp_path, shared_url):
    node_a, node_b = node(tmp_path, "a", shared_url), node(tmp_path, "b", shared_url)
    sha, uri = node_a.local.put_file(b"raw soak data", "raw.jsonl")

    node_a.share(uri)

    assert node_b.get(sha).read_bytes() == b"raw soak data"


def test_a_corrupted_shared_copy_is_refused(tmp_path):
    shared = tmp_path / "shared-store"
    node_a, node_b = node(tmp_path, "a", f"file://{shared}"), node(tmp_path, "b", f"file://{shared}")
    stored = node_a.local.put_adapter(adapter_folder(tmp_path, 9))
    node_a.share(stored.sha256)
    (shared / stored.sha256 / ADAPTER_WEIGHTS).write_bytes(b"tampered")

    with pytest.raises(ArtefactCorrupted):
        node_b.get(stored.sha256)
    assert not node_b.local.exists(stored.sha256)


def test_an_artefact_nobody_has_is_not_found(tmp_path, shared_url):
    with pytest.raises(ArtefactNotFound):
        node(tmp_path, "b", shared_url).get("e" * 64)

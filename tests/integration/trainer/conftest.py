"""Fixtures of the trainer's ML tests: a shared model cache and offline training text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def model_cache() -> Path:
    # Shared across runs: converting SmolLM2 from GGUF takes ~20 s the first time.
    path = Path(os.environ.get("NEURONS_TEST_MODEL_CACHE", REPO / "var" / "models"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def texts(tmp_path_factory) -> list[str]:
    from shared.ml.datasets import build_demo_dataset, load_jsonl

    path = tmp_path_factory.mktemp("dataset") / "demo.jsonl"
    build_demo_dataset(path, records=48)
    return load_jsonl(path)


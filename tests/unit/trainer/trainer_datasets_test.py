"""The demo dataset and JSONL loading, with clear errors for bad lines."""

from __future__ import annotations

import json

import pytest

from shared.ml.datasets import DatasetError, build_demo_dataset, dataset_sha256, inspect_dataset, load_jsonl


def test_demo_dataset_is_deterministic_clean_prose(tmp_path):
    first = build_demo_dataset(tmp_path / "a.jsonl", records=40)
    second = build_demo_dataset(tmp_path / "b.jsonl", records=40)
    assert first["sha256"] == second["sha256"] == dataset_sha256(tmp_path / "a.jsonl")
    assert first["record_count"] == 40
    texts = load_jsonl(tmp_path / "a.jsonl")
    assert len(set(texts)) == 40
    for text in texts:
        assert 200 <= len(text) <= 1200
        assert ">>>" not in text and "\n" not in text
        assert text[0].isupper() and text[-1] in ".!?"


def test_inspect_counts_records_and_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "source": "x"}\n')
    assert inspect_dataset(path) == {"record_count": 2, "sha256": dataset_sha256(path)}
    assert load_jsonl(path) == ["one", "two"]


@pytest.mark.parametrize("line,message", [
    ("not json", "not JSON"),
    ('["text"]', "expected an object"),
    ('{"txt": "x"}', "'text' must be a string"),
    ('{"text": 5}', "'text' must be a string"),
    ('{"text": "   "}', "'text' is empty"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(DatasetError) as caught:
        load_jsonl(path)
    assert str(caught.value).startswith(f"{path}:2: ")
    assert message in str(caught.value)


def test_invalid_utf8_and_missing_files(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_jsonl(path)
    with pytest.raises(DatasetError, match="no such file"):
        inspect_dataset(tmp_path / "missing.jsonl")

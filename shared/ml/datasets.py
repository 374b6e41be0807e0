"""Training text as JSONL (one ``{"text": ...}`` object a line), and the demo dataset.

The demo dataset is built at run time from text every machine has offline: the
docstrings of the installed Python standard library, read from source with
``ast`` (nothing is imported), in sorted file order, so one Python version
always yields the same bytes.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import sysconfig
from pathlib import Path
from typing import Any, Iterator

from shared.artefacts import file_sha256

log = logging.getLogger("neurons.trainer.datasets")

# Packages whose docstrings are mostly tests, GUI glue or generated tables.
_SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages", "dist-packages", "__pycache__", "pydoc_data", "encodings"}
_WORD = re.compile(r"[A-Za-z]+")


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file and line."""


def load_jsonl(path: Path) -> list[str]:
    """The ``text`` of every record; blank lines are skipped, anything else malformed is an error."""
    return [text for _, text in _records(Path(path))]


def dataset_sha256(path: Path) -> str:
    return file_sha256(path)


def inspect_dataset(path: Path) -> dict[str, Any]:
    path = Path(path)
    count = sum(1 for _ in _records(path))
    return {"record_count": count, "sha256": dataset_sha256(path)}


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def build_demo_dataset(
    path: Path, records: int = 200, min_chars: int = 200, max_chars: int = 1200, stdlib_dir: Path | None = None
) -> dict[str, Any]:
    """Write ``records`` clean paragraphs from standard-library docstrings to ``path``."""
    texts: list[str] = []
    seen: set[str] = set()
    for paragraph in stdlib_paragraphs(stdlib_dir, min_chars, max_chars):
        if paragraph in seen:
            continue
        seen.add(paragraph)
        texts.append(paragraph)
        if len(texts) == records:
            break
    if len(texts) < records:
        raise DatasetError(f"the standard library yielded only {len(texts)} clean paragraphs, {records} asked")
    write_jsonl(path, texts)
    info = {"path": str(path), **inspect_dataset(path), "source": "python standard library docstrings"}
    log.info("built demo dataset %s: %d records, sha256 %s", path, info["record_count"], info["sha256"][:12])
    return info


def stdlib_paragraphs(stdlib_dir: Path | None = None, min_chars: int = 200, max_chars: int = 1200) -> Iterator[str]:
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    for source in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        if _SKIP_DIRS & set(source.relative_to(root).parts[:-1]) or source.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(source.read_bytes(), filename=str(source))
        except (SyntaxError, ValueError):
            continue
        for docstring in _docstrings(tree):
            yield from _paragraphs(docstring, min_chars, max_chars)


def _docstrings(tree: ast.AST) -> Iterator[str]:
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc:
            yield doc


def _paragraphs(docstring: str, min_chars: int, max_chars: int) -> Iterator[str]:
    """Prose paragraphs of a docstring, short neighbours joined until ``min_chars``."""
    pending = ""
    for block in re.split(r"\n\s*\n", docstring):
        text = " ".join(block.split())
        if not _is_prose(block, text):
            pending = ""
            continue
        pending = f"{pending} {text}".strip()
        if len(pending) >= min_chars:
            if len(pending) <= max_chars:
                yield pending
            pending = ""


def _is_prose(block: str, text: str) -> bool:
    if not text or ">>>" in block or "::" in block or "\t" in block:
        return False
    lines = block.strip().splitlines()
    # Indented continuation lines are parameter tables or code.
    if any(line.startswith("    ") for line in lines[1:]) and len(lines) > 1 and not all(line.startswith("    ") for line in lines):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    words = _WORD.findall(text)
    return (
        letters / len(text) > 0.9
        and len(words) >= 8
        and text[0].isupper()
        and text.rstrip()[-1] in ".!?"
        and text.isprintable()
    )


def _records(path: Path) -> Iterator[tuple[int, str]]:
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: not UTF-8 ({exc.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: not JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{path}:{lineno}: expected an object with a 'text' field, got {type(record).__name__}")
            text = record.get("text")
            if not isinstance(text, str):
                raise DatasetError(f"{path}:{lineno}: 'text' must be a string, got {type(text).__name__}")
            if not text.strip():
                raise DatasetError(f"{path}:{lineno}: 'text' is empty")
            yield lineno, text

"""What a promotion changed in what the model understands: nearest neighbours among held-out texts.

The demo embeds a few texts the cycle never trained on through the serving
API (the profile's adapter: an MNTP adapter is an encoder), before the
promotion and after it, and prints for each query text which other text is
nearest (cosine), with the adapter that gave each answer.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from shared.settings import Settings

QUERIES = 4
CANDIDATES = 8


def held_out_texts(settings: Settings, trained_records: int) -> list[str]:
    """Docstrings that follow the ``trained_records`` the demo dataset holds: the same source, never trained on."""
    from shared.ml import build_demo_dataset, load_jsonl

    path = settings.var_dir / "datasets" / "held-out.jsonl"
    build_demo_dataset(path, records=trained_records + QUERIES + CANDIDATES)
    texts = load_jsonl(path)[trained_records:]
    return texts[:QUERIES + CANDIDATES]


def wait_for_serving(settings: Settings, timeout_s: float = 180.0) -> bool:
    """Whether the serving API answers within ``timeout_s`` (it listens once its base model is loaded)."""
    import httpx

    from cli.chat_cmd import token_headers

    path = settings.run_dir / "serving-api.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            try:
                url = json.loads(path.read_text())["url"]
                if httpx.get(url + "/v1/models", headers=token_headers(), timeout=5.0).status_code == 200:
                    return True
            except (httpx.HTTPError, ValueError, KeyError):
                pass  # an address from an earlier run, or not listening yet
        time.sleep(1.0)
    return False


def nearest(settings: Settings, profile: str, texts: list[str]) -> dict[str, Any]:
    """Which candidate each query is nearest to, as the profile's adapter embeds them."""
    import httpx

    from cli.chat_cmd import serving_url, token_headers

    answer = httpx.post(serving_url(settings) + "/v1/embeddings", json={"model": profile, "input": texts},
                        headers=token_headers(), timeout=120.0)
    answer.raise_for_status()
    body = answer.json()
    vectors = [item["embedding"] for item in sorted(body["data"], key=lambda item: item["index"])]
    queries, candidates = vectors[:QUERIES], vectors[QUERIES:]
    picks = [max(range(len(candidates)), key=lambda j: _cosine(q, candidates[j])) for q in queries]
    return {"adapter_sha256": (body.get("neurons") or {}).get("adapter_sha256"), "nearest": picks}


def wait_for_adapter(settings: Settings, profile: str, sha: str, timeout_s: float = 120.0) -> bool:
    """Whether the serving API answers ``profile`` with adapter ``sha`` within ``timeout_s`` (it swaps once loaded)."""
    import httpx

    from cli.chat_cmd import serving_url, token_headers

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            models = httpx.get(serving_url(settings) + "/v1/models", headers=token_headers(), timeout=10.0).json()
            if any(m.get("id") == profile and (m.get("neurons") or {}).get("adapter_sha256") == sha
                   for m in models.get("data", ())):
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1.0)
    return False


def changes(texts: list[str], before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per query: its nearest text before and after, and whether it moved."""
    rows = []
    for i in range(QUERIES):
        was, now = before["nearest"][i], after["nearest"][i]
        rows.append({"query": _short(texts[i]), "before": _short(texts[QUERIES + was]),
                     "after": _short(texts[QUERIES + now]), "changed": was != now})
    return rows


def print_changes(rows: list[dict[str, Any]], before: dict[str, Any], after: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def adapter(view: dict[str, Any]) -> str:
        sha = view.get("adapter_sha256")
        return sha[:12] if sha else "base model"

    table = Table(title="nearest held-out text, embedded through the serving API")
    table.add_column("query")
    table.add_column(f"before ({adapter(before)})")
    table.add_column(f"after ({adapter(after)})")
    for row in rows:
        table.add_row(row["query"], row["before"], ("* " if row["changed"] else "") + row["after"])
    Console().print(table)


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def _short(text: str, width: int = 48) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[:width - 1] + "…"


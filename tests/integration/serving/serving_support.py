"""What the serving tests share: real LoRA adapters on the tiny model, the platform's serving API, and waiting
for the serving node to swap."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

from tests.support import await_until

def store_lora(settings, seed: int, kind: str, scratch: Path) -> str:
    """A LoRA on the tiny model with seeded non-zero weights and ``kind`` (mntp or rl) in its training summary,
    stored and signed as the trainer stores it; its sha256."""
    import peft
    import torch

    from shared.adapter_signing import sign_adapter
    from shared.artefacts import SUMMARY, ArtefactStore
    from shared.keys import model_signing_key_path
    from shared.ml import load_model

    model = load_model("tiny", settings.model_cache_dir).model
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    lora = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    folder = scratch / f"adapter-{seed}"
    lora.save_pretrained(str(folder))
    (folder / SUMMARY).write_text(json.dumps({"kind": kind}))
    stored = ArtefactStore(settings.artefact_dir).put_adapter(
        folder, sign=lambda f: sign_adapter(f, model_signing_key_path(settings)))
    return stored.sha256


def stored_folder(settings, sha: str) -> Path:
    from shared.artefacts import ArtefactStore

    return ArtefactStore(settings.artefact_dir).get(sha)


def serving_url(settings) -> str | None:
    path = settings.run_dir / "serving-api.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())["url"]
    except (ValueError, KeyError):
        return None


def client(settings, timeout: float = 60.0):
    """An OpenAI client on the platform's serving API; it never retries, so a failed request shows."""
    import openai

    return openai.OpenAI(base_url=serving_url(settings) + "/v1", api_key="no-token-on-loopback", max_retries=0,
                         timeout=timeout)


def served_models(settings) -> dict[str, dict]:
    """``GET /v1/models`` by id: what serves each profile and channel now (its ``neurons`` block)."""
    import httpx

    data = httpx.get(serving_url(settings) + "/v1/models", timeout=10).json()["data"]
    return {m["id"]: m["neurons"] for m in data}


async def await_serving(settings, model: str, sha: str | None, timeout: float = 60.0) -> datetime:
    """Wait until the serving node routes ``model`` to adapter ``sha`` (None: the base model); the moment the
    model list first said so (every request that starts after it is routed there)."""
    from shared.contracts.envelope import utcnow

    def now_serving():
        entry = served_models(settings).get(model)
        return utcnow() if entry is not None and entry["adapter_sha256"] == sha else None

    return await await_until(now_serving, timeout, interval=0.05, message=f"{model} served by {sha}")


def adapter_loaded(plat, sha: str, loaded: bool = True) -> list[dict]:
    """The archived ``serving.adapter_loaded`` payloads for adapter ``sha`` that say ``loaded``."""
    return [e["payload"] for e in plat.archived("serving.adapter_loaded")
            if e["payload"]["adapter_sha256"] == sha and e["payload"]["loaded"] is loaded]


def wait_for_api(settings, timeout: float = 90.0) -> str:
    """The serving API's URL once it answers (the base model loaded and the stored adapters resident)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        url = serving_url(settings)
        if url:
            try:
                if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"the serving API did not answer within {timeout:.0f}s")


def parse_time(at: str) -> datetime:
    return datetime.fromisoformat(at.replace("Z", "+00:00"))

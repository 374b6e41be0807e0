"""An adapter whose files change after the registry verified them is never served: the serving node checks
them again before it loads, keeps the previous adapter answering, and says why in ``serving.adapter_loaded``.

The serving process is paused (SIGSTOP) while the promotion goes through the registry and a byte of the
adapter's weights is flipped in the node's store, then resumed: it sees the promotion only after the files
changed, as a node that lags behind the registry would.
"""

from __future__ import annotations

import os
import signal

import httpx

from shared import processes
from shared.artefacts import ADAPTER_WEIGHTS
from tests.integration.registry.registry_events import promote
from tests.integration.serving.serving_support import (adapter_loaded, await_serving, client, served_models,
                                                       serving_url, stored_folder)
from tests.support import await_until


def _flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))


async def test_a_tampered_adapter_is_refused_and_the_previous_one_keeps_serving(serving):
    plat, settings = serving, serving.settings
    first, second = plat.adapters["tam-1"], plat.adapters["tam-2"]
    plat.cli("profiles", "create", "tam-profile", "--channel", "tam", "--trait", "tone=calm", "--operator", "alice")
    await promote(plat, first, channel="tam", kind="mntp")
    await await_serving(settings, "tam-profile", first)

    pid = processes.service_pid(settings, "serving")
    os.kill(pid, signal.SIGSTOP)
    try:
        promoted = await promote(plat, second, channel="tam", kind="mntp")  # the registry verified the files
        await await_until(lambda: [e for e in plat.archived("profile.adapter_updated")
                                   if e["payload"]["adapter_sha256"] == second], 20, message="profile updated")
        _flip_a_byte(stored_folder(settings, second) / ADAPTER_WEIGHTS)
    finally:
        os.kill(pid, signal.SIGCONT)

    refusals = await await_until(lambda: adapter_loaded(plat, second, loaded=False), 60,
                                 message="serving.adapter_loaded with loaded false")
    for refusal in refusals:
        assert f"{ADAPTER_WEIGHTS} does not hash to its name" in refusal["reason"], refusal
        assert refusal["load_s"] is None and refusal["latency_s"] >= 0 and refusal["kind"] == "mntp"
        assert refusal["cause"] in ("adapter.promoted", "profile.adapter_updated")
    assert promoted["payload"]["previous_adapter_sha256"] == first

    # the previous adapter keeps answering the profile and the channel; no request fails
    models = served_models(settings)
    assert models["tam-profile"]["adapter_sha256"] == first and models["channel:tam"]["adapter_sha256"] == first
    api = client(settings)
    for model in ("tam-profile", "channel:tam"):
        raw = api.embeddings.with_raw_response.create(model=model, input=["still answered"])
        assert raw.headers["x-neurons-adapter-sha256"] == first
        assert raw.parse().model_extra["neurons"]["adapter_sha256"] == first
    status = httpx.get(serving_url(settings) + "/status", timeout=10).json()["pool"]
    assert second not in [r["adapter_sha256"] for r in status["resident"]]
    assert first in [r["adapter_sha256"] for r in status["resident"]]
    assert "does not hash" in status["last_error"] and status["refused"] >= 1
    assert not adapter_loaded(plat, second, loaded=True)

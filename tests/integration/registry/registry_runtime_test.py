"""A serving process picks up a newly promoted adapter within seconds, without a restart."""

from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from shared.adapter_signing import sign_adapter
from shared.artefacts import ArtefactStore
from shared.keys import model_signing_key_path
from tests.integration.registry.registry_adapters import PROBE, build_adapters
from tests.integration.registry.registry_events import promote
from tests.support import ROOT, await_until

pytest.importorskip("peft", reason="the adapter runtime swaps LoRA adapters with peft")

SWAP_WITHIN_S = 15.0


def reports(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_a_running_process_serves_a_promoted_adapter_within_seconds(registry, tmp_path):
    settings = registry.settings
    # The adapters are built on another node and shared through the store; the registry verifies their files.
    other_node = ArtefactStore(tmp_path / "node-a" / "artefacts")
    key = model_signing_key_path(settings)  # the platform's adapter-signing key, anchored in its trust file
    base_logits, [(first, first_logits), (second, second_logits)] = build_adapters(
        settings.model_cache_dir, tmp_path / "built", other_node, sign=lambda folder: sign_adapter(folder, key))
    report = tmp_path / "swaps.jsonl"
    env = {**os.environ, **registry.env, "NEURONS_ARTEFACT_REMOTE": f"file://{other_node.root}",
           "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "runtime.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "shared.adapter_runtime", "--channel", "live", "--model", "tiny",
         "--probe", PROBE, "--report", str(report)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        await await_until(lambda: reports(report), 120, message="the runtime serving the base model")
        [start] = reports(report)
        assert start["adapter_sha256"] is None
        np.testing.assert_allclose(start["logits"], base_logits, atol=1e-4)

        for number, (adapter, expected) in enumerate([(first, first_logits), (second, second_logits)], start=2):
            # the registry verifies the adapter's signed files before it promotes: its node holds them
            shutil.copytree(other_node.root / adapter.sha256, settings.artefact_dir / adapter.sha256)
            promoted_at = time.monotonic()
            await promote(registry, adapter.sha256, channel="live", uri=adapter.uri, wait=False)
            await await_until(lambda: len(reports(report)) >= number, SWAP_WITHIN_S,
                              message=f"the swap to {adapter.sha256[:12]}")
            latest = reports(report)[-1]
            assert latest["adapter_sha256"] == adapter.sha256
            np.testing.assert_allclose(latest["logits"], expected, atol=1e-4)
            assert time.monotonic() - promoted_at < SWAP_WITHIN_S
        assert process.poll() is None  # the same process all along
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()

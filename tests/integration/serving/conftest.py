"""One platform for the serving tests: the test broker, the registry and the serving node as processes, on the
tiny model, with an approver and an admin enrolled, and the test adapters stored and signed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared import processes
from tests.integration.serving.serving_support import store_lora, wait_for_api
from tests.support import ROOT, Platform

OPERATORS = {"alice": ["approver"], "dave": ["admin"]}
# label -> (seed, kind): each a LoRA with its own weights, so its own sha256
ADAPTERS = {"enc": (11, "mntp"), "emb-1": (21, "mntp"), "emb-2": (22, "mntp"), "emb-3": (23, "mntp"),
            "gen-1": (31, "rl"), "gen-2": (32, "rl"), "tam-1": (41, "mntp"), "tam-2": (42, "mntp")}


@pytest.fixture(scope="package")
def model_folder() -> Path:
    """The tiny model, built once in the cache the other model tests share."""
    from shared.ml import load_model

    cache = Path(os.environ.get("NEURONS_TEST_MODEL_CACHE", ROOT / "var" / "models"))
    cache.mkdir(parents=True, exist_ok=True)
    load_model("tiny", cache)
    return cache / "tiny"


@pytest.fixture(scope="package")
async def serving(tmp_path_factory, kafka_bootstrap, model_folder):
    """The platform, its serving API answering; ``serving.adapters`` names the stored adapters by label."""
    plat = Platform(tmp_path_factory.mktemp("serving") / "var", kafka_bootstrap, NEURONS_API_PORT="0",
                    NEURONS_SERVING_PORT="0", NEURONS_MODEL="tiny", NEURONS_SERVING_ADAPTERS=str(len(ADAPTERS)))
    with pytest.MonkeyPatch.context() as mp:
        plat.apply(mp)
        settings = plat.settings
        settings.model_cache_dir.mkdir(parents=True, exist_ok=True)
        (settings.model_cache_dir / "tiny").symlink_to(model_folder)  # the node's cache, without a rebuild
        await plat.aensure_topics()
        for name, roles in OPERATORS.items():
            plat.enroll(name, *roles)
        # the serving node's consumer tolerates a short pause (the tampering test stops it for a moment)
        plat.start("registry", wait=False)
        plat.start("serving", wait=False, env={"NEURONS_SESSION_TIMEOUT_S": "20"})
        try:
            scratch = tmp_path_factory.mktemp("adapters")  # built while the services start
            plat.adapters = {label: store_lora(settings, seed, kind, scratch)
                             for label, (seed, kind) in ADAPTERS.items()}
            processes.wait_ready(settings, ("registry", "serving"), timeout_s=90)
            wait_for_api(settings)
            yield plat
        finally:
            plat.stop()

"""One registry per test module, on the test broker, with operators in its keyring and its API on a free port."""

from __future__ import annotations

import pytest

from shared.keys import generate_operator
from tests.support import Platform

OPERATORS = {"alice": ["approver"], "erin": ["approver"], "dave": ["admin"]}


@pytest.fixture(scope="module")
async def registry(tmp_path_factory, kafka_bootstrap):
    plat = Platform(tmp_path_factory.mktemp("registry") / "var", kafka_bootstrap, NEURONS_API_PORT="0")
    with pytest.MonkeyPatch.context() as mp:
        plat.apply(mp)
        settings = plat.settings
        for name, roles in OPERATORS.items():
            generate_operator(name, roles, settings.keyring_path, settings.operator_key_dir)
        await plat.aensure_topics()
        plat.start("registry")
        try:
            yield plat
        finally:
            plat.stop()

"""One registry per test module, on the test broker, with operators enrolled on its log and its API on a free port."""

from __future__ import annotations

import pytest

from tests.support import Platform

OPERATORS = {"alice": ["approver"], "erin": ["approver"], "dave": ["admin"]}


@pytest.fixture(scope="module")
async def registry(tmp_path_factory, kafka_bootstrap):
    plat = Platform(tmp_path_factory.mktemp("registry") / "var", kafka_bootstrap, NEURONS_API_PORT="0")
    with pytest.MonkeyPatch.context() as mp:
        plat.apply(mp)
        await plat.aensure_topics()
        for name, roles in OPERATORS.items():  # key pairs under var/, enrolled by the platform's admin
            plat.enroll(name, *roles)
        plat.start("registry")
        try:
            yield plat
        finally:
            plat.stop()

"""The embedded broker restarted through the CLI in the middle of a cycle: the services carry on, and
`audit republish` gives the emptied log back its history."""

import asyncio
import json
from collections import Counter

import pytest

from services.registry.audit import read_log
from shared import processes
from tests.e2e.cycle_support import SERVICES, prepare, start
from tests.e2e.test_e2e_faults import archived_types, run_cycle_in_background
from tests.support import Platform, wait_until


def broker_address(platform: Platform) -> str:
    return json.loads(platform.cli("broker", "status", "--json").stdout)["bootstrap_servers"]


@pytest.mark.slow
def test_a_broker_restart_mid_cycle_then_republish_and_the_cycle_is_promoted(tmp_path, monkeypatch):
    plat = Platform(tmp_path / "var", bootstrap="")
    plat.env.pop("KAFKA_BOOTSTRAP_SERVERS")  # its own embedded broker: this test restarts it
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    plat.apply(monkeypatch)
    try:
        plat.cli("broker", "start")
        address = broker_address(plat)
        prepare(plat, tmp_path)
        start(plat, tmp_path)
        pids = {name: processes.service_pid(plat.settings, name) for name in SERVICES}
        handle = run_cycle_in_background(plat)
        wait_until(lambda: archived_types(plat)["training.started"] > 0, 600, message="training under way")

        plat.cli("broker", "stop")
        restarted = plat.cli("broker", "start")
        assert broker_address(plat) == address, restarted.stdout + restarted.stderr  # the address it had
        republished = plat.cli("audit", "republish").stdout
        assert "republished" in republished

        handle["thread"].join(900)
        summary = json.loads(handle["result"].stdout)
        assert summary["outcome"] == "promoted", summary
        # the same processes carried on: none was restarted
        assert {name: processes.service_pid(plat.settings, name) for name in SERVICES} == pids
        events = [e for e in plat.archived() if e["correlation_id"] == summary["cycle_id"]]
        counts = Counter(e["type"] for e in events)
        assert counts["training.completed"] == 1 and counts["adapter.promoted"] == 1
        assert counts["profile.adapter_updated"] == 1
        ids = [e["event_id"] for e in plat.archived()]
        assert len(ids) == len(set(ids))
        # the emptied log was given back everything: it holds exactly the archive's events, and replaying it
        # rebuilds the registry's projections
        wait_until(lambda: sorted(e.event_id for e in asyncio.run(read_log(plat.settings))[0])
                   == sorted(e["event_id"] for e in plat.archived()), 60, message="the log equals the archive")
        assert asyncio.run(read_log(plat.settings))[1] == 0  # nothing malformed on the restored log
        verify = json.loads(plat.cli("audit", "verify", "--json").stdout)
        assert verify["ok"], verify["differs"]
    finally:
        plat.stop()
        plat.cli("down", check=False)

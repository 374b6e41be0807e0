"""Running services outlive their broker: same address after a restart, topics put back, outbox relayed."""

import asyncio
import json
import time
from datetime import datetime, timezone

from aiokafka.admin import AIOKafkaAdminClient

from shared import broker, processes
from shared.topics import all_topics
from tests.support import Platform, wait_until

SERVICES = ("energy", "registry")


def energy_outbox(plat: Platform) -> list:
    """Every event the energy service has emitted, from its outbox."""
    from sqlmodel import Session, select

    from shared.contracts.envelope import Envelope
    from shared.db import engine_for
    from shared.store import OutboxEvent

    with Session(engine_for(plat.settings.db_url("energy"))) as session:
        rows = session.exec(select(OutboxEvent).order_by(OutboxEvent.id)).all()
    return [Envelope.from_json(row.envelope_json) for row in rows]


def own_broker_platform(tmp_path, monkeypatch) -> Platform:
    plat = Platform(tmp_path / "var", bootstrap="", NEURONS_HARDWARE_PROFILE_S="2", NEURONS_MODEL="tiny")
    plat.env.pop("KAFKA_BOOTSTRAP_SERVERS")  # an embedded broker of its own: this test restarts it
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    return plat.apply(monkeypatch)


async def topic_partitions(settings) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap())
    await admin.start()
    try:
        described = await admin.describe_topics(all_topics())
        return {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}
    finally:
        await admin.close()


def test_broker_start_comes_back_on_the_address_it_had_and_says_so_when_it_cannot(tmp_path, monkeypatch):
    plat = own_broker_platform(tmp_path, monkeypatch)
    try:
        plat.cli("broker", "start")
        address = json.loads(plat.cli("broker", "status", "--json").stdout)["bootstrap_servers"]
        plat.cli("broker", "stop")
        assert json.loads(plat.cli("broker", "status", "--json").stdout) == {
            "bootstrap_servers": address, "pid": None, "log": str(plat.settings.broker_dir / "tansu.log"),
            "state": "stopped", "note": None}
        assert plat.cli("broker", "start").stdout.startswith(f"broker running at {address} ")
        plat.cli("broker", "stop")
        import socket

        with socket.socket() as taken:  # another program holds the port meanwhile
            taken.bind(("127.0.0.1", int(address.rsplit(":", 1)[1])))
            taken.listen()
            moved = plat.cli("broker", "start")
        port = address.rsplit(":", 1)[1]
        assert moved.stderr.strip() == (f"neurons: port {port} (the broker's previous address) is taken: listening "
                                        f"on {broker.status(plat.settings).bootstrap_servers.rsplit(':', 1)[1]}; "
                                        "running services must be restarted to find it")
    finally:
        plat.cli("broker", "stop", check=False)


def test_services_put_the_topics_back_and_relay_what_they_emitted_while_the_broker_was_away(tmp_path, monkeypatch):
    plat = own_broker_platform(tmp_path, monkeypatch)
    try:
        plat.cli("broker", "start")
        plat.start(*SERVICES)
        pids = {name: processes.service_pid(plat.settings, name) for name in SERVICES}
        wait_until(lambda: plat.archived("hardware.profiled"), 60, message="a first hardware profile archived")

        away_since = datetime.now(timezone.utc)
        plat.cli("broker", "stop")
        time.sleep(6)  # the energy service profiles the hardware every 2 s meanwhile
        broker.start(plat.settings)  # the library call: nothing creates the topics but the services
        back_at = datetime.now(timezone.utc)

        # every topic back, with the configured partitions, made by the services' own check
        wait_until(lambda: asyncio.run(topic_partitions(plat.settings)) == {
            t: plat.settings.topic_partitions for t in all_topics()}, 60, message="the topics created again")
        emitted = wait_until(lambda: [e for e in energy_outbox(plat) if e.occurred_at > back_at], 60,
                             message="a profile after the restart")
        emitted = [e for e in energy_outbox(plat) if e.occurred_at <= emitted[0].occurred_at]
        assert [e for e in emitted if away_since < e.occurred_at < back_at], "nothing emitted while away"
        # everything the energy service emitted, during the outage too, reaches the registry on the new broker
        wait_until(lambda: {e.event_id for e in emitted} <= {e["event_id"] for e in plat.archived()}, 90,
                   message="every emitted event archived")
        assert {name: processes.service_pid(plat.settings, name) for name in SERVICES} == pids
        assert "created them again" in plat.log("energy") + plat.log("registry")
    finally:
        plat.stop()
        plat.cli("broker", "stop", check=False)

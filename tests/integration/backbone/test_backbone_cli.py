"""`neurons up|status|down` and `neurons audit ...` as an operator runs them."""

import json


from shared import broker as embedded
from shared.migrations import head
from shared.bus import decode
from tests.support import Platform, await_until, dataset_payload, make_event


def test_up_status_down_runs_and_stops_everything(tmp_path, monkeypatch):
    plat = Platform(tmp_path / "var", bootstrap="", NEURONS_MODEL="tiny", NEURONS_SERVING_PORT="0",
                    NEURONS_API_PORT="0")
    plat.env.pop("KAFKA_BOOTSTRAP_SERVERS")  # the embedded broker of its own
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    try:
        started = plat.cli("up", timeout=180).stdout
        # each service's SQLite file brought to the head revision before any service started
        assert [line.split()[:2] for line in started.splitlines() if line.startswith("database")] == \
            [["database", head()]] * 7, started
        status = json.loads(plat.cli("status", "--json").stdout)
        assert status["broker"]["state"] == "running"
        assert status["bootstrap_servers"].startswith("127.0.0.1:")
        names = {s["name"]: s for s in status["services"]}
        assert set(names) == {"trainer", "evolution", "approval", "validator", "energy", "registry", "serving"}
        assert all(s["state"] == "running" for s in names.values()), names
        pids = [s["pid"] for s in names.values()] + [status["broker"]["pid"]]
    finally:
        plat.cli("down", timeout=120)
    after = json.loads(plat.cli("status", "--json").stdout)
    assert after["broker"]["state"] == "stopped"
    assert all(s["state"] == "stopped" for s in after["services"])
    assert not any(embedded.pid_alive(pid) for pid in pids)


def test_up_reports_a_service_that_exits_at_start_up_as_failed_with_its_last_words(tmp_path, monkeypatch):
    # a setting only the energy service reads, and cannot: it exits while it starts, the others run
    plat = Platform(tmp_path / "var", bootstrap="", NEURONS_MODEL="tiny", NEURONS_SERVING_PORT="0",
                    NEURONS_API_PORT="0", NEURONS_HARDWARE_PROFILE_S="every half minute")
    plat.env.pop("KAFKA_BOOTSTRAP_SERVERS")
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    try:
        result = plat.cli("up", timeout=180, check=False)
        assert result.returncode == 1, result.stdout + result.stderr
        lines = {line.split()[0]: line for line in result.stdout.splitlines()}
        assert lines["energy"].startswith("energy     failed: ValueError: could not convert string to float: "
                                          "'every half minute'  log "), lines["energy"]
        assert all(" pid " in lines[name] for name in ("trainer", "evolution", "approval", "validator", "registry",
                                                       "serving")), lines
        states = {s["name"]: s["state"] for s in json.loads(plat.cli("status", "--json").stdout)["services"]}
        assert states["energy"] == "stopped" and states["registry"] == "running", states
    finally:
        plat.cli("down", timeout=120)


def test_a_command_with_the_embedded_broker_stopped_gets_one_line_that_says_what_to_do(tmp_path, monkeypatch):
    plat = Platform(tmp_path / "var", bootstrap="")
    plat.env.pop("KAFKA_BOOTSTRAP_SERVERS")
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    plat.cli("broker", "start")
    plat.cli("broker", "stop")

    result = plat.cli("audit", "republish", check=False, timeout=120)

    assert result.returncode == 1
    address = json.loads((tmp_path / "var" / "broker" / "broker.json").read_text())["bootstrap_servers"]
    assert result.stderr.strip().splitlines() == [
        f"neurons: the embedded broker does not answer at {address}: run `neurons broker start` (or `neurons up`)"]


def test_a_bad_argument_gets_one_line_that_says_what_to_do(platform):
    result = platform.cli("status", "--colour", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--colour" in lines[0] and "--help" in lines[0]


def test_a_command_without_the_operators_key_says_how_to_get_one(platform):
    result = platform.cli("cycle", "request", "--operator", "nobody", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nobody" in lines[0] and "neurons operator enroll nobody" in lines[0]


def test_the_first_admin_is_anchored_once_and_enrols_operators(platform):
    from shared.keys import load_anchors

    again = platform.cli("operator", "init-admin", "root", check=False)  # the platform anchored "admin" already
    assert again.returncode == 2 and "already anchors" in again.stderr
    platform.enroll("bob", "approver")
    listed = platform.cli("operator", "list").stdout
    assert any(line.startswith("bob") and "approver" in line for line in listed.splitlines())
    assert set(load_anchors(platform.settings.trust_path)["admins"]) == {"admin"}
    revoked = platform.cli("operator", "revoke", "bob", "--reason", "key lost").stdout
    assert revoked.startswith("revoked key ")
    assert not any(line.startswith("bob") for line in platform.cli("operator", "list").stdout.splitlines())


async def test_audit_export_holds_every_published_event_valid_against_its_schema(platform, tmp_path):
    await platform.aensure_topics()
    platform.start("registry")
    events = [make_event("dataset.registered", f"ds-{i}", dataset_payload(f"ds-{i}")) for i in range(25)]
    async with platform.publisher() as publisher:
        await publisher.publish_many(events)
    await await_until(lambda: len(platform.archived()) >= 25, 60, message="25 events archived")
    out = tmp_path / "audit.jsonl"
    platform.cli("audit", "export", "--out", str(out))
    lines = out.read_text().splitlines()
    assert sorted(json.loads(line)["event_id"] for line in lines) == sorted(e.event_id for e in events)
    for line in lines:
        decode(line.encode())  # raises on anything the contract rejects
    verify = json.loads(platform.cli("audit", "verify", "--json").stdout)
    assert verify["ok"] and verify["differs"] == []
    replay = platform.cli("audit", "replay", "--from-log").stdout
    assert "replayed 25 events from the log" in replay


async def test_the_archive_works_on_postgresql(tmp_path, kafka_bootstrap, postgres_url, monkeypatch):
    plat = Platform(tmp_path / "var", kafka_bootstrap, database_url=postgres_url).apply(monkeypatch)
    await plat.aensure_topics()
    try:
        plat.start("registry")
        event = make_event("dataset.registered", "ds-pg", dataset_payload("ds-pg"))
        async with plat.publisher() as publisher:
            await publisher.publish(event)
            await publisher.publish(event)
        await await_until(lambda: plat.archived(), 60, message="archived in PostgreSQL")
        assert plat.settings.db_url("registry") == postgres_url
        assert [e["event_id"] for e in plat.archived()] == [event.event_id]
    finally:
        plat.stop()

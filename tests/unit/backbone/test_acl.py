"""Kafka ACLs follow from the contract, and deploy/ applies exactly them.

Who may write a topic comes from the ``x-producers`` of its aggregate's event
types, who reads it from the services' own ``reads``; deploy/kafka/acls.sh is
the generated script and docker-compose.yml wires one Kafka user per container.
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from shared.contracts import acl, schemas
from shared.contracts.trust import ROLES
from shared.settings import ENV_VARS, Settings
from shared.topics import AGGREGATE_TYPES, SERVICES, dlq_topic, group_id, topic_for

ROOT = Path(__file__).resolve().parents[3]
KAFKA = ROOT / "deploy" / "kafka"
CLI, RESTORE = acl.user(acl.OPERATORS), acl.user(acl.RESTORE)


@pytest.fixture(autouse=True)
def default_prefix(monkeypatch):
    monkeypatch.delenv("NEURONS_TOPIC_PREFIX", raising=False)


def by_user() -> dict[str, acl.Access]:
    return {a.user: a for a in acl.access()}


def writers_of(topic: str) -> set[str]:
    return {a.user for a in acl.access() if topic in a.write}


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


# --- the generated file cannot drift from the contract -------------------------------------------


def test_deploy_acls_script_is_what_the_contract_generates():
    assert (KAFKA / "acls.sh").read_text() == acl.render_script(), (
        "deploy/kafka/acls.sh differs from the contract: run "
        "`neurons audit acls --format kafka-acls > deploy/kafka/acls.sh`")


def test_the_readme_table_is_the_set():
    rows = [line for line in (KAFKA / "README.md").read_text().splitlines() if line.startswith("| `neurons-")]

    def cell(topics):
        return ", ".join(t.removeprefix(acl.DEFAULT_PREFIX) for t in topics) or "–"

    assert rows == [f"| `{a.user}` | {', '.join(a.acts_for)} | {cell(a.write)} | {cell(a.read)} | "
                    f"{', '.join(a.groups) or '–'} |" for a in acl.access()], "deploy/kafka/README.md's table is stale"


def test_the_command_line_prints_the_same_set(capsys):
    from cli.main import main

    assert main(["audit", "acls", "--format", "kafka-acls"]) == 0
    assert capsys.readouterr().out == (KAFKA / "acls.sh").read_text()
    assert main(["audit", "acls", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["user"] for p in data["principals"]] == [a.user for a in acl.access()]
    assert main(["audit", "acls", "--format", "xml"]) == 2


def test_names_match_the_runtime():
    assert set(acl.aggregate_types()) == set(AGGREGATE_TYPES)
    assert list(acl.SERVICE_READS) == list(SERVICES)
    assert acl.dlq() == dlq_topic()
    for service in SERVICES:
        assert acl.user(service) == group_id(service)  # the user and its consumer group share the name
    for aggregate in AGGREGATE_TYPES:
        assert acl.topic(aggregate) == topic_for(aggregate)


def test_every_producer_entry_is_a_known_service_or_role():
    for etype, allowed in schemas.producers().items():
        assert allowed, f"{etype} names no producer"
        for entry in allowed:
            kind, _, name = entry.partition(":")
            assert name in {"service": SERVICES, "operator": ROLES}.get(kind, ()), f"{etype}: {entry}"


# --- (b) a service writes only the topics of the types it may publish, plus the DLQ --------------


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_writes_only_its_own_types_topics_and_the_dlq(service):
    publishes = {etype for etype, allowed in schemas.producers().items() if f"service:{service}" in allowed}
    assert publishes, f"{service} publishes nothing"
    relays = set(acl.RELAYS.get(service, ()))
    access = by_user()[acl.user(service)]
    assert set(access.write) == {topic_for(t.split(".")[0]) for t in publishes | relays} | {dlq_topic()}
    assert access.groups == (group_id(service),)


def test_a_relay_passes_on_only_operators_commands_and_is_real():
    from services.registry.api import DECISION

    assert acl.RELAYS == {"registry": (DECISION,)}  # the API's one write: an operator's signed decision
    for relayed in acl.RELAYS.values():
        for etype in relayed:
            assert all(e.startswith("operator:") for e in schemas.producers()[etype]), etype


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_reads_exactly_the_topics_it_consumes(service):
    declared = importlib.import_module(f"services.{service}.app").service.reads
    access = by_user()[acl.user(service)]
    assert set(access.read) == {topic_for(a) for a in declared}
    assert dlq_topic() not in access.read


def test_every_principal_may_see_every_platform_topic_and_nothing_more():
    platform = {topic_for(a) for a in AGGREGATE_TYPES} | {dlq_topic()}
    for a in acl.access():
        assert set(a.write) | set(a.read) | set(a.describe) == platform, a.user
        assert not set(a.describe) & (set(a.write) | set(a.read)), a.user


# --- (c) what only the operators' client may write -------------------------------------------------


def test_only_the_operators_client_writes_datasets_and_enrolments():
    for aggregate in ("dataset", "operator"):
        assert writers_of(topic_for(aggregate)) == {CLI, RESTORE}, aggregate


def test_cycles_and_research_are_written_by_the_operators_and_evolution_alone():
    for aggregate in ("cycle", "research"):
        assert writers_of(topic_for(aggregate)) == {CLI, acl.user("evolution"), RESTORE}, aggregate


def test_the_operators_client_writes_only_topics_of_operator_commands():
    operator_aggregates = {etype.split(".")[0] for etype, allowed in schemas.producers().items()
                           if any(e.startswith("operator:") for e in allowed)}
    cli = by_user()[CLI]
    assert set(cli.write) == {topic_for(a) for a in operator_aggregates}
    for aggregate in ("training", "validation", "energy", "hardware", "scaling"):
        assert topic_for(aggregate) not in cli.write  # results only services produce
    assert dlq_topic() not in cli.write and cli.groups == ()


def test_every_topic_has_exactly_the_writers_its_types_name():
    for aggregate in AGGREGATE_TYPES:
        expected = {RESTORE}
        for etype, allowed in schemas.producers().items():
            if etype.split(".")[0] == aggregate:
                expected |= {acl.user(e.split(":")[1]) if e.startswith("service:") else CLI for e in allowed}
                expected |= {acl.user(s) for s, relayed in acl.RELAYS.items() if etype in relayed}
        assert writers_of(topic_for(aggregate)) == expected, aggregate
    assert writers_of(dlq_topic()) == {acl.user(s) for s in SERVICES}


def test_no_principal_gets_a_group_but_its_own_and_none_gets_the_cluster():
    for a in acl.access():
        assert a.groups in ((), (a.user,))
    assert "--cluster" not in acl.render_script() and "User:admin" not in acl.render_script()


def test_another_prefix_renames_every_resource():
    for a in acl.access("staging."):
        assert a.user.startswith("staging-")
        assert all(t.startswith("staging.") for t in (*a.write, *a.read, *a.describe))
        assert all(g.startswith("staging-") for g in a.groups)


# --- deploy/kafka and docker-compose.yml ----------------------------------------------------------


def fake_kafka_tools(folder: Path) -> Path:
    log = folder / "calls.log"
    for tool in ("kafka-topics.sh", "kafka-configs.sh", "kafka-acls.sh"):
        script = folder / tool
        script.write_text(f'#!/bin/sh\nprintf "%s" "{tool}" >> "{log}"\n'
                          f'for a in "$@"; do printf " %s" "$(printf %s "$a" | sed "s/ /+/g")" >> "{log}"; done\n'
                          f'echo >> "{log}"\n')
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return log


def test_init_creates_the_topics_the_users_and_the_acls(tmp_path):
    log = fake_kafka_tools(tmp_path)
    env = {**os.environ, "KAFKA_BIN": str(tmp_path), "CONFIG_DIR": str(KAFKA),
           "SCHEMA_DIR": str(schemas.SCHEMA_DIR), "NEURONS_TOPIC_PARTITIONS": "6"}
    done = subprocess.run(["sh", str(KAFKA / "init.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = [shlex.split(line) for line in log.read_text().splitlines()]

    def flag(call, name):
        return [call[i + 1] for i, word in enumerate(call) if word == name]

    created = {flag(c, "--topic")[0] for c in calls if c[0] == "kafka-topics.sh" and "--create" in c}
    assert created == {topic_for(a) for a in AGGREGATE_TYPES} | {dlq_topic()}
    assert all(flag(c, "--partitions") == ["6"] for c in calls if "--create" in c)
    users = {flag(c, "--entity-name")[0] for c in calls if c[0] == "kafka-configs.sh"}
    assert users == {a.user for a in acl.access()}
    granted: dict[tuple[str, str, str], set[str]] = {}
    for c in calls:
        if c[0] == "kafka-acls.sh":
            assert "--add" in c and flag(c, "--bootstrap-server") and flag(c, "--command-config")
            for kind in ("topic", "group"):
                key = (flag(c, "--allow-principal")[0], flag(c, "--operation")[0], kind)
                granted.setdefault(key, set()).update(flag(c, f"--{kind}"))
    for a in acl.access():
        for operation, kind, names in (("Write", "topic", a.write), ("Read", "topic", a.read),
                                       ("Read", "group", a.groups), ("Describe", "topic", a.describe)):
            assert granted.pop((a.principal, operation, kind), set()) == set(names), (a.user, operation, kind)
    assert not any(granted.values()), f"grants the contract does not name: {granted}"


def test_every_principal_has_its_own_credentials_file():
    files = {p.name.removesuffix(".password") for p in (KAFKA / "credentials").glob("*.password")}
    assert files == {a.user for a in acl.access()}


def test_kafka_authenticates_every_client_and_authorises_by_acls_only():
    services = compose()["services"]
    env = services["kafka"]["environment"]
    assert env["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert env["KAFKA_AUTHORIZER_CLASS_NAME"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert env["KAFKA_SUPER_USERS"] == "User:admin"
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(protocols.values()) == {"SASL_PLAINTEXT"}  # no listener lets a client in unauthenticated
    assert env["KAFKA_LISTENER_NAME_CLIENT_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512"
    assert env["KAFKA_ADVERTISED_LISTENERS"].startswith("CLIENT://kafka:9092")
    assert "CONTROLLER://localhost:" in env["KAFKA_LISTENERS"]
    assert "./deploy/kafka/broker_jaas.conf:/etc/kafka/secrets/broker_jaas.conf:ro" in services["kafka"]["volumes"]
    init = services["kafka-init"]
    assert init["entrypoint"] == ["/bin/sh", "/etc/neurons/kafka/init.sh"]
    assert "./deploy/kafka:/etc/neurons/kafka:ro" in init["volumes"]
    assert "./schemas:/etc/neurons/schemas:ro" in init["volumes"]
    assert init["environment"]["NEURONS_TOPIC_PARTITIONS"] == compose()["x-neurons-env"]["NEURONS_TOPIC_PARTITIONS"]


@pytest.mark.parametrize("container, user", [*[(s, acl.user(s)) for s in SERVICES], ("cli", CLI), ("restore", RESTORE)])
def test_each_container_logs_in_as_its_own_user(container, user):
    doc = compose()
    spec = doc["services"][container]
    env = spec["environment"]
    assert {k for k in env if k.startswith("KAFKA_")} <= set(ENV_VARS), f"{container} sets Kafka variables nothing reads"
    assert env["KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT" and env["KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert env["KAFKA_SASL_USERNAME"] == user
    kafka_secrets = [x for x in spec["secrets"] if isinstance(x, str) and x.startswith("kafka-")]
    assert kafka_secrets == [f"kafka-{container}"]  # its own password, and only its own
    signing = [x if isinstance(x, str) else x["source"] for x in spec["secrets"] if x not in kafka_secrets]
    if container not in ("cli", "restore"):  # an operator signs with their own key; restore republishes as signed
        assert f"signing-{container}" in signing  # and its own signing key, no other service's
    assert not [x for x in signing if x.startswith("signing-") and x != f"signing-{container}"]
    assert env["KAFKA_SASL_PASSWORD_FILE"] == f"/run/secrets/kafka-{container}"
    assert doc["secrets"][f"kafka-{container}"] == {"file": f"./deploy/kafka/credentials/{user}.password"}
    assert spec["depends_on"]["kafka-init"] == {"condition": "service_completed_successfully"}


def test_no_two_containers_share_a_kafka_user():
    users = [s["environment"].get("KAFKA_SASL_USERNAME") for s in compose()["services"].values()
             if isinstance(s.get("environment"), dict)]
    users = [u for u in users if u]
    assert len(users) == len(set(users)) == len(acl.access())


# --- the clients' side ------------------------------------------------------------------------------


def test_plaintext_needs_no_client_settings(monkeypatch):
    for name in ("KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD", "KAFKA_SASL_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert Settings.from_env().kafka_security() == {}


def test_a_sasl_user_reads_its_password_file(monkeypatch, tmp_path):
    secret = tmp_path / "kafka-trainer"
    secret.write_text("s3cret\n")
    monkeypatch.delenv("KAFKA_SECURITY_PROTOCOL", raising=False)
    monkeypatch.delenv("KAFKA_SASL_PASSWORD", raising=False)
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "neurons-trainer")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD_FILE", str(secret))
    settings = Settings.from_env()
    assert settings.kafka_security() == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                                         "sasl_plain_username": "neurons-trainer", "sasl_plain_password": "s3cret"}
    assert "s3cret" not in repr(settings)


def test_sasl_without_a_password_says_what_is_missing(monkeypatch):
    for name in ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD", "KAFKA_SASL_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    with pytest.raises(RuntimeError, match="KAFKA_SASL_USERNAME"):
        Settings.from_env().kafka_security()

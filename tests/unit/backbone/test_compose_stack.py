"""docker-compose.yml would start and stay up: valid Compose, every file it names there, every variable,
port, command and policy what the code reads, and an order of start that waits for what each needs.

There is no Docker engine where these tests run: the file is validated, not run.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex

import jsonschema
import pytest
import typer

from shared.contracts.policies import AUTO_APPROVE, REQUIRE_APPROVAL
from shared.policy_file import load_policies
from shared.settings import ENV_VARS, Settings
from shared.topics import SERVICES
from tests.unit.backbone.compose_support import (
    KEYS, PROJECT_IMAGE, ROOT, compose, compose_schema, environment, mounts, project_containers, published,
    repo_path, under_keys)

# Long-running containers whose image has no shell or HTTP client to run a check with.
NO_HEALTHCHECK = {"otel-collector": "the collector's image has no shell", "jaeger": "no HTTP client in the image"}
ONE_SHOT = {"kafka-init", "db-migrate"}
# The key commands of the README, run by test_the_key_commands_make_every_key_file_compose_mounts.
KEY_COMMANDS = (
    "neurons operator service-keys --dir deploy/keys",
    "NEURONS_TRUST=deploy/keys/trust.json NEURONS_OPERATOR_KEYS=deploy/keys/operators neurons operator init-admin root",
)


@pytest.fixture(scope="module")
def doc():
    return compose()


def long_running(doc):
    return {name: spec for name, spec in doc["services"].items()
            if name not in ONE_SHOT and "tools" not in spec.get("profiles", [])}


# --- the Compose Specification --------------------------------------------------------------------


def test_the_file_is_valid_compose(doc):
    validator = jsonschema.Draft7Validator(compose_schema())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, errors


def test_the_schema_rejects_what_compose_would(doc):
    validator = jsonschema.Draft7Validator(compose_schema())
    misspelt = copy.deepcopy(doc)
    misspelt["services"]["postgres"]["healthchek"] = misspelt["services"]["postgres"].pop("healthcheck")
    assert not validator.is_valid(misspelt)
    bad_condition = copy.deepcopy(doc)
    bad_condition["services"]["trainer"]["depends_on"]["db-migrate"]["condition"] = "service_finished"
    assert not validator.is_valid(bad_condition)


# --- files ------------------------------------------------------------------------------------------


def test_every_file_it_mounts_or_builds_from_is_in_the_repository(doc):
    missing = []
    for name, spec in doc["services"].items():
        for mount in mounts(spec):
            if mount["type"] == "bind" and not under_keys(mount["source"]) and not repo_path(mount["source"]).exists():
                missing.append(f"{name}: {mount['source']}")
        for env_file in spec.get("env_file", []):
            missing += [] if repo_path(env_file).exists() else [f"{name}: env_file {env_file}"]
        if "build" in spec:
            context = repo_path(spec["build"] if isinstance(spec["build"], str) else spec["build"]["context"])
            missing += [] if (context / "Dockerfile").exists() else [f"{name}: {context}/Dockerfile"]
    for name, secret in doc["secrets"].items():
        if not under_keys(secret["file"]) and not repo_path(secret["file"]).exists():
            missing.append(f"secret {name}: {secret['file']}")
    assert not missing, missing


def test_the_image_is_built_from_what_the_dockerfile_copies():
    dockerfile = (ROOT / "Dockerfile").read_text()
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for line in re.findall(r"^COPY (.+)$", dockerfile, flags=re.MULTILINE):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
            assert source not in ignored, f".dockerignore leaves {source} out of the build context"
    assert {"deploy/keys", "var", ".venv"} <= ignored  # private keys and local state stay out of the image
    assert "9464" in re.search(r"^EXPOSE (.+)$", dockerfile, flags=re.MULTILINE).group(1)


def run_documented(command: str, monkeypatch) -> int:
    from cli.main import main

    words = shlex.split(command)
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        monkeypatch.setenv(name, value)
    assert words[0] == "neurons"
    return main(words[1:])


def test_the_key_commands_make_every_key_file_compose_mounts(doc, tmp_path, monkeypatch):
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "NEURONS_TRUST", "NEURONS_SERVICE_KEYS", "NEURONS_SERVICE_KEY",
                 "NEURONS_OPERATOR_KEYS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NEURONS_VAR", str(tmp_path / "var"))  # no broker here: the admin is anchored, not enrolled
    monkeypatch.chdir(tmp_path)
    readme = (ROOT / "README.md").read_text()
    for command in KEY_COMMANDS:
        assert command in readme, f"the README does not show `{command}`"
        assert run_documented(command, monkeypatch) == 0, command

    wanted = {secret["file"] for secret in doc["secrets"].values() if under_keys(secret["file"])}
    wanted |= {m["source"] for spec in doc["services"].values() for m in mounts(spec) if under_keys(m["source"])}
    assert wanted, "compose mounts no key"
    missing = sorted(source for source in wanted if not (tmp_path / source).exists())
    assert not missing, f"the key commands do not make {missing}"
    anchors = json.loads((tmp_path / KEYS / "trust.json").read_text())
    assert set(anchors["services"]) == set(SERVICES)
    assert "root" in anchors["admins"] and anchors["model_signing"]


# --- volumes, secrets, read-only configuration -------------------------------------------------------


def test_every_named_volume_is_declared_and_used(doc):
    used = {m["source"] for spec in doc["services"].values() for m in mounts(spec) if m["type"] == "volume"}
    assert used <= set(doc["volumes"]), f"undeclared volumes: {used - set(doc['volumes'])}"
    assert set(doc["volumes"]) <= used, f"declared, never mounted: {set(doc['volumes']) - used}"


def test_every_secret_is_declared_and_used(doc):
    used = {s if isinstance(s, str) else s["source"] for spec in doc["services"].values() for s in spec.get("secrets", [])}
    assert used == set(doc["secrets"])


def test_configuration_from_deploy_is_mounted_read_only(doc):
    writable = {(name, m["source"]) for name, spec in doc["services"].items() for m in mounts(spec)
                if m["type"] == "bind" and not m["read_only"]}
    # the one exception: the command line enrols operators, which writes their keys
    assert writable == {("cli", "./deploy/keys/operators")}


def test_every_container_trusts_the_read_only_trust_file(doc):
    for name, spec in project_containers(doc).items():
        env = environment(spec)
        if "NEURONS_TRUST" not in env:
            assert name == "db-migrate"  # migrations verify nothing
            continue
        trust = [m for m in mounts(spec) if m["target"] == env["NEURONS_TRUST"]]
        assert len(trust) == 1, f"{name}: nothing mounted at {env['NEURONS_TRUST']}"
        assert trust[0]["source"] == f"./{KEYS}/trust.json" and trust[0]["read_only"], name
        # long syntax: a missing trust file stops `up` (the short syntax would mount an empty folder there)
        assert any(isinstance(v, dict) and v["target"] == env["NEURONS_TRUST"] for v in spec["volumes"]), name


# --- what the code reads ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*SERVICES, "db-migrate", "cli", "restore"])
def test_each_container_sets_only_variables_the_settings_read(doc, name):
    env = environment(doc["services"][name])
    unknown = {key for key in env if key.startswith(("NEURONS_", "KAFKA_", "OTEL_"))} - set(ENV_VARS)
    assert not unknown, f"{name} sets variables shared/settings.py does not read: {unknown}"


def test_each_service_runs_its_module(doc):
    for name in SERVICES:
        spec = doc["services"][name]
        assert spec["command"] == ["python", "-m", f"services.{name}"]
        assert importlib.util.find_spec(f"services.{name}.__main__") is not None, name
        assert spec["image"] == PROJECT_IMAGE


def cli_command_exists(words: list[str]) -> bool:
    from cli.main import app

    command = typer.main.get_command(app)
    for word in words:
        if word.startswith("-") or not hasattr(command, "commands"):
            break  # options, or the arguments of a command
        command = command.commands.get(word)
        if command is None:
            return False
    return not hasattr(command, "commands") or words == ["--help"]


def test_the_other_containers_run_real_commands(doc):
    services = doc["services"]
    assert services["db-migrate"]["command"] == ["neurons", "db", "upgrade"]
    for name, spec in project_containers(doc).items():
        if name in SERVICES:
            continue
        words = [*spec.get("entrypoint", []), *spec.get("command", [])]
        assert words[0] == "neurons" and cli_command_exists(words[1:]), f"{name}: {words}"


def service_settings(doc, name: str, monkeypatch) -> Settings:
    env = environment(doc["services"][name], NEURONS_API_TOKEN="token")
    env.pop("KAFKA_SASL_PASSWORD_FILE", None)  # a file only the container has
    for key in ENV_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings.from_env()


def test_published_ports_are_the_ports_the_services_bind(doc, monkeypatch):
    binds = {"registry": ("api_host", "api_port"), "serving": ("serving_host", "serving_port")}
    for name in SERVICES:
        settings = service_settings(doc, name, monkeypatch)
        pairs = published(doc["services"][name])
        if name not in binds:
            assert not pairs, f"{name} publishes ports it does not serve"
            continue
        host_attr, port_attr = binds[name]
        assert [container for _, container in pairs] == [getattr(settings, port_attr)], name
        assert getattr(settings, host_attr) == "0.0.0.0", f"{name} is published but binds loopback only"
        assert settings.api_token, f"{name} is published, so it needs NEURONS_API_TOKEN"


def test_every_service_serves_metrics_on_the_port_its_healthcheck_asks(doc, monkeypatch):
    for name in SERVICES:
        settings = service_settings(doc, name, monkeypatch)
        assert (settings.metrics_host, settings.metrics_port) == ("0.0.0.0", 9464), name
        check = " ".join(doc["services"][name]["healthcheck"]["test"])
        assert f"127.0.0.1:{settings.metrics_port}/metrics" in check, name


def test_approval_and_evolution_read_the_shipped_policies(doc, monkeypatch):
    paths = set()
    for name in ("approval", "evolution"):
        settings = service_settings(doc, name, monkeypatch)
        assert settings.policies_path is not None, f"{name} would fall back to the built-in policies"
        mount = [m for m in mounts(doc["services"][name]) if m["target"] == str(settings.policies_path)]
        assert len(mount) == 1 and mount[0]["read_only"], name
        paths.add(mount[0]["source"])
    assert paths == {"./deploy/policies.yaml"}, "approval and evolution must read the same policy file"
    others = [n for n in SERVICES if n not in ("approval", "evolution") and "NEURONS_POLICIES" in environment(
        doc["services"][n])]
    assert not others


def test_the_shipped_policies_load_with_the_services_loader():
    policies = load_policies(ROOT / "deploy" / "policies.yaml")
    by_kind = {kind: [p.action for p in policies if p.kind == kind] for kind in ("cycle", "research", "promotion")}
    assert all(by_kind.values()), f"a kind without a policy: {by_kind}"
    assert by_kind["research"] == [REQUIRE_APPROVAL] and by_kind["promotion"] == [REQUIRE_APPROVAL]
    assert AUTO_APPROVE in by_kind["cycle"]


# --- start-up order and health ------------------------------------------------------------------


def test_services_start_after_the_topics_and_the_migrations(doc):
    for name in SERVICES:
        needs = doc["services"][name]["depends_on"]
        assert needs["kafka-init"] == {"condition": "service_completed_successfully"}, name
        assert needs["db-migrate"] == {"condition": "service_completed_successfully"}, name
        assert needs["postgres"] == {"condition": "service_healthy"}, name
    services = doc["services"]
    assert services["db-migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert services["kafka-init"]["depends_on"]["kafka"] == {"condition": "service_healthy"}
    assert services["db-migrate"]["restart"] == services["kafka-init"]["restart"] == "no"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])


def test_whatever_is_waited_for_as_healthy_has_a_healthcheck(doc):
    for name, spec in doc["services"].items():
        for needed, condition in (spec.get("depends_on") or {}).items():
            assert needed in doc["services"], f"{name} depends on {needed}, which compose does not define"
            if condition["condition"] == "service_healthy":
                assert "test" in doc["services"][needed].get("healthcheck", {}), f"{name} waits for {needed}"


def test_every_long_running_container_restarts_and_is_checked(doc):
    for name, spec in long_running(doc).items():
        assert spec.get("restart") == "unless-stopped", name
        if name not in NO_HEALTHCHECK:
            check = spec.get("healthcheck", {})
            assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
    assert set(NO_HEALTHCHECK) <= set(long_running(doc))


def test_the_services_reach_the_broker_the_database_and_the_collector_compose_runs(doc, monkeypatch):
    for name in SERVICES:
        settings = service_settings(doc, name, monkeypatch)
        for address in (settings.bootstrap_servers, settings.database_url.split("@")[1], settings.otlp_endpoint):
            host = re.sub(r"^[a-z]+://", "", address).split(":")[0]
            assert host in doc["services"], f"{name} talks to {host}, which compose does not run"
    advertised = dict(item.split("://") for item in
                      environment(doc["services"]["kafka"])["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert environment(doc["services"]["trainer"])["KAFKA_BOOTSTRAP_SERVERS"] == advertised["CLIENT"]
    migrate = environment(doc["services"]["db-migrate"])
    assert migrate["NEURONS_DATABASE_URL"] == environment(doc["services"]["trainer"])["NEURONS_DATABASE_URL"]


def test_no_path_reaches_outside_the_repository(doc):
    for name, spec in doc["services"].items():
        for mount in mounts(spec):
            if mount["type"] == "bind":
                assert repo_path(mount["source"]).is_relative_to(ROOT), f"{name}: {mount['source']}"
    assert all(s["file"].startswith("./deploy/") for s in doc["secrets"].values())


def test_the_readme_compose_commands_name_real_containers_and_commands(doc):
    readme = (ROOT / "README.md").read_text()
    lines = re.findall(r"^docker compose (.+)$", readme, flags=re.MULTILINE)
    assert lines, "the README shows no docker compose command"
    for line in lines:
        words = shlex.split(line)
        if words[0] == "run":
            container = next(w for w in words[1:] if not w.startswith("-"))
            rest = words[words.index(container) + 1:]
            spec = doc["services"][container]
            assert spec.get("entrypoint") == ["neurons"] and cli_command_exists(rest), line
        elif words[0] in ("restart", "stop", "logs"):
            assert set(words[1:]) <= set(doc["services"]), line

"""docker-compose.yml runs what the code is: every service's command and environment."""

import re
from pathlib import Path

import yaml

from shared.settings import ENV_VARS
from shared.topics import SERVICES

ROOT = Path(__file__).resolve().parents[3]


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_service_runs_its_module_from_one_image():
    services = compose()["services"]
    for name in SERVICES:
        assert services[name]["command"] == ["python", "-m", f"services.{name}"]
        assert services[name]["build"] == "."
        assert (ROOT / "services" / name / "__main__.py").exists()
    assert {"kafka", "postgres", "otel-collector", "jaeger"} <= set(services)
    assert "broker,controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]


def test_service_environment_is_only_what_the_settings_read():
    services = compose()["services"]
    for name in SERVICES:
        env = services[name]["environment"]
        unknown = set(env) - set(ENV_VARS)
        assert not unknown, f"{name} sets variables nothing reads: {unknown}"
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert env["NEURONS_DATABASE_URL"].startswith("postgresql://")


def test_every_variable_the_code_reads_is_declared():
    code = "\n".join(p.read_text() for p in (ROOT / "shared").rglob("*.py"))
    code += "\n".join(p.read_text() for p in (ROOT / "services").rglob("*.py"))
    read = set(re.findall(r"['\"]((?:NEURONS|KAFKA|OTEL)_[A-Z_]+)['\"]", code))
    assert read - set(ENV_VARS) == set(), "read but not declared in shared/settings.py ENV_VARS"

"""Reading docker-compose.yml and the files under deploy/ it mounts, for the compose tests.

No Docker engine is needed: the tests read the files as Compose would and
check them against the code (settings, services, metrics catalogue, policies).
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
KEYS = "deploy/keys"  # made by the key commands before `docker compose up`, never in the repository
PROJECT_IMAGE = "neurons:latest"


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_schema() -> dict[str, Any]:
    """The Compose Specification's JSON schema, as the check-jsonschema package ships it."""
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def deploy_yaml(relative: str) -> Any:
    return yaml.safe_load((DEPLOY / relative).read_text())


def project_containers(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The containers built from this repository's Dockerfile: the services, db-migrate and the tools."""
    return {name: spec for name, spec in doc["services"].items() if spec.get("build") == "."}


def mounts(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A container's volumes in long form: type, source, target, read_only."""
    for volume in spec.get("volumes", []):
        if isinstance(volume, dict):
            yield {"read_only": False, **volume}
            continue
        parts = volume.split(":")
        source, target = parts[0], parts[1]
        kind = "bind" if source.startswith((".", "/")) else "volume"
        yield {"type": kind, "source": source, "target": target,
               "read_only": len(parts) > 2 and "ro" in parts[2].split(",")}


def repo_path(source: str) -> Path:
    """A bind mount's or secret's host path, relative to the compose file."""
    return (ROOT / source).resolve()


def under_keys(source: str) -> bool:
    return Path(source).as_posix().lstrip("./").startswith(KEYS)


def environment(spec: dict[str, Any], **interpolated: str) -> dict[str, str]:
    """A container's environment as strings, with ``${NAME...}`` replaced from ``interpolated``."""
    env = {}
    for key, value in (spec.get("environment") or {}).items():
        text = str(value)
        for name, replacement in interpolated.items():
            text = re.sub(r"\$\{" + name + r"(?::?[-?][^}]*)?\}", replacement, text)
        env[key] = text
    return env


def published(spec: dict[str, Any]) -> list[tuple[int, int]]:
    """The (host, container) port pairs a container publishes."""
    pairs = []
    for port in spec.get("ports", []):
        host, container = str(port).rsplit(":", 1) if ":" in str(port) else (str(port), str(port))
        pairs.append((int(host.rsplit(":", 1)[-1]), int(container.split("/")[0])))
    return pairs


def host_port(address: str) -> tuple[str, int]:
    """``host:port`` or a URL's host and port."""
    address = re.sub(r"^[a-z]+://", "", address).split("/")[0]
    host, port = address.rsplit(":", 1)
    return host, int(port)


# --- PromQL, as far as the dashboards need it -------------------------------------------------------

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def promql_series(expr: str) -> tuple[set[str], set[str]]:
    """The series names and the label names a PromQL expression uses."""
    labels: set[str] = set()
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals say nothing about names
    for matchers in re.findall(r"\{([^}]*)\}", text):
        labels.update(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
        labels.update(name.strip() for name in grouping.split(",") if name.strip())
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", text)
    names = {match.group(1) for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", text)}
    return {n for n in names if n.lower() not in PROMQL_WORDS}, labels


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expr) of every query of a dashboard."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel.get("title", ""), target["expr"]

"""Settings read from the environment, and nothing else.

Every variable a service reads is listed in ``ENV_VARS`` so docker-compose and
the README can be checked against the code. Unset variables fall back to the
embedded defaults of one machine: the Tansu broker started by ``neurons broker
start`` (its address is kept in ``var/broker/broker.json``) and SQLite under
``var/db/``.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ENV_VARS: dict[str, str] = {
    "NEURONS_VAR": "folder for state, logs, artefacts (default ./var)",
    "KAFKA_BOOTSTRAP_SERVERS": "external Kafka; unset means the embedded broker",
    "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT, SASL_PLAINTEXT, SASL_SSL or SSL (default SASL_PLAINTEXT with a user, else PLAINTEXT)",
    "KAFKA_SASL_MECHANISM": "SASL mechanism (default SCRAM-SHA-512)",
    "KAFKA_SASL_USERNAME": "this process's Kafka user, e.g. neurons-trainer (see deploy/kafka/README.md)",
    "KAFKA_SASL_PASSWORD": "that user's password",
    "KAFKA_SASL_PASSWORD_FILE": "file holding that password (read when KAFKA_SASL_PASSWORD is unset)",
    "NEURONS_DATABASE_URL": "SQLAlchemy URL shared by all services; unset means SQLite per service under var/db",
    "NEURONS_TOPIC_PREFIX": "namespace of topics and consumer groups (default neurons.)",
    "NEURONS_TOPIC_PARTITIONS": "partitions per topic created at start-up",
    "NEURONS_TOPIC_REPLICATION": "replication factor of created topics",
    "NEURONS_TOPIC_MIN_INSYNC": "min.insync.replicas of created topics (default min(2, replication factor))",
    "NEURONS_SESSION_TIMEOUT_S": "consumer group session timeout",
    "NEURONS_FETCH_WAIT_MS": "longest a worker's fetch waits at the broker for new records",
    "NEURONS_HANDLER_RETRIES": "attempts before an event goes to the dead-letter topic",
    "NEURONS_TRUST": "trust anchors file: services' public keys and the first admins (default var/keys/trust.json)",
    "NEURONS_SERVICE_KEYS": "folder of services' private keys (default var/keys/services)",
    "NEURONS_SERVICE_KEY": "this service's private key file (PEM); overrides NEURONS_SERVICE_KEYS/<service>.pem",
    "NEURONS_POLICIES": "approval policy file (YAML or JSON)",
    "NEURONS_APPROVAL_TTL_S": "seconds before an approval request expires (default 24 h)",
    "NEURONS_OPERATOR_KEYS": "folder of operators' private keys used by the CLI (default var/keys/operators)",
    "NEURONS_NODE": "node name carried in event producers and artefact locations",
    "NEURONS_ARTEFACT_REMOTE": "fsspec URL of the shared artefact store (s3://bucket/prefix); unset means local only",
    "NEURONS_TRACE_FILE": "write finished spans as JSON lines to this file (one per service)",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "send spans to this OTLP/HTTP collector",
    "NEURONS_CARBON_INTENSITY": "grid carbon intensity in gCO2e per kWh",
    "NEURONS_PUE": "power usage effectiveness of the site",
    "NEURONS_CPU_TDP_W": "CPU package TDP in watts for the process energy model",
    "NEURONS_ENERGY_BUDGETS": "rolling energy budgets, e.g. 12h=300,24h=500 (Wh); unset means none",
    "NEURONS_MODEL_PARAMS": "parameter count used to size training micro-batches",
    "NEURONS_HARDWARE_PROFILE_S": "seconds between hardware profiles (energy service)",
    "NEURONS_SOAK_REPLICAS": "replicas per side in a validation soak",
    "NEURONS_SOAK_CYCLES": "cycles per validation soak",
    "NEURONS_SOAK_EPISODES": "evaluation episodes per replica per cycle",
    "NEURONS_SOAK_COOLDOWN_S": "pause between soak cycles",
    "NEURONS_DRIFT_SOAK_S": "seconds between drift soaks of the adapter in production (0: off)",
    "NEURONS_VALIDATION_THRESHOLDS": "judgement thresholds file (JSON or YAML) for verdicts",
    "NEURONS_SOAK_FAULT_LATENCY_JITTER_MS": "chaos drill: candidate replicas answer early and late by turns (wider latency, same median)",
    "NEURONS_EVOLUTION_TICK_S": "seconds between evolution's clock ticks (retries, schedule)",
    "NEURONS_SCHEDULE_INTERVAL_S": "seconds between scheduled cycles (0: none)",
    "NEURONS_MIN_STEPS": "fewest training steps the configuration search may propose",
    "NEURONS_MAX_STEPS": "most training steps the configuration search may propose",
    "NEURONS_SEARCH_SEED": "seed of the configuration search",
    "NEURONS_EVOLUTION_BUDGET_WH": "energy budget (Wh) over evolution's rolling window",
    "NEURONS_CARBON_CAUTION_G_PER_KWH": "carbon gate: above this intensity cycles train fewer steps",
    "NEURONS_CARBON_PAUSE_G_PER_KWH": "carbon gate: above this intensity cycles wait",
    "NEURONS_MAX_LOAD_PER_CORE": "hardware gate: highest load average per core to start a cycle",
    "NEURONS_MAX_PENDING_APPROVALS": "approvals gate: most pending approvals before cycles wait",
    "NEURONS_GATE_RETRY_S": "seconds before a deferred cycle is tried again",
    "NEURONS_CHECKPOINT_EVERY": "training steps between checkpoints a restarted trainer resumes from",
    "NEURONS_MODEL": "base model for cycles: tiny, smollm2 or a local HF folder",
    "NEURONS_API_PORT": "registry HTTP API and dashboard port",
    "NEURONS_SERVING_HOST": "address the serving API binds (default 127.0.0.1; elsewhere NEURONS_API_TOKEN is required)",
    "NEURONS_SERVING_PORT": "serving API port (OpenAI-compatible; default 8700, 0 picks a free one)",
    "NEURONS_SERVING_ADAPTERS": "adapters kept resident on the serving base model (least recently used evicted)",
    "NEURONS_SERVING_MAX_TOKENS": "most tokens one serving request may generate",
    "NEURONS_SERVING_TIMEOUT_S": "seconds one serving request may take, queueing included",
    "NEURONS_SERVING_QUEUE": "serving requests that may wait for the model; more are answered 429",
    "NEURONS_API_HOST": "address the registry API binds to (default 127.0.0.1; any other needs NEURONS_API_TOKEN)",
    "NEURONS_API_TOKEN": "bearer token every registry API request must carry (required off loopback)",
    "NEURONS_METRICS_HOST": "address each service's Prometheus /metrics binds (default 127.0.0.1)",
    "NEURONS_METRICS_PORT": "port of each service's Prometheus /metrics (default 0: a free one, shown by neurons status)",
}

def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


@dataclass(frozen=True)
class Settings:
    var_dir: Path
    bootstrap_servers: str | None
    database_url: str | None
    topic_partitions: int = 3
    topic_replication: int = 1
    topic_min_insync: int | None = None  # None: min(2, topic_replication)
    session_timeout_s: float = 6.0
    handler_retries: int = 3
    fetch_wait_ms: int = 100
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = field(default=None, repr=False)  # a secret: kept out of reprs and logs
    trust_path: Path = Path("var/keys/trust.json")
    service_key_dir: Path = Path("var/keys/services")
    service_key: Path | None = None
    operator_key_dir: Path = Path("var/keys/operators")
    policies_path: Path | None = None
    node: str = field(default_factory=socket.gethostname)
    artefact_remote: str | None = None
    trace_file: Path | None = None
    otlp_endpoint: str | None = None
    carbon_intensity_g_per_kwh: float = 400.0
    pue: float = 1.2
    cpu_tdp_w: float | None = None
    model: str = "smollm2"
    api_port: int = 8600
    api_host: str = "127.0.0.1"
    api_token: str | None = field(default=None, repr=False)  # a secret: kept out of reprs and logs
    serving_host: str = "127.0.0.1"
    serving_port: int = 8700
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0

    @classmethod
    def from_env(cls) -> "Settings":
        var_dir = Path(_env("NEURONS_VAR", "var")).resolve()
        tdp = _env("NEURONS_CPU_TDP_W")
        policies = _env("NEURONS_POLICIES")
        trace_file = _env("NEURONS_TRACE_FILE")
        sasl_user = _env("KAFKA_SASL_USERNAME")
        return cls(
            var_dir=var_dir,
            bootstrap_servers=_env("KAFKA_BOOTSTRAP_SERVERS"),
            database_url=_env("NEURONS_DATABASE_URL"),
            topic_partitions=int(_env("NEURONS_TOPIC_PARTITIONS", "3")),
            topic_replication=int(_env("NEURONS_TOPIC_REPLICATION", "1")),
            topic_min_insync=int(min_insync) if (min_insync := _env("NEURONS_TOPIC_MIN_INSYNC")) else None,
            session_timeout_s=float(_env("NEURONS_SESSION_TIMEOUT_S", "6")),
            handler_retries=int(_env("NEURONS_HANDLER_RETRIES", "3")),
            fetch_wait_ms=int(_env("NEURONS_FETCH_WAIT_MS", "100")),
            kafka_security_protocol=_env("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT" if sasl_user else "PLAINTEXT"),
            kafka_sasl_mechanism=_env("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            kafka_sasl_username=sasl_user,
            kafka_sasl_password=_env("KAFKA_SASL_PASSWORD") or (
                Path(password_file).read_text().strip() if (password_file := _env("KAFKA_SASL_PASSWORD_FILE")) else None),
            trust_path=Path(_env("NEURONS_TRUST", str(var_dir / "keys" / "trust.json"))),
            service_key_dir=Path(_env("NEURONS_SERVICE_KEYS", str(var_dir / "keys" / "services"))),
            service_key=Path(service_key) if (service_key := _env("NEURONS_SERVICE_KEY")) else None,
            operator_key_dir=Path(_env("NEURONS_OPERATOR_KEYS", str(var_dir / "keys" / "operators"))),
            policies_path=Path(policies) if policies else None,
            node=_env("NEURONS_NODE", socket.gethostname()),
            artefact_remote=_env("NEURONS_ARTEFACT_REMOTE"),
            trace_file=Path(trace_file) if trace_file else None,
            otlp_endpoint=_env("OTEL_EXPORTER_OTLP_ENDPOINT"),
            carbon_intensity_g_per_kwh=float(_env("NEURONS_CARBON_INTENSITY", "400")),
            pue=float(_env("NEURONS_PUE", "1.2")),
            cpu_tdp_w=float(tdp) if tdp else None,
            model=_env("NEURONS_MODEL", "smollm2"),
            api_port=int(_env("NEURONS_API_PORT", "8600")),
            api_host=_env("NEURONS_API_HOST", "127.0.0.1"),
            api_token=_env("NEURONS_API_TOKEN"),
            serving_host=_env("NEURONS_SERVING_HOST", "127.0.0.1"),
            serving_port=int(_env("NEURONS_SERVING_PORT", "8700")),
            metrics_host=_env("NEURONS_METRICS_HOST", "127.0.0.1"),
            metrics_port=int(_env("NEURONS_METRICS_PORT", "0")),
        )

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)

    # --- derived locations -------------------------------------------------
    @property
    def broker_dir(self) -> Path:
        return self.var_dir / "broker"

    @property
    def artefact_dir(self) -> Path:
        return self.var_dir / "artefacts"

    @property
    def model_cache_dir(self) -> Path:
        return self.var_dir / "models"

    @property
    def run_dir(self) -> Path:
        return self.var_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.var_dir / "log"

    def bootstrap(self) -> str:
        """The Kafka bootstrap address: the configured one or the embedded broker's."""
        if self.bootstrap_servers:
            return self.bootstrap_servers
        info = self.broker_dir / "broker.json"
        if info.exists():
            return json.loads(info.read_text())["bootstrap_servers"]
        raise RuntimeError(
            "no Kafka broker: run `neurons broker start` (or `neurons up`), "
            "or set KAFKA_BOOTSTRAP_SERVERS"
        )

    def kafka_security(self) -> dict[str, Any]:
        """aiokafka's connection keywords for every client (producer, consumer, admin) of this process.

        Empty for PLAINTEXT (the embedded broker); otherwise the protocol and,
        for SASL, this process's own user: the broker's ACLs are per user
        (deploy/kafka/README.md).
        """
        protocol = self.kafka_security_protocol.upper()
        if protocol not in ("PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"):
            raise ValueError(f"KAFKA_SECURITY_PROTOCOL={protocol}: use PLAINTEXT, SASL_PLAINTEXT, SASL_SSL or SSL")
        if protocol == "PLAINTEXT":
            return {}
        kwargs: dict[str, Any] = {"security_protocol": protocol}
        if protocol.startswith("SASL_"):
            if not (self.kafka_sasl_username and self.kafka_sasl_password):
                raise RuntimeError(f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_USERNAME and "
                                   "KAFKA_SASL_PASSWORD (or KAFKA_SASL_PASSWORD_FILE)")
            kwargs.update(sasl_mechanism=self.kafka_sasl_mechanism, sasl_plain_username=self.kafka_sasl_username,
                          sasl_plain_password=self.kafka_sasl_password)
        if protocol.endswith("SSL"):
            kwargs["ssl_context"] = ssl.create_default_context()
        return kwargs

    def db_url(self, service: str) -> str:
        """One database per service on SQLite; the shared URL when one is set."""
        if self.database_url:
            return self.database_url
        path = self.var_dir / "db" / f"{service}.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"

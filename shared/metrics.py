"""OpenTelemetry metrics of a service, exported to Prometheus (and OTLP when a collector is set).

``METRICS`` is the catalogue: every name a service exports, as Prometheus
sees it, with its type, labels and meaning. Dashboards and alerts name only
what it lists; a unit test checks that a MeterProvider exports each of them.
Every series carries ``service`` (the service's name); ``target_info`` names the
process (``service_name`` neurons-<service>).

Each service answers ``GET /metrics`` on NEURONS_METRICS_HOST:NEURONS_METRICS_PORT
(0: a free port) and writes the URL to ``var/run/<service>-metrics.json``, which
``neurons status`` prints. With OTEL_EXPORTER_OTLP_ENDPOINT set the same
instruments also go to that collector over OTLP/HTTP.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions
from opentelemetry.metrics import Observation as OtelObservation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest

from shared.settings import Settings


@dataclass(frozen=True)
class MetricSpec:
    name: str  # the Prometheus name (a histogram adds _bucket, _sum and _count)
    kind: str  # counter, gauge or histogram
    labels: tuple[str, ...]
    help: str
    unit: str = ""  # the OpenTelemetry unit: "s" for seconds, "J" for joules, "" for a count or a ratio


def _spec(name: str, kind: str, labels: str, help_text: str, unit: str = "") -> MetricSpec:
    return MetricSpec(name, kind, tuple(labels.split()), help_text, unit)


_SERVING = "profile channel adapter endpoint"

METRICS: dict[str, MetricSpec] = {spec.name: spec for spec in (
    # --- the runtime of every service (shared.service, shared.bus) ---------------------------
    _spec("neurons_events_consumed_total", "counter", "service type",
          "Events a service read and admitted (signature and producer checked), by event type."),
    _spec("neurons_events_published_total", "counter", "service type",
          "Events a service published to its topic, by event type."),
    _spec("neurons_events_dead_lettered_total", "counter", "service type reason",
          "Records a service sent to the dead-letter topic, by event type ('unknown' when unreadable) and reason "
          "(bad_json, bad_envelope, unknown_type, schema_violation, unsigned, bad_signature, unknown_key, "
          "revoked_key, unauthorised_producer, handler_failed, ...)."),
    _spec("neurons_handler_duration_seconds", "histogram", "service type",
          "Seconds a handler took, its transaction and the outbox's publication included.", "s"),
    _spec("neurons_consumer_lag", "gauge", "service topic partition",
          "Records on a partition the service's consumer has not read yet (end offset minus position)."),
    _spec("neurons_outbox_depth", "gauge", "service",
          "Events a service has stored in its outbox and not published yet."),
    # --- training (services.trainer) ------------------------------------------------------------
    _spec("neurons_training_tokens_per_second", "gauge", "service cycle_id kind",
          "Training throughput in tokens per second at the last progress report of a cycle's job."),
    _spec("neurons_training_loss", "gauge", "service cycle_id kind",
          "Training loss at the last progress report of a cycle's job."),
    _spec("neurons_training_energy_joules_total", "counter", "service cycle_id kind",
          "Joules a cycle's training job used (added when the job completes).", "J"),
    _spec("neurons_training_jobs_total", "counter", "service kind status",
          "Training jobs finished, by kind (mntp, rl) and status (trained, fallback, failed)."),
    # --- validation (services.validator) --------------------------------------------------------
    _spec("neurons_soak_verdicts_total", "counter", "service verdict purpose",
          "Soak verdicts (pass, fail, inconclusive) by the soak's purpose (candidate, drift)."),
    _spec("neurons_soak_p_value", "histogram", "service metric",
          "p-values of a soak's comparisons of candidate and baseline, by compared metric."),
    # --- energy (services.energy) ---------------------------------------------------------------
    _spec("neurons_energy_joules_total", "counter", "service job_kind method",
          "Measured joules of finished jobs (training, validation) by how they were measured (rapl, nvml, model).",
          "J"),
    _spec("neurons_energy_gco2e_total", "counter", "service job_kind",
          "Grams of CO2e of finished jobs: kWh x PUE x the grid's carbon intensity."),
    _spec("neurons_energy_unmeasured_jobs_total", "counter", "service job_kind",
          "Finished jobs whose energy could not be measured (the report carries the reason)."),
    _spec("neurons_energy_budget_exceeded_total", "counter", "service window",
          "Rolling energy budgets crossed, by window (e.g. 12h)."),
    # --- the registry (services.registry) -------------------------------------------------------
    _spec("neurons_promotions_total", "counter", "service channel",
          "Adapters promoted to a channel."),
    _spec("neurons_rollbacks_total", "counter", "service channel",
          "Channels rolled back to an earlier adapter."),
    # --- evolution (services.evolution) --------------------------------------------------------
    _spec("neurons_cycles_proposed_total", "counter", "service kind trigger",
          "Cycles the gates let through, by kind (mntp, rl) and what started them (schedule, dataset, operator)."),
    _spec("neurons_cycles_deferred_total", "counter", "service gate",
          "Cycles deferred, by the gate that held them (hardware, energy, carbon, approvals, ...)."),
    _spec("neurons_cycles_completed_total", "counter", "service kind outcome",
          "Cycles ended, by kind and outcome (promoted, failed, inconclusive, training_failed, ...)."),
    _spec("neurons_cycle_requests_refused_total", "counter", "service kind",
          "Operators' cycle (mntp) and research (rl) requests refused, the reason in the refusal event."),
    # --- approvals (services.approval) ----------------------------------------------------------
    _spec("neurons_approval_wait_seconds", "histogram", "service kind outcome",
          "Seconds from an approval's request to its outcome (granted, rejected, expired), by kind.", "s"),
    # --- serving (services.serving.api) ---------------------------------------------------------
    _spec("neurons_serving_requests_total", "counter", f"service {_SERVING} status",
          "Serving requests answered, by profile, channel, adapter, endpoint and HTTP status."),
    _spec("neurons_serving_errors_total", "counter", f"service {_SERVING} code",
          "Serving requests refused or failed, by error code."),
    _spec("neurons_serving_request_duration_seconds", "histogram", f"service {_SERVING} status",
          "Seconds from a serving request's start to its answer (a stream: its last byte).", "s"),
    _spec("neurons_serving_prompt_tokens_total", "counter", f"service {_SERVING}",
          "Prompt (or input) tokens read by the serving API."),
    _spec("neurons_serving_completion_tokens_total", "counter", f"service {_SERVING}",
          "Tokens generated by the serving API."),
    _spec("neurons_serving_generation_seconds_total", "counter", f"service {_SERVING}",
          "Seconds spent generating (tokens/s = ratio of the rates).", "s"),
    _spec("neurons_serving_tokens_per_second", "gauge", f"service {_SERVING}",
          "Tokens per second of the last generation."),
    _spec("neurons_serving_time_to_first_token_seconds", "histogram", f"service {_SERVING}",
          "Seconds from a serving request's start to its first token.", "s"),
)}

# histogram bounds: seconds of work by default; waits for a person, p-values and first tokens have their own
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
WAIT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 24 * 3600.0,
                3 * 24 * 3600.0)
P_VALUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BUCKETS = {"neurons_approval_wait_seconds": WAIT_BUCKETS, "neurons_soak_p_value": P_VALUE_BUCKETS,
           "neurons_serving_time_to_first_token_seconds": TTFT_BUCKETS}

Observation = tuple[float, Mapping[str, str]]  # a value and its labels, as an observable gauge's reader gives


class Metrics:
    """A service's meter: the catalogue's instruments, read by Prometheus at ``GET /metrics`` (and sent by OTLP).

    Recording is one call with the catalogue name and labels (``service`` is
    added): ``metrics.add("neurons_promotions_total", channel="production")``.
    """

    def __init__(self, service: str, settings: Settings | None = None, *, readers: Iterable[MetricReader] = (),
                 export_interval_ms: float = 10_000) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        self.reader = PrometheusMetricReader(scope_info_enabled=False, registry=self.registry)
        all_readers: list[MetricReader] = [self.reader, *readers]
        if settings is not None and settings.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            endpoint = settings.otlp_endpoint.rstrip("/") + "/v1/metrics"
            all_readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint),
                                                             export_interval_millis=export_interval_ms))
        self.provider = MeterProvider(resource=Resource.create({"service.name": f"neurons-{service}"}),
                                      metric_readers=all_readers)
        self.meter = self.provider.get_meter(f"neurons.{service}")
        self._instruments: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._server: Any = None
        self.url: str | None = None

    # --- recording ---------------------------------------------------------
    def add(self, name: str, amount: float = 1, **labels: Any) -> None:
        """Add to a counter of the catalogue."""
        if amount:
            self._instrument(name, "counter").add(amount, self._labels(name, labels))

    def record(self, name: str, value: float, **labels: Any) -> None:
        """Record a value in a histogram of the catalogue."""
        self._instrument(name, "histogram").record(value, self._labels(name, labels))

    def set(self, name: str, value: float, **labels: Any) -> None:
        """Set a gauge of the catalogue."""
        self._instrument(name, "gauge").set(value, self._labels(name, labels))

    def observe(self, name: str, read: Callable[[], Iterable[Observation]]) -> None:
        """Make a gauge of the catalogue whose values ``read`` gives at each collection: (value, labels) pairs."""
        spec = _spec_of(name, "gauge")

        def callback(options: CallbackOptions) -> Iterator[OtelObservation]:
            for value, labels in read():
                yield OtelObservation(value, self._labels(name, dict(labels)))

        with self._lock:
            if name not in self._instruments:
                self._instruments[name] = self.meter.create_observable_gauge(
                    name, callbacks=[callback], unit=spec.unit, description=spec.help)

    def _instrument(self, name: str, kind: str) -> Any:
        instrument = self._instruments.get(name)
        if instrument is not None:
            return instrument
        spec = _spec_of(name, kind)
        with self._lock:
            if name not in self._instruments:
                if kind == "counter":
                    made = self.meter.create_counter(name, unit=spec.unit, description=spec.help)
                elif kind == "gauge":
                    made = self.meter.create_gauge(name, unit=spec.unit, description=spec.help)
                else:
                    made = self.meter.create_histogram(
                        name, unit=spec.unit, description=spec.help,
                        explicit_bucket_boundaries_advisory=list(BUCKETS.get(name, SECONDS_BUCKETS)))
                self._instruments[name] = made
            return self._instruments[name]

    def _labels(self, name: str, labels: Mapping[str, Any]) -> dict[str, str]:
        expected = set(METRICS[name].labels) - {"service"}
        if set(labels) != expected:
            raise ValueError(f"{name} takes the labels {sorted(expected)}, not {sorted(labels)}")
        return {"service": self.service, **{key: "" if value is None else str(value) for key, value in labels.items()}}

    # --- reading -----------------------------------------------------------
    def render(self) -> bytes:
        """Every instrument's current values in the Prometheus text format."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int, address: Path | None = None) -> str:
        """Answer ``GET /metrics`` on ``host``:``port`` (0: a free port) in a thread; write the URL to ``address``."""
        from prometheus_client import start_http_server

        from shared.http_server import local_url

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        self.url = local_url(host, server.server_address[1]) + "/metrics"
        if address is not None:
            address.parent.mkdir(parents=True, exist_ok=True)
            address.write_text(json.dumps({"url": self.url, "host": host, "port": server.server_address[1]}))
        return self.url

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.provider.shutdown()


def _spec_of(name: str, kind: str) -> MetricSpec:
    spec = METRICS.get(name)
    if spec is None:
        raise KeyError(f"{name} is not in the metrics catalogue (shared.metrics.METRICS)")
    if spec.kind != kind:
        raise TypeError(f"{name} is a {spec.kind}, not a {kind}")
    return spec


def metrics_address(settings: Settings, service: str) -> Path:
    """Where a running service writes the URL of its ``/metrics`` (read by ``neurons status``)."""
    return settings.run_dir / f"{service}-metrics.json"


# --- what the services' wiring records, read from the events they emit or fold ---------------


def record_training(metrics: Metrics, events: Iterable[Any], kind: str) -> None:
    """training.progressed sets throughput and loss; training.completed/failed count the job and its joules."""
    for event in events:
        payload = event.payload
        labels = {"cycle_id": payload.get("cycle_id") or "", "kind": kind}
        if event.type == "training.progressed":
            if isinstance(payload.get("tokens_per_s"), (int, float)):
                metrics.set("neurons_training_tokens_per_second", payload["tokens_per_s"], **labels)
            if isinstance(payload.get("loss"), (int, float)):
                metrics.set("neurons_training_loss", payload["loss"], **labels)
        elif event.type == "training.completed":
            joules = (payload.get("energy") or {}).get("joules")
            if isinstance(joules, (int, float)) and joules > 0:
                metrics.add("neurons_training_energy_joules_total", joules, **labels)
            metrics.add("neurons_training_jobs_total", kind=kind, status=payload.get("status") or "trained")
        elif event.type == "training.failed":
            metrics.add("neurons_training_jobs_total", kind=kind, status="failed")


def record_soak(metrics: Metrics, events: Iterable[Any]) -> None:
    """validation.completed counts its verdict and records the p-value of each compared metric."""
    for event in events:
        if event.type != "validation.completed":
            continue
        payload = event.payload
        metrics.add("neurons_soak_verdicts_total", verdict=payload.get("verdict"), purpose=payload.get("purpose"))
        for name, compared in sorted((payload.get("metrics") or {}).items()):
            p_value = compared.get("p_two_sided") if isinstance(compared, dict) else None
            if isinstance(p_value, (int, float)):
                metrics.record("neurons_soak_p_value", p_value, metric=name)


def record_channel_change(metrics: Metrics, event: Any) -> None:
    """adapter.promoted and adapter.rolled_back count per channel."""
    if event.type == "adapter.promoted":
        metrics.add("neurons_promotions_total", channel=event.payload.get("channel"))
    elif event.type == "adapter.rolled_back":
        metrics.add("neurons_rollbacks_total", channel=event.payload.get("channel"))


def record_evolution(metrics: Metrics, events: Iterable[Any]) -> None:
    """cycle.proposed / research.proposed, cycle.deferred, cycle.completed and refused requests count."""
    for event in events:
        payload = event.payload
        if event.type in ("cycle.proposed", "research.proposed"):
            metrics.add("neurons_cycles_proposed_total", kind=payload.get("kind"),
                        trigger=(payload.get("trigger") or {}).get("type"))
        elif event.type == "cycle.deferred":
            metrics.add("neurons_cycles_deferred_total", gate=payload.get("gate"))
        elif event.type == "cycle.completed":
            metrics.add("neurons_cycles_completed_total", kind=payload.get("kind"), outcome=payload.get("outcome"))
        elif event.type in ("cycle.request_refused", "research.request_refused"):
            metrics.add("neurons_cycle_requests_refused_total", kind="rl" if event.type.startswith("research") else "mntp")


APPROVAL_OUTCOMES = {"approval.granted": "granted", "approval.rejected": "rejected", "approval.expired": "expired"}


def record_approval_waits(metrics: Metrics, events: Iterable[Any], requested_at: Callable[[str], Any]) -> None:
    """Each granted, rejected or expired approval records the seconds since its request (``requested_at(id)``)."""
    for event in events:
        outcome = APPROVAL_OUTCOMES.get(event.type)
        asked = requested_at(event.payload.get("request_id")) if outcome else None
        if asked is not None:
            waited = max(0.0, (event.occurred_at - asked).total_seconds())
            metrics.record("neurons_approval_wait_seconds", waited, kind=event.payload.get("kind"), outcome=outcome)


def record_energy(metrics: Metrics, events: Iterable[Any]) -> None:
    """energy.reported adds its joules and gCO2e (or counts a job it could not measure); a crossed budget counts."""
    for event in events:
        payload = event.payload
        if event.type == "energy.reported":
            job_kind = payload.get("job_kind")
            if isinstance(payload.get("joules"), (int, float)):
                metrics.add("neurons_energy_joules_total", payload["joules"], job_kind=job_kind,
                            method=payload.get("method") or "")
                if isinstance(payload.get("gco2e"), (int, float)):
                    metrics.add("neurons_energy_gco2e_total", payload["gco2e"], job_kind=job_kind)
            else:
                metrics.add("neurons_energy_unmeasured_jobs_total", job_kind=job_kind)
        elif event.type == "energy.budget_exceeded":
            metrics.add("neurons_energy_budget_exceeded_total", window=payload.get("window"))

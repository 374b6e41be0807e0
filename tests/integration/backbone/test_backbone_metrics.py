"""Each running service answers GET /metrics in Prometheus' text format at the URL `neurons status` prints."""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families

from shared.topics import topic_for
from tests.support import await_until, dataset_payload, make_event

FAST = {"NEURONS_EVOLUTION_TICK_S": "1", "NEURONS_MAX_STEPS": "30", "NEURONS_MAX_LOAD_PER_CORE": "1000",
        "NEURONS_SCHEDULE_INTERVAL_S": "0"}


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample at ``url``: (name, labels) -> value."""
    answer = httpx.get(url, timeout=10)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(answer.text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, key), v in samples.items() if n == name and set(labels.items()) <= key)


def has(url: str, *wanted: tuple[str, dict]) -> dict | None:
    samples = scrape(url)
    return samples if all(value(samples, name, **labels) >= 1 for name, labels in wanted) else None


async def test_running_services_count_what_they_consume_publish_and_dead_letter(platform):
    platform.env.update(FAST)
    await platform.aensure_topics()
    platform.start("evolution", "approval")

    status = json.loads(platform.cli("status", "--json").stdout)
    urls = {row["name"]: row["metrics_url"] for row in status["services"]}
    assert urls["evolution"].startswith("http://127.0.0.1:") and urls["evolution"].endswith("/metrics")
    assert urls["approval"] != urls["evolution"] and urls["trainer"] is None  # a stopped service has none
    assert f"metrics {urls['approval']}" in platform.cli("status").stdout

    async with platform.publisher() as publisher:
        await publisher.publish(make_event("dataset.registered", "ds-m", dataset_payload("ds-m")))
        await publisher.send_raw(topic_for("dataset"), b"{not an event", b"ds-m")

    evolution = await await_until(lambda: has(
        urls["evolution"],
        ("neurons_events_consumed_total", {"service": "evolution", "type": "dataset.registered"}),
        ("neurons_events_published_total", {"service": "evolution", "type": "cycle.proposed"}),
        ("neurons_events_dead_lettered_total", {"type": "unknown", "reason": "bad_json"}),
        ("neurons_handler_duration_seconds_count", {"type": "dataset.registered"}),
    ), 90, interval=1.0, message="evolution's counts at its /metrics")
    approval = await await_until(lambda: has(
        urls["approval"],
        ("neurons_events_consumed_total", {"service": "approval", "type": "cycle.proposed"}),
        ("neurons_events_published_total", {"type": "approval.requested"}),
        ("neurons_events_published_total", {"type": "approval.granted"}),
        ("neurons_approval_wait_seconds_count", {"kind": "cycle", "outcome": "granted"}),
    ), 90, interval=1.0, message="approval's counts at its /metrics")

    assert value(evolution, "neurons_events_dead_lettered_total", service="evolution") == 1
    assert value(approval, "neurons_approval_wait_seconds_count") == 1
    # the backlog gauges are measured every few seconds: once all is handled, an empty outbox, nothing unread
    backlog = await await_until(lambda: _settled(urls["approval"]), 60, interval=1.0, message="the backlog gauges")
    assert {dict(key)["topic"] for name, key in backlog if name == "neurons_consumer_lag"} >= {
        topic_for("cycle"), topic_for("approval")}


def _settled(url: str) -> dict | None:
    samples = scrape(url)
    names = {name for name, _ in samples}
    if not {"neurons_outbox_depth", "neurons_consumer_lag"} <= names:
        return None
    backlog = value(samples, "neurons_outbox_depth") + value(samples, "neurons_consumer_lag")
    return samples if backlog == 0 else None


def test_with_an_otlp_endpoint_the_same_metrics_go_to_the_collector(tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    from shared.metrics import Metrics
    from shared.settings import Settings

    received: list[tuple[str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the name http.server calls
            received.append((self.path, self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            return None

    server = HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = Settings.from_env().with_(var_dir=tmp_path, otlp_endpoint=f"http://127.0.0.1:{server.server_port}")
    metrics = Metrics("registry", settings)
    try:
        metrics.add("neurons_promotions_total", channel="production")
        assert metrics.provider.force_flush(timeout_millis=10_000)
    finally:
        metrics.shutdown()
        server.shutdown()

    sent = ExportMetricsServiceRequest()
    sent.ParseFromString(next(body for path, body in received if path == "/v1/metrics"))
    names = {m.name for rm in sent.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert "neurons_promotions_total" in names

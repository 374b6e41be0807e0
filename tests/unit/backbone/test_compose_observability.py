"""Prometheus, the OpenTelemetry collector and Grafana of docker-compose.yml: each points at the container
that serves what it reads, and every dashboard query names only metrics the services export
(the catalogue ``METRICS`` of shared/metrics.py)."""

from __future__ import annotations

import pytest

from shared.metrics import METRICS
from shared.topics import SERVICES
from tests.unit.backbone.compose_support import (
    HISTOGRAM_SUFFIXES, compose, dashboards, deploy_yaml, environment, host_port, mounts, panels, promql_series,
    queries)

# Series Prometheus makes itself, not a service: whether a target answered its last scrape.
PROMETHEUS_SERIES = {"up": ("job", "instance")}
# Labels every scraped series has besides its own (a histogram's buckets also have le).
TARGET_LABELS = {"job", "instance"}


@pytest.fixture(scope="module")
def doc():
    return compose()


def metrics_port(doc) -> int:
    return int(doc["x-neurons-env"]["NEURONS_METRICS_PORT"])


def scrape_jobs() -> dict[str, list[str]]:
    config = deploy_yaml("prometheus.yaml")
    return {job["job_name"]: [t for static in job["static_configs"] for t in static["targets"]]
            for job in config["scrape_configs"]}


def collector() -> dict:
    return deploy_yaml("otel-collector.yaml")


def mount_target(doc, service: str, source: str) -> str:
    found = [m["target"] for m in mounts(doc["services"][service]) if m["source"] == source]
    assert len(found) == 1, f"{service} does not mount {source}"
    return found[0]


# --- Prometheus --------------------------------------------------------------------------------------


def test_prometheus_scrapes_every_service_at_its_metrics_port(doc):
    jobs = scrape_jobs()
    assert sorted(jobs["neurons"]) == sorted(f"{name}:{metrics_port(doc)}" for name in SERVICES)
    for job, targets in jobs.items():
        for target in targets:
            assert host_port(target)[0] in doc["services"], f"job {job} scrapes {target}, which compose does not run"
    assert mount_target(doc, "prometheus", "./deploy/prometheus.yaml") == "/etc/prometheus/prometheus.yml"


def test_prometheus_scrapes_the_collectors_prometheus_exporter(doc):
    exporter_port = host_port(collector()["exporters"]["prometheus"]["endpoint"])[1]
    assert scrape_jobs()["otel-collector"] == [f"otel-collector:{exporter_port}"]


# --- the OpenTelemetry collector -------------------------------------------------------------------


def test_the_collector_pipelines_carry_traces_to_jaeger_and_metrics_to_prometheus():
    config = collector()
    pipelines = config["service"]["pipelines"]
    metrics = [p for name, p in pipelines.items() if name.split("/")[0] == "metrics"]
    traces = [p for name, p in pipelines.items() if name.split("/")[0] == "traces"]
    assert any("prometheus" in p["exporters"] for p in metrics), "the prometheus exporter is in no metrics pipeline"
    assert any("otlp/jaeger" in p["exporters"] for p in traces)
    assert all("otlp" in p["receivers"] for p in metrics + traces), "otlp must feed both pipelines"
    for pipeline in pipelines.values():
        for section in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(section, [])) <= set(config.get(section) or {}), f"undefined {section}"


def test_the_services_send_otlp_where_the_collector_listens(doc):
    http = collector()["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    host, port = host_port(doc["x-neurons-env"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert host == "otel-collector" and port == host_port(http)[1]
    jaeger_host = host_port(collector()["exporters"]["otlp/jaeger"]["endpoint"])[0]
    assert jaeger_host in doc["services"]
    assert environment(doc["services"]["jaeger"])["COLLECTOR_OTLP_ENABLED"] == "true"
    assert mount_target(doc, "otel-collector", "./deploy/otel-collector.yaml") in " ".join(
        doc["services"]["otel-collector"]["command"])


# --- Grafana ---------------------------------------------------------------------------------------


def datasource() -> dict:
    sources = deploy_yaml("grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert len(sources) == 1
    return sources[0]


def test_the_data_source_is_the_prometheus_container(doc):
    source = datasource()
    host, port = host_port(source["url"])
    assert source["type"] == "prometheus" and host == "prometheus"
    assert port in {container for _, container in
                    [tuple(map(int, p.split(":"))) for p in doc["services"]["prometheus"]["ports"]]}
    for kind in ("datasources", "dashboards"):
        source = f"./deploy/grafana/provisioning/{kind}"
        assert mount_target(doc, "grafana", source) == f"/etc/grafana/provisioning/{kind}"


def test_the_dashboard_provider_reads_the_folder_compose_mounts(doc):
    providers = deploy_yaml("grafana/provisioning/dashboards/neurons.yaml")["providers"]
    mounted = mount_target(doc, "grafana", "./deploy/grafana/dashboards")
    assert [p["options"]["path"] for p in providers] == [mounted]
    home = environment(doc["services"]["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(mounted + "/") and home.rsplit("/", 1)[1] in dashboards()


def test_every_panel_reads_the_provisioned_data_source():
    uid = datasource()["uid"]
    uids = set()
    for name, board in dashboards().items():
        assert board["uid"] not in uids, f"{name}: uid {board['uid']} is taken"
        uids.add(board["uid"])
        ids = [p["id"] for p in panels(board)]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat"
        for panel in panels(board):
            if panel["type"] == "row":
                continue
            assert panel["targets"], f"{name}: {panel['title']} has no query"
            for source in [panel["datasource"], *[t["datasource"] for t in panel["targets"]]]:
                assert source == {"type": "prometheus", "uid": uid}, f"{name}: {panel['title']}"


def catalogued(series: str) -> str | None:
    """The catalogue name a series belongs to (a histogram's _bucket, _sum, _count), or None."""
    if series in METRICS:
        return series if METRICS[series].kind != "histogram" else None
    for suffix in HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and base in METRICS and METRICS[base].kind == "histogram":
            return base
    return None


def test_every_query_names_only_catalogued_metrics_and_their_labels():
    problems = []
    for name, board in dashboards().items():
        for title, expr in queries(board):
            series, labels = promql_series(expr)
            known = set(TARGET_LABELS)
            for one in series:
                if one in PROMETHEUS_SERIES:
                    known |= set(PROMETHEUS_SERIES[one])
                elif (base := catalogued(one)) is None:
                    problems.append(f"{name} / {title}: {one} is not in shared.metrics.METRICS")
                else:
                    known |= set(METRICS[base].labels) | ({"le"} if one.endswith("_bucket") else set())
            if not series:
                problems.append(f"{name} / {title}: no series in {expr}")
            if labels - known:
                problems.append(f"{name} / {title}: labels {sorted(labels - known)} are on none of {sorted(series)}")
    assert not problems, "\n".join(problems)


def test_the_query_reader_finds_what_is_wrong():
    assert promql_series('sum by (le, type) (rate(neurons_handler_duration_seconds_bucket{job="x"}[5m]))') == (
        {"neurons_handler_duration_seconds_bucket"}, {"le", "type", "job"})
    assert catalogued("neurons_handler_duration_seconds") is None  # a histogram is read by its series
    assert catalogued("neurons_events_consumed_total_bucket") is None
    assert promql_series("rate(neurons_not_a_metric[5m]) / on (service) up")[0] == {"neurons_not_a_metric", "up"}


DASHBOARD_METRICS = {
    "platform-health.json": {"neurons_events_consumed_total", "neurons_events_published_total",
                             "neurons_events_dead_lettered_total", "neurons_handler_duration_seconds",
                             "neurons_consumer_lag", "neurons_outbox_depth"},
    "training.json": {"neurons_training_tokens_per_second", "neurons_training_loss",
                      "neurons_training_energy_joules_total"},
    "validation.json": {"neurons_soak_verdicts_total", "neurons_soak_p_value"},
    "energy.json": {"neurons_training_energy_joules_total"},
    "serving.json": {"neurons_serving_requests_total", "neurons_serving_request_duration_seconds",
                     "neurons_serving_errors_total"},
}


@pytest.mark.parametrize("board, wanted", sorted(DASHBOARD_METRICS.items()))
def test_each_dashboard_shows_what_it_is_for(board, wanted):
    shown = {catalogued(s) for _, expr in queries(dashboards()[board]) for s in promql_series(expr)[0]}
    assert wanted <= shown, f"{board} lacks {sorted(wanted - shown)}"


def test_the_dashboards_read_the_services_own_scrapes_only():
    for name, board in dashboards().items():
        for title, expr in queries(board):
            # job otel-collector re-exports the same series: reading both would count everything twice
            assert 'job="neurons"' in expr, f"{name} / {title}: {expr}"

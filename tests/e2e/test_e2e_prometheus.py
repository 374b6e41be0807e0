"""The real Prometheus scrapes every service at the URL `neurons status` prints and sees a cycle promoted."""

from __future__ import annotations

import json
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.e2e.cycle_support import CYCLE, SERVICES, prepare, start
from tests.support import wait_until

PROMETHEUS = Path("/usr/bin/prometheus")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(path: Path, targets: dict[str, str]) -> Path:
    """A scrape job per service, every second, at the host, port and path of its metrics URL."""
    jobs = []
    for service, url in sorted(targets.items()):
        where = httpx.URL(url)
        jobs.append({"job_name": f"neurons-{service}", "metrics_path": where.path,
                     "static_configs": [{"targets": [f"{where.host}:{where.port}"]}]})
    # JSON is YAML: Prometheus reads it as it is
    path.write_text(json.dumps({"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                                "scrape_configs": jobs}, indent=2))
    return path


@contextmanager
def _prometheus(config: Path, data: Path, log: Path) -> Iterator[str]:
    """Prometheus on a free loopback port until the block ends; its base URL."""
    address = f"127.0.0.1:{_free_port()}"
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={data}",
                                 f"--web.listen-address={address}"], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    base = f"http://{address}"
    try:
        wait_until(lambda: _ready(base, proc, log), 60, interval=0.5, message="Prometheus ready")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready(base: str, proc: subprocess.Popen, log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
    try:
        return httpx.get(f"{base}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _query(base: str, promql: str) -> list[dict]:
    answer = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.mark.slow
def test_prometheus_scrapes_every_service_and_sees_the_cycle_train_and_promote(platform, tmp_path):
    if not PROMETHEUS.exists():
        pytest.skip(f"no Prometheus at {PROMETHEUS}: `bash deploy/install-prometheus.sh` (run by `make setup`) "
                    "installs Debian's package")
    prepare(platform, tmp_path)
    start(platform, tmp_path)
    status = json.loads(platform.cli("status", "--json").stdout)
    targets = {row["name"]: row["metrics_url"] for row in status["services"] if row["name"] in SERVICES}
    assert all(targets.values()), targets

    config = _config(tmp_path / "prometheus.yml", targets)
    with _prometheus(config, tmp_path / "prometheus-data", tmp_path / "prometheus.log") as prometheus:
        up = wait_until(lambda: len(_query(prometheus, "up == 1")) == len(SERVICES) or None, 60, interval=1.0,
                        message="every service scraped")
        assert up
        summary = json.loads(platform.cli(*CYCLE, timeout=600, check=False).stdout)
        cycle = summary["cycle_id"]
        trained = wait_until(lambda: _query(prometheus, f'neurons_training_loss{{cycle_id="{cycle}"}}'), 60,
                             interval=1.0, message="the cycle's training loss in Prometheus")
        throughput = wait_until(
            lambda: _query(prometheus, f'neurons_training_tokens_per_second{{cycle_id="{cycle}"}} > 0'), 60,
            interval=1.0, message="the cycle's training throughput in Prometheus")
        assert summary["outcome"] == "promoted", summary
        promoted = wait_until(lambda: _query(prometheus, 'neurons_promotions_total{channel="production"} >= 1'),
                              60, interval=1.0, message="the promotion counted in Prometheus")
        ended = wait_until(lambda: _query(prometheus, 'neurons_cycles_completed_total{outcome="promoted"} >= 1'),
                           60, interval=1.0, message="the cycle's end counted in Prometheus")
        consumed = _query(prometheus, "sum by (service) (neurons_events_consumed_total)")

    assert trained[0]["metric"]["job"] == "neurons-trainer" and float(trained[0]["value"][1]) > 0
    assert throughput[0]["metric"]["kind"] == "mntp"
    assert promoted[0]["metric"]["service"] == "registry"
    assert ended[0]["metric"]["service"] == "evolution" and ended[0]["metric"]["kind"] == "mntp"
    assert {row["metric"]["service"] for row in consumed} == set(SERVICES)

"""The dashboard as a person sees it: headless Chromium against a registry fed with real events."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import timedelta

import httpx
import pytest

from shared.contracts.envelope import iso, utcnow
from tests.integration.registry.registry_events import (
    approval_requested,
    promote,
    publish,
    sha_of,
    validation_completed,
)
from tests.support import await_until, make_event

pytestmark = pytest.mark.chromium
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CYCLE = "cyc-dashboard"
ADVICE = "6f1c2d3e-4a5b-4c6d-8e7f-0a1b2c3d4e5f"  # the scaling.recommended the soak was sized to


def chromium(url: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1000",
         "--virtual-time-budget=10000", *args, url],
        capture_output=True, text=True, timeout=120)


def energy(job_id: str, job_kind: str, wh: float):
    now = utcnow()
    return make_event("energy.reported", job_id, {
        "job_id": job_id, "job_kind": job_kind, "cycle_id": CYCLE, "joules": wh * 3600, "wh": wh,
        "facility_wh": wh * 1.2, "gco2e": wh * 1.2 * 0.4, "pue": 1.2, "carbon_intensity": 400.0, "method": "rapl",
        "methods": {"cpu": "rapl"}, "reason": None,
        "window": {"started_at": iso(now - timedelta(minutes=5)), "ended_at": iso(now)}}, service="energy")


def soak(sha: str) -> list:
    validation_id = f"val-{sha[:16]}"
    started = make_event("validation.started", validation_id, {
        "validation_id": validation_id, "cycle_id": CYCLE, "adapter_sha256": sha, "adapter_uri": f"artefact://sha256/{sha}",
        "baseline": {"kind": "base", "adapter_sha256": None}, "replicas": 2, "cycles": 2, "episodes": 20,
        "kind": "mntp", "purpose": "candidate", "sized_by": {"event_id": ADVICE, "validator_replicas": 4}},
        sequence=1, service="validator", correlation_id=CYCLE)
    cycles = [make_event("validation.cycle_completed", validation_id, {
        "validation_id": validation_id, "cycle": n, "outcome": "pass", "score": 0.8, "metrics": {}, "vetoes": [],
        "reason": "better latency", "incidents": [], "failing_streak": 0, "stop_early": False,
        "replicas": [{"replica_id": f"{side}-0", "side": side, "episodes": 20, "rss_mb": 300.0, "cpu_percent": 50.0,
                      "latency_ms": 40.0, "incident": None} for side in ("candidate", "baseline")]},
        sequence=1 + n, service="validator", correlation_id=CYCLE) for n in (1, 2)]
    return [started, *cycles]


def training() -> list:
    """The trainer's events of one short job: a loss curve of ten points."""
    events = [make_event("training.started", "job-dash", {
        "job_id": "job-dash", "cycle_id": CYCLE, "kind": "mntp", "model": "tiny", "dataset_sha256": None,
        "config": {"steps": 10}, "resumed_from_step": None}, service="trainer")]
    for step in range(1, 11):
        events.append(make_event("training.progressed", "job-dash", {
            "job_id": "job-dash", "cycle_id": CYCLE, "step": step, "total_steps": 10, "loss": 4.0 / step,
            "reward_mean": None, "learning_rate": 1e-4, "tokens_per_s": 100.0, "energy_j": None},
            sequence=1 + step, service="trainer"))
    return events


def rl_training() -> list:
    """An RL job's progress: the mean reward rising, its spread, KL to the starting policy, distinct answers."""
    events = [make_event("training.started", "job-rl", {
        "job_id": "job-rl", "cycle_id": "cyc-research", "kind": "rl", "model": "tiny", "dataset_sha256": None,
        "config": {"steps": 4}, "resumed_from_step": None}, service="trainer")]
    for step in range(1, 5):
        events.append(make_event("training.progressed", "job-rl", {
            "job_id": "job-rl", "cycle_id": "cyc-research", "step": step, "total_steps": 4, "loss": 0.1,
            "reward_mean": 0.5 + 0.1 * step, "reward_std": 0.2, "kl": 0.001 * step, "distinct_share": 0.75,
            "learning_rate": 2e-2, "tokens_per_s": 50.0, "energy_j": None}, sequence=1 + step, service="trainer"))
    return events


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium) to drive the dashboard")
async def test_the_dashboard_shows_production_verdicts_energy_approvals_and_loss_curves(registry, tmp_path):
    served, waiting = sha_of("dashboard-served"), sha_of("dashboard-waiting")
    await publish(registry.settings, *soak(served), energy("job-dash", "training", 2.5),
                  energy(f"val-{served[:16]}", "validation", 1.25), *training(), *rl_training())
    await promote(registry, served)
    await publish(registry.settings, validation_completed(waiting), approval_requested(waiting))
    waiting_request = f"apr-promotion-val-{waiting[:16]}"
    await await_until(lambda: len(registry.archived("energy.reported")) >= 2
                      and len(registry.archived("validation.cycle_completed")) >= 2
                      and any(e["aggregate_id"] == waiting_request for e in registry.archived("approval.requested")),
                      60, message="the events archived")

    address = json.loads((registry.var_dir / "run" / "registry-api.json").read_text())["url"]
    data = httpx.get(f"{address}/api/dashboard", timeout=10).json()
    assert data["channels"][0]["adapter_sha256"] == served
    assert [a["request_id"] for a in data["pending_approvals"]] == [waiting_request]
    assert httpx.get(f"{address}/openapi.json", timeout=10).json()["info"]["title"] == "neurons registry"
    shown = json.loads(registry.cli("validate", "show", f"val-{served[:16]}", "--json").stdout)
    assert shown["totals"]["cycles_done"] == 2 and shown["success_rate"] == 1.0
    assert shown["energy"]["wh"] == 1.25 and shown["promotion_approval"]["status"] == "granted"
    assert shown["sized_by"] == {"event_id": ADVICE, "validator_replicas": 4}
    told = registry.cli("validate", "show", f"val-{served[:16]}").stdout
    assert "on 2 replicas per side, 0 incidents (sized to the energy service's advice of 4 replica processes)" in told

    dom = chromium(address + "/", tmp_path, "--dump-dom")
    shot = chromium(address + "/", tmp_path, f"--screenshot={tmp_path / 'dashboard.png'}")

    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-state="ready"' in html, html[:2000]
    assert served[:12] in html and "alice" in html  # the adapter in production and who approved it
    assert waiting_request in html  # waiting for an operator
    assert 'class="verdict-pass"' in html and "100%" in html  # the soak run's verdict and success rate
    assert f'title="sized to scaling.recommended {ADVICE}">2 (advice: 4)</span>' in html  # what sized it
    assert CYCLE in html and "3.7500" in html  # energy per cycle: 2.5 Wh training + 1.25 Wh validation
    assert 'class="loss-curve"' in html and "<polyline" in html
    assert 'class="reward-curve"' in html and "reward 0.600 → 0.900 ± 0.200 · KL 0.0040 · distinct answers 75%" in html
    assert shot.returncode == 0 and (tmp_path / "dashboard.png").stat().st_size > 10_000

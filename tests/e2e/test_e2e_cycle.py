"""The whole platform as a user runs it: six services as processes, the real broker, one cycle."""

import json
from datetime import datetime
from collections import Counter

import pytest

from shared.ml.placement import resolve
from tests.e2e.cycle_support import CYCLE, SERVICES, prepare, spans, start


@pytest.mark.slow
def test_one_cycle_from_request_to_profile_update_is_one_trace(platform, tmp_path):
    prepare(platform, tmp_path)
    start(platform, tmp_path)
    result = platform.cli(*CYCLE, timeout=600)
    summary = json.loads(result.stdout)
    assert summary["outcome"] == "promoted", summary
    assert summary["verdict"] == "pass"
    assert summary["promotion"]["channel"] == "production"
    assert summary["promotion"]["approver"] == "ops"
    assert summary["profiles_updated"] == ["helper-en"]
    assert summary["metrics"]["loss_after"] < summary["metrics"]["loss_before"]
    # where the job computed travels in training.completed: the trainer runs here, on device auto
    assert summary["placement"] == resolve().describe()

    cycle = summary["cycle_id"]
    events = [e for e in platform.archived() if e["correlation_id"] == cycle]
    kinds = Counter(e["type"] for e in events)
    assert kinds["training.completed"] == kinds["validation.completed"] == kinds["adapter.promoted"] == 1
    assert kinds["profile.adapter_updated"] == 1
    # the soak names the energy service's advice it was sized to (published when that service starts)
    sized_by, soak = summary["soak"]["sized_by"], summary["soak"]
    assert sized_by, soak
    advice = next((e for e in platform.archived() if e["event_id"] == sized_by["event_id"]), None)
    assert advice is not None and advice["type"] == "scaling.recommended", sized_by
    assert advice["payload"]["validator_replicas"] == sized_by["validator_replicas"]
    assert soak["replicas"] == max(1, min(2, sized_by["validator_replicas"] // 2)), soak
    # and the registry's snapshot of the soak shows it (the registry judged the promotion on that soak)
    validation = next(e for e in events if e["type"] == "validation.started")["payload"]["validation_id"]
    shown = json.loads(platform.cli("validate", "show", validation, "--json").stdout)
    assert shown["sized_by"] == sized_by and shown["totals"]["replicas"] == soak["replicas"], shown

    proposed = next(s for s in spans(platform) if s["name"] == "publish cycle.proposed"
                    and s["attributes"].get("neurons.correlation_id") == cycle)
    trace = [s for s in spans(platform) if s["trace_id"] == proposed["trace_id"]]
    services = {s["service"] for s in trace}
    assert services >= {f"neurons-{name}" for name in SERVICES}, services
    order = [s["name"] for s in sorted(trace, key=lambda s: s["start_ns"]) if s["name"].startswith("publish ")]
    firsts = [order.index(f"publish {t}") for t in ("cycle.proposed", "approval.requested", "approval.granted",
                                                     "training.requested", "training.completed",
                                                     "validation.completed", "adapter.promoted",
                                                     "profile.adapter_updated")]
    assert firsts == sorted(firsts), order

    verify = json.loads(platform.cli("audit", "verify", "--json").stdout)
    assert verify["ok"], verify["differs"]
    # every archived event signed by a principal allowed to publish it, checked as of when it occurred
    signatures = verify["signatures"]
    assert signatures["ok"] and signatures["failed"] == 0, signatures["failures"]
    assert signatures["counts"]["signed_and_authorised"] == signatures["events"], signatures["counts"]
    assert signatures["events"] == len(platform.archived())
    # the archive keeps arrival order, which is not time order across topics: ask about the latest moment
    latest = max(events, key=lambda e: datetime.fromisoformat(e["occurred_at"].replace("Z", "+00:00")))["occurred_at"]
    served = json.loads(platform.cli("audit", "at", latest, "--profile", "helper-en", "--json").stdout)
    assert summary["adapter_id"] in json.dumps(served)

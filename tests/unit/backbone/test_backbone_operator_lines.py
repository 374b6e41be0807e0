"""The lines `neurons cycle run` prints for a verdict and a deferral: each said once, whole, never silent."""

import io
import json
from contextlib import redirect_stdout

import pytest

from cli.cycle_run import Reporter, deferral_line, verdict_line
from services.validator.judgement import rejudge
from services.validator.thresholds import Thresholds
from tests.support import make_event

DEFERRED = {"cycle_id": "cyc-1", "kind": "mntp", "gate": "hardware", "reason": "load average per core 1.20 is above 0.85",
            "retry_at": "2026-12-04T13:36:41Z", "deferred_at": "2026-12-04T13:06:41Z", "attempt": 1,
            "trigger": {"type": "operator", "command_id": "req-1"}, "requested_by": "alice"}


def raw_soak(better: bool) -> dict:
    """Raw soak data as the replicas write it: the candidate's loss lower than the base's when ``better``."""
    def side(loss: float, accuracy: float) -> dict:
        return {"mntp_loss": [loss + 0.01 * (i % 5) for i in range(40)],
                "mntp_accuracy": [accuracy + 0.002 * (i % 5) for i in range(40)],
                "latency_ms": [100.0 + (i % 7) for i in range(40)], "rss_mb": [800.0 + (i % 3) for i in range(40)],
                "errors": [0.0] * 40}
    candidate = side(1.8, 0.45) if better else side(2.0, 0.40)
    return {"validation_id": "val-1", "adapter_sha256": "a" * 64, "baseline": {"kind": "base", "adapter_sha256": None},
            "kind": "mntp", "cycles": [{"cycle": c, "replicas": [
                {"replica_id": "candidate-0", "side": "candidate", "samples": candidate, "incident": None},
                {"replica_id": "baseline-0", "side": "baseline", "samples": side(2.0, 0.40), "incident": None}]}
                for c in (1, 2, 3)]}


@pytest.mark.parametrize("better", [True, False])
def test_the_verdict_is_said_once(better):
    verdict = rejudge(raw_soak(better), Thresholds())

    line = verdict_line({"verdict": verdict.outcome, "explanation": verdict.reason})

    assert line == f"verdict   {verdict.reason}"  # the explanation begins with the verdict already
    assert line.startswith(f"verdict   {verdict.outcome}")
    assert f"{verdict.outcome}: {verdict.outcome}" not in line


def test_a_verdict_without_explanation_is_the_verdict():
    assert verdict_line({"verdict": "pass", "explanation": None}) == "verdict   pass"
    assert verdict_line({"verdict": "fail", "explanation": "critical metric worse"}) == \
        "verdict   fail: critical metric worse"


def test_a_deferral_names_the_gate_the_reason_and_the_retry():
    assert deferral_line(DEFERRED) == (
        "deferred  cyc-1: gate hardware: load average per core 1.20 is above 0.85 (retry at 2026-12-04T13:36:41Z); "
        "an admin may start it now: neurons cycle run ... --force-gate hardware")


def test_a_deferral_is_a_json_line_when_the_output_is_json():
    out = io.StringIO()
    with redirect_stdout(out), Reporter(quiet=True) as reporter:
        reporter.on(make_event("cycle.deferred", "cyc-1", DEFERRED))

    notice = json.loads(out.getvalue())
    assert notice == {"event": "cycle.deferred", "cycle_id": "cyc-1", "gate": "hardware",
                      "reason": DEFERRED["reason"], "retry_at": DEFERRED["retry_at"],
                      "hint": "an admin may start it now: neurons cycle run ... --force-gate hardware"}


def test_a_deferral_by_a_gate_nobody_may_force_gives_no_hint():
    assert "hint" not in json.dumps(deferral_line({**DEFERRED, "gate": "energy"}))
    assert deferral_line({**DEFERRED, "gate": "energy"}).endswith("(retry at 2026-12-04T13:36:41Z)")

import json

import pytest

from services.validator.threshold_file import load_thresholds
from services.validator.thresholds import MetricSpec, Thresholds


def test_defaults_cover_the_soak_metrics():
    t = Thresholds.default()
    assert t.metrics["mntp_loss"].critical and t.metrics["mntp_loss"].direction == "lower"
    assert t.metrics["mntp_accuracy"].direction == "higher" and not t.metrics["mntp_accuracy"].critical
    assert t.metrics["reward"].critical and t.metrics["reward"].kinds == ("rl",)
    assert t.metrics["latency_ms"].shape_check
    assert t.metrics["errors"].critical and t.metrics["errors"].effect_measure == "rank_biserial"
    assert t.metrics_for("rl") == ["reward", "latency_ms", "rss_mb", "errors"]
    assert "reward" not in t.metrics_for("mntp")
    assert t.marginal_score < 0.5 < t.pass_score


def test_yaml_file_overrides_only_what_it_names(tmp_path):
    path = tmp_path / "thresholds.yaml"
    path.write_text(
        "pass_score: 0.7\n"
        "consecutive_failures: 5\n"
        "metrics:\n"
        "  latency_ms: {min_effect: 0.02}\n"
        "  tokens_per_s: {direction: higher, group: performance, kinds: [rl]}\n"
    )
    t = load_thresholds(path)
    assert t.pass_score == 0.7 and t.consecutive_failures == 5
    assert t.metrics["latency_ms"].min_effect == 0.02
    assert t.metrics["latency_ms"].shape_check  # kept from the defaults
    assert t.metrics["tokens_per_s"] == MetricSpec("higher", group="performance", kinds=("rl",))
    assert t.marginal_score == Thresholds().marginal_score


def test_json_file_and_round_trip(tmp_path):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"min_samples": 30, "groups": {"quality": 0.8}}))
    t = load_thresholds(path)
    assert t.min_samples == 30 and t.groups["quality"] == 0.8
    assert Thresholds.restore(json.loads(json.dumps(t.to_dict()))) == t


def test_restore_does_not_add_todays_defaults():
    stored = Thresholds(metrics={"errors": MetricSpec("lower", group="reliability")}, groups={"reliability": 1.0})
    assert set(Thresholds.restore(stored.to_dict()).metrics) == {"errors"}


@pytest.mark.parametrize(
    "data",
    [
        {"bogus": 1},
        {"metrics": {"latency_ms": {"colour": "red"}}},
        {"metrics": {"new_metric": {"alpha": 0.05}}},
        {"metrics": {"latency_ms": {"direction": "sideways"}}},
        {"metrics": {"latency_ms": {"alpha": 1.5}}},
        {"metrics": {"latency_ms": {"group": "nowhere"}}},
        {"metrics": {"latency_ms": {"kinds": ["vision"]}}},
        {"pass_score": 0.3, "marginal_score": 0.4},
        {"consecutive_failures": 0},
        {"min_samples": 1},
    ],
)
def test_invalid_settings_are_refused(data):
    with pytest.raises(ValueError):
        Thresholds.from_dict(data)

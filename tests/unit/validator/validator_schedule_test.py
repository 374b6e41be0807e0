from datetime import datetime, timedelta, timezone

import pytest

from services.validator.soak_plan import next_drift_soak

DAY = 86400.0
NOW = datetime(2025, 3, 4, 12, 0, tzinfo=timezone.utc)


def test_next_soak_is_an_interval_after_the_last_start_within_the_jitter():
    last = NOW - timedelta(hours=2)
    due = next_drift_soak(NOW, last, DAY, 0.1, "node-a")
    assert last + timedelta(days=0.9) <= due <= last + timedelta(days=1.1)
    assert due == next_drift_soak(NOW + timedelta(minutes=5), last, DAY, 0.1, "node-a")


def test_seeds_spread_the_soaks_of_different_nodes():
    last = NOW - timedelta(hours=2)
    dues = {next_drift_soak(NOW, last, DAY, 0.2, f"node-{i}") for i in range(10)}
    assert len(dues) == 10


def test_no_jitter_gives_the_exact_interval():
    last = NOW - timedelta(hours=1)
    assert next_drift_soak(NOW, last, DAY, 0.0, 1) == last + timedelta(days=1)


def test_an_overdue_soak_is_due_now():
    # whatever became of the last run, the next one is not pushed back
    last = NOW - timedelta(days=10)
    assert next_drift_soak(NOW, last, DAY, 0.1, "node-a") == NOW


def test_without_history_the_answer_is_stable_within_one_jittered_slot():
    slot_start = datetime(2025, 3, 4, tzinfo=timezone.utc)  # the daily grid from the epoch
    now = slot_start + timedelta(seconds=1)
    due = next_drift_soak(now, None, DAY, 0.25, "node-a")
    assert now < due <= slot_start + timedelta(days=0.25)
    assert next_drift_soak(now + timedelta(seconds=1), None, DAY, 0.25, "node-a") == due
    # past the jittered start of its slot the soak is simply due
    assert next_drift_soak(slot_start + timedelta(days=0.5), None, DAY, 0.25, "node-a") == slot_start + timedelta(days=0.5)


@pytest.mark.parametrize(
    "args",
    [
        (NOW, None, 0.0, 0.1, 1),
        (NOW, None, DAY, 1.0, 1),
        (NOW.replace(tzinfo=None), None, DAY, 0.1, 1),
        (NOW, NOW.replace(tzinfo=None), DAY, 0.1, 1),
    ],
)
def test_bad_arguments_are_refused(args):
    with pytest.raises(ValueError):
        next_drift_soak(*args)

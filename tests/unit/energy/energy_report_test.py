"""`neurons energy report`: per job, per day, methods, CSV and --since."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta, timezone

import pytest

from services.energy.domain import EnergyConfig, energy_report
from services.energy.report import build_report, parse_since, to_csv

NOW = datetime(2026, 3, 3, 12, 0, tzinfo=timezone.utc)


def reported(job_id, joules, ended, kind="training", method="rapl"):
    reading = None
    if joules is not None:
        reading = {
            "joules": joules,
            "method": method,
            "components": [{"name": "package-0", "joules": joules, "method": method}],
            "ended_at": ended.isoformat(),
            "duration_s": 10.0,
        }
    payload = energy_report(
        job_id=job_id, job_kind=kind, cycle_id="c1", reading=reading, completed_at=ended, config=EnergyConfig()
    )
    return ended, payload


def records():
    day1 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
    day2 = datetime(2026, 3, 3, 9, 0, tzinfo=timezone.utc)
    return [
        reported("t1", 3600.0, day1),
        reported("v1", 7200.0, day1 + timedelta(hours=1), kind="validation", method="model"),
        reported("t2", None, day2),
        reported("t3", 36000.0, day2 + timedelta(hours=1)),
    ]


def test_per_day_totals_leave_unmeasured_jobs_out_and_count_them():
    report = build_report(records(), now=NOW)
    assert [r["job_id"] for r in report["jobs"]] == ["t1", "v1", "t2", "t3"]
    day1, day2 = report["days"]
    assert day1["date"] == "2026-03-02" and day1["wh"] == pytest.approx(3.0) and day1["jobs"] == 2
    assert day2["date"] == "2026-03-03" and day2["wh"] == pytest.approx(10.0)
    assert day2["measured_jobs"] == 1 and day2["unmeasured_jobs"] == 1
    assert report["totals"]["joules"] == pytest.approx(46800.0)
    assert report["methods"] == {
        "model": {"jobs": 1, "components": 1, "joules": 7200.0},
        "rapl": {"jobs": 2, "components": 2, "joules": 39600.0},
    }


def test_a_day_with_no_measured_job_has_no_total_rather_than_zero():
    report = build_report([reported("t2", None, NOW - timedelta(hours=1))], now=NOW)
    assert report["days"][0]["joules"] is None and report["days"][0]["unmeasured_jobs"] == 1


def test_since_filters_and_duplicates_count_once():
    rows = records() + [records()[-1]]
    report = build_report(rows, since=parse_since("24h"), now=NOW)
    assert [r["job_id"] for r in report["jobs"]] == ["t2", "t3"]
    assert report["since"] == "2026-03-02T12:00:00Z"


def test_csv_has_a_header_and_empty_cells_for_unknowns():
    report = build_report(records(), now=NOW)
    rows = list(csv.DictReader(io.StringIO(to_csv(report))))
    assert len(rows) == 4
    assert rows[0]["job_id"] == "t1" and float(rows[0]["wh"]) == pytest.approx(1.0)
    assert rows[2]["joules"] == "" and rows[2]["reason"]
    days = list(csv.DictReader(io.StringIO(to_csv(report, table="days"))))
    assert [d["date"] for d in days] == ["2026-03-02", "2026-03-03"]
    assert float(days[1]["wh"]) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        to_csv(report, table="weeks")


def test_records_may_be_events_or_dicts():
    at, payload = records()[0]

    class Event:
        occurred_at = at

    Event.payload = payload
    for record in (Event(), {"occurred_at": at.isoformat(), "payload": payload}):
        assert build_report([record], now=NOW)["totals"]["jobs"] == 1


@pytest.mark.parametrize("text, expected", [("24h", timedelta(hours=24)), ("7d", timedelta(days=7)), ("90m", timedelta(minutes=90)), ("1.5h", timedelta(minutes=90))])
def test_parse_since(text, expected):
    assert parse_since(text) == expected


@pytest.mark.parametrize("text", ["", "24", "h", "24 hours", "-1h", "0h", "7y"])
def test_parse_since_explains_bad_input(text):
    with pytest.raises(ValueError, match=r"--since: .*(90m, 24h or 7d|longer than zero)"):
        parse_since(text)

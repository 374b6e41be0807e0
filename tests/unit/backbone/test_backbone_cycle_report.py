"""The lines `neurons cycle run` and the demo print for a soak's start."""

import pytest

from cli.cycle_run import Reporter
from tests.support import make_event

STARTED = {"validation_id": "val-1", "cycle_id": "cyc-1", "adapter_sha256": "c" * 64, "adapter_uri": "file:///a",
           "baseline": {"kind": "base", "adapter_sha256": None, "adapter_uri": None},
           "replicas": 1, "cycles": 2, "episodes": 10, "kind": "mntp", "purpose": "candidate", "started_at": None}


def soak_line(payload: dict) -> str:
    with Reporter() as reporter:
        reporter.progress.console.record = True
        reporter.progress.console.width = 400  # one line, as a wide terminal shows it
        reporter.on(make_event("validation.started", "val-1", payload))
        text = reporter.progress.console.export_text()
    return next(line for line in text.splitlines() if "side by side" in line)


@pytest.mark.parametrize("sized_by, ending", [
    (None, "2 cycles of 10 episodes each"),
    ({"event_id": "e", "validator_replicas": 2}, "(sized to the energy service's advice of 2 replica processes)"),
    ({"event_id": "e", "validator_replicas": 1},
     "(the smallest soak: the energy service's advice allows 1 replica process)"),
    ({"event_id": "e", "validator_replicas": 0},
     "(the smallest soak: the energy service's advice allows 0 replica processes)"),
])
def test_the_soak_line_says_what_sized_it(sized_by, ending):
    line = soak_line({**STARTED, "sized_by": sized_by})
    assert line.startswith("soak      1 replica of the candidate and 1 replica of the base side by side")
    assert line.rstrip().endswith(ending), line

"""The README's confluent-kafka example, run as it is written, reads signed events the platform's verifier accepts."""

import asyncio
import json
import re
import subprocess
import sys

import pytest

from shared.contracts.envelope import Envelope
from shared.contracts.signing import Refused
from shared.trust_view import TrustView
from tests.support import ROOT, dataset_payload, make_event

SECTION = "## Reading the events with another Kafka client"


def readme_example() -> str:
    """The first Python block of the README's section on other Kafka clients."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(SECTION):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_reads_every_event_with_its_headers_and_a_signature_verifies(platform, tmp_path):
    pytest.importorskip("confluent_kafka")
    settings = platform.settings
    asyncio.run(platform.aensure_topics())
    events = [make_event("dataset.registered", f"ds-ext-{i}", dataset_payload(f"ds-ext-{i}")) for i in range(6)]

    async def publish() -> None:
        async with platform.publisher() as publisher:
            await publisher.publish_many(events)  # one batch of several records per partition

    asyncio.run(publish())
    script = tmp_path / "read_events.py"
    script.write_text(readme_example())
    run = subprocess.run([sys.executable, str(script)], env={**platform.env, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    seen = {line["envelope"]["event_id"]: line for line in lines}
    assert set(seen) == {e.event_id for e in events}

    first = seen[events[0].event_id]
    assert first["topic"] == f"{platform.prefix}dataset" and first["key"] == "ds-ext-0"
    assert first["headers"]["event_type"] == "dataset.registered"
    assert first["headers"]["schema_version"] == str(events[0].schema_version)
    assert first["headers"]["event_id"] == events[0].event_id
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", first["headers"]["traceparent"])

    trust = TrustView(settings)
    envelope = Envelope.model_validate(first["envelope"])
    trust.admit(envelope)  # signed by a key the anchors know, allowed to publish the type
    forged = Envelope.model_validate({**first["envelope"], "payload": {**first["envelope"]["payload"],
                                                                       "record_count": 999}})
    with pytest.raises(Refused):
        trust.admit(forged)

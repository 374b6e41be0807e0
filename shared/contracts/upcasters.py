"""The steps that bring old event payloads to their current version.

``UPCASTERS`` maps ``(event type, from version)`` to the step that returns the
payload at ``from version + 1``; the schema registry walks the chain. This
module imports nothing of the registry, so either can be read alone. Each step
is tested with a stored payload of the old version (tests/contract).
"""

from __future__ import annotations

from typing import Callable

Upcaster = Callable[[dict], dict]


def dataset_registered_v1_to_v2(payload: dict) -> dict:
    # v1 called the record count `records` and had no quarantine flag: every
    # dataset registered before v2 was curated by hand and never quarantined.
    # v1 allowed any extra property; one named like a field v2 added is not that
    # field (no v1 producer wrote them), so it does not carry over.
    for added in ("quarantined", "quarantine_reason", "source", "registered_by", "auto_cycle"):
        payload.pop(added, None)
    payload["record_count"] = payload.pop("records")
    payload["quarantined"] = False
    payload["quarantine_reason"] = None
    return payload


UPCASTERS: dict[tuple[str, int], Upcaster] = {
    ("dataset.registered", 1): dataset_registered_v1_to_v2,
}

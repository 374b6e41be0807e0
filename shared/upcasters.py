"""Registered steps that bring old event payloads to their current version.

Each step is tested with a stored payload of the old version (tests/contract).
"""

from __future__ import annotations

from shared.schemas import upcaster


@upcaster("dataset.registered", 1)
def dataset_registered_v1_to_v2(payload: dict) -> dict:
    # v1 called the record count `records` and had no quarantine flag: every
    # dataset registered before v2 was curated by hand and never quarantined.
    payload["record_count"] = payload.pop("records")
    payload.setdefault("quarantined", False)
    payload.setdefault("quarantine_reason", None)
    return payload

"""The facts other services read out of a training result or a verdict.

Approval, evolution and the registry each act on ``training.completed`` and
``validation.completed``; they read them through these functions so that a
field renamed in a schema is followed in one place.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable, Mapping

from shared.contracts.values import number, parse_time

# Who is named as the requester when the platform itself asks (a scheduled or a dataset's cycle).
SERVICE_REQUESTER = "evolution"

# What a verdict is about; ``validation_facts`` adds the evidence a promotion request carries.
_EVIDENCE = ("verdict", "score", "explanation", "baseline", "sample_sizes", "vetoes", "raw_data_uri")


def occurred_at(event: Any) -> datetime:
    """The event's own time, in UTC: what a decider uses as "now" for it."""
    occurred = getattr(event, "occurred_at", None)
    if occurred is None:
        raise ValueError(f"{event.type} carries no occurred_at; deciders count time from the event")
    return parse_time(occurred)


def adapter_sha(payload: Mapping[str, Any]) -> str | None:
    adapter = payload.get("adapter")
    return payload.get("adapter_sha256") or (adapter.get("sha256") if isinstance(adapter, Mapping) else None)


def verdict_facts(event: Any) -> dict[str, Any]:
    """Verdict (pass, fail, inconclusive), purpose (candidate, drift) and ids from ``validation.completed``."""
    payload = event.payload
    return {
        "validation_id": payload.get("validation_id") or event.aggregate_id,
        "verdict": payload.get("verdict"),
        "purpose": payload.get("purpose", "candidate"),
        "adapter_sha256": adapter_sha(payload),
    }


def validation_facts(event: Any) -> dict[str, Any]:
    """``verdict_facts`` plus what a promotion request shows as evidence, and who asked for the cycle."""
    payload = event.payload
    return {
        **verdict_facts(event),
        "adapter_uri": payload.get("adapter_uri"),
        "kind": payload.get("kind"),
        "cycle_id": payload.get("cycle_id"),
        "summary": {key: payload.get(key) for key in _EVIDENCE if key in payload},
        "requested_by": payload.get("requested_by"),
    }


def first_number(mapping: Mapping[str, Any], keys: Iterable[str]) -> float | None:
    return next((number(mapping[k]) for k in keys if number(mapping.get(k)) is not None), None)


def energy_wh(payload: Mapping[str, Any]) -> float | None:
    """Measured energy in Wh from ``energy_wh`` or ``energy.{wh,joules}`` (and their older names)."""
    for source in (payload, payload.get("energy") if isinstance(payload.get("energy"), Mapping) else {}):
        wh = first_number(source, ("energy_wh", "wh", "total_wh"))
        if wh is not None:
            return wh
        joules = first_number(source, ("energy_j", "joules", "total_joules"))
        if joules is not None:
            return joules / 3600.0
    return None


def training_facts(event: Any) -> dict[str, Any]:
    """Adapter, losses and measured energy from ``training.completed`` (or the failure).

    Losses are read from ``metrics`` (``loss_before``/``initial_loss``/
    ``eval_loss_before`` and ``loss_after``/``final_loss``/``eval_loss_after``).
    """
    payload = event.payload
    metrics = payload.get("metrics") if isinstance(payload.get("metrics"), Mapping) else {}
    return {
        "job_id": payload.get("job_id"),
        "failed": event.type == "training.failed",
        "fallback": bool(payload.get("fallback")) or payload.get("status") not in (None, "trained"),
        "error": payload.get("error") or payload.get("reason"),
        "adapter_sha256": adapter_sha(payload),
        "loss_before": first_number(metrics, ("loss_before", "initial_loss", "eval_loss_before")),
        "loss_after": first_number(metrics, ("loss_after", "final_loss", "eval_loss_after")),
        "energy_wh": energy_wh(payload),
    }

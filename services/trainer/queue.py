"""The trainer's job queue: at most ``trainer_replicas`` jobs train at once on a node; the others wait in order.

Pure, no I/O. The capacity is the ``trainer_replicas`` of the latest
``scaling.recommended`` for this node (``capacity``), one when no advice has
come. At least one job always runs: an advice of none (an energy budget used
up, no memory to spare) leaves stopping work to evolution's gates, which read
the same budget before any cycle is proposed; the trainer only bounds how many
jobs share the node.

A request the trainer would start waits when the node is full or others are
already waiting (first in, first out: ``may_start``). Its wait is an event,
``training.queued``, with its place in the queue, the jobs running and the
advice that set the capacity (``queued_event``); its start is the usual
``training.started``, once a running job ends (``to_start``).

An entry of the queue (``entry``) keeps the request as it came, so the job
starts later exactly as it would have then, grant checked and all.
"""

from __future__ import annotations

from typing import Any, Mapping

from shared.contracts.envelope import NewEvent, iso

DEFAULT_CAPACITY = 1


def capacity(advice: Mapping[str, Any] | None) -> int:
    """How many jobs may train at once: the advice's ``trainer_replicas`` (at least one), else one."""
    replicas = (advice or {}).get("trainer_replicas")
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        return DEFAULT_CAPACITY
    return max(1, replicas)


def may_start(running: int, waiting: int, slots: int) -> bool:
    """Whether a new request starts now: a slot is free and nobody is waiting before it."""
    return waiting == 0 and running < slots


def waiting_order(entries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The waiting jobs' ids, first in first."""
    return sorted(entries, key=lambda job_id: (entries[job_id]["seq"], job_id))


def to_start(entries: Mapping[str, Mapping[str, Any]], running: int, slots: int) -> list[str]:
    """The waiting jobs that may start now, in order."""
    return waiting_order(entries)[: max(0, slots - running)]


def entry(request: Mapping[str, Any], entries: Mapping[str, Mapping[str, Any]], now: Any) -> dict[str, Any]:
    """A queue entry for ``request`` (a ``training.requested`` payload), behind every entry already there."""
    seq = max((int(e["seq"]) for e in entries.values()), default=0) + 1
    return {"seq": seq, "queued_at": iso(now), "request": dict(request)}


def queued_event(request: Mapping[str, Any], position: int, running: list[str],
                 advice: Mapping[str, Any] | None, now: Any) -> NewEvent:
    """``training.queued``: the job waits at ``position`` (1: next to start) until a running job ends."""
    slots = capacity(advice)
    source = (f"the scaling advice for this node allows {advice.get('trainer_replicas')} trainer(s)"
              if advice else f"no scaling advice yet: {DEFAULT_CAPACITY} job at a time")
    return NewEvent("training.queued", request["job_id"], {
        "job_id": request["job_id"],
        "cycle_id": request["cycle_id"],
        "kind": request["kind"],
        "position": position,
        "capacity": slots,
        "running": sorted(running),
        "advice_event_id": (advice or {}).get("event_id"),
        "reason": f"{len(running)} job(s) running, {position - 1} waiting before it; {source}",
        "queued_at": iso(now),
    })

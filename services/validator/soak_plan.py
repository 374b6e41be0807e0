"""Planning soaks, not judging them: how big a run is and when drift runs are due. No I/O.

* ``SoakPlan`` — replicas per side, cycles and episodes of a run, fitted to the
  replica processes the energy service advises (``scaling.recommended``);
* ``next_drift_soak`` — when the adapter in production is soaked again, with a
  repeatable per-node jitter;
* ``blocking_drift_run`` — the live drift run, if any, that keeps a new one
  from starting; a run silent for ``drift_stale_after_s`` no longer blocks.

The aggregate (``domain``) starts runs on the plan; ``soak`` runs them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the aggregate imports this module; only the types come back
    from services.validator.domain import ValidationRun, ValidatorState


@dataclass(frozen=True)
class SoakPlan:
    replicas: int = 3
    cycles: int = 6
    episodes: int = 20
    # A drift run with no result after this long is presumed dead and is closed
    # as inconclusive when the next drift run is due, so it cannot block it.
    drift_stale_after_s: float = 6 * 3600.0
    # The advice this plan was sized to (see ``fitted``): the ``scaling.recommended`` event and
    # the replica processes it allowed. A run started on the plan names them, for the audit.
    advice_event_id: str | None = None
    advised_processes: int | None = None

    def fitted(self, replica_processes: int | None, min_samples: int, advice_event_id: str | None = None) -> SoakPlan:
        """This plan sized to the replica processes the energy service says the node can run at
        once (``scaling.recommended``'s ``validator_replicas``, from the event ``advice_event_id``;
        None: no advice, as planned).

        Every candidate replica has a baseline twin running beside it, so a soak of R replicas
        per side is 2R processes: R is at most half the advice, and at least one of each side
        (an advice of 0, an energy budget used up or no memory to spare, gets that smallest
        soak: a candidate already trained is still judged, on the fewest processes). Fewer
        replicas run more episodes each, so every cycle still has the samples a verdict needs.
        Fit the configured plan: a fitted one fitted again keeps its replicas but not its advice.
        """
        advised = replica_processes is not None
        replicas = max(1, min(self.replicas, replica_processes // 2)) if advised else self.replicas
        return replace(self, replicas=replicas, episodes=max(self.episodes, -(-min_samples // replicas)),
                       advice_event_id=advice_event_id if advised else None, advised_processes=replica_processes)

    def sizing(self) -> dict[str, Any] | None:
        """What sized this plan, as ``validation.started`` records it: None when it runs as configured."""
        if self.advised_processes is None:
            return None
        return {"event_id": self.advice_event_id, "validator_replicas": self.advised_processes}


# ---------------------------------------------------------------------------
# Drift soak schedule
# ---------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def next_drift_soak(
    now: datetime,
    last_started: datetime | None,
    interval_s: float,
    jitter_fraction: float,
    rng_seed: int | str,
) -> datetime:
    """When the next drift soak is due; a result <= ``now`` means "start now".

    Jitter spreads soaks of many nodes over time so they do not all load the
    machines at once; the seed (say, the node name) makes it repeatable, so
    asking again gives the same answer until a new run starts.

    The schedule depends only on when the last run *started*, never on how it
    ended: a failing or dead run never blocks or delays later ones.
    """
    if interval_s <= 0:
        raise ValueError("interval_s must be positive")
    if not 0.0 <= jitter_fraction < 1.0:
        raise ValueError("jitter_fraction must lie in [0, 1)")
    if now.tzinfo is None or (last_started is not None and last_started.tzinfo is None):
        raise ValueError("times must carry a timezone")
    if last_started is None:
        # No history: anchor to the interval grid so repeated calls agree.
        slots = math.floor((now - _EPOCH).total_seconds() / interval_s)
        anchor = _EPOCH + timedelta(seconds=slots * interval_s)
        rng = random.Random(f"{rng_seed}:{anchor.isoformat()}")
        due = anchor + timedelta(seconds=rng.uniform(0.0, jitter_fraction * interval_s))
    else:
        rng = random.Random(f"{rng_seed}:{last_started.astimezone(timezone.utc).isoformat()}")
        due = last_started + timedelta(seconds=interval_s * (1.0 + rng.uniform(-jitter_fraction, jitter_fraction)))
    return max(due, now)


def blocking_drift_run(state: ValidatorState, adapter_sha256: str, now: datetime) -> ValidationRun | None:
    """The drift run that keeps a new one for this adapter from starting, if any.

    Only a live run blocks: a completed run never does, whatever its verdict,
    and a run silent for longer than ``drift_stale_after_s`` is presumed dead."""
    for run in state.runs.values():
        if run.purpose == "drift" and run.adapter_sha256 == adapter_sha256 and run.active:
            if not _stale(run, now, state.plan):
                return run
    return None


def _stale(run: ValidationRun, now: datetime, plan: SoakPlan) -> bool:
    if run.started_at is None:
        return True
    return (now - run.started_at).total_seconds() >= plan.drift_stale_after_s

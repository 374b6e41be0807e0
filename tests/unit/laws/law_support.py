"""What the law tests share: bounded Hypothesis settings, events as plain values, a log kept while
driving a domain, operators with fixed keys, and a service runtime on SQLite with no broker.

A law test drives a service's domain (or its runtime) with a short generated script and checks one
property of the result: redelivering an event changes nothing, replaying the log gives the state
built live, the state survives being stored as rows.
"""

from __future__ import annotations

import functools
import json
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from sqlmodel import Session, select

from shared.contracts import schemas
from shared.contracts.envelope import Envelope, NewEvent, Producer, seal
from shared.contracts.trust import Keyring, decision_subject, public_key_b64, sign_decision

T0 = datetime(2025, 3, 4, 14, 3, tzinfo=timezone.utc)

# Every law runs a fixed, small number of examples from a seed fixed per test: the same examples on
# every run and every machine, and the whole folder in a few seconds.
LAWS = settings(max_examples=25, deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])


def laws(max_examples: int) -> settings:
    return settings(LAWS, max_examples=max_examples)


class Move:
    """A script's move: ``build(state, now, ids)`` gives the message; shown by the call that made it."""

    def __init__(self, label: str, build: Callable[[Any, datetime, "Ids"], Any]) -> None:
        self.label, self.build = label, build

    def __call__(self, state: Any, now: datetime, ids: "Ids") -> Any:
        return self.build(state, now, ids)

    def __repr__(self) -> str:
        return self.label


def move(factory: Callable[..., Callable[[Any, datetime, "Ids"], Any]]) -> Callable[..., Move]:
    """Marks a factory of moves, so that a failing example prints ``factory(args)`` for each move."""
    @functools.wraps(factory)
    def make(*args: Any, **kwargs: Any) -> Move:
        shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
        return Move(f"{factory.__name__}({', '.join(shown)})", factory(*args, **kwargs))
    return make


def interleave(draw: Callable[[Any], Any], stories: list[list[Any]]) -> list[Any]:
    """The moves of ``stories`` merged in a drawn order, each story's own order kept (as each stream's
    order is kept on its partition while streams interleave)."""
    stories = [list(story) for story in stories if story]
    merged = []
    while stories:
        story = stories[draw(st.integers(0, len(stories) - 1))]
        merged.append(story.pop(0))
        stories = [s for s in stories if s]
    return merged


def weighted(*choices: "tuple[int, st.SearchStrategy]") -> "st.SearchStrategy":
    """One of ``choices`` (weight, strategy), drawn in proportion to the weights; shrinks to the first."""
    slots = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(slots) - 1).flatmap(lambda i: slots[i])


# --- events as plain values -----------------------------------------------------------------


@dataclass(frozen=True)
class Ev:
    """An event as a domain reads it: sealed, with its time and its id."""

    type: str
    aggregate_id: str
    payload: Mapping[str, Any]
    occurred_at: datetime = T0
    event_id: str = ""
    producer: str = "test"

    @property
    def aggregate_type(self) -> str:
        return self.type.split(".", 1)[0]


class Ids:
    """Event ids counted from 1, so a failing example prints the same ids on every run."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return str(uuid.UUID(int=self.n))


def event(ids: Ids, type: str, aggregate_id: str, payload: Mapping[str, Any], at: datetime,
          producer: str = "test", *, check: bool = True) -> Ev:
    """A consumed event; ``check``: its payload must fit the current schema (the generators' own test)."""
    if check:
        schemas.validate_payload(type, schemas.current_version(type), dict(payload))
    return Ev(type, aggregate_id, dict(payload), at, ids(), producer)


def sealed(ids: Ids, new: NewEvent, at: datetime, producer: str) -> Ev:
    """A decided event as it comes back from the log: the same type, stream and payload, with a time and an id."""
    return Ev(new.type, new.aggregate_id, dict(new.payload), at, ids(), producer)


def is_event(message: Any) -> bool:
    return hasattr(message, "type") and hasattr(message, "payload")


# --- a domain driven message by message, its log kept -----------------------------------------

Step = Callable[[Any, Any], "tuple[Any, list[NewEvent]]"]  # (message, state) -> (state, decided)
# A script is a list of (minutes after the previous move, move); a move gives the message from the state
# so far (so that it can name what exists), or None when it makes no sense in that state.


@dataclass
class Journal:
    """The state a domain built live, and the log it leads to: each consumed event followed by the
    events decided on it, in order."""

    state: Any
    log: list[Ev] = field(default_factory=list)
    consumed: list[Ev] = field(default_factory=list)
    own: list[Ev] = field(default_factory=list)  # the decided events, sealed, in log order
    messages: list[Any] = field(default_factory=list)
    decided: list[list[NewEvent]] = field(default_factory=list)  # per message
    now: datetime = T0
    # the state after each message, and the number of log entries by then
    states: list[Any] = field(default_factory=list)
    log_sizes: list[int] = field(default_factory=list)


def drive(step: Step, state: Any, script: Iterable[Any], ids: Ids, producer: str) -> Journal:
    journal = Journal(state)
    for minutes, build in script:
        journal.now += timedelta(minutes=minutes)
        message = build(journal.state, journal.now, ids)
        if message is None:
            continue
        journal.state, decided = step(message, journal.state)
        journal.messages.append(message)
        journal.decided.append(decided)
        if is_event(message):
            journal.log.append(message)
            journal.consumed.append(message)
        for new in decided:
            own = sealed(ids, new, journal.now, producer)
            journal.log.append(own)
            journal.own.append(own)
        journal.states.append(journal.state)
        journal.log_sizes.append(len(journal.log))
    return journal


def play(runtime: "Runtime", script: Iterable[Any], ids: Ids, config: Any) -> list[Envelope]:
    """Run ``script`` through the runtime: events delivered as records, commands as timers run them;
    the envelopes delivered, in order."""
    delivered: list[Envelope] = []
    now = T0
    for minutes, build in script:
        now += timedelta(minutes=minutes)
        message = build(runtime.state(), now, ids)
        if message is None:
            continue
        if is_event(message):
            envelope = runtime.envelope(message)
            runtime.deliver(envelope)
            delivered.append(envelope)
        else:
            try:
                runtime.command(message, config)
            except runtime.refused:
                pass  # a command the domain turns down: its transaction wrote nothing
    return delivered


def rows_round_trip(state: Any, from_rows: Callable[[Mapping[str, Any]], Any]) -> Any:
    """The state as a restarted service reads it back: ``to_rows`` stored as JSON text, then ``from_rows``
    (as ``shared.decider`` writes and reads them)."""
    stored = {key: json.dumps(record, sort_keys=True, default=str) for key, record in state.to_rows().items()}
    return from_rows({key: json.loads(text) for key, text in stored.items()})


# --- operators ------------------------------------------------------------------------------


OPERATORS = {  # name -> roles; mallory holds a key but has no place in the keyring
    "alice": ("approver",), "bob": ("approver", "requester"), "carol": ("requester",), "dave": ("admin",),
    "mallory": None,
}
KEYS = {name: Ed25519PrivateKey.from_private_bytes(bytes([i + 41]) * 32) for i, name in enumerate(OPERATORS)}


def keyring() -> Keyring:
    ring = Keyring()
    for name, roles in OPERATORS.items():
        if roles is not None:
            ring.add(name, public_key_b64(KEYS[name]), roles, created_at=T0 - timedelta(days=1))
    return ring


def signed(request_id: str, decision: str, operator: str, at: datetime, nonce: str,
           extra: Mapping[str, Any] | None = None, *, kind: str | None = None,
           about: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A decision ``operator`` signed a minute before ``at``, valid for ten minutes, on what a request of
    ``kind`` is ``about`` (its subject: ``decision_subject(kind, about)``); no subject without a kind."""
    subject = decision_subject(kind, about or {}) if kind is not None else None
    return sign_decision(request_id, decision, operator, KEYS[operator], at - timedelta(minutes=1),
                         at + timedelta(minutes=9), nonce=nonce, extra=extra, subject=subject)


def sha(letter: str) -> str:
    return letter * 64


# --- the runtime: a Service with its decider on SQLite, no broker ---------------------------


class Runtime:
    """A service as its consumer runs it: each event through ``Service._apply`` (one SQL transaction
    that de-duplicates on event_id, runs the handler, stages the outbox and saves the decider's rows),
    each command through a transaction of its own, as a timer runs it."""

    def __init__(self, root: Path, name: str, reads: list[str], domain: Any,
                 from_rows: Callable[[Mapping[str, Any]], Any],
                 wire: Callable[["Runtime"], None], refused: tuple[type[Exception], ...] = ()) -> None:
        from shared.decider import Decider
        from shared.service import Service
        from shared.settings import Settings

        var = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
        settings = Settings(var_dir=var, bootstrap_servers=None, database_url=None, node="law-node")
        self._start = lambda: (Service(name, reads=reads, settings=settings), Decider(domain, from_rows=from_rows))
        self._wire = wire
        self.service, self.decider = self._start()
        self.sequences: dict[tuple[str, str], int] = {}
        self.refused = refused
        wire(self)

    def restart(self) -> None:
        """A new process on the same database: nothing held in memory, the state read from its rows."""
        self.service, self.decider = self._start()
        self._wire(self)

    def envelope(self, ev: Ev) -> Envelope:
        """``ev`` sealed by its producer, as it would travel (same id and time on every delivery)."""
        key = (ev.aggregate_type, ev.aggregate_id)
        self.sequences[key] = self.sequences.get(key, 0) + 1
        return seal(NewEvent(ev.type, ev.aggregate_id, dict(ev.payload)), sequence=self.sequences[key],
                    producer=Producer(service=ev.producer, node="law-node"), correlation_id=ev.aggregate_id,
                    causation_id=None, schema_version=schemas.current_version(ev.type),
                    occurred_at=ev.occurred_at, event_id=ev.event_id)

    def deliver(self, envelope: Envelope) -> list:
        """One record off the topic: decoded from its bytes (validated, upcast), then applied."""
        from shared.bus import decode

        return self.service._apply(decode(envelope.to_json()))

    def command(self, message: Any, config: Any) -> None:
        with self.service.transaction() as ctx:
            self.decider.run(ctx, message, config)

    def state(self) -> Any:
        with self.service.transaction() as ctx:
            return self.decider.state(ctx)

    def snapshot(self) -> dict[str, Any]:
        """Everything a handler may write: outbox, state rows and their head, processed ids, sequences."""
        from shared.store import AggregateSequence, OutboxEvent, ProcessedEvent, ServiceState, StateHead

        with Session(self.service.engine) as session:
            return {
                "outbox": [(r.event_id, r.envelope_json) for r in
                           session.exec(select(OutboxEvent).order_by(OutboxEvent.id))],
                "state": sorted((r.service, r.kind, r.key, r.value_json) for r in session.exec(select(ServiceState))),
                "heads": sorted((h.service, h.kind, h.version) for h in session.exec(select(StateHead))),
                "processed": sorted((p.consumer, p.event_id, p.outcome) for p in
                                    session.exec(select(ProcessedEvent))),
                "sequences": sorted((s.service, s.aggregate_type, s.aggregate_id, s.last_sequence) for s in
                                    session.exec(select(AggregateSequence))),
            }

    def close(self) -> None:
        self.service.engine.dispose()


# --- payloads other services publish, shaped as their schemas ask --------------------------------


def artefact_uri(adapter_sha: str) -> str:
    return f"artefact://sha256/{adapter_sha}"


def training_completed(job_id: str, cycle_id: str, adapter_sha: str, *, status: str = "trained", kind: str = "mntp",
                       energy: Mapping[str, Any] | None = None, loss: tuple[float, float] = (3.0, 2.5),
                       dataset_sha: str = "e" * 64) -> dict[str, Any]:
    return {
        "job_id": job_id, "cycle_id": cycle_id, "kind": kind, "model": "tiny",
        "adapter_uri": artefact_uri(adapter_sha), "adapter_sha256": adapter_sha, "status": status,
        "fallback": status != "trained", "fallback_reason": None if status == "trained" else "no ML stack",
        "metrics": {"before": {"loss": loss[0]}, "after": {"loss": loss[1]},
                    "loss_before": loss[0], "loss_after": loss[1]},
        "duration_s": 60.0, "energy": dict(energy) if energy is not None else None, "base_model": "tiny",
        "base_model_checksum": None, "dataset_id": "ds-1", "dataset_sha256": dataset_sha,
        "config": {"steps": 10}, "warm_start": None,
    }


THRESHOLDS = {"metrics": {}, "groups": {}, "pass_score": 0.6, "marginal_score": 0.4, "consecutive_failures": 2,
              "min_samples": 5}


def validation_completed(validation_id: str, adapter_sha: str, *, verdict: str, purpose: str = "candidate",
                         cycle_id: str | None = None, kind: str = "mntp",
                         energy: Mapping[str, Any] | None = None) -> dict[str, Any]:
    payload = {
        "validation_id": validation_id, "adapter_sha256": adapter_sha, "adapter_uri": artefact_uri(adapter_sha),
        "baseline": {"kind": "base", "adapter_sha256": None}, "kind": kind, "purpose": purpose,
        "cycle_id": cycle_id, "verdict": verdict, "explanation": f"soak {verdict}", "score": 0.8,
        "raw_data_uri": None, "sample_sizes": {"candidate": {"latency_ms": 30}, "baseline": {"latency_ms": 30}},
        "thresholds": dict(THRESHOLDS),
    }
    if energy is not None:
        payload["energy"] = dict(energy)
    return payload


def hardware_profile(load_1m: float, cores: int = 4, available_gib: float = 8.0) -> dict[str, Any]:
    return {"cores": cores, "memory_total_bytes": 16 * 2**30, "memory_available_bytes": int(available_gib * 2**30),
            "gpus": [], "load_avg": [load_1m, load_1m, load_1m], "cpu_model": "law-cpu"}


def redelivery_is_absorbed(runtime: Runtime, script: Iterable[Any], config: Any, pick: int, restart: bool) -> None:
    """The runtime's law: ``script`` played, then one of its records delivered again (by the same process,
    or by a restarted one when ``restart``) returns nothing to run and writes nothing: no outbox row, no
    state row, no processed id, no sequence; the state is the one before."""
    try:
        delivered = play(runtime, script, Ids(), config)
        if not delivered:
            return
        before, state = runtime.snapshot(), runtime.state()
        if restart:
            runtime.restart()

        assert runtime.deliver(delivered[pick % len(delivered)]) == []

        assert runtime.snapshot() == before
        # a restarted process holds the state its rows give (compared as rows: see the rows laws)
        assert (runtime.state().to_rows() == state.to_rows()) if restart else (runtime.state() == state)
    finally:
        runtime.close()


def assert_redelivery_changes_nothing(journal, step, candidates, pick: int, watched: Iterable[str] | None = None) -> None:
    """Delivering one of ``candidates`` again (``pick`` chooses) decides nothing (of ``watched``) and keeps the state."""
    if not candidates:
        return
    state, events = step(candidates[pick % len(candidates)], journal.state)
    assert [e for e in events if watched is None or e.type in watched] == []
    assert state == journal.state


def assert_replay_gives_live_state(journal, replay) -> None:
    """Folding the log gives the state built live: at the end, and at every point on the way."""
    assert replay(journal.log) == journal.state
    for state, size in zip(journal.states, journal.log_sizes):
        assert replay(journal.log[:size]) == state

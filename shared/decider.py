"""A service's decider, run inside the transaction of the message it answers, its state kept as rows.

Every service's domain is a decider: ``initial_state()``, ``decide(message,
state, config) -> [NewEvent]`` and ``evolve(state, event) -> state``. Its state
class says how it is stored: ``to_rows()`` gives one JSON record per aggregate
(or per small key, such as a used nonce) by row key, and ``from_rows(rows)``
reads them back (``from_rows({})`` is the initial state).

``Decider.run(ctx, message, config)`` in a handler:

1. takes the state: the copy held in memory, loaded from the rows once and
   reloaded only when someone else saved it since (``StateHead`` counts saves);
2. folds the message in when it is an event, decides, stages the decided events
   in the outbox of ``ctx``'s transaction and folds them in as sealed;
3. writes the rows whose record changed and deletes the rows that disappeared,
   in that same transaction, which also records the message as processed.

The copy in memory becomes the new state when the transaction commits; a
transaction that fails leaves no copy behind, so the next message reads the
rows again. A save made from a copy older than the rows is refused
(``StaleState``) and the message is handled again on the newer state.

A database written before the rows existed keeps the state its own way (one
document, or only the service's own events); ``upgrade`` reads it the first
time the state is loaded and the rows take its place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generic, Mapping, Protocol, TypeVar

from shared.contracts.envelope import Envelope, NewEvent
from shared.store import StateStore, advance_state_version, read_state_rows, state_version, write_state_rows

if TYPE_CHECKING:
    from shared.service import HandlerContext

S = TypeVar("S")
KIND = "state"  # the ServiceState kind of every decider's rows; the key names the aggregate


class Domain(Protocol[S]):
    """What a service's domain module exposes."""

    def initial_state(self) -> S: ...

    def decide(self, message: Any, state: S, config: Any) -> list[NewEvent]: ...

    def evolve(self, state: S, event: Any) -> S: ...


@dataclass(frozen=True)
class _Held:
    state: Any
    rows: Mapping[str, str]  # row key -> JSON text, as stored
    version: int


def is_event(message: Any) -> bool:
    """An event is folded into the state before deciding on it; a command is not."""
    return hasattr(message, "type") and hasattr(message, "payload")


class Decider(Generic[S]):
    def __init__(self, domain: Domain[S], *, from_rows: Callable[[Mapping[str, Any]], S],
                 upgrade: Callable[["HandlerContext"], S | None] | None = None, kind: str = KIND) -> None:
        self.domain = domain
        self.from_rows = from_rows
        self.upgrade = upgrade
        self.kind = kind
        self._held: dict[tuple[str, str], _Held] = {}  # by (database, service)

    # --- in a handler ------------------------------------------------------------
    def run(self, ctx: "HandlerContext", message: Any, config: Any = None, *,
            correlation_id: str | None = None) -> list[Envelope]:
        """Decide on ``message``, stage the events in the outbox, save the state they lead to; the sealed events."""
        state = self.state(ctx)
        if is_event(message):
            state = self.domain.evolve(state, message)
        return self._record(ctx, state, self.domain.decide(message, state, config), correlation_id)

    def record(self, ctx: "HandlerContext", events: list[NewEvent], *,
               correlation_id: str | None = None) -> list[Envelope]:
        """Stage ``events`` decided on ``self.state(ctx)`` (and completed by the caller), fold them in, save."""
        return self._record(ctx, self.state(ctx), events, correlation_id)

    def _record(self, ctx: "HandlerContext", state: S, events: list[NewEvent],
                correlation_id: str | None) -> list[Envelope]:
        sealed = ctx.service.stage(ctx, events, correlation_id=correlation_id)
        for envelope in sealed:
            state = self.domain.evolve(state, envelope)
        self.save(ctx, state)
        return sealed

    def fold(self, ctx: "HandlerContext", event: Any) -> S:
        """Fold ``event`` in without deciding on it (a fact to remember, nothing to answer)."""
        state = self.domain.evolve(self.state(ctx), event)
        self.save(ctx, state)
        return state

    def state(self, ctx: "HandlerContext") -> S:
        """The state as ``ctx``'s transaction sees it."""
        return self._current(ctx).state

    def save(self, ctx: "HandlerContext", state: S) -> None:
        """Write what changed between the state as read and ``state``, in ``ctx``'s transaction."""
        before = self._current(ctx)
        if state is not before.state:  # evolve hands back the very state it was given when nothing changed
            self._write(ctx, before, state)

    def _write(self, ctx: "HandlerContext", before: _Held, state: S) -> _Held:
        rows = {key: _json(record) for key, record in state.to_rows().items()}
        added = {k: v for k, v in rows.items() if k not in before.rows}
        changed = {k: v for k, v in rows.items() if k in before.rows and before.rows[k] != v}
        removed = [k for k in before.rows if k not in rows]
        version = before.version
        if added or changed or removed:
            service = ctx.service.name
            version = advance_state_version(ctx.session, service, self.kind, before.version)
            write_state_rows(ctx.session, service, self.kind, added=added, changed=changed, removed=removed)
        self._held.pop(self._key(ctx), None)  # until the commit, the rows are the truth
        ctx.staged[self] = _Held(state, rows, version)
        return ctx.staged[self]

    # --- loading -------------------------------------------------------------------
    def _current(self, ctx: "HandlerContext") -> _Held:
        if self in ctx.staged:
            return ctx.staged[self]
        service, key = ctx.service.name, self._key(ctx)
        version = state_version(ctx.session, service, self.kind)
        held = self._held.get(key)
        if held is None or held.version != version:
            held = self._load(ctx, version)
        # this transaction goes on from what it read here; after the commit, what it saved is the state
        ctx.staged[self] = held
        ctx.committed(lambda: self._held.__setitem__(key, ctx.staged[self]))
        return held

    def _load(self, ctx: "HandlerContext", version: int) -> _Held:
        rows = read_state_rows(ctx.session, ctx.service.name, self.kind)
        if version == 0 and not rows and self.upgrade is not None:
            previous = self.upgrade(ctx)
            if previous is not None:
                return self._write(ctx, _Held(self.from_rows({}), {}, 0), previous)
        return _Held(self.from_rows({k: json.loads(v) for k, v in rows.items()}), rows, version)

    @staticmethod
    def _key(ctx: "HandlerContext") -> tuple[str, str]:
        return str(ctx.service.engine.url), ctx.service.name


def from_document(kind: str, key: str, from_dict: Callable[[Mapping[str, Any]], S]) -> Callable[["HandlerContext"], S | None]:
    """An ``upgrade`` from a state kept as one document at (``kind``, ``key``): read once, then removed."""

    def upgrade(ctx: "HandlerContext") -> S | None:
        store = StateStore(ctx.session, ctx.service.name)
        document = store.get(kind, key)
        if document is None:
            return None
        store.delete(kind, key)
        return from_dict(document)

    return upgrade


def _json(record: Any) -> str:
    return json.dumps(record, sort_keys=True, default=str)

"""What one consumer trusts: the anchors file plus the operators the log enrolled.

``admit`` is the check every service runs on every record before any handler
(``Service.process``): a signature by a known, unrevoked key over exactly
these bytes, from a principal the contract lets publish the type, whose
envelope names it as producer. Operators' enrolments and revocations are
folded in as they are consumed (``fold``); at start-up, and whenever an event
names a key nobody knows yet (its enrolment may sit on a partition not read
yet), ``catch_up`` reads the operator topic from its start. The rules are
``shared.contracts.signing``; the anchors file is ``shared.keys``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid

from shared.contracts.chain import verify_service_decision
from shared.contracts.envelope import Envelope
from shared.contracts.signing import (Refused, RootCache, TrustState, check_envelope, fold_operator_event,
                                      fold_operator_events)
from shared.contracts.trust import Keyring
from shared.keys import load_anchors
from shared.settings import Settings

log = logging.getLogger("neurons.trust")
# the events that change which adapter serves: each carries the operator's signed decision behind it
SERVICE_CHANGES = ("adapter.promoted", "adapter.rolled_back", "profile.adapter_updated")


class TrustView:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = RootCache()
        self._anchors_seen: float | None = None
        self._rows: dict = {}  # the log's operators, kept across reloads of the anchors
        self._state: TrustState | None = None
        self._log_ends: dict | None = None
        self._consumer = None
        self._lock: asyncio.Lock | None = None

    @property
    def state(self) -> TrustState:
        try:
            seen = os.stat(self.settings.trust_path).st_mtime
        except OSError:
            seen = None
        if self._state is None or seen != self._anchors_seen:
            self._anchors_seen = seen
            self._state = TrustState.from_anchors(load_anchors(self.settings.trust_path)).with_rows(
                self._rows)
        return self._state

    def admit(self, envelope: Envelope) -> None:
        check_envelope(envelope, self.state, cache=self.cache)
        if envelope.type in SERVICE_CHANGES:
            # a signature proves who published it; what it puts in service must also be an operator's decision
            cause = envelope.payload.get("cause") if envelope.type == "profile.adapter_updated" else envelope.type
            verified = verify_service_decision(envelope.payload, self.keyring(), cause=cause or "")
            if not verified:
                # an approver enrolled since this view last read the log: read it again (Service.process)
                reason = "unknown_key" if verified.reason == "unknown_operator" else "unapproved"
                raise Refused(reason, f"{envelope.type} without a valid operator's decision: "
                                      f"{verified.reason}: {verified.detail}")

    def fold(self, envelope: Envelope) -> None:
        """Take an admitted ``operator.*`` event into the view."""
        principal = (envelope.signature or {}).get("principal", "")
        fold_operator_event(self.state, envelope.type, envelope.payload, principal, envelope.occurred_at)
        self._rows = self.state.to_rows()

    def keyring(self) -> Keyring:
        """The operators whose keys are valid now, with their roles: what decisions are verified against."""
        keyring = Keyring()
        for operator_id, record in self.state.operator_keys().items():
            keyring.add(operator_id, record.public_key, record.roles, created_at=record.valid_from)
        return keyring

    async def catch_up(self) -> bool:
        """Read the operator topic from its start and fold what it holds; True if the view changed.

        Skipped (False) when the topic has not grown since the last reading:
        one offsets request on a consumer kept open, so a flood of events
        signed by unknown keys costs little.
        """
        from shared.bus import MalformedEvent, decode
        from shared.log_reader import partitions_of, read_to_end
        from shared.topics import topic_for

        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            consumer = await self._reader()
            partitions = await partitions_of(consumer, [topic_for("operator")])
            if not partitions:
                return False
            if set(consumer.assignment()) != set(partitions):
                consumer.assign(partitions)
            ends = await consumer.end_offsets(partitions)
            if ends == self._log_ends:
                return False
            events: list[Envelope] = []
            # to the end of the log, not only to the reported high watermark (shared.log_reader)
            async for records in read_to_end(consumer, partitions, max_wait_s=5.0):
                for record in records:
                    try:
                        events.append(decode(record.value))
                    except MalformedEvent:
                        continue
            before = self.state.to_rows()
            fold_operator_events(self.state, events)
            self._rows = self.state.to_rows()
            self._log_ends = ends
            return self._rows != before

    async def _reader(self):
        from aiokafka import AIOKafkaConsumer

        from shared.log_reader import FETCH_WAIT_MS

        if self._consumer is None:
            # earliest: a seek to the beginning that races the default reset to the end would skip records
            consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.bootstrap(), group_id=None,
                                        enable_auto_commit=False, auto_offset_reset="earliest",
                                        fetch_max_wait_ms=FETCH_WAIT_MS,
                                        **self.settings.kafka_security(),
                                        client_id=f"neurons-trust-{uuid.uuid4().hex[:6]}")
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def read_once(self) -> "TrustView":
        """Catch up and let the reader go: for a command that checks once and exits."""
        try:
            await self.catch_up()
        finally:
            await self.close()
        return self

    async def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()

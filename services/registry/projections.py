"""The registry's read models, each a projection of the event log.

Every projection is idempotent given the archive's de-duplication (an event is
applied once, when it is first archived) and can be rebuilt from the archive
(``neurons audit replay``) or compared with a rebuilt copy (``neurons audit verify``).
Each reads only the events (times included), never the clock or a file, so two
builds from the same history are equal row for row.

- stream heads: the latest event of every stream (here);
- manifest: adapters with lineage, what serves each channel, channel history (manifest.py);
- approvals: requests, evidence, decisions (approvals.py);
- observability: cycles, training runs and loss curves, soak snapshots, energy (observability.py);
- profiles: personality profiles and their live adapter (profiles.py).
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, Session, SQLModel

from shared.archive import Projection, new_row
from shared.contracts.envelope import Envelope


class StreamHead(SQLModel, table=True):
    """The latest event of every stream: what each aggregate last did, and when."""

    __tablename__ = "stream_heads"
    aggregate_type: str = Field(primary_key=True)
    aggregate_id: str = Field(primary_key=True)
    last_sequence: int
    last_type: str
    last_event_id: str
    last_event_at: datetime
    event_count: int = 0


def apply_stream_head(session: Session, event: Envelope) -> None:
    row = session.get(StreamHead, (event.aggregate_type, event.aggregate_id))
    if row is None:
        row = new_row(session, StreamHead, aggregate_type=event.aggregate_type, aggregate_id=event.aggregate_id,
                      last_sequence=event.sequence, last_type=event.type, last_event_id=event.event_id,
                      last_event_at=event.occurred_at, event_count=0)
    if event.sequence >= row.last_sequence:
        row.last_sequence = event.sequence
        row.last_type = event.type
        row.last_event_id = event.event_id
        row.last_event_at = event.occurred_at
    row.event_count += 1
    session.add(row)


STREAM_HEADS = Projection("stream_heads", [StreamHead], apply_stream_head)


def all_projections() -> list[Projection]:
    from services.registry.approvals import APPROVALS
    from services.registry.manifest import MANIFEST
    from services.registry.observability import OBSERVABILITY
    from services.registry.profiles import PROFILES

    return [STREAM_HEADS, MANIFEST, APPROVALS, OBSERVABILITY, PROFILES]

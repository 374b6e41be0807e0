"""Evolution wiring: the faust worker that reads its topics and calls the domain."""

from __future__ import annotations

from shared.service import Service

service = Service("evolution", reads=["dataset", "approval", "training", "validation", "energy", "hardware", "scaling", "adapter"])

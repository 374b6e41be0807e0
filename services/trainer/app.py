"""Trainer wiring: the faust worker that reads its topics and calls the domain."""

from __future__ import annotations

from shared.service import Service

service = Service("trainer", reads=["training", "dataset"])

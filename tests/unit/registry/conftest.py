"""Fixtures of the registry's unit tests (the givens live in registry_givens)."""

from tests.unit.registry.registry_givens import config, keys, sign  # noqa: F401

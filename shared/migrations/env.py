"""Alembic's environment: run the revisions on the connection ``shared.migrations.config`` carries."""

from __future__ import annotations

from alembic import context

from shared.migrations import platform_metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("the revisions run through shared.db.migrate (neurons db upgrade), which hands them a connection")
context.configure(connection=connection, target_metadata=platform_metadata(), render_as_batch=connection.dialect.name == "sqlite",
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()

"""The platform's tables as they stood when its schema became versioned.

A database an earlier version of the platform created (its tables made at each
start, no ``alembic_version``) is adopted here: the tables it lacks are created
and those it holds get the columns they lack (``shared.migrations.create_table``).

Revision ID: 0001_initial
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

from shared.migrations import create_table

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    present = set(sa.inspect(op.get_bind()).get_table_names())
    create_table(present, "aggregate_sequences",
        sa.Column("service", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("aggregate_type", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("aggregate_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("last_sequence", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("service", "aggregate_type", "aggregate_id")
    )
    if create_table(present, "archived_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("type", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.Column("aggregate_type", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("aggregate_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("occurred_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("correlation_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("causation_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("producer_service", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("envelope_json", sa.Text(), nullable=False),
        sa.Column("topic", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("partition", sa.Integer(), nullable=True),
        sa.Column("offset", sa.Integer(), nullable=True),
        sa.Column("archived_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id")
    ):
        op.create_index(op.f("ix_archived_events_aggregate_id"), "archived_events", ["aggregate_id"], unique=False)
        op.create_index(op.f("ix_archived_events_aggregate_type"), "archived_events", ["aggregate_type"], unique=False)
        op.create_index(op.f("ix_archived_events_correlation_id"), "archived_events", ["correlation_id"], unique=False)
        op.create_index(op.f("ix_archived_events_occurred_at"), "archived_events", ["occurred_at"], unique=False)
        op.create_index(op.f("ix_archived_events_type"), "archived_events", ["type"], unique=False)
    if create_table(present, "outbox_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("service", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("event_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("aggregate_type", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("aggregate_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("envelope_json", sa.Text(), nullable=False),
        sa.Column("traceparent", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("published_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
        sa.UniqueConstraint("service", "aggregate_type", "aggregate_id", "sequence")
    ):
        op.create_index(op.f("ix_outbox_events_published_at"), "outbox_events", ["published_at"], unique=False)
        op.create_index(op.f("ix_outbox_events_service"), "outbox_events", ["service"], unique=False)
    create_table(present, "processed_events",
        sa.Column("consumer", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("event_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("event_type", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("outcome", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("processed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "event_id")
    )
    if create_table(present, "registry_adapters",
        sa.Column("adapter_sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("adapter_uri", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("cycle_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("job_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("base_model", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("base_model_sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("dataset_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("dataset_sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("config_json", sa.Text(), nullable=False),
        sa.Column("metrics_json", sa.Text(), nullable=False),
        sa.Column("energy_json", sa.Text(), nullable=False),
        sa.Column("trained_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("validation_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("verdict", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("verdict_explanation", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("verdict_score", sa.Float(), nullable=True),
        sa.Column("raw_data_uri", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("validated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("drift_validation_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("drift_verdict", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("drift_validated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("first_served_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("first_seen_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("adapter_sha256")
    ):
        op.create_index(op.f("ix_registry_adapters_cycle_id"), "registry_adapters", ["cycle_id"], unique=False)
    if create_table(present, "registry_approvals",
        sa.Column("request_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("subject_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("subject_json", sa.Text(), nullable=False),
        sa.Column("cycle_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("adapter_sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("evidence_json", sa.Text(), nullable=False),
        sa.Column("policy_json", sa.Text(), nullable=False),
        sa.Column("requested_by", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("requested_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("actor", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("operator_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("decided_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("reason", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("decision_json", sa.Text(), nullable=False),
        sa.Column("refusals_json", sa.Text(), nullable=False),
        sa.Column("outcome", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("grant_event_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.PrimaryKeyConstraint("request_id")
    ):
        op.create_index(op.f("ix_registry_approvals_adapter_sha256"), "registry_approvals", ["adapter_sha256"], unique=False)
        op.create_index(op.f("ix_registry_approvals_cycle_id"), "registry_approvals", ["cycle_id"], unique=False)
        op.create_index(op.f("ix_registry_approvals_kind"), "registry_approvals", ["kind"], unique=False)
        op.create_index(op.f("ix_registry_approvals_status"), "registry_approvals", ["status"], unique=False)
    if create_table(present, "registry_channel_events",
        sa.Column("event_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("channel", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("action", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("adapter_sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("adapter_uri", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("previous_adapter_sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("approval_request_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("operator_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("reason", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("detail", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("correlation_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.PrimaryKeyConstraint("event_id")
    ):
        op.create_index(op.f("ix_registry_channel_events_adapter_sha256"), "registry_channel_events", ["adapter_sha256"], unique=False)
        op.create_index(op.f("ix_registry_channel_events_at"), "registry_channel_events", ["at"], unique=False)
        op.create_index(op.f("ix_registry_channel_events_channel"), "registry_channel_events", ["channel"], unique=False)
    create_table(present, "registry_channels",
        sa.Column("channel", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("adapter_sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("adapter_uri", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("since", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("via", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("event_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("approval_request_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("approver", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("operator_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("previous_adapter_sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.PrimaryKeyConstraint("channel")
    )
    create_table(present, "registry_cycles",
        sa.Column("cycle_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("model", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("dataset_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("dataset_sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("config_json", sa.Text(), nullable=False),
        sa.Column("warm_start", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("energy_estimate_wh", sa.Float(), nullable=True),
        sa.Column("requested_by", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("proposed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("deferred_gate", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("deferred_reason", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("retry_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("job_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("adapter_sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("verdict", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("fitness", sa.Float(), nullable=True),
        sa.Column("loss_before", sa.Float(), nullable=True),
        sa.Column("loss_after", sa.Float(), nullable=True),
        sa.Column("outcome", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("completed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("last_event_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("cycle_id")
    )
    if create_table(present, "registry_energy_reports",
        sa.Column("job_kind", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("job_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("cycle_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("joules", sa.Float(), nullable=True),
        sa.Column("wh", sa.Float(), nullable=True),
        sa.Column("facility_wh", sa.Float(), nullable=True),
        sa.Column("gco2e", sa.Float(), nullable=True),
        sa.Column("pue", sa.Float(), nullable=True),
        sa.Column("carbon_intensity", sa.Float(), nullable=True),
        sa.Column("method", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("reason", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("ended_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("reported_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("job_kind", "job_id")
    ):
        op.create_index(op.f("ix_registry_energy_reports_cycle_id"), "registry_energy_reports", ["cycle_id"], unique=False)
    if create_table(present, "registry_profiles",
        sa.Column("profile_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("traits_json", sa.Text(), nullable=False),
        sa.Column("interaction_style", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("context_preferences_json", sa.Text(), nullable=False),
        sa.Column("channel", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("active_adapter_sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("active_adapter_uri", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("updated_by", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("adapter_updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("profile_id")
    ):
        op.create_index(op.f("ix_registry_profiles_channel"), "registry_profiles", ["channel"], unique=False)
    if create_table(present, "registry_training_runs",
        sa.Column("job_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("cycle_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("base_model", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("base_model_sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("dataset_sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("config_json", sa.Text(), nullable=False),
        sa.Column("loss_curve_json", sa.Text(), nullable=False),
        sa.Column("metrics_json", sa.Text(), nullable=False),
        sa.Column("adapter_sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("adapter_uri", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("error", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("requested_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("finished_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("job_id")
    ):
        op.create_index(op.f("ix_registry_training_runs_cycle_id"), "registry_training_runs", ["cycle_id"], unique=False)
    if create_table(present, "registry_validation_snapshots",
        sa.Column("validation_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("adapter_sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("adapter_uri", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("cycle_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("purpose", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("baseline_json", sa.Text(), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("verdict", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("explanation", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("raw_data_uri", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("replicas_planned", sa.Integer(), nullable=True),
        sa.Column("sized_by_event_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("advised_replicas", sa.Integer(), nullable=True),
        sa.Column("cycles_planned", sa.Integer(), nullable=True),
        sa.Column("episodes_planned", sa.Integer(), nullable=True),
        sa.Column("cycles_done", sa.Integer(), nullable=False),
        sa.Column("cycles_passed", sa.Integer(), nullable=False),
        sa.Column("cycles_failed", sa.Integer(), nullable=False),
        sa.Column("success_rate", sa.Float(), nullable=True),
        sa.Column("episodes_total", sa.Integer(), nullable=False),
        sa.Column("failing_streak", sa.Integer(), nullable=False),
        sa.Column("records_json", sa.Text(), nullable=False),
        sa.Column("load_json", sa.Text(), nullable=False),
        sa.Column("incidents_json", sa.Text(), nullable=False),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("completed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("last_event_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("validation_id")
    ):
        op.create_index(op.f("ix_registry_validation_snapshots_adapter_sha256"), "registry_validation_snapshots", ["adapter_sha256"], unique=False)
        op.create_index(op.f("ix_registry_validation_snapshots_cycle_id"), "registry_validation_snapshots", ["cycle_id"], unique=False)
    create_table(present, "service_state",
        sa.Column("service", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("key", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("value_json", sa.Text(), nullable=False),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("service", "kind", "key")
    )
    create_table(present, "state_heads",
        sa.Column("service", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("service", "kind")
    )
    create_table(present, "stream_heads",
        sa.Column("aggregate_type", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("aggregate_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("last_sequence", sa.Integer(), nullable=False),
        sa.Column("last_type", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("last_event_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("last_event_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("event_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("aggregate_type", "aggregate_id")
    )


def downgrade() -> None:
    op.drop_table("stream_heads")
    op.drop_table("state_heads")
    op.drop_table("service_state")
    op.drop_table("registry_validation_snapshots")
    op.drop_table("registry_training_runs")
    op.drop_table("registry_profiles")
    op.drop_table("registry_energy_reports")
    op.drop_table("registry_cycles")
    op.drop_table("registry_channels")
    op.drop_table("registry_channel_events")
    op.drop_table("registry_approvals")
    op.drop_table("registry_adapters")
    op.drop_table("processed_events")
    op.drop_table("outbox_events")
    op.drop_table("archived_events")
    op.drop_table("aggregate_sequences")

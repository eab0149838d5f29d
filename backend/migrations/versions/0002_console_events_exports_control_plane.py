"""Console operators and sessions, runtime events for the timeline, exporter state, the control plane's view.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07 02:10:13.218153
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "console_sessions",
        sa.Column("id_sha256", sa.String(length=64), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id_sha256"),
    )
    with op.batch_alter_table("console_sessions", schema=None) as batch_op:
        batch_op.create_index("ix_console_sessions_user", ["username"], unique=False)

    op.create_table(
        "control_plane_clusters",
        sa.Column("detector_id", sa.String(length=32), nullable=False),
        sa.Column("cluster_name", sa.String(length=255), nullable=False),
        sa.Column("cluster_arn", sa.String(length=512), nullable=True),
        sa.Column("covered", sa.Boolean(), nullable=False),
        sa.Column("management_type", sa.String(length=16), nullable=False),
        sa.Column("issue", sa.Text(), nullable=True),
        sa.Column("reported_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("detector_id", "cluster_name"),
    )
    op.create_table(
        "control_plane_tasks",
        sa.Column("detector_id", sa.String(length=32), nullable=False),
        sa.Column("task_arn", sa.String(length=512), nullable=False),
        sa.Column("account_id", sa.String(length=12), nullable=False),
        sa.Column("region", sa.String(length=32), nullable=False),
        sa.Column("cluster_name", sa.String(length=255), nullable=False),
        sa.Column("cluster_arn", sa.String(length=512), nullable=True),
        sa.Column("task_definition_arn", sa.String(length=512), nullable=True),
        sa.Column("launch_type", sa.String(length=16), nullable=True),
        sa.Column("last_status", sa.String(length=32), nullable=True),
        sa.Column("started_at", sa.BigInteger(), nullable=True),
        sa.Column("issue", sa.Text(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("reported_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("detector_id", "task_arn"),
    )
    with op.batch_alter_table("control_plane_tasks", schema=None) as batch_op:
        batch_op.create_index("ix_control_plane_tasks_cluster", ["detector_id", "cluster_name"], unique=False)

    op.create_table(
        "export_dead_letters",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("exporter", sa.String(length=64), nullable=False),
        sa.Column("detector_id", sa.String(length=32), nullable=True),
        sa.Column("finding_id", sa.String(length=64), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("export_dead_letters", schema=None) as batch_op:
        batch_op.create_index("ix_export_dead_letters_exporter", ["exporter", "created_at"], unique=False)

    op.create_table(
        "export_published",
        sa.Column("exporter", sa.String(length=64), nullable=False),
        sa.Column("detector_id", sa.String(length=32), nullable=False),
        sa.Column("finding_id", sa.String(length=64), nullable=False),
        sa.Column("published_at", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("exporter", "detector_id", "finding_id"),
    )
    op.create_table(
        "operators",
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("accounts", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("disabled_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("username"),
    )
    op.create_table(
        "runtime_events",
        sa.Column("detector_id", sa.String(length=32), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("task_arn", sa.String(length=512), nullable=False),
        sa.Column("time", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("container_name", sa.String(length=255), nullable=True),
        sa.Column("process_name", sa.String(length=255), nullable=True),
        sa.Column("executable_path", sa.Text(), nullable=True),
        sa.Column("received_at", sa.BigInteger(), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("detector_id", "id"),
    )
    with op.batch_alter_table("runtime_events", schema=None) as batch_op:
        batch_op.create_index("ix_runtime_events_received", ["received_at"], unique=False)
        batch_op.create_index("ix_runtime_events_task_time", ["detector_id", "task_arn", "time"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("runtime_events", schema=None) as batch_op:
        batch_op.drop_index("ix_runtime_events_task_time")
        batch_op.drop_index("ix_runtime_events_received")

    op.drop_table("runtime_events")
    op.drop_table("operators")
    op.drop_table("export_published")
    with op.batch_alter_table("export_dead_letters", schema=None) as batch_op:
        batch_op.drop_index("ix_export_dead_letters_exporter")

    op.drop_table("export_dead_letters")
    with op.batch_alter_table("control_plane_tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_control_plane_tasks_cluster")

    op.drop_table("control_plane_tasks")
    op.drop_table("control_plane_clusters")
    with op.batch_alter_table("console_sessions", schema=None) as batch_op:
        batch_op.drop_index("ix_console_sessions_user")

    op.drop_table("console_sessions")

"""The initial schema: detectors, agent tokens, access keys, findings, filters, coverage, intel sets, policies.

Made by autogenerate from backend.models. PostgreSQL names primary keys <table>_pkey itself; the one unique
constraint the models leave unnamed is named here, so that a later migration can drop it by name on both engines.

Revision ID: 0001
Revises:
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "access_keys",
        sa.Column("access_key_id", sa.String(length=32), nullable=False),
        sa.Column("secret_access_key", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=12), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("access_key_id"),
    )
    op.create_table(
        "agent_tokens",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=12), nullable=False),
        sa.Column("region", sa.String(length=32), nullable=False),
        sa.Column("cluster_name", sa.String(length=255), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at", sa.BigInteger(), nullable=True),
        sa.Column("last_used_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("secret_sha256", name="uq_agent_tokens_secret_sha256"),
    )
    op.create_table(
        "coverage",
        sa.Column("detector_id", sa.String(length=32), nullable=False),
        sa.Column("task_arn", sa.String(length=512), nullable=False),
        sa.Column("account_id", sa.String(length=12), nullable=False),
        sa.Column("region", sa.String(length=32), nullable=False),
        sa.Column("cluster_name", sa.String(length=255), nullable=False),
        sa.Column("cluster_arn", sa.String(length=512), nullable=True),
        sa.Column("task_definition_arn", sa.String(length=512), nullable=True),
        sa.Column("family", sa.String(length=255), nullable=True),
        sa.Column("launch_type", sa.String(length=16), nullable=True),
        sa.Column("agent_id", sa.String(length=128), nullable=False),
        sa.Column("agent_version", sa.String(length=32), nullable=False),
        sa.Column("first_seen", sa.BigInteger(), nullable=False),
        sa.Column("last_heartbeat", sa.BigInteger(), nullable=False),
        sa.Column("interval_s", sa.Integer(), nullable=False),
        sa.Column("stopped", sa.Boolean(), nullable=False),
        sa.Column("heartbeat", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("detector_id", "task_arn"),
    )
    op.create_index("ix_coverage_cluster", "coverage", ["detector_id", "cluster_name"])
    op.create_table(
        "detectors",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("account_id", sa.String(length=12), nullable=False),
        sa.Column("region", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("finding_publishing_frequency", sa.String(length=32), nullable=False),
        sa.Column("tags", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("account_id", "region", name="uq_detectors_account_region"),
    )
    op.create_table(
        "filters",
        sa.Column("detector_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("criteria", sa.Text(), nullable=False),
        sa.Column("tags", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("detector_id", "name"),
    )
    op.create_table(
        "findings",
        sa.Column("detector_id", sa.String(length=32), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=12), nullable=False),
        sa.Column("region", sa.String(length=32), nullable=False),
        sa.Column("type", sa.String(length=128), nullable=False),
        sa.Column("severity", sa.Float(), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.Column("first_seen", sa.BigInteger(), nullable=True),
        sa.Column("last_seen", sa.BigInteger(), nullable=True),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("epoch_created", sa.BigInteger(), nullable=False),
        sa.Column("epoch_count", sa.Integer(), nullable=False),
        sa.Column("archived", sa.Boolean(), nullable=False),
        sa.Column("archived_by", sa.String(length=160), nullable=True),
        sa.Column("resource_type", sa.String(length=32), nullable=True),
        sa.Column("cluster_name", sa.String(length=255), nullable=True),
        sa.Column("cluster_arn", sa.String(length=512), nullable=True),
        sa.Column("task_arn", sa.String(length=512), nullable=True),
        sa.Column("task_definition_arn", sa.String(length=512), nullable=True),
        sa.Column("task_family", sa.String(length=255), nullable=True),
        sa.Column("container_name", sa.String(length=255), nullable=True),
        sa.Column("image", sa.String(length=512), nullable=True),
        sa.Column("executable_path", sa.Text(), nullable=True),
        sa.Column("process_name", sa.String(length=255), nullable=True),
        sa.Column("executable_sha256", sa.String(length=64), nullable=True),
        sa.Column("feature_name", sa.String(length=64), nullable=True),
        sa.Column("action_type", sa.String(length=64), nullable=True),
        sa.Column("remote_ip", sa.String(length=64), nullable=True),
        sa.Column("domain", sa.String(length=255), nullable=True),
        sa.Column("threat_list_name", sa.String(length=255), nullable=True),
        sa.Column("agent_id", sa.String(length=128), nullable=True),
        sa.Column("received_at", sa.BigInteger(), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("detector_id", "id"),
    )
    op.create_index("ix_findings_archived_updated", "findings", ["detector_id", "archived", "updated_at", "id"])
    op.create_index("ix_findings_cluster", "findings", ["detector_id", "cluster_name", "updated_at", "id"])
    op.create_index("ix_findings_family", "findings", ["detector_id", "task_family", "updated_at", "id"])
    op.create_index("ix_findings_severity", "findings", ["detector_id", "severity", "updated_at", "id"])
    op.create_index("ix_findings_task", "findings", ["detector_id", "task_arn", "updated_at", "id"])
    op.create_index("ix_findings_type", "findings", ["detector_id", "type", "updated_at", "id"])
    op.create_index("ix_findings_updated", "findings", ["detector_id", "updated_at", "id"])
    op.create_table(
        "intel_sets",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("detector_id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("name", sa.String(length=300), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("location", sa.Text(), nullable=False),
        sa.Column("activate", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("content_sha256", sa.String(length=64), nullable=False),
        sa.Column("tags", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("detector_id", "kind", "name", name="uq_intel_sets_name"),
    )
    op.create_table(
        "policies",
        sa.Column("account_id", sa.String(length=12), nullable=False),
        sa.Column("cluster_name", sa.String(length=255), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "cluster_name"),
    )


def downgrade() -> None:
    # indexes go with their tables
    tables = ("policies", "intel_sets", "findings", "filters", "detectors", "coverage", "agent_tokens", "access_keys")
    for table in tables:
        op.drop_table(table)

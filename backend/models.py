"""The backend's tables (SQLAlchemy 2 declarative). Alembic migrations in backend/migrations are made from these.

Times are integers of milliseconds since the epoch (UTC): GuardDuty's FindingCriteria compare ``updatedAt``
and ``createdAt`` as epoch milliseconds, and integers compare the same on SQLite and PostgreSQL.

Every row that belongs to a tenant carries its ``detector_id`` (one detector per account and region), and
every query filters on it first: the indexes below all start with it.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Float, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Detector(Base):
    """GuardDuty's detector: one per (account, region), created when that account's first token or key is."""

    __tablename__ = "detectors"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(12))
    region: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="ENABLED")
    finding_publishing_frequency: Mapped[str] = mapped_column(String(32), default="FIFTEEN_MINUTES")
    tags: Mapped[str] = mapped_column(Text, default="{}")  # JSON object
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (UniqueConstraint("account_id", "region", name="uq_detectors_account_region"),)


class AgentToken(Base):
    """A sidecar's bearer token, bound to one account, region and cluster. Only its SHA-256 is kept."""

    __tablename__ = "agent_tokens"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "tok-" + hex, shown in listings
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    account_id: Mapped[str] = mapped_column(String(12))
    region: Mapped[str] = mapped_column(String(32))
    cluster_name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[int] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_used_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class AccessKey(Base):
    """An access key for the GuardDuty-compatible API (SigV4). The secret is kept: HMAC needs it, as in IAM."""

    __tablename__ = "access_keys"
    access_key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_access_key: Mapped[str] = mapped_column(String(64))
    account_id: Mapped[str] = mapped_column(String(12))
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[int] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class FindingRow(Base):
    """One finding: the document as the agent built it, plus the columns that criteria and sorting use.

    Column names are those of ``backend.criteria.FINDING_FIELDS`` (the GuardDuty attribute -> column map).
    """

    __tablename__ = "findings"
    detector_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(12))
    region: Mapped[str] = mapped_column(String(32))
    type: Mapped[str] = mapped_column(String(128))
    severity: Mapped[float] = mapped_column(Float)
    title: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    first_seen: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_seen: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    count: Mapped[int] = mapped_column(Integer, default=1)
    # An agent counts from 1 again after a restart (same finding id): the store keeps the total over the
    # agent's lives. epoch_created is the agent's createdAt of the life being counted, epoch_count its count.
    epoch_created: Mapped[int] = mapped_column(BigInteger, default=0)
    epoch_count: Mapped[int] = mapped_column(Integer, default=1)
    archived: Mapped[bool] = mapped_column(Boolean, default=False)
    # who archived it: "user" (ArchiveFindings) or "filter:<name>" (a suppression rule on arrival)
    archived_by: Mapped[str | None] = mapped_column(String(160), nullable=True)
    resource_type: Mapped[str | None] = mapped_column(String(32), nullable=True)
    cluster_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    cluster_arn: Mapped[str | None] = mapped_column(String(512), nullable=True)
    task_arn: Mapped[str | None] = mapped_column(String(512), nullable=True)
    task_definition_arn: Mapped[str | None] = mapped_column(String(512), nullable=True)
    task_family: Mapped[str | None] = mapped_column(String(255), nullable=True)
    container_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    image: Mapped[str | None] = mapped_column(String(512), nullable=True)
    executable_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    process_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    executable_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    feature_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    action_type: Mapped[str | None] = mapped_column(String(64), nullable=True)
    remote_ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    domain: Mapped[str | None] = mapped_column(String(255), nullable=True)
    threat_list_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    agent_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    received_at: Mapped[int] = mapped_column(BigInteger)
    document: Mapped[str] = mapped_column(Text)  # the finding as JSON (camelCase, GetFindings' shape)
    __table_args__ = (
        # Each filter column is followed by (updated_at, id): ListFindings' default order (newest first, id
        # breaking ties) is then read off the index, 50 rows at a time, instead of sorting every match.
        Index("ix_findings_updated", "detector_id", "updated_at", "id"),
        Index("ix_findings_archived_updated", "detector_id", "archived", "updated_at", "id"),
        Index("ix_findings_type", "detector_id", "type", "updated_at", "id"),
        Index("ix_findings_severity", "detector_id", "severity", "updated_at", "id"),
        Index("ix_findings_cluster", "detector_id", "cluster_name", "updated_at", "id"),
        Index("ix_findings_task", "detector_id", "task_arn", "updated_at", "id"),
        Index("ix_findings_family", "detector_id", "task_family", "updated_at", "id"),
    )


class FilterRow(Base):
    """CreateFilter: a saved FindingCriteria; action ARCHIVE makes it a suppression rule."""

    __tablename__ = "filters"
    detector_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    action: Mapped[str] = mapped_column(String(16), default="NOOP")
    rank: Mapped[int] = mapped_column(Integer, default=1)
    criteria: Mapped[str] = mapped_column(Text)  # FindingCriteria as sent (camelCase JSON)
    tags: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class CoverageRow(Base):
    """One task's agent, from its heartbeats: HEALTHY while it reports, UNHEALTHY after missed heartbeats."""

    __tablename__ = "coverage"
    detector_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    task_arn: Mapped[str] = mapped_column(String(512), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(12))
    region: Mapped[str] = mapped_column(String(32))
    cluster_name: Mapped[str] = mapped_column(String(255))
    cluster_arn: Mapped[str | None] = mapped_column(String(512), nullable=True)
    task_definition_arn: Mapped[str | None] = mapped_column(String(512), nullable=True)
    family: Mapped[str | None] = mapped_column(String(255), nullable=True)
    launch_type: Mapped[str | None] = mapped_column(String(16), nullable=True)
    agent_id: Mapped[str] = mapped_column(String(128))
    agent_version: Mapped[str] = mapped_column(String(32))
    first_seen: Mapped[int] = mapped_column(BigInteger)
    last_heartbeat: Mapped[int] = mapped_column(BigInteger)
    interval_s: Mapped[int] = mapped_column(Integer, default=60)
    stopped: Mapped[bool] = mapped_column(Boolean, default=False)  # its last heartbeat said the task stops
    heartbeat: Mapped[str] = mapped_column(Text)  # the last heartbeat as JSON (sources, counters, delivery)
    __table_args__ = (Index("ix_coverage_cluster", "detector_id", "cluster_name"),)


class IntelSet(Base):
    """CreateThreatIntelSet (kind THREAT) and CreateIPSet (kind TRUSTED): a list agents receive in their config."""

    __tablename__ = "intel_sets"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    detector_id: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(8))  # THREAT | TRUSTED
    name: Mapped[str] = mapped_column(String(300))
    format: Mapped[str] = mapped_column(String(16))  # GuardDuty's: TXT, STIX, OTX_CSV, ...
    location: Mapped[str] = mapped_column(Text)
    activate: Mapped[bool] = mapped_column(Boolean, default=True)
    status: Mapped[str] = mapped_column(String(16))  # ACTIVE | INACTIVE | ERROR
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    content: Mapped[str] = mapped_column(Text, default="")
    content_sha256: Mapped[str] = mapped_column(String(64), default="")
    tags: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (UniqueConstraint("detector_id", "kind", "name", name="uq_intel_sets_name"),)


class PolicyRow(Base):
    """The detection policy (lists, exceptions, rules) agents of an account receive; cluster '' is the default."""

    __tablename__ = "policies"
    account_id: Mapped[str] = mapped_column(String(12), primary_key=True)
    cluster_name: Mapped[str] = mapped_column(String(255), primary_key=True)
    document: Mapped[str] = mapped_column(Text)  # canonical JSON of detectors.policy
    updated_at: Mapped[int] = mapped_column(BigInteger)


# -- the console ---------------------------------------------------------------------------------------------------


class Operator(Base):
    """Someone who signs in to the console. ``accounts``: JSON list of account ids they may see, or ["*"]."""

    __tablename__ = "operators"
    username: Mapped[str] = mapped_column(String(64), primary_key=True)
    password_hash: Mapped[str] = mapped_column(Text)  # scrypt, with its parameters and salt
    accounts: Mapped[str] = mapped_column(Text, default='["*"]')
    created_at: Mapped[int] = mapped_column(BigInteger)
    disabled_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class ConsoleSession(Base):
    """A signed-in browser: the cookie holds a random id, only its SHA-256 is kept; CSRF token per session."""

    __tablename__ = "console_sessions"
    id_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(String(64))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    last_seen_at: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (Index("ix_console_sessions_user", "username"),)


# -- what agents report besides findings ---------------------------------------------------------------------


class RuntimeEventRow(Base):
    """A runtime event an agent sent (process, network, DNS, file), for the investigation timeline of a task."""

    __tablename__ = "runtime_events"
    detector_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    task_arn: Mapped[str] = mapped_column(String(512))
    time: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(64))
    container_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    process_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    executable_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    received_at: Mapped[int] = mapped_column(BigInteger)
    document: Mapped[str] = mapped_column(Text)
    __table_args__ = (
        Index("ix_runtime_events_task_time", "detector_id", "task_arn", "time"),
        Index("ix_runtime_events_received", "received_at"),
    )


# -- exports -----------------------------------------------------------------------------------------------------


class ExportPublished(Base):
    """What an exporter last sent for a finding: updates of aggregated findings go out at a set frequency."""

    __tablename__ = "export_published"
    exporter: Mapped[str] = mapped_column(String(64), primary_key=True)
    detector_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    finding_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    published_at: Mapped[int] = mapped_column(BigInteger)
    count: Mapped[int] = mapped_column(Integer)


class ExportDeadLetter(Base):
    """A payload an exporter gave up on, kept for inspection and replay."""

    __tablename__ = "export_dead_letters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    exporter: Mapped[str] = mapped_column(String(64))
    detector_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    finding_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    payload: Mapped[str] = mapped_column(Text)
    error: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (Index("ix_export_dead_letters_exporter", "exporter", "created_at"),)


# -- the control plane's view (runtime-manager) --------------------------------------------------------------


class ControlPlaneTask(Base):
    """A running task as ECS reports it (runtime-manager), joined with heartbeats for coverage."""

    __tablename__ = "control_plane_tasks"
    detector_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    task_arn: Mapped[str] = mapped_column(String(512), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(12))
    region: Mapped[str] = mapped_column(String(32))
    cluster_name: Mapped[str] = mapped_column(String(255))
    cluster_arn: Mapped[str | None] = mapped_column(String(512), nullable=True)
    task_definition_arn: Mapped[str | None] = mapped_column(String(512), nullable=True)
    launch_type: Mapped[str | None] = mapped_column(String(16), nullable=True)
    last_status: Mapped[str | None] = mapped_column(String(32), nullable=True)
    started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # what the manager concluded: None (the sidecar is there: heartbeats decide), or GuardDuty's issue kind text
    issue: Mapped[str | None] = mapped_column(Text, nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="{}")  # JSON: sidecar container status, exit code, reason
    reported_at: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (Index("ix_control_plane_tasks_cluster", "detector_id", "cluster_name"),)


class ControlPlaneCluster(Base):
    """A cluster as runtime-manager sees it: covered or excluded (tag), and cluster-wide issues (VPC endpoint)."""

    __tablename__ = "control_plane_clusters"
    detector_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    cluster_name: Mapped[str] = mapped_column(String(255), primary_key=True)
    cluster_arn: Mapped[str | None] = mapped_column(String(512), nullable=True)
    covered: Mapped[bool] = mapped_column(Boolean, default=True)
    management_type: Mapped[str] = mapped_column(String(16), default="AUTO_MANAGED")
    issue: Mapped[str | None] = mapped_column(Text, nullable=True)
    reported_at: Mapped[int] = mapped_column(BigInteger)

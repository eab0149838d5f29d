"""Coverage: which tasks run a reporting agent, from their heartbeats; ListCoverage and GetCoverageStatistics.

Each heartbeat upserts one row per (detector, task ARN) holding the last heartbeat as sent. A task's status is
computed when someone asks, from the time of that heartbeat (the backend's clock, not the agent's), the interval
the agent announced and the ``heartbeat_misses`` setting, plus what the heartbeat itself says (delivery blocked,
no process source, findings dropped). Nothing has to run in the background for an agent that went silent to
turn UNHEALTHY, and every replica computes the same answer from the same rows.

GuardDuty reports ECS coverage per cluster: one ``CoverageResource`` per cluster, UNHEALTHY when any of its
tasks is, with the per-task problems in ``fargateDetails.issues``. A task whose agent said it stops leaves
coverage at once, as a stopped task leaves GuardDuty's. The console wants the task level:
:func:`task_coverage`.

Heartbeats only tell about tasks that run an agent. ``runtime-manager`` reports the control plane's view
(``backend.control_plane``: ECS's running tasks and, for each, why it has no agent), and the two are merged here:
a task ECS runs with the sidecar is HEALTHY if its agent reports and UNHEALTHY "Agent not reporting" if it never
did; a task the manager gives an issue (not provisioned, agent exited) is UNHEALTHY with it; a cluster-wide issue
(the VPC endpoint could not be created) makes its cluster UNHEALTHY; an agent's task that ECS no longer lists has
stopped, even if the agent never said so. A manager that stopped reporting is ignored after
CONTROL_PLANE_FRESH_MS: coverage falls back to the heartbeats alone.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import and_, delete, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from backend.api import ApiRequest, next_token, operation, parse_page
from backend.errors import BadRequest
from backend.findings import iso_ms
from backend.ingest import AgentError, validation_error
from backend.models import ControlPlaneCluster, ControlPlaneTask, CoverageRow, Detector
from backend.tenancy import TokenIdentity, now_ms

HEALTHY = "HEALTHY"
UNHEALTHY = "UNHEALTHY"
# Only task_coverage (the console) shows this; the GuardDuty API drops stopped tasks.
STOPPED = "STOPPED"

MAX_HEARTBEAT_BYTES = 256 * 1024
MAX_INTERVAL_S = 3600  # an agent announcing a day-long interval would stay HEALTHY for days after dying
# How long the console still lists a task that stopped cleanly, so an operator can tell "stopped" from "went silent".
STOPPED_VISIBLE_MS = 3_600_000
# A task that went silent without a stopping heartbeat (SIGKILL, host lost) is UNHEALTHY for this long, then
# dropped: without it, every hard-killed task of every cluster would stay in coverage forever.
SILENT_RETENTION_MS = 86_400_000
# Findings the agent's spool dropped (it was full) since the agent started; below this, only HIGH/CRITICAL count.
DROPPED_ISSUE_THRESHOLD = 100
# The agent's process sources (sidecar/probe.py): without one of them it sees no process at all.
PROCESS_SOURCES = ("proc_poll", "proc_connector")
MAX_TASK_ISSUES = 50  # per cluster in fargateDetails.issues; the console has them all

ISSUE_NOT_REPORTING = "Agent not reporting"
ISSUE_CANNOT_DELIVER = "Agent cannot deliver findings"
ISSUE_NO_PROCESS_SOURCE = "Agent runs without a process source"
ISSUE_DROPPED = "Agent dropped findings"
# GuardDuty's issue kinds that only the control plane (runtime-manager) can see
ISSUE_NOT_PROVISIONED = "Agent not provisioned"
ISSUE_EXITED = "Agent exited"
ISSUE_VPC_ENDPOINT = "VPC endpoint creation failed"
TASK_ISSUE_KINDS = (
    ISSUE_NOT_REPORTING,
    ISSUE_CANNOT_DELIVER,
    ISSUE_NO_PROCESS_SOURCE,
    ISSUE_DROPPED,
    ISSUE_NOT_PROVISIONED,
    ISSUE_EXITED,
)
# GuardDuty's ManagementType of a cluster's agents: the manager adds them (AUTO_MANAGED), a tag excludes the
# cluster (DISABLED), or they are the user's business (MANUAL: no manager, or a cluster it does not manage).
AUTO_MANAGED, MANUAL, DISABLED = "AUTO_MANAGED", "MANUAL", "DISABLED"
# The manager reports every few minutes; a view older than this is from a manager that stopped.
CONTROL_PLANE_FRESH_MS = 3_600_000
# Before its first heartbeat is due, a task that ECS started with the sidecar is not yet "not reporting".
FIRST_HEARTBEAT_S = 60

_TASK_ARN = re.compile(
    r"^arn:(?P<partition>aws[a-z-]*):ecs:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
    r"task/(?:(?P<cluster>[A-Za-z0-9_-]{1,255})/)?(?P<task_id>[A-Za-z0-9-]{1,128})$"
)
_CLUSTER_ARN = re.compile(
    r"^arn:(?P<partition>aws[a-z-]*):ecs:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
    r"cluster/(?P<name>[A-Za-z0-9_-]{1,255})$"
)


def _matching(pattern: re.Pattern[str], what: str) -> AfterValidator:
    def check(v: str) -> str:
        if not pattern.match(v):
            raise ValueError(f"not an ECS {what}")
        return v

    return AfterValidator(check)


# what heartbeats, events and the control plane's reports say a task or cluster is
TaskArn = Annotated[
    str,
    Field(min_length=1, max_length=512),
    _matching(_TASK_ARN, "task ARN (arn:aws:ecs:REGION:ACCOUNT:task/[CLUSTER/]TASK_ID)"),
]
ClusterArn = Annotated[
    str, Field(max_length=512), _matching(_CLUSTER_ARN, "cluster ARN (arn:aws:ecs:REGION:ACCOUNT:cluster/NAME)")
]


# -- the heartbeat (README, "The agent API") ------------------------------------------------------------------


class HeartbeatTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    accountId: str = Field(min_length=1, max_length=12)
    region: str = Field(min_length=1, max_length=32)
    clusterName: str = Field(min_length=1, max_length=255)
    clusterArn: ClusterArn | None = None
    taskArn: TaskArn
    taskDefinitionArn: str | None = Field(None, max_length=512)
    family: str | None = Field(None, max_length=255)
    launchType: Literal["FARGATE", "EC2"] | None = None
    availabilityZone: str | None = Field(None, max_length=64)
    hostMode: bool = False


class SourceState(BaseModel):
    # a newer agent may say more about a source; what this backend reads is checked
    model_config = ConfigDict(extra="allow")
    enabled: bool
    detail: str | None = None


class DeliveryState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    findingsEmitted: int = Field(0, ge=0)
    findingsSent: int = Field(0, ge=0)
    spooled: int = Field(0, ge=0)
    spoolBytes: int = Field(0, ge=0)
    dropped: int = Field(0, ge=0)
    droppedBySeverity: dict[str, int] = Field(default_factory=dict)
    lastError: str | None = None
    lastErrorAt: str | None = None
    permanentError: str | None = None


class ResourceUsage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cpuPercent: float = Field(ge=0)
    rssBytes: int = Field(ge=0)


class Heartbeat(BaseModel):
    """The heartbeat's top-level shape is closed (a misspelt key is an error the agent's tests see); the names
    inside ``sources`` and ``counters`` are the agent's to choose."""

    model_config = ConfigDict(extra="forbid")
    agentId: str = Field(min_length=1, max_length=128)
    agentVersion: str = Field(min_length=1, max_length=32)
    sentAt: str = Field(max_length=40)
    intervalS: int = Field(ge=1, le=MAX_INTERVAL_S)
    stopping: bool = False
    task: HeartbeatTask
    sources: dict[str, SourceState] = Field(default_factory=dict)
    counters: dict[str, int] = Field(default_factory=dict)
    delivery: DeliveryState | None = None
    resources: ResourceUsage | None = None
    configEtag: str | None = Field(None, max_length=128)
    # the remote configuration the agent refused (it keeps running its previous one)
    configError: str | None = Field(None, max_length=4096)

    @field_validator("sentAt")
    @classmethod
    def _sent_at(cls, v: str) -> str:
        try:
            datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError("not an ISO 8601 time (e.g. 2024-05-01T12:00:00.000Z)") from None
        return v


def check_heartbeat_claims(ident: TokenIdentity, task: HeartbeatTask) -> None:
    """A token speaks for one account, region and cluster: a heartbeat claiming another is refused (403)."""
    for name, claimed, allowed in (
        ("accountId", task.accountId, ident.account_id),
        ("region", task.region, ident.region),
        ("clusterName", task.clusterName, ident.cluster_name),
    ):
        if claimed != allowed:
            raise AgentError(403, f"task.{name}: this token may only send heartbeats of {name} {allowed}")
    m = _TASK_ARN.match(task.taskArn)
    assert m is not None  # the model checked it
    if (
        m["account"] != ident.account_id
        or m["region"] != ident.region
        or m["cluster"] not in (None, ident.cluster_name)
    ):
        raise AgentError(403, f"task.taskArn: this token may only send heartbeats of cluster {ident.cluster_name}")
    if task.clusterArn is not None:
        c = _CLUSTER_ARN.match(task.clusterArn)
        assert c is not None
        if c["account"] != ident.account_id or c["region"] != ident.region or c["name"] != ident.cluster_name:
            raise AgentError(
                403, f"task.clusterArn: this token may only send heartbeats of cluster {ident.cluster_name}"
            )


def parse_heartbeat(data: dict[str, Any]) -> Heartbeat:
    size = len(orjson.dumps(data))
    if size > MAX_HEARTBEAT_BYTES:
        raise AgentError(
            413, f"heartbeat larger than {MAX_HEARTBEAT_BYTES} bytes ({size})", maxBytes=MAX_HEARTBEAT_BYTES
        )
    try:
        return Heartbeat.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def _insert(session: AsyncSession) -> Any:
    name = session.get_bind().dialect.name
    return (postgresql.insert if name == "postgresql" else sqlite.insert)(CoverageRow)


async def record_heartbeat(session: AsyncSession, ident: TokenIdentity, data: dict[str, Any]) -> None:
    """Validate a heartbeat and store it as its task's coverage row (AgentError 400/403/413 when refused)."""
    hb = parse_heartbeat(data)
    check_heartbeat_claims(ident, hb.task)
    t = now_ms()
    did = ident.detector_id
    is_new = (
        await session.execute(
            select(CoverageRow.task_arn).where(CoverageRow.detector_id == did, CoverageRow.task_arn == hb.task.taskArn)
        )
    ).first() is None
    values = {
        "detector_id": did,
        "task_arn": hb.task.taskArn,
        "account_id": ident.account_id,
        "region": ident.region,
        "cluster_name": ident.cluster_name,
        "cluster_arn": hb.task.clusterArn,
        "task_definition_arn": hb.task.taskDefinitionArn,
        "family": hb.task.family,
        "launch_type": hb.task.launchType,
        "agent_id": hb.agentId,
        "agent_version": hb.agentVersion,
        "first_seen": t,
        "last_heartbeat": t,
        "interval_s": hb.intervalS,
        "stopped": hb.stopping,
        "heartbeat": orjson.dumps(data).decode(),
    }
    ins = _insert(session).values(**values)
    keep = ("detector_id", "task_arn", "first_seen")
    # An old-format task ARN (task/ID) does not name its cluster: the stored row says whose it is. The check is
    # the upsert's WHERE, so that two clusters' agents racing on one such ARN cannot move a row between clusters.
    stmt = ins.on_conflict_do_update(
        index_elements=["detector_id", "task_arn"],
        set_={k: ins.excluded[k] for k in values if k not in keep},
        where=CoverageRow.cluster_name == ins.excluded.cluster_name,
    )
    res = await session.execute(stmt.execution_options(synchronize_session=False))
    if not res.rowcount:  # type: ignore[attr-defined]
        raise AgentError(403, f"task.taskArn: this task belongs to another cluster than {ident.cluster_name}")
    if is_new:
        # A new task is the moment to forget the cluster's finished ones: task churn drives both, so the
        # table stays bounded without a background job or a delete on every heartbeat.
        await session.execute(
            delete(CoverageRow)
            .where(
                CoverageRow.detector_id == did,
                CoverageRow.cluster_name == ident.cluster_name,
                or_(
                    and_(CoverageRow.stopped.is_(True), CoverageRow.last_heartbeat < t - STOPPED_VISIBLE_MS),
                    CoverageRow.last_heartbeat < t - SILENT_RETENTION_MS,
                ),
            )
            .execution_options(synchronize_session=False)
        )


# -- status ------------------------------------------------------------------------------------------------------


def task_status(row: CoverageRow, now_ms: int, misses: int) -> tuple[str, str | None]:
    """(status, issue) of one task's agent: HEALTHY/None, UNHEALTHY/why, or STOPPED/None for a task that stopped.

    Silence wins over everything else (what the last heartbeat said is no longer news); otherwise every problem
    the heartbeat shows is listed, joined with "; ". Each problem starts with a fixed phrase before its first
    ": " (the ISSUE_* constants), which the cluster summary counts by.
    """
    if row.stopped:
        return STOPPED, None
    if now_ms - row.last_heartbeat > misses * row.interval_s * 1000:
        return UNHEALTHY, f"{ISSUE_NOT_REPORTING}: no heartbeat since {iso_ms(row.last_heartbeat)}"
    hb = orjson.loads(row.heartbeat)
    issues: list[str] = []
    delivery = hb.get("delivery") or {}
    if delivery.get("permanentError"):
        issues.append(f"{ISSUE_CANNOT_DELIVER}: {delivery['permanentError']}")
    sources: dict[str, Any] = hb.get("sources") or {}
    if not any((sources.get(name) or {}).get("enabled") for name in PROCESS_SOURCES):
        reasons = [f"{name}: {sources[name].get('detail') or 'off'}" for name in PROCESS_SOURCES if name in sources]
        issues.append(f"{ISSUE_NO_PROCESS_SOURCE}: {'; '.join(reasons) or 'the heartbeat lists no process source'}")
    dropped = int(delivery.get("dropped") or 0)
    by_severity: dict[str, int] = delivery.get("droppedBySeverity") or {}
    severe = sum(int(by_severity.get(s) or 0) for s in ("HIGH", "CRITICAL"))
    if dropped >= DROPPED_ISSUE_THRESHOLD or severe:
        detail = ", ".join(f"{s} {n}" for s, n in by_severity.items() if n)
        issues.append(
            f"{ISSUE_DROPPED}: {dropped} since the agent started, its spool was full"
            + (f" ({detail})" if detail else "")
        )
    if issues:
        return UNHEALTHY, "; ".join(issues)
    return HEALTHY, None


def issue_kinds(issue: str) -> list[str]:
    """The fixed phrases of a task's issue ("Agent not reporting", ...), for counting tasks by problem."""
    kinds = [kind for kind in TASK_ISSUE_KINDS if kind + ":" in issue]
    return kinds or [issue]


def task_id_of(task_arn: str) -> str:
    return task_arn.rsplit("/", 1)[-1]


def merged_status(
    row: CoverageRow | None, plane: ControlPlaneTask | None, now_ms: int, misses: int
) -> tuple[str, str | None]:
    """(status, issue) of a task from its agent's heartbeats (``row``) and what ECS says of it (``plane``).

    The manager's issue wins: it comes from ECS itself (the task definition has no sidecar, the sidecar container
    exited), which no heartbeat can contradict. A task that runs the sidecar and never sent a heartbeat is not
    reporting once its first heartbeat is overdue (as late as a silent agent's would make it UNHEALTHY).
    """
    if plane is not None and plane.issue:
        return UNHEALTHY, plane.issue
    if row is not None:
        return task_status(row, now_ms, misses)
    assert plane is not None, "a task is known from its heartbeats, the control plane, or both"
    started = plane.started_at
    if started is not None and now_ms - started <= misses * FIRST_HEARTBEAT_S * 1000:
        return HEALTHY, None
    since = f" since {iso_ms(started)}" if started is not None else ""
    return UNHEALTHY, f"{ISSUE_NOT_REPORTING}: the task runs the sidecar{since} but its agent sent no heartbeat"


# -- clusters (GuardDuty's CoverageResource for ECS) -------------------------------------------------------------


@dataclass
class TaskCoverage:
    """One task: its agent's coverage row (None: never heard from), what ECS said of it (None: no manager)."""

    row: CoverageRow | None
    status: str
    issue: str | None
    plane: ControlPlaneTask | None = None

    @property
    def task_arn(self) -> str:
        if self.row is not None:
            return self.row.task_arn
        assert self.plane is not None
        return self.plane.task_arn

    @property
    def launch_type(self) -> str | None:
        if self.row is not None and self.row.launch_type:
            return self.row.launch_type
        return self.plane.launch_type if self.plane is not None else None

    @property
    def updated_at_ms(self) -> int:
        if self.row is not None:
            return self.row.last_heartbeat
        assert self.plane is not None
        return self.plane.reported_at


@dataclass
class ClusterCoverage:
    name: str
    account_id: str
    arn: str | None = None
    tasks: list[TaskCoverage] = field(default_factory=list)
    # the manager's view of the cluster (None: nobody reports the control plane, or it stopped)
    plane: ControlPlaneCluster | None = None

    @property
    def resource_id(self) -> str:
        return self.arn or self.name

    @property
    def status(self) -> str:
        if self.plane is not None and self.plane.issue:
            return UNHEALTHY
        return UNHEALTHY if any(t.status == UNHEALTHY for t in self.tasks) else HEALTHY

    @property
    def management_type(self) -> str:
        return self.plane.management_type if self.plane is not None else MANUAL

    @property
    def healthy_tasks(self) -> int:
        return sum(1 for t in self.tasks if t.status == HEALTHY)

    @property
    def coverage(self) -> float:
        """Healthy tasks / all tasks (1.0 for a cluster without tasks: nothing runs unprotected)."""
        return self.healthy_tasks / len(self.tasks) if self.tasks else 1.0

    @property
    def updated_at_ms(self) -> int:
        times = [t.updated_at_ms for t in self.tasks]
        if self.plane is not None:
            times.append(self.plane.reported_at)
        return max(times)

    @property
    def agent_versions(self) -> set[str]:
        return {t.row.agent_version for t in self.tasks if t.row is not None}

    @property
    def issue(self) -> str | None:
        kinds: Counter[str] = Counter()
        for t in self.tasks:
            if t.issue:
                kinds.update(issue_kinds(t.issue))
        parts = [self.plane.issue] if self.plane is not None and self.plane.issue else []
        total = len(self.tasks)
        parts += [f"{n} of {total} tasks: {kind}" for kind, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))]
        return "; ".join(parts) or None

    def wire(self, detector_id: str) -> dict[str, Any]:
        unhealthy = [t for t in self.tasks if t.issue]
        issues = [self.plane.issue] if self.plane is not None and self.plane.issue else []
        issues += [f"task {task_id_of(t.task_arn)}: {t.issue}" for t in unhealthy[:MAX_TASK_ISSUES]]
        if len(unhealthy) > MAX_TASK_ISSUES:
            issues.append(f"and {len(unhealthy) - MAX_TASK_ISSUES} more tasks with issues (the console lists all)")
        # An agent on an EC2 container instance is counted as GuardDuty counts instances; issues of every task,
        # EC2 or Fargate, go in fargateDetails.issues, the model's only list of issues for ECS.
        ec2 = [t for t in self.tasks if t.launch_type == "EC2"]
        out: dict[str, Any] = {
            "resourceId": self.resource_id,
            "detectorId": detector_id,
            "accountId": self.account_id,
            "coverageStatus": self.status,
            "updatedAt": self.updated_at_ms / 1000,
            "resourceDetails": {
                "resourceType": "ECS",
                "ecsClusterDetails": {
                    "clusterName": self.name,
                    "fargateDetails": {"issues": issues, "managementType": self.management_type},
                    "containerInstanceDetails": {
                        "coveredContainerInstances": sum(1 for t in ec2 if t.status == HEALTHY),
                        "compatibleContainerInstances": len(ec2),
                    },
                },
            },
        }
        if self.issue:
            out["issue"] = self.issue
        return out


async def _task_rows(
    session: AsyncSession, detector_id: str, now_ms: int, *, stopped_since: int | None
) -> list[CoverageRow]:
    """The detector's tasks heard from within SILENT_RETENTION_MS; stopped ones only if they stopped after
    ``stopped_since`` (None: none)."""
    live = CoverageRow.stopped.is_(False)
    stmt = select(CoverageRow).where(
        CoverageRow.detector_id == detector_id,
        CoverageRow.last_heartbeat >= now_ms - SILENT_RETENTION_MS,
        live if stopped_since is None else or_(live, CoverageRow.last_heartbeat >= stopped_since),
    )
    return list((await session.execute(stmt)).scalars())


@dataclass
class ControlPlaneView:
    """What the manager last reported, if recently: clusters by name, the tasks ECS runs by ARN."""

    clusters: dict[str, ControlPlaneCluster]
    tasks: dict[str, ControlPlaneTask]

    def lists_tasks_of(self, cluster_name: str) -> ControlPlaneCluster | None:
        """The cluster's view if the manager lists its tasks (it does not in clusters it does not manage)."""
        c = self.clusters.get(cluster_name)
        return c if c is not None and c.management_type != MANUAL else None

    def ended(self, row: CoverageRow) -> bool:
        """ECS no longer runs the agent's task: the manager listed its cluster after its last heartbeat."""
        c = self.lists_tasks_of(row.cluster_name)
        return c is not None and row.task_arn not in self.tasks and row.last_heartbeat < c.reported_at


async def control_plane_view(session: AsyncSession, detector_id: str, now_ms: int) -> ControlPlaneView:
    clusters = {
        c.cluster_name: c
        for c in (
            await session.execute(
                select(ControlPlaneCluster).where(
                    ControlPlaneCluster.detector_id == detector_id,
                    ControlPlaneCluster.reported_at >= now_ms - CONTROL_PLANE_FRESH_MS,
                )
            )
        ).scalars()
    }
    tasks: dict[str, ControlPlaneTask] = {}
    if clusters:
        rows = await session.execute(select(ControlPlaneTask).where(ControlPlaneTask.detector_id == detector_id))
        # a cluster's tasks are as fresh as its report (they are replaced with it)
        tasks = {t.task_arn: t for t in rows.scalars() if t.cluster_name in clusters}
    return ControlPlaneView(clusters, tasks)


def _visible(plane: ControlPlaneCluster, has_tasks: bool) -> bool:
    # A cluster the manager covers is listed even with nothing running (GuardDuty lists it too); one it leaves
    # to the user or that a tag excludes only when something runs there or something is wrong with it.
    return has_tasks or bool(plane.issue) or plane.management_type == AUTO_MANAGED


async def cluster_coverage(session: AsyncSession, detector_id: str, now_ms: int, misses: int) -> list[ClusterCoverage]:
    # A detector has tens of clusters and at most thousands of live tasks: computing status in Python over all
    # of them is cheaper than teaching SQL the rules, and keeps one definition of them (task_status).
    view = await control_plane_view(session, detector_id, now_ms)
    clusters: dict[str, ClusterCoverage] = {}

    def cluster(name: str, account_id: str) -> ClusterCoverage:
        c = clusters.get(name)
        if c is None:
            c = clusters[name] = ClusterCoverage(name, account_id, plane=view.clusters.get(name))
            if c.plane is not None:
                c.arn = c.plane.cluster_arn
        return c

    planned = dict(view.tasks)
    for row in await _task_rows(session, detector_id, now_ms, stopped_since=None):
        if view.ended(row):
            continue
        plane = planned.pop(row.task_arn, None)
        c = cluster(row.cluster_name, row.account_id)
        status, issue = merged_status(row, plane, now_ms, misses)
        c.tasks.append(TaskCoverage(row, status, issue, plane))
        if row.cluster_arn and (c.arn is None or row.last_heartbeat >= c.updated_at_ms):
            c.arn = row.cluster_arn
    for plane in planned.values():
        c = cluster(plane.cluster_name, plane.account_id)
        status, issue = merged_status(None, plane, now_ms, misses)
        c.tasks.append(TaskCoverage(None, status, issue, plane))
    empty = [name for name, cp in view.clusters.items() if name not in clusters and _visible(cp, False)]
    if empty:
        detector = await session.get(Detector, detector_id)
        for name in empty:
            cluster(name, detector.account_id if detector is not None else "")
    for c in clusters.values():
        c.tasks.sort(key=lambda t: t.task_arn)
    return [c for c in clusters.values() if c.plane is None or _visible(c.plane, bool(c.tasks))]


# -- ListCoverage / GetCoverageStatistics ------------------------------------------------------------------------

# criterionKey -> the values a cluster has for it (a set: a cluster runs several agent versions). The EKS and
# EC2-instance keys are valid GuardDuty keys that no ECS cluster has a value for.
_CRITERIA: dict[str, Callable[[ClusterCoverage], set[str]]] = {
    "ACCOUNT_ID": lambda c: {c.account_id},
    "CLUSTER_NAME": lambda c: {c.name},
    "ECS_CLUSTER_NAME": lambda c: {c.name},
    "RESOURCE_TYPE": lambda c: {"ECS"},
    "COVERAGE_STATUS": lambda c: {c.status},
    "AGENT_VERSION": lambda c: c.agent_versions,
    "MANAGEMENT_TYPE": lambda c: {c.management_type},
    "CLUSTER_ARN": lambda c: {c.arn} if c.arn else set(),
    "ADDON_VERSION": lambda c: set(),
    "EKS_CLUSTER_NAME": lambda c: set(),
    "INSTANCE_ID": lambda c: set(),
}

_SORT_KEYS: dict[str, Callable[[ClusterCoverage], Any]] = {
    "ACCOUNT_ID": lambda c: c.account_id,
    "COVERAGE_STATUS": lambda c: c.status,
    "ISSUE": lambda c: c.issue,
    "UPDATED_AT": lambda c: c.updated_at_ms,
    "CLUSTER_NAME": lambda c: c.name,
    "ECS_CLUSTER_NAME": lambda c: c.name,
    "ADDON_VERSION": lambda c: None,
    "EKS_CLUSTER_NAME": lambda c: None,
    "INSTANCE_ID": lambda c: None,
}


@dataclass(frozen=True)
class CoverageCondition:
    key: str
    equals: frozenset[str] | None
    not_equals: frozenset[str] | None

    def matches(self, cluster: ClusterCoverage) -> bool:
        values = _CRITERIA[self.key](cluster)
        if self.equals is not None and not values & self.equals:
            return False
        return not (self.not_equals is not None and values & self.not_equals)


def _string_list(v: Any, where: str) -> frozenset[str]:
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise BadRequest(f"{where}: expected a non-empty list of strings")
    return frozenset(v)


def parse_coverage_criteria(raw: Any, where: str = "filterCriteria") -> list[CoverageCondition]:
    """GuardDuty's CoverageFilterCriteria: criteria are ANDed, values of one Equals/NotEquals list ORed."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise BadRequest(f"{where}: expected an object with filterCriterion")
    extra = set(raw) - {"filterCriterion"}
    if extra:
        raise BadRequest(f"{where}: unknown member {sorted(extra)[0]!r} (only filterCriterion)")
    items = raw.get("filterCriterion") or []
    if not isinstance(items, list) or len(items) > 50:
        raise BadRequest(f"{where}.filterCriterion: expected a list of at most 50 criteria")
    out: list[CoverageCondition] = []
    for i, item in enumerate(items):
        at = f"{where}.filterCriterion[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{at}: expected an object with criterionKey and filterCondition")
        key = item.get("criterionKey")
        if key not in _CRITERIA:
            raise BadRequest(f"{at}.criterionKey: unknown key {key!r}; one of {', '.join(_CRITERIA)}")
        cond = item.get("filterCondition")
        if not isinstance(cond, dict) or not ({"equals", "notEquals"} & set(cond)):
            raise BadRequest(f"{at}.filterCondition: expected equals and/or notEquals")
        unknown = set(cond) - {"equals", "notEquals"}
        if unknown:
            raise BadRequest(f"{at}.filterCondition: unknown member {sorted(unknown)[0]!r} (equals, notEquals)")
        out.append(
            CoverageCondition(
                key,
                _string_list(cond["equals"], f"{at}.filterCondition.equals") if "equals" in cond else None,
                _string_list(cond["notEquals"], f"{at}.filterCondition.notEquals") if "notEquals" in cond else None,
            )
        )
    return out


def sort_clusters(clusters: Iterable[ClusterCoverage], raw: Any) -> list[ClusterCoverage]:
    """GuardDuty's CoverageSortCriteria; ties (and no criteria) are ordered by resource id, so pages are stable."""
    out = sorted(clusters, key=lambda c: c.resource_id)
    if raw is None:
        return out
    if not isinstance(raw, dict):
        raise BadRequest("sortCriteria: expected an object with attributeName and orderBy")
    name = raw.get("attributeName")
    order = raw.get("orderBy", "ASC")
    if name is None:
        return out
    if name not in _SORT_KEYS:
        raise BadRequest(f"sortCriteria.attributeName: unknown attribute {name!r}; one of {', '.join(_SORT_KEYS)}")
    if order not in ("ASC", "DESC"):
        raise BadRequest(f"sortCriteria.orderBy: ASC or DESC, got {order!r}")
    get = _SORT_KEYS[name]

    def key(c: ClusterCoverage) -> tuple[bool, Any]:
        v = get(c)
        return (v is not None, v if v is not None else 0)  # missing values first in ascending order

    # sorted() is stable with reverse=True too: ties keep the resource id order
    return sorted(out, key=key, reverse=order == "DESC")


async def _matching_clusters(req: ApiRequest) -> list[ClusterCoverage]:
    from backend.app import SETTINGS

    conditions = parse_coverage_criteria(req.body.get("filterCriteria"))
    misses = req.app[SETTINGS].heartbeat_misses
    clusters = await cluster_coverage(req.session, req.detector_id, now_ms(), misses)
    return [c for c in clusters if all(cond.matches(c) for cond in conditions)]


@operation("POST", "/detector/{DetectorId}/coverage", "ListCoverage")
async def list_coverage(req: ApiRequest) -> dict[str, Any]:
    offset, limit = parse_page(req, default=50, maximum=50)
    clusters = sort_clusters(await _matching_clusters(req), req.body.get("sortCriteria"))
    page = clusters[offset : offset + limit]
    out: dict[str, Any] = {"resources": [c.wire(req.detector_id) for c in page]}
    token = next_token(offset, limit, len(page), total=len(clusters))
    if token is not None:
        out["nextToken"] = token
    return out


STATISTICS_TYPES = ("COUNT_BY_RESOURCE_TYPE", "COUNT_BY_COVERAGE_STATUS")


@operation("POST", "/detector/{DetectorId}/coverage/statistics", "GetCoverageStatistics")
async def get_coverage_statistics(req: ApiRequest) -> dict[str, Any]:
    types = req.body.get("statisticsType")
    if not isinstance(types, list) or not types:
        raise BadRequest(f"statisticsType: required, a list of {' and/or '.join(STATISTICS_TYPES)}")
    for t in types:
        if t not in STATISTICS_TYPES:
            raise BadRequest(f"statisticsType: unknown type {t!r}; one of {', '.join(STATISTICS_TYPES)}")
    clusters = await _matching_clusters(req)
    stats: dict[str, Any] = {}
    if "COUNT_BY_RESOURCE_TYPE" in types:
        stats["countByResourceType"] = {"ECS": len(clusters)}
    if "COUNT_BY_COVERAGE_STATUS" in types:
        by_status = Counter(c.status for c in clusters)
        stats["countByCoverageStatus"] = {HEALTHY: by_status[HEALTHY], UNHEALTHY: by_status[UNHEALTHY]}
    return {"coverageStatistics": stats}


# -- the console's view: one row per task ------------------------------------------------------------------------


def _plane_wire(plane: ControlPlaneTask | None) -> dict[str, Any] | None:
    if plane is None:
        return None
    return {
        "lastStatus": plane.last_status,
        "startedAt": iso_ms(plane.started_at) if plane.started_at is not None else None,
        "issue": plane.issue,
        "detail": orjson.loads(plane.detail or "{}"),
        "reportedAt": iso_ms(plane.reported_at),
    }


async def task_coverage(session: AsyncSession, detector_id: str, now_ms: int, misses: int) -> list[dict[str, Any]]:
    """Every task heard from recently, by cluster then task: status and issue as in ListCoverage, plus tasks that
    stopped within STOPPED_VISIBLE_MS (status STOPPED), and what their agents last reported.

    Tasks the manager reports (``controlPlane``: ECS's view) are merged in: those without an agent have None in
    the agent's fields; an agent's task that ECS no longer lists is STOPPED."""
    view = await control_plane_view(session, detector_id, now_ms)
    rows = await _task_rows(session, detector_id, now_ms, stopped_since=now_ms - STOPPED_VISIBLE_MS)
    planned = dict(view.tasks)
    out: list[dict[str, Any]] = []
    for row in rows:
        plane = planned.pop(row.task_arn, None)
        if view.ended(row):
            if row.last_heartbeat < now_ms - STOPPED_VISIBLE_MS:
                continue
            status, issue = STOPPED, None
        else:
            status, issue = merged_status(row, plane, now_ms, misses)
        hb = orjson.loads(row.heartbeat)
        sources: dict[str, Any] = hb.get("sources") or {}
        out.append(
            {
                "clusterName": row.cluster_name,
                "clusterArn": row.cluster_arn,
                "taskArn": row.task_arn,
                "taskId": task_id_of(row.task_arn),
                "taskDefinitionArn": row.task_definition_arn,
                "family": row.family,
                "launchType": row.launch_type,
                "hostMode": bool((hb.get("task") or {}).get("hostMode")),
                "agentId": row.agent_id,
                "agentVersion": row.agent_version,
                "sourcesEnabled": sorted(n for n, s in sources.items() if isinstance(s, dict) and s.get("enabled")),
                "sources": sources,
                "firstSeen": iso_ms(row.first_seen),
                "lastHeartbeat": iso_ms(row.last_heartbeat),
                "lastHeartbeatMs": row.last_heartbeat,
                "intervalS": row.interval_s,
                "status": status,
                "issue": issue,
                "delivery": hb.get("delivery") or {},
                "counters": hb.get("counters") or {},
                "resources": hb.get("resources"),
                "configEtag": hb.get("configEtag"),
                "configError": hb.get("configError"),
                "controlPlane": _plane_wire(plane),
            }
        )
    for plane in planned.values():
        status, issue = merged_status(None, plane, now_ms, misses)
        cluster = view.clusters[plane.cluster_name]
        td = plane.task_definition_arn
        out.append(
            {
                "clusterName": plane.cluster_name,
                "clusterArn": cluster.cluster_arn,
                "taskArn": plane.task_arn,
                "taskId": task_id_of(plane.task_arn),
                "taskDefinitionArn": td,
                # arn:...:task-definition/FAMILY:REVISION
                "family": td.rsplit("/", 1)[-1].rsplit(":", 1)[0] if td else None,
                "launchType": plane.launch_type,
                "hostMode": False,
                "agentId": None,
                "agentVersion": None,
                "sourcesEnabled": [],
                "sources": {},
                "firstSeen": None,
                "lastHeartbeat": None,
                "lastHeartbeatMs": None,
                "intervalS": None,
                "status": status,
                "issue": issue,
                "delivery": {},
                "counters": {},
                "resources": None,
                "configEtag": None,
                "configError": None,
                "controlPlane": _plane_wire(plane),
            }
        )
    out.sort(key=lambda t: (t["clusterName"], t["taskArn"]))
    return out

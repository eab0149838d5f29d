"""What the console's pages show, queried for one operator: every query is limited to the detectors of the
accounts they may see (:class:`Scope`), and findings are selected with the API's own FindingCriteria code.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from multidict import MultiMapping
from sqlalchemy import ColumnElement, and_, false, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from backend import coverage
from backend.criteria import FINDING_FIELDS, Condition, compile_conditions, parse_finding_criteria, parse_sort
from backend.errors import BadRequest
from backend.findings import document_of, iso_ms
from backend.models import Detector, FindingRow, RuntimeEventRow
from backend.tenancy import detector_id_for

MAX_PAGE = 200
DEFAULT_PAGE = 50
# Ingest stamps received_at when a batch arrives and commits it a moment later: a poll in between must not skip
# it, so each poll looks this far behind its cursor (the page ignores versions it has already shown).
CHANGES_SLACK_MS = 10_000
MAX_CHANGES = 200
MAX_TIMELINE_EVENTS = 500
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


# -- who sees what -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectorRef:
    id: str
    account_id: str
    region: str


@dataclass(frozen=True)
class Scope:
    """The detectors an operator may see: those of their accounts (all of them for ``*``)."""

    detectors: Mapping[str, DetectorRef]

    def allows(self, detector_id: str) -> bool:
        return detector_id in self.detectors

    def where(self, column: Any) -> ColumnElement[bool]:
        if len(self.detectors) == 1:  # '=' lets the planners read the (detector_id, column, ...) indexes in order
            return column == next(iter(self.detectors))  # type: ignore[no-any-return]
        return column.in_(list(self.detectors)) if self.detectors else false()


async def scope_for(session: AsyncSession, accounts: list[str]) -> Scope:
    stmt = select(Detector.id, Detector.account_id, Detector.region)
    if accounts != ["*"]:
        stmt = stmt.where(Detector.account_id.in_(accounts))
    refs: dict[str, DetectorRef] = {}
    for did, account, region in await session.execute(stmt):
        # a detector's id is derived from its account and region (as the agents derive it): a row that says
        # otherwise would let one account's id stand for another's
        if did == detector_id_for(account, region):
            refs[did] = DetectorRef(did, account, region)
    return Scope(refs)


# -- severity ------------------------------------------------------------------------------------------------

SEVERITY_LABELS = ("Low", "Medium", "High", "Critical")


def severity_label(severity: float) -> str:
    """GuardDuty's bands: Low 1.0-3.9, Medium 4.0-6.9, High 7.0-8.9, Critical 9.0-10.0."""
    if severity >= 9.0:
        return "Critical"
    if severity >= 7.0:
        return "High"
    if severity >= 4.0:
        return "Medium"
    return "Low"


# -- the findings list ---------------------------------------------------------------------------------------

# the page's filters -> GuardDuty attribute names (FindingCriteria), so the API's parser validates them
LIST_FILTERS = {
    "account": "accountId",
    "type": "type",
    "cluster": "resource.ecsClusterDetails.name",
    "family": "resource.ecsClusterDetails.taskDetails.family",
    "task": "resource.ecsClusterDetails.taskDetails.arn",
    "image": "resource.ecsClusterDetails.taskDetails.containers.image",
    "executable": "service.runtimeDetails.process.executablePath",
}


def _int_param(query: MultiMapping[str], name: str, *, lo: int, hi: int, default: int | None = None) -> int | None:
    raw = query.get(name, "").strip()
    if not raw:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise BadRequest(f"{name}: expected an integer, got {raw[:40]!r}") from None
    if not lo <= v <= hi:
        raise BadRequest(f"{name}: must be from {lo} to {hi}, got {v}")
    return v


def criteria_from_query(query: MultiMapping[str]) -> dict[str, Any]:
    """The page's filters as a wire-form FindingCriteria (what ListFindings would be sent)."""
    criterion: dict[str, Any] = {}
    for param, attribute in LIST_FILTERS.items():
        values = [v for v in query.getall(param, []) if v != ""]
        if values:
            criterion[attribute] = {"eq": values}
    # severity bands are [1, 4), [4, 7), [7, 9), [9, 10]: integer bounds, as GuardDuty's comparisons take
    severity: dict[str, int] = {}
    for param, op in (("severityGte", "gte"), ("severityLt", "lt")):
        v = _int_param(query, param, lo=0, hi=11)
        if v is not None:
            severity[op] = v
    if severity:
        criterion["severity"] = severity
    archived = query.get("archived", "false")
    if archived not in ("false", "true", "all"):
        raise BadRequest(f"archived: false, true or all, got {archived[:40]!r}")
    if archived != "all":
        criterion["service.archived"] = {"eq": [archived]}
    window: dict[str, int] = {}
    for param, op in (("from", "gte"), ("to", "lte")):
        v = _int_param(query, param, lo=0, hi=10**15)
        if v is not None:
            window[op] = v
    if window:
        criterion["updatedAt"] = window
    return {"criterion": criterion}


def conditions_from_query(query: MultiMapping[str]) -> list[Condition]:
    return parse_finding_criteria(criteria_from_query(query), where="filters")


SORTABLE = (
    "updatedAt",
    "createdAt",
    "severity",
    "type",
    "service.count",
    "service.eventFirstSeen",
    "service.eventLastSeen",
    "resource.ecsClusterDetails.name",
    "resource.ecsClusterDetails.taskDetails.containers.name",
    "service.runtimeDetails.process.executablePath",
)


def order_from_query(query: MultiMapping[str]) -> list[Any]:
    name = query.get("sort") or "updatedAt"
    if name not in SORTABLE:
        raise BadRequest(f"sort: one of {', '.join(SORTABLE)}, got {name[:80]!r}")
    sort = parse_sort(
        {"attributeName": name, "orderBy": query.get("order") or "DESC"}, fields=FINDING_FIELDS, where="sort"
    )
    assert sort is not None
    column, descending = sort
    col = getattr(FindingRow, column)
    # the id breaks ties so that pages neither repeat nor skip rows; in the same direction, as ListFindings
    # does, so that the (column, updated_at, id) indexes serve the order
    if descending:
        return [col.desc(), FindingRow.id.desc(), FindingRow.detector_id]
    return [col.asc(), FindingRow.id.asc(), FindingRow.detector_id]


def finding_summary(row: FindingRow, scope: Scope) -> dict[str, Any]:
    det = scope.detectors.get(row.detector_id)
    return {
        "detectorId": row.detector_id,
        "id": row.id,
        "accountId": row.account_id,
        "region": det.region if det else row.region,
        "type": row.type,
        "severity": row.severity,
        "severityLabel": severity_label(row.severity),
        "title": row.title,
        "clusterName": row.cluster_name,
        "taskArn": row.task_arn,
        "taskId": coverage.task_id_of(row.task_arn) if row.task_arn else None,
        "family": row.task_family,
        "containerName": row.container_name,
        "image": row.image,
        "executablePath": row.executable_path,
        "processName": row.process_name,
        "count": row.count,
        "firstSeen": row.first_seen,
        "lastSeen": row.last_seen,
        "createdAt": row.created_at,
        "updatedAt": row.updated_at,
        "archived": bool(row.archived),
        "archivedBy": row.archived_by,
    }


def _findings_where(scope: Scope, conditions: list[Condition]) -> ColumnElement[bool]:
    return and_(scope.where(FindingRow.detector_id), compile_conditions(conditions, FindingRow))


async def list_findings(session: AsyncSession, scope: Scope, query: MultiMapping[str]) -> dict[str, Any]:
    conditions = conditions_from_query(query)
    order = order_from_query(query)
    limit = _int_param(query, "limit", lo=1, hi=MAX_PAGE, default=DEFAULT_PAGE)
    offset = _int_param(query, "offset", lo=0, hi=10**9, default=0)
    assert limit is not None and offset is not None
    where = _findings_where(scope, conditions)
    total = (await session.execute(select(func.count()).select_from(FindingRow).where(where))).scalar_one()
    rows = (
        await session.execute(select(FindingRow).where(where).order_by(*order).offset(offset).limit(limit))
    ).scalars()
    return {
        "findings": [finding_summary(r, scope) for r in rows],
        "total": int(total),
        "offset": offset,
        "limit": limit,
    }


async def finding_changes(session: AsyncSession, scope: Scope, query: MultiMapping[str], now: int) -> dict[str, Any]:
    """Findings matching the filters that arrived or changed since the cursor: (id, version) only."""
    since = _int_param(query, "since", lo=0, hi=10**15, default=now)
    assert since is not None
    where = and_(
        _findings_where(scope, conditions_from_query(query)),
        FindingRow.received_at > since - CHANGES_SLACK_MS,
    )
    rows = await session.execute(
        select(FindingRow.detector_id, FindingRow.id, FindingRow.updated_at, FindingRow.count)
        .where(where)
        .order_by(FindingRow.received_at.desc())
        .limit(MAX_CHANGES)
    )
    return {
        "changed": [{"detectorId": d, "id": i, "updatedAt": u, "count": c} for d, i, u, c in rows],
        "cursor": now,
    }


async def facets(session: AsyncSession, scope: Scope) -> dict[str, Any]:
    """The values the filters offer: types, clusters, families and accounts that have findings."""
    out: dict[str, Any] = {}
    for name, column in (
        ("types", FindingRow.type),
        ("clusters", FindingRow.cluster_name),
        ("families", FindingRow.task_family),
        ("accounts", FindingRow.account_id),
    ):
        stmt = (
            select(column)
            .where(scope.where(FindingRow.detector_id), column.is_not(None))
            .group_by(column)
            .order_by(column)
            .limit(500)
        )
        out[name] = list((await session.execute(stmt)).scalars())
    return out


# -- one finding ---------------------------------------------------------------------------------------------


async def get_finding_row(session: AsyncSession, scope: Scope, detector_id: str, finding_id: str) -> FindingRow | None:
    if not scope.allows(detector_id):
        return None
    return await session.get(FindingRow, (detector_id, finding_id))


def _process_ids(doc: dict[str, Any]) -> tuple[set[str], set[int]]:
    """The uuids and pids of the finding's process and its ancestors, to mark their events in the timeline."""
    process = ((doc.get("service") or {}).get("runtimeDetails") or {}).get("process") or {}
    uuids: set[str] = set()
    pids: set[int] = set()
    for p in [process, *(process.get("lineage") or [])]:
        if isinstance(p, dict):
            if isinstance(p.get("uuid"), str):
                uuids.add(p["uuid"])
            if isinstance(p.get("pid"), int):
                pids.add(p["pid"])
    return uuids, pids


async def timeline(session: AsyncSession, row: FindingRow, doc: dict[str, Any], window_ms: int) -> dict[str, Any]:
    """The task's runtime events from ``window_ms`` before the finding's first sighting to as long after its last."""
    if not row.task_arn:
        return {"events": [], "truncated": False, "from": None, "to": None}
    start = (row.first_seen or row.created_at) - window_ms
    end = (row.last_seen or row.updated_at) + window_ms
    rows = list(
        (
            await session.execute(
                select(RuntimeEventRow)
                .where(
                    RuntimeEventRow.detector_id == row.detector_id,
                    RuntimeEventRow.task_arn == row.task_arn,
                    RuntimeEventRow.time >= start,
                    RuntimeEventRow.time <= end,
                )
                .order_by(RuntimeEventRow.time, RuntimeEventRow.id)
                .limit(MAX_TIMELINE_EVENTS + 1)
            )
        ).scalars()
    )
    uuids, pids = _process_ids(doc)
    events = []
    for ev in rows[:MAX_TIMELINE_EVENTS]:
        try:
            body = orjson.loads(ev.document)
        except orjson.JSONDecodeError:
            body = {}
        process = body.get("process") if isinstance(body, dict) else None
        process = process if isinstance(process, dict) else {}
        related = process.get("uuid") in uuids if process.get("uuid") else process.get("pid") in pids
        events.append(
            {
                "id": ev.id,
                "time": ev.time,
                "kind": ev.kind,
                "containerName": ev.container_name,
                "processName": ev.process_name,
                "executablePath": ev.executable_path,
                "commandLine": process.get("commandLine"),
                "user": process.get("user"),
                "pid": process.get("pid"),
                "related": bool(related),
                "document": body,
            }
        )
    return {"events": events, "truncated": len(rows) > MAX_TIMELINE_EVENTS, "from": start, "to": end}


def suppression_prefill(row: FindingRow) -> dict[str, Any]:
    """The criteria a suppression rule made from this finding starts with: its type, and its image (the whole
    service) or else its executable; the page lets the operator change them."""
    criterion: dict[str, Any] = {"type": {"eq": [row.type]}}
    if row.image:
        criterion["resource.ecsClusterDetails.taskDetails.containers.image"] = {"eq": [row.image]}
    elif row.executable_path:
        criterion["service.runtimeDetails.process.executablePath"] = {"eq": [row.executable_path]}
    options: dict[str, Any] = {
        "type": row.type,
        "resource.ecsClusterDetails.taskDetails.containers.image": row.image,
        "service.runtimeDetails.process.executablePath": row.executable_path,
        "resource.ecsClusterDetails.name": row.cluster_name,
        "resource.ecsClusterDetails.taskDetails.family": row.task_family,
    }
    return {"findingCriteria": {"criterion": criterion}, "options": {k: v for k, v in options.items() if v}}


async def finding_detail(session: AsyncSession, scope: Scope, row: FindingRow, window_ms: int) -> dict[str, Any]:
    doc = document_of(row)
    others = (
        await session.execute(
            select(func.count())
            .select_from(FindingRow)
            .where(
                FindingRow.detector_id == row.detector_id,
                FindingRow.task_arn == row.task_arn,
                FindingRow.id != row.id,
            )
        )
    ).scalar_one()
    return {
        "summary": finding_summary(row, scope),
        "finding": doc,
        "receivedAt": row.received_at,
        "otherFindingsOfTask": int(others) if row.task_arn else 0,
        "timeline": await timeline(session, row, doc, window_ms),
        "suppression": suppression_prefill(row),
    }


async def set_archived(
    session: AsyncSession, scope: Scope, items: list[tuple[str, str]], archived: bool, who: str
) -> int:
    by_detector: dict[str, list[str]] = defaultdict(list)
    for detector_id, finding_id in items:
        if not scope.allows(detector_id):
            raise BadRequest("findings: a finding of an account you may not see")
        by_detector[detector_id].append(finding_id)
    n = 0
    for detector_id, ids in by_detector.items():
        res = await session.execute(
            update(FindingRow)
            .where(FindingRow.detector_id == detector_id, FindingRow.id.in_(ids))
            .values(archived=archived, archived_by=who if archived else None)
            .execution_options(synchronize_session=False)
        )
        n += res.rowcount or 0  # type: ignore[attr-defined]
    return n


async def archive_matching(session: AsyncSession, detector_id: str, conditions: list[Condition], name: str) -> int:
    """Archive the detector's current findings a new suppression rule matches (the rule covers later ones)."""
    res = await session.execute(
        update(FindingRow)
        .where(
            FindingRow.detector_id == detector_id,
            FindingRow.archived.is_(False),
            compile_conditions(conditions, FindingRow),
        )
        .values(archived=True, archived_by=f"filter:{name}")
        .execution_options(synchronize_session=False)
    )
    return int(res.rowcount or 0)  # type: ignore[attr-defined]


# -- summary -------------------------------------------------------------------------------------------------

TOP_TYPES = 8
TOP_N = 10


async def summary(session: AsyncSession, scope: Scope, query: MultiMapping[str], now: int) -> dict[str, Any]:
    """Findings created per time bucket by severity band and by type, and the clusters and images with most."""
    days = _int_param(query, "days", lo=1, hi=90, default=14)
    assert days is not None
    bucket_ms = HOUR_MS if days <= 2 else DAY_MS
    start = (now - days * DAY_MS) // bucket_ms * bucket_ms
    include_archived = query.get("archived") == "all"
    where = and_(scope.where(FindingRow.detector_id), FindingRow.created_at >= start)
    if not include_archived:
        where = and_(where, FindingRow.archived.is_(False))
    bucket = (FindingRow.created_at // bucket_ms).label("bucket")
    n = func.count().label("n")
    buckets = list(range(start // bucket_ms, now // bucket_ms + 1))
    by_severity: dict[int, Counter[str]] = {b: Counter() for b in buckets}
    totals: Counter[str] = Counter()
    for b, sev, count in await session.execute(
        select(bucket, FindingRow.severity, n).where(where).group_by(bucket, FindingRow.severity)
    ):
        label = severity_label(float(sev))
        by_severity.setdefault(int(b), Counter())[label] += int(count)
        totals[label] += int(count)
    type_totals: Counter[str] = Counter()
    by_type: dict[str, Counter[int]] = defaultdict(Counter)
    for b, type_, count in await session.execute(
        select(bucket, FindingRow.type, n).where(where).group_by(bucket, FindingRow.type)
    ):
        type_totals[type_] += int(count)
        by_type[type_][int(b)] += int(count)

    async def top(*columns: Any) -> list[Any]:
        stmt = (
            select(*columns, n)
            .where(where, columns[-1].is_not(None))
            .group_by(*columns)
            .order_by(n.desc(), *columns)
            .limit(TOP_N)
        )
        return list(await session.execute(stmt))

    return {
        "from": start,
        "to": now,
        "bucketMs": bucket_ms,
        "severityLabels": list(SEVERITY_LABELS),
        "bySeverity": [
            {"start": b * bucket_ms, **{label: by_severity[b][label] for label in SEVERITY_LABELS}}
            for b in sorted(by_severity)
        ],
        "totals": {label: totals[label] for label in SEVERITY_LABELS},
        "byType": [
            {
                "type": t,
                "total": total,
                "series": [{"start": b * bucket_ms, "count": by_type[t][b]} for b in buckets],
            }
            for t, total in sorted(type_totals.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TYPES]
        ],
        "otherTypes": max(len(type_totals) - TOP_TYPES, 0),
        "topClusters": [
            {"accountId": a, "clusterName": c, "count": int(k)}
            for a, c, k in await top(FindingRow.account_id, FindingRow.cluster_name)
        ],
        "topImages": [{"image": i, "count": int(k)} for i, k in await top(FindingRow.image)],
    }


# -- coverage ------------------------------------------------------------------------------------------------

# what to do, by the fixed phrase each issue starts with (backend.coverage's ISSUE_* and runtime-manager's kinds)
ADVICE = {
    "Agent not reporting": (
        "The agent has stopped sending heartbeats (or never sent one). Check that the task still runs (aws ecs "
        "describe-tasks), read the runtime-sidecar container's logs, and check that the task can reach the backend "
        "(security group, VPC endpoint, RUNTIME_SIDECAR_COLLECTOR_URL)."
    ),
    "Agent cannot deliver findings": (
        "The backend refuses this agent's findings. Check its token (runtime-backend token list: not revoked, "
        "made for this account, region and cluster) and the error shown."
    ),
    "Agent runs without a process source": (
        "The agent sees no processes. Give the task pidMode: task and the sidecar the SYS_PTRACE capability "
        "(see task-definitions/), and check `runtime-sidecar probe` in the container."
    ),
    "Agent dropped findings": (
        "The agent's spool filled up and findings were lost: the backend was unreachable or slow for a while. "
        "Check delivery errors, and raise RUNTIME_SIDECAR_SPOOL_MAX_BYTES if outages are expected."
    ),
    "Agent not provisioned": (
        "The task runs without the sidecar. Add the runtime-sidecar container to the task definition (see "
        "task-definitions/sidecar-container.json) or let runtime-manager inject it, then redeploy the service."
    ),
    "Agent exited": (
        "The sidecar container stopped while the task runs: read its exit code and logs (aws ecs describe-tasks, "
        "CloudWatch Logs); a missing token or an unreachable backend are the common causes."
    ),
    "VPC endpoint creation failed": (
        "runtime-manager could not create the VPC endpoint the sidecars reach the backend through: check its IAM "
        "permissions (ec2:CreateVpcEndpoint) and the VPC's endpoint quota, or create the endpoint yourself."
    ),
}
GENERIC_ADVICE = "Read the runtime-sidecar container's logs and `runtime-sidecar probe` in the task."


def advice_for(issue: str | None) -> list[str]:
    if not issue:
        return []
    return [text for phrase, text in ADVICE.items() if phrase in issue] or [GENERIC_ADVICE]


async def coverage_view(session: AsyncSession, scope: Scope, now: int, misses: int) -> dict[str, Any]:
    """Per cluster: coverage % (healthy tasks / running tasks), its tasks, their agents and issues.

    Tasks and statuses are backend.coverage's (the same rules as ListCoverage); this only groups them.
    """
    out: list[dict[str, Any]] = []
    for det in sorted(scope.detectors.values(), key=lambda d: (d.account_id, d.region)):
        tasks_by_cluster: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for task in await coverage.task_coverage(session, det.id, now, misses):
            task["advice"] = advice_for(task.get("issue"))
            tasks_by_cluster[task["clusterName"]].append(task)
        clusters = {c.name: c for c in await coverage.cluster_coverage(session, det.id, now, misses)}
        for name in sorted(set(tasks_by_cluster) | set(clusters)):
            tasks = tasks_by_cluster.get(name, [])
            summary = clusters.get(name)
            running = [t for t in tasks if t["status"] != coverage.STOPPED]
            healthy = sum(1 for t in running if t["status"] == coverage.HEALTHY)
            versions: Counter[str] = Counter(t["agentVersion"] for t in running if t.get("agentVersion"))
            tasks.sort(key=lambda t: (_STATUS_ORDER.get(t["status"], 3), t["taskArn"]))
            out.append(
                {
                    "detectorId": det.id,
                    "accountId": det.account_id,
                    "region": det.region,
                    "clusterName": name,
                    "status": summary.status if summary is not None else coverage.HEALTHY,
                    "issue": summary.issue if summary is not None else None,
                    "managementType": getattr(summary, "management_type", "MANUAL"),
                    "running": len(running),
                    "healthy": healthy,
                    "unhealthy": len(running) - healthy,
                    "coveragePercent": round(100.0 * healthy / len(running), 1) if running else None,
                    "agentVersions": dict(sorted(versions.items())),
                    "tasks": tasks,
                }
            )
    total = sum(int(c["running"]) for c in out)
    healthy_total = sum(int(c["healthy"]) for c in out)
    return {
        "clusters": out,
        "running": total,
        "healthy": healthy_total,
        "coveragePercent": round(100.0 * healthy_total / total, 1) if total else None,
        "generatedAt": iso_ms(now),
    }


_STATUS_ORDER = {coverage.UNHEALTHY: 0, coverage.HEALTHY: 1, coverage.STOPPED: 2}

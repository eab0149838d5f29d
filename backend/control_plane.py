"""The control plane's view of coverage: runtime-manager reports which tasks ECS runs and why some have no agent.

``POST /control-plane/v1/report`` is signed like the GuardDuty API (SigV4 with one of the backend's access keys,
service ``guardduty``, checked by the app's VERIFIER), so the manager needs no other credential: a key speaks for
its account, and the region of its signature names the detector the report is about (created if needed, as a
token or key creates it). The body::

    {"clusters": [{"clusterName": "prod", "clusterArn": "arn:aws:ecs:...:cluster/prod",
                   "managementType": "AUTO_MANAGED" | "MANUAL" | "DISABLED",
                   "issue": null | "VPC endpoint creation failed: ...",
                   "append": false,
                   "tasks": [{"taskArn": ..., "taskDefinitionArn": ..., "launchType": "FARGATE",
                              "lastStatus": "RUNNING", "startedAt": <epoch ms>,
                              "issue": null | "Agent not provisioned: ..." | "Agent exited: ...",
                              "detail": {...}}]}],
     "knownClusters": ["prod", "staging"]}

Each cluster named replaces what was known of it, its tasks included (``append: true`` adds tasks to the same
cluster's view instead: a cluster with more tasks than one body holds is sent in parts). ``knownClusters``, when
present, is every cluster the manager saw in the region: the others are forgotten (deleted clusters). An issue
starts with one of GuardDuty's issue kinds (``backend.coverage``'s ISSUE_* phrases) followed by ": ", which the
cluster summaries count by. One manager per account and region: two would overwrite each other's view.

``backend.coverage`` merges this view with the agents' heartbeats for ListCoverage, GetCoverageStatistics and the
console.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from backend.api import json_response, read_limited
from backend.coverage import (
    _CLUSTER_ARN,
    _TASK_ARN,
    AUTO_MANAGED,
    ISSUE_EXITED,
    ISSUE_NOT_PROVISIONED,
    ISSUE_VPC_ENDPOINT,
    ClusterArn,
    TaskArn,
)
from backend.errors import AccessDenied, ApiError, BadRequest, InternalServerError
from backend.models import ControlPlaneCluster, ControlPlaneTask
from backend.sigv4 import Principal
from backend.tenancy import CLUSTER_RE, detector_id_for, ensure_detector, now_ms

log = logging.getLogger("backend.control_plane")

REPORT_PATH = "/control-plane/v1/report"
MAX_ISSUE_CHARS = 2048
MAX_DETAIL_BYTES = 4096
# the kinds of issue the control plane may state; "Agent not reporting" is the heartbeats' to say
TASK_ISSUE_PREFIXES = (ISSUE_NOT_PROVISIONED + ": ", ISSUE_EXITED + ": ")
CLUSTER_ISSUE_PREFIXES = (ISSUE_VPC_ENDPOINT + ": ",)


def _check_issue(v: str | None, prefixes: tuple[str, ...]) -> str | None:
    if v is not None and not v.startswith(prefixes):
        raise ValueError("must start with " + " or ".join(repr(p) for p in prefixes))
    return v


class ReportedTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    taskArn: TaskArn
    taskDefinitionArn: str | None = Field(None, max_length=512)
    launchType: Literal["FARGATE", "EC2", "EXTERNAL"] | None = None
    lastStatus: str | None = Field(None, max_length=32)
    startedAt: int | None = Field(None, ge=0, description="epoch milliseconds")
    issue: str | None = Field(None, min_length=1, max_length=MAX_ISSUE_CHARS)
    detail: dict[str, Any] = Field(default_factory=dict)

    @field_validator("issue")
    @classmethod
    def _issue(cls, v: str | None) -> str | None:
        return _check_issue(v, TASK_ISSUE_PREFIXES)

    @field_validator("detail")
    @classmethod
    def _detail(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(orjson.dumps(v)) > MAX_DETAIL_BYTES:
            raise ValueError(f"at most {MAX_DETAIL_BYTES} bytes as JSON")
        return v


class ReportedCluster(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clusterName: str = Field(min_length=1, max_length=255)
    clusterArn: ClusterArn | None = None
    managementType: Literal["AUTO_MANAGED", "MANUAL", "DISABLED"]
    issue: str | None = Field(None, min_length=1, max_length=MAX_ISSUE_CHARS)
    append: bool = False
    tasks: list[ReportedTask] = Field(default_factory=list)

    @field_validator("clusterName")
    @classmethod
    def _name(cls, v: str) -> str:
        if not CLUSTER_RE.match(v):
            raise ValueError("not an ECS cluster name (1-255 letters, digits, '-' or '_')")
        return v

    @field_validator("issue")
    @classmethod
    def _issue(cls, v: str | None) -> str | None:
        return _check_issue(v, CLUSTER_ISSUE_PREFIXES)


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clusters: list[ReportedCluster] = Field(default_factory=list)
    knownClusters: list[str] | None = None


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def parse_report(raw: bytes) -> Report:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        report = Report.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise BadRequest(f"{_where(tuple(err['loc']))}: {err['msg']}{more}") from None
    names = [c.clusterName for c in report.clusters]
    if len(set(names)) != len(names):
        raise BadRequest("clusters: a cluster is named twice (send its tasks in one entry, or in parts with append)")
    arns = [t.taskArn for c in report.clusters for t in c.tasks]
    if len(set(arns)) != len(arns):
        raise BadRequest("clusters[].tasks: a task is reported twice")
    return report


def check_claims(principal: Principal, report: Report) -> None:
    """An access key speaks for its account, and the signature's region names the clusters' region (403)."""
    account, region = principal.account_id, principal.region
    for i, c in enumerate(report.clusters):
        where = f"clusters[{i}]"
        if c.clusterArn is not None:
            m = _CLUSTER_ARN.match(c.clusterArn)
            assert m is not None  # the model checked it
            if m["account"] != account or m["region"] != region or m["name"] != c.clusterName:
                raise AccessDenied(
                    f"{where}.clusterArn: this key may only report clusters of account {account} in {region} "
                    f"(the region it signs for), named as clusterName"
                )
        for j, t in enumerate(c.tasks):
            m = _TASK_ARN.match(t.taskArn)
            assert m is not None
            if m["account"] != account or m["region"] != region or m["cluster"] not in (None, c.clusterName):
                raise AccessDenied(
                    f"{where}.tasks[{j}].taskArn: this key may only report tasks of account {account} in {region}, "
                    f"in cluster {c.clusterName}"
                )


def _insert(session: AsyncSession, model: Any) -> Any:
    name = session.get_bind().dialect.name
    return (postgresql.insert if name == "postgresql" else sqlite.insert)(model)


async def store_report(session: AsyncSession, principal: Principal, report: Report) -> dict[str, int]:
    """Replace the reported clusters' view (one transaction: a failed report changes nothing)."""
    await ensure_detector(session, principal.account_id, principal.region)
    did = detector_id_for(principal.account_id, principal.region)
    t = now_ms()
    tasks = 0
    for c in report.clusters:
        values = {
            "detector_id": did,
            "cluster_name": c.clusterName,
            "cluster_arn": c.clusterArn,
            "covered": c.managementType == AUTO_MANAGED,
            "management_type": c.managementType,
            "issue": c.issue,
            "reported_at": t,
        }
        ins = _insert(session, ControlPlaneCluster).values(**values)
        await session.execute(
            ins.on_conflict_do_update(
                index_elements=["detector_id", "cluster_name"],
                set_={k: ins.excluded[k] for k in values if k not in ("detector_id", "cluster_name")},
            ).execution_options(synchronize_session=False)
        )
        if not c.append:
            await session.execute(
                delete(ControlPlaneTask)
                .where(ControlPlaneTask.detector_id == did, ControlPlaneTask.cluster_name == c.clusterName)
                .execution_options(synchronize_session=False)
            )
        rows = [
            {
                "detector_id": did,
                "task_arn": task.taskArn,
                "account_id": principal.account_id,
                "region": principal.region,
                "cluster_name": c.clusterName,
                "cluster_arn": c.clusterArn,
                "task_definition_arn": task.taskDefinitionArn,
                "launch_type": task.launchType,
                "last_status": task.lastStatus,
                "started_at": task.startedAt,
                "issue": task.issue,
                "detail": orjson.dumps(task.detail).decode(),
                "reported_at": t,
            }
            for task in c.tasks
        ]
        if rows:
            ins = _insert(session, ControlPlaneTask)
            # an old-format task ARN (task/ID) names no cluster: the last cluster that reports it owns it
            await session.execute(
                ins.on_conflict_do_update(
                    index_elements=["detector_id", "task_arn"],
                    set_={k: ins.excluded[k] for k in rows[0] if k not in ("detector_id", "task_arn")},
                ).execution_options(synchronize_session=False),
                rows,
            )
        tasks += len(rows)
    removed = 0
    if report.knownClusters is not None:
        keep = set(report.knownClusters) | {c.clusterName for c in report.clusters}
        gone = delete(ControlPlaneCluster).where(
            ControlPlaneCluster.detector_id == did, ControlPlaneCluster.cluster_name.not_in(keep)
        )
        res = await session.execute(gone.execution_options(synchronize_session=False))
        removed = int(res.rowcount or 0)  # type: ignore[attr-defined]
        await session.execute(
            delete(ControlPlaneTask)
            .where(ControlPlaneTask.detector_id == did, ControlPlaneTask.cluster_name.not_in(keep))
            .execution_options(synchronize_session=False)
        )
    return {"clusters": len(report.clusters), "tasks": tasks, "removedClusters": removed}


async def post_report(request: web.Request) -> web.StreamResponse:
    from backend.app import DB, SETTINGS, VERIFIER

    try:
        body = await read_limited(request, request.app[SETTINGS].max_api_body_bytes)
        principal = await request.app[VERIFIER].verify(
            request.method, request.rel_url.raw_path, request.rel_url.raw_query_string, request.headers, body
        )
        report = parse_report(body)
        check_claims(principal, report)
        async with request.app[DB].sessions() as session, session.begin():
            out = await store_report(session, principal, report)
    except ApiError as exc:
        if exc.status >= 500 or exc.status == 403:
            log.warning("control plane report refused", extra={"status": exc.status, "error": exc.message})
        return exc.response()
    except Exception:
        log.exception("control plane report failed")
        return InternalServerError("internal error; the backend's log has the details").response()
    log.info("control plane reported", extra={"account": principal.account_id, "region": principal.region, **out})
    return json_response(out)


def setup(app: web.Application) -> None:
    app.router.add_post(REPORT_PATH, post_report)

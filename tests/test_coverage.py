"""Coverage from heartbeats: agents report over HTTP, people read ListCoverage/GetCoverageStatistics with boto3.

The status rules (backend.coverage.task_status) are tested directly on rows; everything else goes through a real
backend (tests/backend_env.py) on SQLite and PostgreSQL.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from backend_env import BackendThread, iso
from botocore.exceptions import ClientError
from sqlalchemy import delete, select

from backend import tenancy
from backend.coverage import (
    HEALTHY,
    STOPPED,
    UNHEALTHY,
    ClusterCoverage,
    TaskCoverage,
    task_coverage,
    task_status,
)
from backend.models import CoverageRow

ACCOUNT, REGION = "111111111111", "us-east-1"
DETECTOR = tenancy.detector_id_for(ACCOUNT, REGION)
HEALTHY_SOURCES = {
    "proc_connector": {"enabled": False, "detail": "silent outside the initial PID namespace"},
    "proc_poll": {"enabled": True, "detail": "reads /proc"},
    "packets": {"enabled": True, "detail": None},
}


def task_arn(task_id: str, cluster: str = "prod", account: str = ACCOUNT) -> str:
    return f"arn:aws:ecs:{REGION}:{account}:task/{cluster}/{task_id}"


def cluster_arn(cluster: str, account: str = ACCOUNT) -> str:
    return f"arn:aws:ecs:{REGION}:{account}:cluster/{cluster}"


def heartbeat(
    task_id: str = "t1",
    cluster: str = "prod",
    *,
    interval_s: int = 60,
    stopping: bool = False,
    version: str = "0.1.0",
    launch_type: str = "FARGATE",
    sources: dict[str, Any] | None = None,
    delivery: dict[str, Any] | None = None,
    **task: Any,
) -> dict[str, Any]:
    """A heartbeat as the contract (agent_api, POST /agent/v1/heartbeat) describes it."""
    return {
        "agentId": f"agent-{task_id}",
        "agentVersion": version,
        "sentAt": iso(time.time()),
        "intervalS": interval_s,
        "stopping": stopping,
        "task": {
            "accountId": ACCOUNT,
            "region": REGION,
            "clusterName": cluster,
            "clusterArn": cluster_arn(cluster),
            "taskArn": task_arn(task_id, cluster),
            "taskDefinitionArn": f"arn:aws:ecs:{REGION}:{ACCOUNT}:task-definition/web:3",
            "family": "web",
            "launchType": launch_type,
            "availabilityZone": "us-east-1a",
            "hostMode": False,
            **task,
        },
        "sources": HEALTHY_SOURCES if sources is None else sources,
        "counters": {"proc_poll.events": 1200, "packets.kernelDrops": 0, "some.future.counter": 7},
        "delivery": {
            "findingsEmitted": 3,
            "findingsSent": 3,
            "spooled": 0,
            "spoolBytes": 0,
            "dropped": 0,
            "droppedBySeverity": {"LOW": 0, "MEDIUM": 0, "HIGH": 0, "CRITICAL": 0},
            "lastError": None,
            "lastErrorAt": None,
            "permanentError": None,
            **(delivery or {}),
        },
        "resources": {"cpuPercent": 1.5, "rssBytes": 40_000_000},
        "configEtag": None,
    }


def beat(backend: BackendThread, token: str, body: Any) -> tuple[int, dict[str, Any]]:
    status, out, _ = backend.post("/agent/v1/heartbeat", body, token)
    return status, out


def coverage(gd: Any, **kwargs: Any) -> list[dict[str, Any]]:
    resources: list[dict[str, Any]] = gd.list_coverage(DetectorId=DETECTOR, **kwargs)["Resources"]
    return resources


def by_status(gd: Any, **kwargs: Any) -> dict[str, int]:
    out = gd.get_coverage_statistics(DetectorId=DETECTOR, StatisticsType=["COUNT_BY_COVERAGE_STATUS"], **kwargs)
    counts: dict[str, int] = out["CoverageStatistics"]["CountByCoverageStatus"]
    return counts


def criterion(key: str, *, equals: list[str] | None = None, not_equals: list[str] | None = None) -> dict[str, Any]:
    cond: dict[str, Any] = {}
    if equals is not None:
        cond["Equals"] = equals
    if not_equals is not None:
        cond["NotEquals"] = not_equals
    return {"FilterCriteria": {"FilterCriterion": [{"CriterionKey": key, "FilterCondition": cond}]}}


# -- the status rules, on rows ---------------------------------------------------------------------------------

NOW = 1_760_000_000_000


def row(
    *,
    last: int = NOW,
    interval_s: int = 60,
    stopped: bool = False,
    task_id: str = "t1",
    launch_type: str = "FARGATE",
    version: str = "0.1.0",
    cluster: str = "prod",
    **hb_over: Any,
) -> CoverageRow:
    hb = heartbeat(task_id, cluster, interval_s=interval_s, launch_type=launch_type)
    hb.update(hb_over)
    return CoverageRow(
        detector_id=DETECTOR,
        task_arn=task_arn(task_id, cluster),
        account_id=ACCOUNT,
        region=REGION,
        cluster_name=cluster,
        cluster_arn=cluster_arn(cluster),
        launch_type=launch_type,
        agent_id=f"agent-{task_id}",
        agent_version=version,
        first_seen=last,
        last_heartbeat=last,
        interval_s=interval_s,
        stopped=stopped,
        heartbeat=orjson.dumps(hb).decode(),
    )


def test_status_healthy_until_the_missed_heartbeats_are_over() -> None:
    r = row(last=NOW, interval_s=60)
    assert task_status(r, NOW, 3) == (HEALTHY, None)
    assert task_status(r, NOW + 180_000, 3) == (HEALTHY, None)  # exactly three intervals: not yet
    status, issue = task_status(r, NOW + 180_001, 3)
    assert status == UNHEALTHY
    assert issue == "Agent not reporting: no heartbeat since 2025-10-09T08:53:20.000Z"
    # the setting counts: one miss is enough when heartbeat_misses is 1
    assert task_status(r, NOW + 60_001, 1)[0] == UNHEALTHY
    assert task_status(r, NOW + 60_001, 2)[0] == HEALTHY


def test_status_issues_from_the_heartbeat_itself() -> None:
    hb = heartbeat()
    blocked = row(delivery={**hb["delivery"], "permanentError": "401 unknown or revoked agent token"})
    assert task_status(blocked, NOW, 3) == (
        UNHEALTHY,
        "Agent cannot deliver findings: 401 unknown or revoked agent token",
    )
    blind = row(
        sources={
            "proc_connector": {"enabled": False, "detail": "silent in a task"},
            "proc_poll": {"enabled": False, "detail": "/proc/loadavg unreadable"},
            "packets": {"enabled": True, "detail": None},
        }
    )
    assert task_status(blind, NOW, 3) == (
        UNHEALTHY,
        "Agent runs without a process source: proc_poll: /proc/loadavg unreadable; proc_connector: silent in a task",
    )
    assert task_status(row(sources={}), NOW, 3) == (
        UNHEALTHY,
        "Agent runs without a process source: the heartbeat lists no process source",
    )
    # the spool dropping a few low-severity findings is not yet a coverage problem; many, or any severe one, is
    few = {**hb["delivery"], "dropped": 99, "droppedBySeverity": {"LOW": 99, "MEDIUM": 0, "HIGH": 0, "CRITICAL": 0}}
    assert task_status(row(delivery=few), NOW, 3) == (HEALTHY, None)
    many = {**few, "dropped": 100, "droppedBySeverity": {"LOW": 100}}
    assert task_status(row(delivery=many), NOW, 3) == (
        UNHEALTHY,
        "Agent dropped findings: 100 since the agent started, its spool was full (LOW 100)",
    )
    severe = {**few, "dropped": 1, "droppedBySeverity": {"LOW": 0, "HIGH": 1}}
    assert task_status(row(delivery=severe), NOW, 3)[1] == (
        "Agent dropped findings: 1 since the agent started, its spool was full (HIGH 1)"
    )
    # several problems are all named; silence hides them (the last heartbeat is no longer news)
    both = row(sources={}, delivery={**hb["delivery"], "permanentError": "403 cluster"})
    assert task_status(both, NOW, 3)[1] == (
        "Agent cannot deliver findings: 403 cluster; "
        "Agent runs without a process source: the heartbeat lists no process source"
    )
    assert task_status(both, NOW + 200_000, 3)[1] == "Agent not reporting: no heartbeat since 2025-10-09T08:53:20.000Z"


def test_status_of_a_stopped_task() -> None:
    assert task_status(row(stopped=True), NOW, 3) == (STOPPED, None)
    assert task_status(row(stopped=True), NOW + 10_000_000, 3) == (STOPPED, None)


def test_cluster_summarises_its_tasks() -> None:
    tasks = [
        TaskCoverage(row(task_id="a"), HEALTHY, None),
        TaskCoverage(row(task_id="b"), UNHEALTHY, "Agent not reporting: no heartbeat since X"),
        TaskCoverage(row(task_id="c"), UNHEALTHY, "Agent not reporting: no heartbeat since Y"),
        TaskCoverage(
            row(task_id="d", launch_type="EC2"),
            UNHEALTHY,
            "Agent cannot deliver findings: 401 x; Agent runs without a process source: proc_poll: off",
        ),
        TaskCoverage(row(task_id="e", launch_type="EC2", last=NOW + 5000), HEALTHY, None),
    ]
    c = ClusterCoverage("prod", ACCOUNT, cluster_arn("prod"), tasks)
    assert c.status == UNHEALTHY
    assert c.issue == (
        "2 of 5 tasks: Agent not reporting; 1 of 5 tasks: Agent cannot deliver findings; "
        "1 of 5 tasks: Agent runs without a process source"
    )
    wire = c.wire(DETECTOR)
    assert wire["resourceId"] == cluster_arn("prod") and wire["updatedAt"] == (NOW + 5000) / 1000
    details = wire["resourceDetails"]["ecsClusterDetails"]
    assert details["fargateDetails"]["issues"] == [
        "task b: Agent not reporting: no heartbeat since X",
        "task c: Agent not reporting: no heartbeat since Y",
        "task d: Agent cannot deliver findings: 401 x; Agent runs without a process source: proc_poll: off",
    ]
    assert details["containerInstanceDetails"] == {"coveredContainerInstances": 1, "compatibleContainerInstances": 2}
    healthy = ClusterCoverage("prod", ACCOUNT, None, [tasks[0]])
    assert healthy.status == HEALTHY and healthy.issue is None and "issue" not in healthy.wire(DETECTOR)
    assert healthy.wire(DETECTOR)["resourceId"] == "prod"  # no ARN reported: the name


# -- over HTTP and boto3 -------------------------------------------------------------------------------------------


def test_heartbeats_make_the_cluster_covered_and_healthy(backend: BackendThread) -> None:
    token = backend.token(cluster="prod")
    for task_id in ("t1", "t2"):
        status, out = beat(backend, token, heartbeat(task_id, interval_s=30))
        assert status == 200, out
        assert out["heartbeatIntervalS"] == 30 and isinstance(out["configEtag"], str)
    gd = backend.guardduty()
    (res,) = coverage(gd)
    assert res["ResourceId"] == cluster_arn("prod")
    assert res["DetectorId"] == DETECTOR and res["AccountId"] == ACCOUNT
    assert res["CoverageStatus"] == "HEALTHY" and "Issue" not in res
    assert abs(res["UpdatedAt"].timestamp() - time.time()) < 30
    assert res["ResourceDetails"] == {
        "ResourceType": "ECS",
        "EcsClusterDetails": {
            "ClusterName": "prod",
            "FargateDetails": {"Issues": [], "ManagementType": "MANUAL"},
            "ContainerInstanceDetails": {"CoveredContainerInstances": 0, "CompatibleContainerInstances": 0},
        },
    }
    stats = gd.get_coverage_statistics(
        DetectorId=DETECTOR, StatisticsType=["COUNT_BY_RESOURCE_TYPE", "COUNT_BY_COVERAGE_STATUS"]
    )["CoverageStatistics"]
    assert stats == {"CountByResourceType": {"ECS": 1}, "CountByCoverageStatus": {"HEALTHY": 1, "UNHEALTHY": 0}}
    # the console's per-task view: what each agent last said
    rows = backend.in_session(lambda s: task_coverage(s, DETECTOR, tenancy.now_ms(), 3))
    assert [(r["taskId"], r["status"], r["issue"]) for r in rows] == [("t1", HEALTHY, None), ("t2", HEALTHY, None)]
    assert rows[0]["sourcesEnabled"] == ["packets", "proc_poll"] and rows[0]["agentVersion"] == "0.1.0"
    assert rows[0]["delivery"]["findingsSent"] == 3 and rows[0]["counters"]["some.future.counter"] == 7
    assert rows[0]["family"] == "web" and rows[0]["intervalS"] == 30
    # another account's key sees none of it
    other = backend.guardduty(account="222222222222")
    with pytest.raises(ClientError) as exc:
        other.list_coverage(DetectorId=DETECTOR)
    assert exc.value.response["Error"]["Code"] == "BadRequestException"


def test_silent_agent_turns_unhealthy_after_the_missed_heartbeats(sqlite_backend: BackendThread) -> None:
    backend = sqlite_backend  # the rule runs in Python; the engines are covered by the other tests
    assert backend.settings.heartbeat_misses == 3
    token = backend.token()
    gd = backend.guardduty()
    assert beat(backend, token, heartbeat("alive", interval_s=1))[0] == 200
    before = time.monotonic()
    assert beat(backend, token, heartbeat("silent", interval_s=1))[0] == 200
    after = time.monotonic()  # the backend took its heartbeat's time between these two
    assert coverage(gd)[0]["CoverageStatus"] == "HEALTHY"
    seen: dict[str, Any] | None = None
    while time.monotonic() - before < 6:
        assert beat(backend, token, heartbeat("alive", interval_s=1))[0] == 200
        (res,) = coverage(gd)
        if res["CoverageStatus"] == "UNHEALTHY":
            seen = res
            break
        time.sleep(0.1)
    found = time.monotonic()
    assert seen is not None, "the silent agent's task never turned UNHEALTHY"
    # three intervals of 1 s after its heartbeat: not earlier, and found within a poll or two after
    assert found - before >= 3.0, found - before
    assert found - after < 3.75, found - after
    assert seen["Issue"] == "1 of 2 tasks: Agent not reporting"
    (issue,) = seen["ResourceDetails"]["EcsClusterDetails"]["FargateDetails"]["Issues"]
    assert issue.startswith("task silent: Agent not reporting: no heartbeat since 20"), issue
    assert by_status(gd) == {"HEALTHY": 0, "UNHEALTHY": 1}
    # it reports again: healthy again
    assert beat(backend, token, heartbeat("silent", interval_s=1))[0] == 200
    assert coverage(gd)[0]["CoverageStatus"] == "HEALTHY"


def test_stopping_heartbeat_removes_the_task(backend: BackendThread) -> None:
    token = backend.token()
    gd = backend.guardduty()
    assert beat(backend, token, heartbeat("ok"))[0] == 200
    blocked = heartbeat("blocked", delivery={"permanentError": "401 unknown or revoked agent token"})
    assert beat(backend, token, blocked)[0] == 200
    (res,) = coverage(gd)
    assert res["CoverageStatus"] == "UNHEALTHY"
    assert res["Issue"] == "1 of 2 tasks: Agent cannot deliver findings"
    assert res["ResourceDetails"]["EcsClusterDetails"]["FargateDetails"]["Issues"] == [
        "task blocked: Agent cannot deliver findings: 401 unknown or revoked agent token"
    ]
    # the unhealthy task stops: it leaves coverage, and the cluster is healthy again
    blocked["stopping"] = True
    assert beat(backend, token, blocked)[0] == 200
    (res,) = coverage(gd)
    assert res["CoverageStatus"] == "HEALTHY" and "Issue" not in res
    # the last task stops: the cluster leaves coverage
    assert beat(backend, token, heartbeat("ok", stopping=True))[0] == 200
    assert coverage(gd) == []
    assert by_status(gd) == {"HEALTHY": 0, "UNHEALTHY": 0}
    # the console still shows that they stopped (rather than went silent)
    rows = backend.in_session(lambda s: task_coverage(s, DETECTOR, tenancy.now_ms(), 3))
    assert [(r["taskId"], r["status"]) for r in rows] == [("blocked", STOPPED), ("ok", STOPPED)]


def test_finished_tasks_leave_coverage_and_the_table(backend: BackendThread) -> None:
    token = backend.token()
    gd = backend.guardduty()
    now = tenancy.now_ms()
    hour = 3_600_000

    def finished() -> list[CoverageRow]:
        return [
            row(task_id="stopped-2h", stopped=True, last=now - 2 * hour),
            row(task_id="stopped-10m", stopped=True, last=now - 600_000),
            row(task_id="silent-2h", last=now - 2 * hour),
            row(task_id="silent-25h", last=now - 25 * hour),
            row(task_id="staging-stopped-2h", cluster="staging", stopped=True, last=now - 2 * hour),
        ]

    async def add(session: Any) -> None:
        await session.execute(delete(CoverageRow).where(CoverageRow.task_arn != task_arn("fresh")))
        session.add_all(finished())

    async def first_seen(session: Any) -> dict[str, int]:
        rows = await session.execute(select(CoverageRow.task_arn, CoverageRow.first_seen))
        return {arn.rsplit("/", 1)[1]: seen for arn, seen in rows}

    backend.in_session(add)
    # a task silent for more than a day no longer counts; one silent for two hours is the cluster's problem
    (res,) = coverage(gd)
    assert res["Issue"] == "1 of 1 tasks: Agent not reporting", res
    assert res["ResourceDetails"]["EcsClusterDetails"]["FargateDetails"]["Issues"][0].startswith("task silent-2h:")
    # a new task of the cluster clears the cluster's finished tasks from the table (staging's are staging's)
    assert beat(backend, token, heartbeat("fresh"))[0] == 200
    seen = backend.in_session(first_seen)
    assert set(seen) == {"stopped-10m", "silent-2h", "fresh", "staging-stopped-2h"}
    assert coverage(gd)[0]["Issue"] == "1 of 2 tasks: Agent not reporting"
    # the next heartbeat of a known task is no new task: nothing is cleared, and its first sighting stays
    backend.in_session(add)
    time.sleep(0.01)
    assert beat(backend, token, heartbeat("fresh"))[0] == 200
    again = backend.in_session(first_seen)
    assert len(again) == 6 and again["fresh"] == seen["fresh"]


def test_heartbeat_for_another_cluster_is_refused(backend: BackendThread) -> None:
    prod = backend.token(cluster="prod")
    staging = backend.token(cluster="staging")
    gd = backend.guardduty()
    # an old-format task ARN does not name its cluster: prod's row says whose it is
    old_arn = f"arn:aws:ecs:{REGION}:{ACCOUNT}:task/0123abcd"
    assert beat(backend, prod, heartbeat("x", taskArn=old_arn))[0] == 200
    refused = {
        "clusterName": heartbeat("t9", "prod"),
        "taskArn": heartbeat("t9", "staging", taskArn=task_arn("t9", "prod")),
        "clusterArn": heartbeat("t9", "staging", clusterArn=cluster_arn("prod")),
        "accountId": heartbeat("t9", "staging", accountId="222222222222"),
        "region": heartbeat("t9", "staging", region="eu-west-1"),
        "hijack": heartbeat("t9", "staging", taskArn=old_arn, stopping=True),
    }
    for what, body in refused.items():
        status, out = beat(backend, staging, body)
        assert status == 403, (what, out)
        assert "staging" in out["error"] or "111111111111" in out["error"] or "us-east-1" in out["error"], out
    # nothing was stored for staging, and prod's task is untouched (not stopped, still prod's)
    (res,) = coverage(gd)
    assert res["ResourceDetails"]["EcsClusterDetails"]["ClusterName"] == "prod"
    rows = backend.in_session(lambda s: task_coverage(s, DETECTOR, tenancy.now_ms(), 3))
    assert [(r["clusterName"], r["taskArn"], r["status"]) for r in rows] == [("prod", old_arn, HEALTHY)]
    # with its own identity, staging is welcome
    assert beat(backend, staging, heartbeat("t9", "staging"))[0] == 200
    assert len(coverage(gd)) == 2


def test_malformed_heartbeat_is_refused_naming_the_field(backend: BackendThread) -> None:
    token = backend.token()
    hb = heartbeat()
    del hb["task"]["taskArn"]
    cases: list[tuple[dict[str, Any], str]] = [(hb, "task.taskArn")]
    cases.append(({**heartbeat(), "intervalS": "often"}, "intervalS"))
    cases.append(({**heartbeat(), "intervalS": 0}, "intervalS"))
    cases.append(({**heartbeat(), "sentAt": "yesterday"}, "sentAt"))
    cases.append(({**heartbeat(), "bogus": 1}, "bogus"))
    cases.append((heartbeat(taskArn="task-1"), "task.taskArn"))
    cases.append((heartbeat(launchType="MOON"), "task.launchType"))
    cases.append((heartbeat(sources={"proc_poll": {"enabled": "maybe"}}), "sources.proc_poll.enabled"))
    cases.append((heartbeat(delivery={"dropped": -1}), "delivery.dropped"))
    cases.append(({**heartbeat(), "counters": {"x": "many"}}, "counters.x"))
    no_agent = heartbeat()
    del no_agent["agentVersion"]
    cases.append((no_agent, "agentVersion"))
    for body, field in cases:
        status, out = beat(backend, token, body)
        assert status == 400, (field, out)
        assert out["field"] == field, out
        assert out["error"].startswith(field + ":"), out
    # too large: refused whole, the limit is said
    huge = heartbeat()
    huge["counters"] = {f"c{i:06d}": i for i in range(20_000)}
    status, out = beat(backend, token, huge)
    assert status == 413 and out["maxBytes"] == 256 * 1024, out
    # none of it was stored
    assert coverage(backend.guardduty()) == []


def test_filter_sort_and_pages(backend: BackendThread) -> None:
    gd = backend.guardduty()
    prod, staging, batch = (backend.token(cluster=c) for c in ("prod", "staging", "batch"))
    assert beat(backend, prod, heartbeat("p1", "prod"))[0] == 200
    time.sleep(0.01)  # prod's heartbeat is the oldest, for UPDATED_AT below
    blind = {"proc_poll": {"enabled": False, "detail": "/proc hidden"}}
    assert beat(backend, staging, heartbeat("s1", "staging", sources=blind))[0] == 200
    assert beat(backend, batch, heartbeat("b1", "batch", version="0.2.0", launch_type="EC2"))[0] == 200
    assert beat(backend, batch, heartbeat("b2", "batch", version="0.1.0", launch_type="EC2"))[0] == 200

    def names(**kwargs: Any) -> list[str]:
        return [r["ResourceDetails"]["EcsClusterDetails"]["ClusterName"] for r in coverage(gd, **kwargs)]

    assert names() == ["batch", "prod", "staging"]  # by resource id when no sort is asked
    assert names(**criterion("COVERAGE_STATUS", equals=["UNHEALTHY"])) == ["staging"]
    assert names(**criterion("COVERAGE_STATUS", not_equals=["UNHEALTHY"])) == ["batch", "prod"]
    assert names(**criterion("CLUSTER_NAME", equals=["prod", "batch"])) == ["batch", "prod"]
    assert names(**criterion("ECS_CLUSTER_NAME", not_equals=["prod"])) == ["batch", "staging"]
    assert names(**criterion("CLUSTER_ARN", equals=[cluster_arn("staging")])) == ["staging"]
    assert names(**criterion("AGENT_VERSION", equals=["0.2.0"])) == ["batch"]
    assert names(**criterion("AGENT_VERSION", not_equals=["0.2.0"])) == ["prod", "staging"]
    assert names(**criterion("ACCOUNT_ID", equals=["222222222222"])) == []
    assert names(**criterion("RESOURCE_TYPE", equals=["ECS"])) == ["batch", "prod", "staging"]
    assert names(**criterion("MANAGEMENT_TYPE", equals=["AUTO_MANAGED"])) == []
    assert names(**criterion("EKS_CLUSTER_NAME", equals=["prod"])) == []  # valid key, no ECS cluster has one
    both = {
        "FilterCriteria": {
            "FilterCriterion": [
                {"CriterionKey": "COVERAGE_STATUS", "FilterCondition": {"Equals": ["HEALTHY"]}},
                {"CriterionKey": "CLUSTER_NAME", "FilterCondition": {"NotEquals": ["batch"]}},
            ]
        }
    }
    assert names(**both) == ["prod"]
    assert by_status(gd, **criterion("CLUSTER_NAME", not_equals=["prod"])) == {"HEALTHY": 1, "UNHEALTHY": 1}

    assert names(SortCriteria={"AttributeName": "CLUSTER_NAME", "OrderBy": "DESC"}) == ["staging", "prod", "batch"]
    assert names(SortCriteria={"AttributeName": "COVERAGE_STATUS", "OrderBy": "DESC"})[0] == "staging"
    assert names(SortCriteria={"AttributeName": "ISSUE", "OrderBy": "DESC"})[0] == "staging"
    assert names(SortCriteria={"AttributeName": "UPDATED_AT", "OrderBy": "ASC"})[0] == "prod"

    # EC2 launch type tasks are counted as container instances
    (b,) = coverage(gd, **criterion("CLUSTER_NAME", equals=["batch"]))
    assert b["ResourceDetails"]["EcsClusterDetails"]["ContainerInstanceDetails"] == {
        "CoveredContainerInstances": 2,
        "CompatibleContainerInstances": 2,
    }
    (s,) = coverage(gd, **criterion("CLUSTER_NAME", equals=["staging"]))
    assert s["Issue"] == "1 of 1 tasks: Agent runs without a process source"

    # one per page, in order, until no token
    pages: list[str] = []
    kwargs: dict[str, Any] = {"MaxResults": 1}
    while True:
        out = gd.list_coverage(DetectorId=DETECTOR, **kwargs)
        pages += [r["ResourceDetails"]["EcsClusterDetails"]["ClusterName"] for r in out["Resources"]]
        if not out.get("NextToken"):
            break
        kwargs["NextToken"] = out["NextToken"]
    assert pages == ["batch", "prod", "staging"]
    paginated = gd.get_paginator("list_coverage").paginate(DetectorId=DETECTOR, PaginationConfig={"PageSize": 2})
    assert sum(len(p["Resources"]) for p in paginated) == 3

    # mistakes name what is wrong
    for kwargs, word in (
        (criterion("COLOR", equals=["red"]), "COLOR"),
        (criterion("CLUSTER_NAME", equals=[]), "equals"),
        ({"SortCriteria": {"AttributeName": "SIZE"}}, "SIZE"),
        ({"MaxResults": 51}, "maxResults"),
        ({"NextToken": "not-a-token"}, "nextToken"),
    ):
        with pytest.raises(ClientError) as exc:
            gd.list_coverage(DetectorId=DETECTOR, **kwargs)
        err = exc.value.response["Error"]
        assert err["Code"] == "BadRequestException" and word in err["Message"], err
    with pytest.raises(ClientError) as exc:
        gd.get_coverage_statistics(DetectorId=DETECTOR, StatisticsType=["COUNT_BY_COLOR"])
    assert "COUNT_BY_COLOR" in exc.value.response["Error"]["Message"]

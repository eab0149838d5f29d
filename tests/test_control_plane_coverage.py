"""Coverage from both sides: the agents' heartbeats and runtime-manager's view of what ECS runs.

ECS is moto in server mode (tests/moto_server.py, clusters built with tests/test_manager_automation.py's EcsWorld),
the backend is the real one (tests/backend_env.py) on SQLite and PostgreSQL, the manager reports over HTTP with
SigV4, agents send heartbeats with their tokens, and people read ListCoverage / GetCoverageStatistics with boto3.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from backend_env import BackendThread, iso
from sqlalchemy import select, update
from test_manager_automation import ACCOUNT, REGION, EcsWorld, ecs_world, settings

from backend import tenancy
from backend.control_plane import REPORT_PATH
from backend.coverage import (
    AUTO_MANAGED,
    CONTROL_PLANE_FRESH_MS,
    DISABLED,
    HEALTHY,
    MANUAL,
    STOPPED,
    UNHEALTHY,
    cluster_coverage,
    merged_status,
    task_coverage,
)
from backend.manager.coverage_report import (
    BackendReporter,
    ClusterReport,
    ReportError,
    ServiceState,
    TaskReport,
    report_bodies,
    task_issue,
)
from backend.models import ControlPlaneCluster, ControlPlaneTask

if TYPE_CHECKING:
    from moto_server import MotoEndpoint
DETECTOR = tenancy.detector_id_for(ACCOUNT, REGION)
TAG = "RuntimeMonitoringManaged"


@pytest.fixture
def world(moto_endpoint: MotoEndpoint) -> Iterator[EcsWorld]:
    yield from ecs_world(moto_endpoint)


def cluster_arn(name: str, account: str = ACCOUNT, region: str = REGION) -> str:
    return f"arn:aws:ecs:{region}:{account}:cluster/{name}"


def task_arn(task_id: str, cluster: str = "prod", account: str = ACCOUNT, region: str = REGION) -> str:
    return f"arn:aws:ecs:{region}:{account}:task/{cluster}/{task_id}"


def heartbeat(arn: str, cluster: str = "prod", interval_s: int = 60, stopping: bool = False) -> dict[str, Any]:
    return {
        "agentId": "agent-" + arn.rsplit("/", 1)[-1][:8],
        "agentVersion": "0.1.0",
        "sentAt": iso(time.time()),
        "intervalS": interval_s,
        "stopping": stopping,
        "task": {
            "accountId": ACCOUNT,
            "region": REGION,
            "clusterName": cluster,
            "clusterArn": cluster_arn(cluster),
            "taskArn": arn,
            "launchType": "FARGATE",
        },
        "sources": {"proc_poll": {"enabled": True, "detail": "reads /proc"}},
    }


def beat(backend: BackendThread, token: str, arn: str, **kw: Any) -> None:
    status, out, _ = backend.post("/agent/v1/heartbeat", heartbeat(arn, **kw), token)
    assert status == 200, out


def stop_sidecar(arn: str, exit_code: int, reason: str) -> None:
    """ECS reporting the task's sidecar container as exited. moto has no API for a container's state (its agent
    protocol is not served), so the test sets it in moto's model, where DescribeTasks reads it from."""
    from moto.ecs.models import ecs_backends

    task = ecs_backends[ACCOUNT][REGION].tasks[arn.split("/")[-2]][arn]
    (container,) = [c for c in task.containers if c.name == "runtime-sidecar"]
    container.last_status, container.exitCode = "STOPPED", exit_code
    container.reason = reason  # type: ignore[attr-defined]  # moto serialises it when present, as ECS sends it


def resources(gd: Any, **kw: Any) -> dict[str, dict[str, Any]]:
    out = gd.list_coverage(DetectorId=DETECTOR, **kw)["Resources"]
    return {r["ResourceDetails"]["EcsClusterDetails"]["ClusterName"]: r for r in out}


def issues_of(resource: dict[str, Any]) -> dict[str, str]:
    """task id -> its issue, from FargateDetails.Issues ("task ID: issue")."""
    out = {}
    for line in resource["ResourceDetails"]["EcsClusterDetails"]["FargateDetails"]["Issues"]:
        if line.startswith("task "):
            tid, _, issue = line[5:].partition(": ")
            out[tid] = issue
    return out


def tid(arn: str) -> str:
    return arn.rsplit("/", 1)[-1]


# -- the whole story: a mixed cluster -------------------------------------------------------------------------


def test_mixed_cluster_coverage(backend: BackendThread, world: EcsWorld) -> None:
    world.cluster("prod")
    world.cluster("billing", "false")
    web_v1 = world.task_definition("web", fargate=False)
    world.service("prod", "web", web_v1)
    before_rollout = world.run_task("prod", web_v1, group="service:web", started_by="ecs-svc/1")
    standalone = world.run_task("prod", world.task_definition("job", fargate=False), started_by="nightly-report")
    ledger = world.task_definition("ledger", fargate=False)
    world.service("billing", "ledger", ledger)
    excluded = world.run_task("billing", ledger, group="service:ledger")
    key = backend.access_key(account=ACCOUNT, region=REGION)
    reporter = BackendReporter(backend.url, key[0], key[1], REGION)

    first = world.manager(settings(), reporter=reporter).run_once()
    assert first["changes"] == 1
    web_v2 = world.describe_service("prod", "web")["taskDefinition"]
    # the new deployment's tasks, as ECS's scheduler starts them: two report, one is silent, one's agent died
    new = [world.run_task("prod", web_v2, group="service:web", started_by="ecs-svc/2") for _ in range(4)]
    reporting, silent, exited = new[:2], new[2], new[3]
    stop_sidecar(exited, 137, "OutOfMemoryError: Container killed due to memory usage")
    token = backend.token(account=ACCOUNT, cluster="prod", region=REGION)
    for arn in reporting:
        beat(backend, token, arn)

    out = world.manager(settings(), reporter=reporter).run_once()
    assert out["changes"] == 0
    assert out["reported"] == {"clusters": 2, "tasks": 7, "removedClusters": 0}
    gd = backend.guardduty(account=ACCOUNT, region=REGION, key=key)
    res = resources(gd)
    prod, billing = res["prod"], res["billing"]
    assert prod["CoverageStatus"] == UNHEALTHY and prod["ResourceId"] == cluster_arn("prod")
    assert prod["Issue"] == (
        "2 of 6 tasks: Agent not provisioned; 1 of 6 tasks: Agent exited; 1 of 6 tasks: Agent not reporting"
    )
    assert prod["ResourceDetails"]["EcsClusterDetails"]["FargateDetails"]["ManagementType"] == AUTO_MANAGED
    issues = issues_of(prod)
    assert set(issues) == {tid(a) for a in (before_rollout, standalone, silent, exited)}
    assert issues[tid(before_rollout)] == (
        "Agent not provisioned: the task started before service web got the sidecar (web:2); "
        "its new deployment replaces it"
    )
    assert issues[tid(standalone)].startswith(
        "Agent not provisioned: a standalone task (started by nightly-report, not a service) of task definition job:1"
    )
    assert issues[tid(silent)] == "Agent not reporting: the task runs the sidecar but its agent sent no heartbeat"
    assert issues[tid(exited)] == (
        "Agent exited: exit code 137, reason: OutOfMemoryError: Container killed due to memory usage"
    )
    assert billing["CoverageStatus"] == UNHEALTHY and billing["Issue"] == "1 of 1 tasks: Agent not provisioned"
    assert billing["ResourceDetails"]["EcsClusterDetails"]["FargateDetails"]["ManagementType"] == DISABLED
    assert issues_of(billing) == {
        tid(excluded): f"Agent not provisioned: the cluster is excluded by its tag {TAG}=false"
    }
    stats = gd.get_coverage_statistics(DetectorId=DETECTOR, StatisticsType=["COUNT_BY_COVERAGE_STATUS"])
    assert stats["CoverageStatistics"]["CountByCoverageStatus"] == {"HEALTHY": 0, "UNHEALTHY": 2}
    only_disabled = {
        "FilterCriterion": [{"CriterionKey": "MANAGEMENT_TYPE", "FilterCondition": {"Equals": ["DISABLED"]}}]
    }
    assert list(resources(gd, FilterCriteria=only_disabled)) == ["billing"]

    def prod_coverage() -> tuple[int, int]:
        clusters = backend.in_session(lambda s: cluster_coverage(s, DETECTOR, tenancy.now_ms(), 3))
        (c,) = [c for c in clusters if c.name == "prod"]
        assert c.coverage == c.healthy_tasks / len(c.tasks)
        return c.healthy_tasks, len(c.tasks)

    assert prod_coverage() == (2, 6)

    # the silent agent speaks; the deployment stops the old task and the broken one; one reporting task is killed
    # without a last heartbeat (ECS no longer lists it: it leaves coverage at the next report, not a day later)
    beat(backend, token, silent)
    for arn in (before_rollout, exited, reporting[0]):
        world.ecs.stop_task(cluster="prod", task=arn, reason="Scaling activity initiated by deployment")
    world.manager(settings(), reporter=reporter).run_once()
    prod = resources(gd)["prod"]
    assert prod["Issue"] == "1 of 3 tasks: Agent not provisioned"
    assert set(issues_of(prod)) == {tid(standalone)}
    assert prod_coverage() == (2, 3)
    rows = {r["taskId"]: r for r in backend.in_session(lambda s: task_coverage(s, DETECTOR, tenancy.now_ms(), 3))}
    assert rows[tid(reporting[0])]["status"] == STOPPED  # the console still shows the task ECS stopped
    assert rows[tid(silent)]["status"] == HEALTHY and rows[tid(silent)]["controlPlane"]["issue"] is None
    assert rows[tid(standalone)]["agentId"] is None and rows[tid(standalone)]["family"] == "job"
    assert rows[tid(standalone)]["controlPlane"]["detail"]["startedBy"] == "nightly-report"
    assert tid(before_rollout) not in rows and tid(exited) not in rows


def test_a_cluster_whose_vpc_endpoint_failed(sqlite_backend: BackendThread, world: EcsWorld) -> None:
    backend = sqlite_backend
    service_name = world.endpoint_service()
    vpc, subnets, sg = world.vpc(dns_hostnames=False)
    world.cluster("legacy")
    world.service("legacy", "web", world.task_definition("web", awsvpc=True), subnets, sg)
    world.cluster("empty")  # covered, nothing runs: listed HEALTHY, as GuardDuty lists covered clusters
    world.cluster("mine", "false")  # excluded, nothing runs: not listed
    key = backend.access_key(account=ACCOUNT, region=REGION)
    reporter = BackendReporter(backend.url, key[0], key[1], REGION)
    world.manager(settings(endpoint_service_name=service_name), reporter=reporter).run_once()
    res = resources(backend.guardduty(account=ACCOUNT, region=REGION, key=key))
    assert set(res) == {"legacy", "empty"}
    legacy = res["legacy"]
    assert legacy["CoverageStatus"] == UNHEALTHY
    assert legacy["Issue"].startswith(f"VPC endpoint creation failed: {vpc}: enableDnsHostnames is off")
    assert legacy["ResourceDetails"]["EcsClusterDetails"]["FargateDetails"]["Issues"] == [legacy["Issue"]]
    assert res["empty"]["CoverageStatus"] == HEALTHY and "Issue" not in res["empty"]


# -- the report API ---------------------------------------------------------------------------------------------


def test_reports_in_parts_replace_and_forget(backend: BackendThread) -> None:
    key = backend.access_key(account=ACCOUNT, region=REGION)
    reporter = BackendReporter(backend.url, key[0], key[1], REGION, tasks_per_request=3)
    issue = "Agent not provisioned: the cluster is excluded by its tag X=false"

    def cluster(name: str, n: int, mtype: str = DISABLED) -> ClusterReport:
        tasks = [TaskReport(task_arn(f"{name}{i}", name), None, "FARGATE", "RUNNING", None, issue) for i in range(n)]
        return ClusterReport(name, cluster_arn(name), mtype, None, tasks)

    def stored() -> dict[str, list[str]]:
        async def read(s: Any) -> dict[str, list[str]]:
            out: dict[str, list[str]] = {
                c.cluster_name: [] for c in (await s.execute(select(ControlPlaneCluster))).scalars()
            }
            for t in (await s.execute(select(ControlPlaneTask))).scalars():
                out[t.cluster_name].append(tid(t.task_arn))
            return {k: sorted(v) for k, v in out.items()}

        return backend.in_session(read)

    assert reporter.send([cluster("big", 7), cluster("small", 2), cluster("old", 1)]) == {
        "clusters": 5,  # big in three parts
        "tasks": 10,
        "removedClusters": 0,
    }
    assert stored() == {"big": [f"big{i}" for i in range(7)], "small": ["small0", "small1"], "old": ["old0"]}
    # the next report: big shrank, old is gone from ECS, a MANUAL cluster is reported without tasks
    out = reporter.send([cluster("big", 2), cluster("small", 2), cluster("theirs", 0, MANUAL)])
    assert out["removedClusters"] == 1
    assert stored() == {"big": ["big0", "big1"], "small": ["small0", "small1"], "theirs": []}


def test_report_bodies_split_clusters_and_name_them_all() -> None:
    def c(name: str, n: int) -> ClusterReport:
        return ClusterReport(
            name, None, AUTO_MANAGED, None, [TaskReport(f"{name}{i}", None, None, None, None, None) for i in range(n)]
        )

    bodies = report_bodies([c("a", 2), c("b", 5), c("e", 0)], per_request=3)
    shape = [[(x["clusterName"], len(x["tasks"]), x["append"]) for x in b["clusters"]] for b in bodies]
    assert shape == [[("a", 2, False), ("b", 1, False)], [("b", 3, True)], [("b", 1, True), ("e", 0, False)]]
    assert [b.get("knownClusters") for b in bodies] == [None, None, ["a", "b", "e"]]
    assert report_bodies([], per_request=3) == [{"clusters": [], "knownClusters": []}]


def test_reports_are_refused_with_the_reason(sqlite_backend: BackendThread) -> None:
    backend = sqlite_backend
    key = backend.access_key(account=ACCOUNT, region=REGION)
    ok_task = {"taskArn": task_arn("t1"), "issue": None}
    ok_cluster = {"clusterName": "prod", "clusterArn": cluster_arn("prod"), "managementType": "AUTO_MANAGED"}

    def send(body: dict[str, Any], *, k: tuple[str, str] = key, region: str = REGION) -> str:
        reporter = BackendReporter(backend.url, k[0], k[1], region, attempts=1)
        with pytest.raises(ReportError) as exc:
            reporter._send_one(body)
        return str(exc.value)

    # not signed at all
    req = urllib.request.Request(backend.url + REPORT_PATH, data=b'{"clusters": []}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(req, timeout=10)
    assert http.value.code == 403
    assert json.loads(http.value.read())["__type"] == "MissingAuthenticationTokenException"
    assert "(403)" in send({"clusters": []}, k=(key[0], "wrong-secret"))
    # another account's cluster or task, another region than the one signed for: refused, nothing stored
    other = "222222222222"
    assert "(403)" in send({"clusters": [{**ok_cluster, "clusterArn": cluster_arn("prod", other)}]})
    assert "(403)" in send(
        {"clusters": [{**ok_cluster, "tasks": [{**ok_task, "taskArn": task_arn("t", "prod", other)}]}]}
    )
    assert "(403)" in send({"clusters": [{**ok_cluster, "tasks": [{**ok_task, "taskArn": task_arn("t", "staging")}]}]})
    assert "(403)" in send({"clusters": [ok_cluster]}, region="eu-west-1")
    # malformed: the field is named
    bad_issue = {**ok_cluster, "tasks": [{**ok_task, "issue": "Everything is fine"}]}
    assert "clusters[0].tasks[0].issue: Value error, must start with 'Agent not provisioned: '" in send(
        {"clusters": [bad_issue]}
    )
    assert "clusters[0].issue" in send({"clusters": [{**ok_cluster, "issue": "Agent exited: 1"}]})
    assert "managementType" in send({"clusters": [{**ok_cluster, "managementType": "SOMETIMES"}]})
    assert "a cluster is named twice" in send({"clusters": [ok_cluster, ok_cluster]})
    assert "clusters[0].bogus" in send({"clusters": [{**ok_cluster, "bogus": 1}]})

    async def count(s: Any) -> int:
        return len(list((await s.execute(select(ControlPlaneCluster))).scalars()))

    assert backend.in_session(count) == 0


def test_a_manager_that_stopped_reporting_is_ignored(sqlite_backend: BackendThread) -> None:
    backend = sqlite_backend
    key = backend.access_key(account=ACCOUNT, region=REGION)
    reporter = BackendReporter(backend.url, key[0], key[1], REGION)
    token = backend.token(account=ACCOUNT, cluster="prod", region=REGION)
    beat(backend, token, task_arn("agent1"))
    not_provisioned = "Agent not provisioned: service web needs a new deployment with the sidecar"
    reporter.send(
        [
            ClusterReport(
                "prod",
                cluster_arn("prod"),
                AUTO_MANAGED,
                None,
                [
                    TaskReport(task_arn("agent1"), None, "FARGATE", "RUNNING", None, None),
                    TaskReport(task_arn("bare"), None, "FARGATE", "RUNNING", None, not_provisioned),
                ],
            )
        ]
    )
    gd = backend.guardduty(account=ACCOUNT, region=REGION, key=key)
    assert resources(gd)["prod"]["Issue"] == "1 of 2 tasks: Agent not provisioned"

    async def age(s: Any) -> None:
        old = tenancy.now_ms() - CONTROL_PLANE_FRESH_MS - 1000
        await s.execute(update(ControlPlaneCluster).values(reported_at=old))

    backend.in_session(age)
    prod = resources(gd)["prod"]
    assert prod["CoverageStatus"] == HEALTHY and "Issue" not in prod  # the heartbeats alone
    assert prod["ResourceDetails"]["EcsClusterDetails"]["FargateDetails"]["ManagementType"] == MANUAL


# -- the rules, on values ---------------------------------------------------------------------------------------


def test_merged_status_rules() -> None:
    now = 1_760_000_000_000

    def plane(issue: str | None = None, started: int | None = None) -> ControlPlaneTask:
        return ControlPlaneTask(
            detector_id=DETECTOR,
            task_arn=task_arn("t"),
            account_id=ACCOUNT,
            region=REGION,
            cluster_name="prod",
            started_at=started,
            issue=issue,
            detail="{}",
            reported_at=now,
        )

    exited = "Agent exited: exit code 1, reason: Essential container exited"
    assert merged_status(None, plane(exited), now, 3) == (UNHEALTHY, exited)
    # started recently: its first heartbeat is not overdue yet (3 misses of the default 60 s)
    assert merged_status(None, plane(started=now - 179_000), now, 3) == (HEALTHY, None)
    status, issue = merged_status(None, plane(started=now - 181_000), now, 3)
    assert status == UNHEALTHY
    assert issue == (
        "Agent not reporting: the task runs the sidecar since 2025-10-09T08:50:19.000Z but its agent sent no heartbeat"
    )


def test_task_issue_kinds() -> None:
    with_sidecar = {
        "executionRoleArn": "arn:aws:iam::123456789012:role/x",
        "containerDefinitions": [{"name": "runtime-sidecar", "image": "x/runtime-sidecar:1"}, {"name": "app"}],
    }
    without = {"executionRoleArn": "arn:aws:iam::123456789012:role/x", "containerDefinitions": [{"name": "app"}]}
    no_role = {"containerDefinitions": [{"name": "app"}]}
    task = {"taskArn": task_arn("t"), "taskDefinitionArn": "arn:aws:ecs:us-east-1:1:task-definition/web:3"}
    svc_task = {**task, "group": "service:web", "startedBy": "ecs-svc/9"}
    running = {**svc_task, "containers": [{"name": "runtime-sidecar", "lastStatus": "RUNNING"}]}
    rolled = {"web": ServiceState("web", "arn:aws:ecs:us-east-1:1:task-definition/web:4", True)}
    stuck = {"web": ServiceState("web", "arn:aws:ecs:us-east-1:1:task-definition/web:3", False, "it uses CODE_DEPLOY")}

    def issue(t: dict[str, Any], td: dict[str, Any], mtype: str = AUTO_MANAGED, services: Any = None) -> str | None:
        return task_issue(t, td, management_type=mtype, tag=TAG, services=services or {})[0]

    assert issue(running, with_sidecar) is None
    assert issue(svc_task, with_sidecar) is None  # ECS has not said anything of the container yet
    stopped = {**svc_task, "containers": [{"name": "runtime-sidecar", "lastStatus": "STOPPED"}]}
    assert issue(stopped, with_sidecar) == "Agent exited: exit code none, reason: ECS gave no reason"
    assert (
        issue(svc_task, without, DISABLED) == f"Agent not provisioned: the cluster is excluded by its tag {TAG}=false"
    )
    assert "has no execution role" in (issue(svc_task, no_role) or "")
    assert "started before service web got the sidecar (web:4)" in (issue(svc_task, without, services=rolled) or "")
    assert issue(svc_task, without, services=stuck) == (
        "Agent not provisioned: service web needs a new deployment: it uses CODE_DEPLOY"
    )
    assert "standalone task (started by RunTask" in (issue(task, without) or "")
    assert "not managed" in (issue(svc_task, without, MANUAL) or "")
    # a sidecar found by its image, under another container name
    renamed = {**with_sidecar, "containerDefinitions": [{"name": "agent", "image": "r/runtime-sidecar@sha256:ab"}]}
    exited = {**svc_task, "containers": [{"name": "agent", "lastStatus": "STOPPED", "exitCode": 2, "reason": "bad"}]}
    assert issue(exited, renamed) == "Agent exited: exit code 2, reason: bad"

"""The control plane's half of coverage: which tasks ECS runs, and why a task has no agent.

An agent that runs reports itself (heartbeats); a task without one cannot, so the manager lists the running tasks
of the clusters it looks after (ListTasks, DescribeTasks) and says, for each, what GuardDuty would say:

- the sidecar is in the task and running: nothing (the agent's heartbeats decide: HEALTHY, or "Agent not
  reporting" if it never sent one);
- "Agent exited: ...": the sidecar container stopped while the task runs (its exit code and ECS's reason);
- "Agent not provisioned: ...": the task's definition has no sidecar, because the cluster is excluded by its tag,
  the task definition has no execution role, the task started before its service got the sidecar, the service
  could not be updated (it needs a new deployment), or it is a standalone task (RunTask), which the manager does
  not restart;

and, for the whole cluster, "VPC endpoint creation failed: ..." when a VPC of its services could not get the
collector's endpoint. :class:`BackendReporter` sends that view to the backend (``backend.control_plane``), signed
with SigV4 by one of the backend's access keys, as boto3 signs GuardDuty calls.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from backend.coverage import AUTO_MANAGED, DISABLED, ISSUE_EXITED, ISSUE_NOT_PROVISIONED, MANUAL
from backend.manager.aws import Backoff
from backend.manager.inject import CONTAINER_NAME, has_sidecar

log = logging.getLogger("backend.manager.coverage")

REPORT_PATH = "/control-plane/v1/report"
# tasks per request: a task's entry is ~600 bytes of JSON, the backend takes 1 MiB bodies by default
TASKS_PER_REQUEST = 500


@dataclass
class TaskReport:
    task_arn: str
    task_definition_arn: str | None
    launch_type: str | None
    last_status: str | None
    started_at_ms: int | None
    issue: str | None
    detail: dict[str, Any] = field(default_factory=dict)

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "taskArn": self.task_arn,
            "taskDefinitionArn": self.task_definition_arn,
            "lastStatus": self.last_status,
            "startedAt": self.started_at_ms,
            "issue": self.issue,
            "detail": self.detail,
        }
        if self.launch_type in ("FARGATE", "EC2", "EXTERNAL"):
            out["launchType"] = self.launch_type
        return out


@dataclass
class ClusterReport:
    name: str
    arn: str | None
    management_type: str  # AUTO_MANAGED, DISABLED (excluded by tag) or MANUAL (not the manager's)
    issue: str | None = None
    tasks: list[TaskReport] = field(default_factory=list)

    def wire(self, tasks: list[TaskReport] | None = None, *, append: bool = False) -> dict[str, Any]:
        return {
            "clusterName": self.name,
            "clusterArn": self.arn,
            "managementType": self.management_type,
            "issue": self.issue,
            "append": append,
            "tasks": [t.wire() for t in (self.tasks if tasks is None else tasks)],
        }


@dataclass
class ServiceState:
    """What the manager knows of a service after this run: does its current task definition have the sidecar,
    and if not, why it could not get it."""

    name: str
    task_definition_arn: str
    has_sidecar: bool
    problem: str | None = None


def epoch_ms(value: Any) -> int | None:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, (int, float)):
        return int(value * 1000)  # botocore's epoch seconds when timestamps are not parsed
    return None


def family_revision(task_definition_arn: str | None) -> str:
    return (task_definition_arn or "?").rsplit("/", 1)[-1]


def sidecar_container_name(task_definition: dict[str, Any], container_name: str = CONTAINER_NAME) -> str | None:
    for c in task_definition.get("containerDefinitions") or []:
        if has_sidecar({"containerDefinitions": [c]}, container_name):
            return str(c.get("name"))
    return None


def task_issue(
    task: dict[str, Any],
    task_definition: dict[str, Any],
    *,
    management_type: str,
    tag: str,
    services: dict[str, ServiceState],
    container_name: str = CONTAINER_NAME,
) -> tuple[str | None, dict[str, Any]]:
    """GuardDuty's issue for one running task (None: it runs the sidecar), and the facts behind it."""
    td_name = family_revision(task.get("taskDefinitionArn"))
    group = str(task.get("group") or "")
    service = group.removeprefix("service:") if group.startswith("service:") else None
    detail: dict[str, Any] = {"group": group or None, "startedBy": task.get("startedBy")}
    if service is not None:
        detail["service"] = service
    sidecar = sidecar_container_name(task_definition, container_name)
    if sidecar is not None:
        container = next((c for c in task.get("containers") or [] if c.get("name") == sidecar), None)
        if container is None:
            return None, detail
        state = {
            "name": sidecar,
            "lastStatus": container.get("lastStatus"),
            "exitCode": container.get("exitCode"),
            "reason": container.get("reason"),
        }
        detail["sidecar"] = state
        if str(container.get("lastStatus") or "").upper() == "STOPPED":
            code = container.get("exitCode")
            reason = container.get("reason") or "ECS gave no reason"
            return f"{ISSUE_EXITED}: exit code {code if code is not None else 'none'}, reason: {reason}", detail
        return None, detail
    if management_type == DISABLED:
        why = f"the cluster is excluded by its tag {tag}=false"
    elif not task_definition.get("executionRoleArn"):
        why = (
            f"task definition {td_name} has no execution role: the sidecar's image pull and token secret need one "
            "(add executionRoleArn; runtime-manager check-roles checks what it may pull)"
        )
    elif service is None:
        started_by = task.get("startedBy") or "RunTask"
        why = (
            f"a standalone task (started by {started_by}, not a service) of task definition {td_name}, which has "
            "no sidecar: the manager updates services only; add the sidecar where the task is started "
            "(runtime-manager inject)"
        )
    elif service in services and services[service].has_sidecar:
        why = (
            f"the task started before service {service} got the sidecar "
            f"({family_revision(services[service].task_definition_arn)}); its new deployment replaces it"
        )
    elif service in services and services[service].problem:
        why = f"service {service} needs a new deployment: {services[service].problem}"
    elif management_type == MANUAL:
        why = f"task definition {td_name} has no sidecar and the cluster is not managed (tag {tag}=true manages it)"
    else:
        why = f"service {service} needs a new deployment with the sidecar (task definition {td_name} has none)"
    return f"{ISSUE_NOT_PROVISIONED}: {why}", detail


class TaskDefinitions:
    """DescribeTaskDefinition, once per ARN per run (every task of a service shares one)."""

    def __init__(self, ecs: Any, backoff: Backoff) -> None:
        self.ecs = ecs
        self.backoff = backoff
        self.cache: dict[str, dict[str, Any]] = {}

    def get(self, arn: str) -> dict[str, Any]:
        if arn not in self.cache:
            out = self.backoff.call(self.ecs.describe_task_definition, taskDefinition=arn, include=["TAGS"])
            td = dict(out["taskDefinition"])
            if out.get("tags"):
                td["tags"] = out["tags"]
            self.cache[arn] = td
        return self.cache[arn]


def running_tasks(ecs: Any, backoff: Backoff, cluster: str) -> Iterator[dict[str, Any]]:
    """The cluster's tasks that ECS wants running (ListTasks, then DescribeTasks by 100)."""
    arns = [
        a for page in backoff.pages(ecs.list_tasks, cluster=cluster, desiredStatus="RUNNING") for a in page["taskArns"]
    ]
    for i in range(0, len(arns), 100):
        out = backoff.call(ecs.describe_tasks, cluster=cluster, tasks=arns[i : i + 100])
        yield from out.get("tasks", [])


def collect_cluster(
    ecs: Any,
    backoff: Backoff,
    task_definitions: TaskDefinitions,
    cluster: ClusterReport,
    *,
    tag: str,
    services: dict[str, ServiceState],
    container_name: str = CONTAINER_NAME,
) -> ClusterReport:
    """Fill ``cluster.tasks`` from ECS (a cluster the manager does not manage is reported without tasks)."""
    if cluster.management_type not in (AUTO_MANAGED, DISABLED):
        return cluster
    for task in running_tasks(ecs, backoff, cluster.name):
        if str(task.get("lastStatus") or "").upper() in ("STOPPED", "DELETED", "DEPROVISIONING"):
            continue
        td_arn = task.get("taskDefinitionArn")
        td = task_definitions.get(td_arn) if td_arn else {}
        issue, detail = task_issue(
            task, td, management_type=cluster.management_type, tag=tag, services=services, container_name=container_name
        )
        cluster.tasks.append(
            TaskReport(
                task_arn=task["taskArn"],
                task_definition_arn=td_arn,
                launch_type=task.get("launchType"),
                last_status=task.get("lastStatus"),
                started_at_ms=epoch_ms(task.get("startedAt") or task.get("createdAt")),
                issue=issue,
                detail=detail,
            )
        )
    return cluster


# -- sending it to the backend --------------------------------------------------------------------------------------


class ReportError(Exception):
    """The backend refused or could not take the report; the message says why."""


def report_bodies(clusters: list[ClusterReport], per_request: int = TASKS_PER_REQUEST) -> list[dict[str, Any]]:
    """The report as request bodies of at most ``per_request`` tasks; the last names every cluster seen, so the
    backend forgets clusters that no longer exist. A cluster larger than one body goes in parts (append)."""
    bodies: list[dict[str, Any]] = []
    current: list[dict[str, Any]] = []
    room = per_request
    for c in clusters:
        tasks, append = c.tasks, False
        while True:
            if room == 0:
                bodies.append({"clusters": current})
                current, room = [], per_request
            part, tasks = tasks[:room], tasks[room:]
            current.append(c.wire(part, append=append))
            room -= len(part)
            append = True
            if not tasks:
                break
    bodies.append({"clusters": current})
    bodies[-1]["knownClusters"] = sorted(c.name for c in clusters)
    return bodies


class BackendReporter:
    """POSTs the control plane's view to the backend, signed with one of its access keys (SigV4)."""

    def __init__(
        self,
        backend_url: str,
        access_key_id: str,
        secret_access_key: str,
        region: str,
        *,
        timeout_s: float = 30.0,
        attempts: int = 3,
        tasks_per_request: int = TASKS_PER_REQUEST,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = backend_url.rstrip("/") + REPORT_PATH
        self.credentials = Credentials(access_key_id, secret_access_key)
        self.region = region
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.tasks_per_request = tasks_per_request
        self.sleep = sleep

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body, separators=(",", ":")).encode()
        # signed anew for every attempt: a signature is only good for a few minutes
        req = AWSRequest(method="POST", url=self.url, data=data, headers={"Content-Type": "application/json"})
        SigV4Auth(self.credentials, "guardduty", self.region).add_auth(req)
        prepared = urllib.request.Request(self.url, data=data, headers=dict(req.headers.items()), method="POST")
        with urllib.request.urlopen(prepared, timeout=self.timeout_s) as resp:
            out: dict[str, Any] = json.loads(resp.read() or b"{}")
            return out

    def send(self, clusters: list[ClusterReport]) -> dict[str, int]:
        totals = {"clusters": 0, "tasks": 0, "removedClusters": 0}
        for body in report_bodies(clusters, self.tasks_per_request):
            out = self._send_one(body)
            for k in totals:
                totals[k] += int(out.get(k) or 0)
        return totals

    def _send_one(self, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(1, self.attempts + 1):
            try:
                return self._post(body)
            except urllib.error.HTTPError as exc:
                payload = exc.read()
                try:
                    message = json.loads(payload).get("message") or payload.decode(errors="replace")
                except ValueError:
                    message = payload.decode(errors="replace")
                if exc.code < 500 and exc.code != 429:
                    raise ReportError(f"the backend refused the coverage report ({exc.code}): {message}") from None
                last = f"{exc.code}: {message}"
            except (urllib.error.URLError, OSError) as exc:
                last = str(getattr(exc, "reason", exc))
            if attempt < self.attempts:
                self.sleep(min(30.0, 2.0**attempt))
        raise ReportError(f"the backend at {self.url} did not take the coverage report: {last}")

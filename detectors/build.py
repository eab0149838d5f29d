"""Detection -> GuardDuty finding dict: identity, resource, process with lineage, context, evidence.

The identity (account, region, cluster, task) comes from the agent (ECS task
metadata v4, or the host in local mode) as a :class:`FindingScope`;
``detectors`` never imports the agent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from collectors.events import ContainerRef, iso_time
from detectors import catalog
from detectors.base import Detection, DetectorContext, process_details
from detectors.finding import SCHEMA_VERSION


@dataclass(frozen=True, slots=True)
class FindingScope:
    """Where findings come from: one task (or one host in local mode), and the agent that saw them."""

    account_id: str = "000000000000"
    region: str = "local"
    partition: str = "aws"
    cluster_name: str = "local"
    cluster_arn: str = "arn:aws:ecs:local:000000000000:cluster/local"
    task_arn: str = "arn:aws:ecs:local:000000000000:task/local/local"
    task_definition_arn: str | None = None
    task_version: str | None = None
    launch_type: str | None = None
    task_started_at: str | None = None
    agent_id: str = "local"
    agent_version: str = "0"
    detector_id: str | None = None
    # local mode: the agent watches a host, processes outside containers are the host's
    host_mode: bool = False
    # container images by container id, for findings whose ContainerRef lacks one
    images: dict[str, str] = field(default_factory=dict)

    @property
    def detector(self) -> str:
        # GuardDuty detector ids are 32 hex chars, one per account and region; the backend may own the real one.
        return self.detector_id or hashlib.md5(f"{self.account_id}/{self.region}".encode()).hexdigest()

    def container_details(self, ref: ContainerRef | None) -> dict[str, Any] | None:
        if ref is None:
            return None
        image = ref.image or (self.images.get(ref.id) if ref.id else None)
        out: dict[str, Any] = {"containerRuntime": "docker", "id": ref.id, "name": ref.name, "image": image}
        if image:
            out["imagePrefix"] = image.rsplit("@", 1)[0].rsplit(":", 1)[0] if "/" in image else image.split(":")[0]
        return {k: v for k, v in out.items() if v is not None}


def finding_id(scope: FindingScope, agg_key: tuple[Any, ...]) -> str:
    """Stable across agent restarts: the same activity in the same task is the same finding."""
    raw = orjson.dumps([scope.account_id, scope.task_arn, [str(k) for k in agg_key]])
    return hashlib.sha256(raw).hexdigest()[:32]


def template_fields(d: Detection, scope: FindingScope) -> dict[str, Any]:
    p = d.process
    where = d.where
    fields: dict[str, Any] = {
        "container": (where.name or where.id)
        if where is not None
        else ("(host)" if scope.host_mode else "(not identified)"),
        "task": scope.task_arn.rsplit("/", 1)[-1],
        "cluster": scope.cluster_name,
    }
    if p is not None:
        fields.update(process=f"{p.name}[{p.nspid}]", exe=p.executable_path, commandLine=p.command_line)
        fields["sha256"] = p.executable_sha256
    else:
        # network and DNS activity the kernel did not let us tie to a process (it was gone before we looked)
        fields.update(process="(unattributed)", exe="its socket was gone before it could be tied to a process")
    for k, v in d.context.items():
        if isinstance(v, dict) and k.endswith("Process"):
            fields[k] = f"{v.get('name')}[{v.get('namespacePid')}]"
        elif not isinstance(v, dict):
            fields[k] = v
    if d.evidence:
        fields["listName"] = d.evidence[0].list_name
        fields["threatNames"] = list(d.evidence[0].threat_names)
    fields.update(d.facts)
    return fields


def build_finding(
    d: Detection,
    ft: catalog.FindingType,
    scope: FindingScope,
    ctx: DetectorContext,
    *,
    fid: str,
    now: float,
) -> dict[str, Any]:
    when = iso_time(d.time if d.time is not None else now)
    stamp = iso_time(now)
    fields = template_fields(d, scope)
    task: dict[str, Any] = {"arn": scope.task_arn}
    if scope.task_definition_arn:
        task["definitionArn"] = scope.task_definition_arn
    if scope.task_version:
        task["version"] = scope.task_version
    if scope.launch_type:
        task["launchType"] = scope.launch_type
    if scope.task_started_at:
        task["startedAt"] = scope.task_started_at
    container = scope.container_details(d.where)
    if container is not None:
        task["containers"] = [container]
    runtime: dict[str, Any] = {}
    if d.process is not None:
        runtime["process"] = process_details(d.process, ctx.lineage(d.process))
    if d.context:
        runtime["context"] = d.context
    service: dict[str, Any] = {
        "serviceName": "guardduty",
        "featureName": "RuntimeMonitoring",
        "detectorId": scope.detector,
        "resourceRole": "TARGET",
        "archived": False,
        "count": 1,
        "eventFirstSeen": when,
        "eventLastSeen": when,
        "additionalInfo": {
            "type": "default",
            "value": orjson.dumps(
                {"agentDetails": {"agentId": scope.agent_id, "agentVersion": scope.agent_version}}
            ).decode(),
        },
        "runtimeDetails": runtime,
    }
    if d.action is not None:
        service["action"] = d.action
    if d.evidence:
        service["evidence"] = {"threatIntelligenceDetails": [e.to_json() for e in d.evidence]}
    return {
        "schemaVersion": SCHEMA_VERSION,
        "id": fid,
        "arn": f"arn:{scope.partition}:guardduty:{scope.region}:{scope.account_id}"
        f":detector/{scope.detector}/finding/{fid}",
        "type": ft.name,
        "severity": ft.severity_for(d.level),
        "title": catalog.render(ft.title, fields),
        "description": catalog.render(ft.description, fields),
        "createdAt": stamp,
        "updatedAt": stamp,
        "accountId": scope.account_id,
        "region": scope.region,
        "partition": scope.partition,
        "resource": {
            "resourceType": "ECSCluster",
            "ecsClusterDetails": {
                "name": scope.cluster_name,
                "arn": scope.cluster_arn,
                "status": "ACTIVE",
                "taskDetails": task,
            },
        },
        "service": service,
    }

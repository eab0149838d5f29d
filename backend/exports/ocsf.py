"""A finding as an OCSF Detection Finding (class 2004, category 2 "Findings"), for data lakes (Security Lake,
Athena, any OCSF-speaking SIEM). Used by the ``format = "ocsf"`` option of the S3 and webhook exporters.

Schema version 1.3.0 with the ``cloud`` and ``container`` profiles. The mapping, attribute by attribute
(GuardDuty's camelCase paths on the right; ``REQUIRED`` below is what :func:`check_detection_finding` checks):

====================================  ===========================================================================
OCSF attribute                        from the finding
====================================  ===========================================================================
class_uid / class_name                2004 "Detection Finding"
category_uid / category_name          2 "Findings"
activity_id / activity_name           3 "Close" when archived (``service.archived``), else 1 "Create" when
                                      ``createdAt == updatedAt`` (first report), else 2 "Update"
type_uid / type_name                  class_uid * 100 + activity_id, "Detection Finding: <activity>"
time                                  ``updatedAt`` (epoch ms)
severity_id / severity                GuardDuty's bands: < 4 Low (2), < 7 Medium (3), < 9 High (4), else
                                      Critical (5)
status_id / status                    3 "Suppressed" when archived, else 1 "New"
message                               ``title``
count / start_time / end_time         ``service.count``, ``service.eventFirstSeen``, ``service.eventLastSeen``
finding_info.uid / title / desc       ``id``, ``title``, ``description``
finding_info.types                    [``type``] (GuardDuty's exact type name)
finding_info.created_time /           ``createdAt`` / ``updatedAt``; first/last_seen_time: eventFirstSeen/LastSeen
  modified_time
finding_info.analytic                 {name: ``type``, type_id 1 "Rule"}
finding_info.attacks                  the ATT&CK tactic of the type's threat purpose (Execution, Persistence, ...),
                                      and the technique when the finding names one
                                      (``runtimeDetails.context.mitreTechniqueId``)
finding_info.product_uid              ``arn`` (GuardDuty-style finding ARN) when present
metadata.version / product / uid      "1.3.0", {name, vendor_name: "ecs-runtime-monitor", feature.name:
                                      ``service.featureName``}, ``id``; metadata.profiles ["cloud", "container"]
cloud                                 {provider "AWS", region, account {uid: ``accountId``, type_id 10 "AWS Account"}}
resources                             ECS cluster (AWS::ECS::Cluster, ``ecsClusterDetails.arn``/name), task
                                      (AWS::ECS::Task, ``taskDetails.arn``, labels family:rev), container
                                      (Container, id, name, image)
container                             the first container: {uid, name, image {name}, runtime}
evidences[0].process                  ``runtimeDetails.process``: pid, name, cmd_line, file {path, name,
                                      hashes SHA-256}, user {uid, name}, created_time, uid, parent_process
                                      (from ``lineage[0]``), lineage (executable paths, nearest first)
evidences[0].dst_endpoint             network connection: remote ip/port; DNS: domain (hostname)
evidences[0].connection_info          protocol_name, direction_id (1 inbound, 2 outbound)
evidences[0].query                    DNS request: {hostname, type "A"}
enrichments                           one per threat-intel match: {name "threatListName", value, type
                                      "threat_intel", data {threatNames}}
unmapped                              the GuardDuty fields with no OCSF home: detectorId, resourceRole,
                                      runtimeDetails.context, agentDetails
====================================  ===========================================================================

Every string in a finding is attacker-controlled (command lines, paths): it is copied as data, never interpreted.
"""

from __future__ import annotations

from typing import Any

import orjson

from backend.findings import dig, parse_time_ms

OCSF_VERSION = "1.3.0"
CLASS_UID, CLASS_NAME = 2004, "Detection Finding"
CATEGORY_UID, CATEGORY_NAME = 2, "Findings"
PRODUCT = {"name": "ecs-runtime-monitor", "vendor_name": "ecs-runtime-monitor"}
ACTIVITIES = {1: "Create", 2: "Update", 3: "Close"}

# GuardDuty's threat purpose -> ATT&CK tactic (name, uid). Purposes that are not a tactic map to the one their
# runtime types stand for, as the finding catalog tags them (Backdoor, Trojan: command and control; CryptoCurrency:
# impact, resource hijacking; UnauthorizedAccess: initial access).
TACTICS: dict[str, tuple[str, str]] = {
    "Backdoor": ("Command and Control", "TA0011"),
    "CryptoCurrency": ("Impact", "TA0040"),
    "DefenseEvasion": ("Defense Evasion", "TA0005"),
    "Discovery": ("Discovery", "TA0007"),
    "Execution": ("Execution", "TA0002"),
    "Exfiltration": ("Exfiltration", "TA0010"),
    "Impact": ("Impact", "TA0040"),
    "Persistence": ("Persistence", "TA0003"),
    "PrivilegeEscalation": ("Privilege Escalation", "TA0004"),
    "Recon": ("Reconnaissance", "TA0043"),
    "Stealth": ("Defense Evasion", "TA0005"),
    "Trojan": ("Command and Control", "TA0011"),
    "UnauthorizedAccess": ("Initial Access", "TA0001"),
    "CredentialAccess": ("Credential Access", "TA0006"),
}

# what check_detection_finding verifies: attribute path -> type
REQUIRED: dict[str, type | tuple[type, ...]] = {
    "class_uid": int,
    "category_uid": int,
    "activity_id": int,
    "type_uid": int,
    "time": int,
    "severity_id": int,
    "status_id": int,
    "metadata.version": str,
    "metadata.product.name": str,
    "metadata.product.vendor_name": str,
    "finding_info.uid": str,
    "finding_info.title": str,
    "finding_info.types": list,
    "finding_info.analytic.name": str,
    "cloud.provider": str,
    "cloud.region": str,
    "cloud.account.uid": str,
    "resources": list,
}


def severity_id(severity: float) -> tuple[int, str]:
    if severity < 4:
        return 2, "Low"
    if severity < 7:
        return 3, "Medium"
    if severity < 9:
        return 4, "High"
    return 5, "Critical"


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    """Without empty members: OCSF consumers treat absent and null alike, and the lines stay short."""
    out: dict[str, Any] = {}
    for k, value in d.items():
        v = _clean(value) if isinstance(value, dict) else value
        if v is None or v in ({}, []):
            continue
        out[k] = v
    return out


def _process(p: dict[str, Any] | None, *, depth: int = 0) -> dict[str, Any] | None:
    if not isinstance(p, dict):
        return None
    path = p.get("executablePath")
    out: dict[str, Any] = {
        "pid": p.get("pid"),
        "name": p.get("name"),
        "cmd_line": p.get("commandLine"),
        "uid": p.get("uuid"),
        "created_time": parse_time_ms(p.get("startTime")),
        "file": {
            "path": path,
            "name": path.rsplit("/", 1)[-1] if isinstance(path, str) else None,
            "type_id": 1,  # Regular File
            "hashes": (
                [{"algorithm_id": 3, "algorithm": "SHA-256", "value": p["executableSha256"]}]
                if p.get("executableSha256")
                else None
            ),
        }
        if path
        else None,
        "user": {"uid": str(p["userId"]), "name": p.get("user")} if p.get("userId") is not None else None,
    }
    lineage = p.get("lineage")
    if depth == 0 and isinstance(lineage, list) and lineage:
        out["parent_process"] = _process(lineage[0], depth=1)
        out["lineage"] = [a.get("executablePath") or a.get("name") or "?" for a in lineage if isinstance(a, dict)]
    return _clean(out)


def _activity(doc: dict[str, Any]) -> int:
    if dig(doc, "service", "archived"):
        return 3
    created, updated = parse_time_ms(doc.get("createdAt")), parse_time_ms(doc.get("updatedAt"))
    return 1 if created == updated and int(dig(doc, "service", "count") or 1) <= 1 else 2


def to_detection_finding(doc: dict[str, Any]) -> dict[str, Any]:
    """The OCSF Detection Finding of one finding (GetFindings' shape)."""
    service = doc.get("service") or {}
    ecs = dig(doc, "resource", "ecsClusterDetails") or {}
    task = ecs.get("taskDetails") or {}
    containers = [c for c in (task.get("containers") or []) if isinstance(c, dict)]
    region, account, partition = doc.get("region"), doc.get("accountId"), doc.get("partition", "aws")
    activity = _activity(doc)
    sev_id, sev = severity_id(float(doc.get("severity") or 0))
    archived = bool(service.get("archived"))
    ftype = str(doc.get("type") or "")
    purpose = ftype.split(":", 1)[0]
    context = dig(service, "runtimeDetails", "context") or {}

    attacks = []
    if purpose in TACTICS:
        tactic_name, tactic_uid = TACTICS[purpose]
        attack: dict[str, Any] = {"tactic": {"name": tactic_name, "uid": tactic_uid}, "version": "v15"}
        technique = context.get("mitreTechniqueId") if isinstance(context, dict) else None
        if isinstance(technique, str):
            attack["technique"] = {"uid": technique}
        attacks.append(attack)

    resources: list[dict[str, Any]] = []
    if ecs.get("arn") or ecs.get("name"):
        resources.append(
            {
                "type": "AWS::ECS::Cluster",
                "uid": ecs.get("arn") or ecs.get("name"),
                "name": ecs.get("name"),
                "region": region,
                "cloud_partition": partition,
            }
        )
    if task.get("arn"):
        family_rev = (task.get("definitionArn") or "").rsplit("task-definition/", 1)[-1] or None
        resources.append(
            {
                "type": "AWS::ECS::Task",
                "uid": task["arn"],
                "name": task["arn"].rsplit("/", 1)[-1],
                "region": region,
                "cloud_partition": partition,
                "labels": [f"taskDefinition:{family_rev}"] if family_rev else None,
            }
        )
    for c in containers:
        resources.append({"type": "Container", "uid": c.get("id") or c.get("name"), "name": c.get("name")})
    resources = [_clean(r) for r in resources]

    evidence: dict[str, Any] = {"process": _process(dig(service, "runtimeDetails", "process"))}
    action = service.get("action") or {}
    net = action.get("networkConnectionAction")
    if isinstance(net, dict):
        remote = net.get("remoteIpDetails") or {}
        evidence["dst_endpoint"] = {
            "ip": remote.get("ipAddressV4") or remote.get("ipAddressV6"),
            "port": dig(net, "remotePortDetails", "port"),
        }
        direction = {"INBOUND": 1, "OUTBOUND": 2}.get(str(net.get("connectionDirection")), 0)
        evidence["connection_info"] = {"protocol_name": (net.get("protocol") or "").lower() or None}
        if direction:
            evidence["connection_info"]["direction_id"] = direction
    dns = action.get("dnsRequestAction")
    if isinstance(dns, dict) and dns.get("domain"):
        evidence["query"] = {"hostname": dns["domain"], "type": "A"}
        evidence.setdefault("dst_endpoint", {})["domain"] = dns["domain"]
    evidences = [e for e in [_clean(evidence)] if e]

    enrichments = [
        {
            "name": "threatListName",
            "value": t.get("threatListName") or "unknown",
            "type": "threat_intel",
            "data": {"threatNames": t.get("threatNames") or []},
        }
        for t in (dig(service, "evidence", "threatIntelligenceDetails") or [])
        if isinstance(t, dict)
    ]

    agent = None
    info = dig(service, "additionalInfo", "value")
    if isinstance(info, str):
        try:
            agent = dig(orjson.loads(info), "agentDetails")
        except orjson.JSONDecodeError:
            agent = None

    first = containers[0] if containers else None
    event: dict[str, Any] = {
        "class_uid": CLASS_UID,
        "class_name": CLASS_NAME,
        "category_uid": CATEGORY_UID,
        "category_name": CATEGORY_NAME,
        "activity_id": activity,
        "activity_name": ACTIVITIES[activity],
        "type_uid": CLASS_UID * 100 + activity,
        "type_name": f"{CLASS_NAME}: {ACTIVITIES[activity]}",
        "time": parse_time_ms(doc.get("updatedAt")) or 0,
        "severity_id": sev_id,
        "severity": sev,
        "status_id": 3 if archived else 1,
        "status": "Suppressed" if archived else "New",
        "message": doc.get("title"),
        "count": service.get("count"),
        "start_time": parse_time_ms(service.get("eventFirstSeen")),
        "end_time": parse_time_ms(service.get("eventLastSeen")),
        "metadata": {
            "version": OCSF_VERSION,
            "uid": doc.get("id"),
            "profiles": ["cloud", "container"],
            "product": {**PRODUCT, "feature": {"name": service.get("featureName") or "RuntimeMonitoring"}},
        },
        "finding_info": {
            "uid": str(doc.get("id") or ""),
            "title": str(doc.get("title") or ftype),
            "desc": doc.get("description"),
            "types": [ftype],
            "product_uid": doc.get("arn"),
            "created_time": parse_time_ms(doc.get("createdAt")),
            "modified_time": parse_time_ms(doc.get("updatedAt")),
            "first_seen_time": parse_time_ms(service.get("eventFirstSeen")),
            "last_seen_time": parse_time_ms(service.get("eventLastSeen")),
            "analytic": {"name": ftype, "type_id": 1, "type": "Rule"},
            "attacks": attacks,
        },
        "cloud": {
            "provider": "AWS",
            "region": region,
            "account": {"uid": account, "type_id": 10, "type": "AWS Account"},
        },
        "resources": resources,
        "container": {
            "uid": first.get("id"),
            "name": first.get("name"),
            "image": {"name": first.get("image")},
            "runtime": first.get("containerRuntime"),
        }
        if first
        else None,
        "evidences": evidences,
        "enrichments": enrichments,
        "unmapped": {
            "detectorId": service.get("detectorId"),
            "resourceRole": service.get("resourceRole"),
            "runtimeContext": context or None,
            "agentDetails": agent,
        },
    }
    out = _clean(event)
    out["resources"] = resources  # required even when empty
    return out


def check_detection_finding(event: Any) -> list[str]:
    """What is wrong with an OCSF Detection Finding, against REQUIRED and the class's fixed values."""
    if not isinstance(event, dict):
        return ["not an object"]
    problems = []
    for path, kind in REQUIRED.items():
        value = dig(event, *path.split("."))
        if value is None:
            problems.append(f"{path}: missing")
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            problems.append(f"{path}: {type(value).__name__}, expected {getattr(kind, '__name__', kind)}")
    if problems:
        return problems
    if event["class_uid"] != CLASS_UID or event["category_uid"] != CATEGORY_UID:
        problems.append("class_uid/category_uid: not 2004/2")
    if event["activity_id"] not in ACTIVITIES:
        problems.append(f"activity_id: {event['activity_id']} is not 1, 2 or 3")
    if event["type_uid"] != CLASS_UID * 100 + event["activity_id"]:
        problems.append("type_uid: must be class_uid * 100 + activity_id")
    if event["severity_id"] not in (0, 1, 2, 3, 4, 5, 6, 99):
        problems.append(f"severity_id: {event['severity_id']} is not an OCSF severity")
    if event["status_id"] not in (0, 1, 2, 3, 4, 99):
        problems.append(f"status_id: {event['status_id']} is not an OCSF status")
    for i, r in enumerate(event["resources"]):
        if not isinstance(r, dict) or not r.get("uid") or not r.get("type"):
            problems.append(f"resources[{i}]: needs uid and type")
    return problems

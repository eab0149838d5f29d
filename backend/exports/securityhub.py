"""Security Hub: findings as ASFF (AwsSecurityFinding) through ``BatchImportFindings``, as GuardDuty sends them.

Sources for the mapping (GuardDuty User Guide, "Integrating with AWS Security Hub CSPM": the table "Interpreting
GuardDuty finding names", and "Typical finding from GuardDuty"):

- ``Types``: GuardDuty sends ``<namespace>/<category>/<ThreatPurpose>:<ResourceType>-<rest>``, the finding type with
  its "/" turned into "-" behind a category that depends on the type. ``RUNTIME_TYPE_CATEGORIES`` is that table's
  column for every Runtime type, as published (including its irregular spellings: "TTPs/DefenseEvasion" for two
  types, "Software and Configuration Checks" for PrivilegeEscalation:Runtime/SuspiciousCommand, "TTPs" alone for
  MetadataDNSRebind); a type not in the table gets its threat purpose's usual category (``PURPOSE_CATEGORIES``).
- ``Id`` is the finding's ARN and ``GeneratorId`` its detector's ARN, as in GuardDuty's example.
- ``Severity``: ``Product`` is the GuardDuty number, ``Label`` its band (LOW < 4 <= MEDIUM < 7 <= HIGH < 9 <=
  CRITICAL), ``Normalized`` the number times ten (8.0 -> 80, inside ASFF's HIGH range 70-89).
- ``ProductArn``: a self-hosted product cannot use GuardDuty's ``product/aws/guardduty``; findings are imported
  through the account's default product ``arn:aws:securityhub:<region>:<account>:product/<account>/default``.
- ``Resources``: the ECS cluster (``AwsEcsCluster``), the task (``AwsEcsTask``) and each container
  (``Container``), ids being the ARNs (a container: its runtime id).
- Archive state: GuardDuty itself does not tell Security Hub when a finding is archived; this exporter does
  (``archive_updates``, on by default): an archived finding is re-imported with ``RecordState: ARCHIVED``, an
  unarchived one with ``ACTIVE``. ``Workflow.Status`` is ``NEW`` on import; Security Hub leaves it to its users
  afterwards (BatchImportFindings does not change the workflow of an existing finding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from backend.exports.base import AwsExporter, Failure, Item, aws_error
from backend.exports.config import SecurityHubConfig
from backend.findings import dig

MAX_FINDINGS_PER_CALL = 100  # BatchImportFindings' limit
TITLE_MAX, DESCRIPTION_MAX = 256, 1024
PRODUCT_NAME, COMPANY_NAME = "ecs-runtime-monitor", "ecs-runtime-monitor"

RUNTIME_TYPE_CATEGORIES: dict[str, str] = {
    "Backdoor:Runtime/C&CActivity.B": "TTPs/Command and Control",
    "Backdoor:Runtime/C&CActivity.B!DNS": "TTPs/Command and Control",
    "CryptoCurrency:Runtime/BitcoinTool.B": "TTPs/Command and Control",
    "CryptoCurrency:Runtime/BitcoinTool.B!DNS": "TTPs/Command and Control",
    "DefenseEvasion:Runtime/FilelessExecution": "TTPs/Defense Evasion",
    "DefenseEvasion:Runtime/KernelModuleLoaded": "TTPs/Defense Evasion",
    "DefenseEvasion:Runtime/SensitiveFileModified": "TTPs/Defense Evasion",
    "DefenseEvasion:Runtime/ProcessInjection.Proc": "TTPs/Defense Evasion",
    "DefenseEvasion:Runtime/ProcessInjection.Ptrace": "TTPs/Defense Evasion",
    "DefenseEvasion:Runtime/ProcessInjection.VirtualMemoryWrite": "TTPs/Defense Evasion",
    "DefenseEvasion:Runtime/PtraceAntiDebugging": "TTPs/DefenseEvasion",
    "DefenseEvasion:Runtime/SuspiciousCommand": "TTPs/DefenseEvasion",
    "Discovery:Runtime/SuspiciousCommand": "TTPs/Discovery",
    "Execution:Runtime/MaliciousFileExecuted": "TTPs/Execution",
    "Execution:Runtime/NewBinaryExecuted": "TTPs/Execution",
    "Execution:Runtime/NewLibraryLoaded": "TTPs/Execution",
    "Execution:Runtime/ReverseShell": "TTPs/Execution",
    "Execution:Runtime/SuspiciousCommand": "TTPs/Execution",
    "Execution:Runtime/SuspiciousShellCreated": "TTPs/Execution",
    "Execution:Runtime/SuspiciousTool": "TTPs/Execution",
    "Impact:Runtime/AbusedDomainRequest.Reputation": "TTPs/Impact",
    "Impact:Runtime/BitcoinDomainRequest.Reputation": "TTPs/Impact",
    "Impact:Runtime/CryptoMinerExecuted": "TTPs/Impact",
    "Impact:Runtime/MaliciousDomainRequest.Reputation": "TTPs/Impact",
    "Impact:Runtime/SuspiciousDomainRequest.Reputation": "TTPs/Impact",
    "Persistence:Runtime/SuspiciousCommand": "TTPs/Persistence",
    "Persistence:Runtime/SensitiveFileModified": "TTPs/Persistence",
    "PrivilegeEscalation:Runtime/CGroupsReleaseAgentModified": "TTPs/Privilege Escalation",
    "PrivilegeEscalation:Runtime/ContainerMountsHostDirectory": "TTPs/Privilege Escalation",
    "PrivilegeEscalation:Runtime/DockerSocketAccessed": "TTPs/Privilege Escalation",
    "PrivilegeEscalation:Runtime/ElevationToRoot": "TTPs/Privilege Escalation",
    "PrivilegeEscalation:Runtime/RuncContainerEscape": "TTPs/Privilege Escalation",
    "PrivilegeEscalation:Runtime/SensitiveFileModified": "TTPs/Privilege Escalation",
    "PrivilegeEscalation:Runtime/SuspiciousCommand": "Software and Configuration Checks",
    "PrivilegeEscalation:Runtime/UserfaultfdUsage": "TTPs/Privilege Escalation",
    "Trojan:Runtime/BlackholeTraffic": "TTPs/Command and Control",
    "Trojan:Runtime/BlackholeTraffic!DNS": "TTPs/Command and Control",
    "Trojan:Runtime/DGADomainRequest.C!DNS": "TTPs/Command and Control",
    "Trojan:Runtime/DriveBySourceTraffic!DNS": "TTPs/Initial Access",
    "Trojan:Runtime/DropPoint": "Effects/Data Exfiltration",
    "Trojan:Runtime/DropPoint!DNS": "Effects/Data Exfiltration",
    "Trojan:Runtime/PhishingDomainRequest!DNS": "TTPs/Command and Control",
    "UnauthorizedAccess:Runtime/MetadataDNSRebind": "TTPs",
    "UnauthorizedAccess:Runtime/TorClient": "Effects/Resource Consumption",
    "UnauthorizedAccess:Runtime/TorRelay": "Effects/Resource Consumption",
}

# the category most of a threat purpose's types get in GuardDuty's table
PURPOSE_CATEGORIES: dict[str, str] = {
    "Backdoor": "TTPs/Command and Control",
    "Behavior": "Unusual Behaviors/VM",
    "CredentialAccess": "TTPs/Credential Access",
    "CryptoCurrency": "TTPs/Command and Control",
    "DefenseEvasion": "TTPs/Defense Evasion",
    "Discovery": "TTPs/Discovery",
    "Execution": "TTPs/Execution",
    "Exfiltration": "TTPs/Exfiltration",
    "Impact": "TTPs/Impact",
    "InitialAccess": "TTPs/Initial Access",
    "PenTest": "TTPs",
    "Persistence": "TTPs/Persistence",
    "Policy": "TTPs",
    "PrivilegeEscalation": "TTPs/Privilege Escalation",
    "Recon": "TTPs/Discovery",
    "Stealth": "TTPs/Defense Evasion",
    "Trojan": "TTPs/Command and Control",
    "UnauthorizedAccess": "TTPs",
}


def asff_type(finding_type: str) -> str:
    """GuardDuty's type as Security Hub shows it: Execution:Runtime/ReverseShell ->
    TTPs/Execution/Execution:Runtime-ReverseShell."""
    purpose = finding_type.split(":", 1)[0]
    category = RUNTIME_TYPE_CATEGORIES.get(finding_type) or PURPOSE_CATEGORIES.get(purpose, "TTPs")
    return f"{category}/{finding_type.replace('/', '-')}"


def severity(value: float) -> dict[str, Any]:
    if value < 4:
        label = "LOW"
    elif value < 7:
        label = "MEDIUM"
    elif value < 9:
        label = "HIGH"
    else:
        label = "CRITICAL"
    return {"Product": float(value), "Label": label, "Normalized": max(0, min(100, round(value * 10)))}


def _clip(value: Any, n: int) -> str:
    s = str(value or "")
    return s if len(s) <= n else s[: n - 1] + "…"


def _resources(doc: dict[str, Any]) -> list[dict[str, Any]]:
    region, partition = doc.get("region"), doc.get("partition", "aws")
    ecs = dig(doc, "resource", "ecsClusterDetails") or {}
    task = ecs.get("taskDetails") or {}
    out: list[dict[str, Any]] = []
    common = {"Partition": partition, "Region": region}
    if ecs.get("arn") or ecs.get("name"):
        cluster: dict[str, Any] = {
            "ClusterName": ecs.get("name"),
            "ClusterArn": ecs.get("arn"),
            "Status": ecs.get("status"),
        }
        out.append(
            {
                "Type": "AwsEcsCluster",
                "Id": ecs.get("arn") or ecs.get("name"),
                **common,
                "Details": {"AwsEcsCluster": {k: v for k, v in cluster.items() if v}},
            }
        )
    containers = [c for c in (task.get("containers") or []) if isinstance(c, dict)]
    if task.get("arn"):
        details: dict[str, Any] = {
            "ClusterArn": ecs.get("arn"),
            "TaskDefinitionArn": task.get("definitionArn"),
            "Version": task.get("version"),
            "CreatedAt": task.get("createdAt"),
            "StartedAt": task.get("startedAt"),
            "StartedBy": task.get("startedBy"),
            "Group": task.get("group"),
            "Containers": [
                {k: v for k, v in {"Name": c.get("name"), "Image": c.get("image")}.items() if v} for c in containers
            ],
        }
        out.append(
            {
                "Type": "AwsEcsTask",
                "Id": task["arn"],
                **common,
                "Details": {"AwsEcsTask": {k: v for k, v in details.items() if v}},
            }
        )
    for c in containers:
        privileged = dig(c, "securityContext", "privileged")
        details = {
            "ContainerRuntime": c.get("containerRuntime"),
            "Name": c.get("name"),
            "ImageName": c.get("image"),
            "Privileged": privileged if isinstance(privileged, bool) else None,
        }
        out.append(
            {
                "Type": "Container",
                "Id": c.get("id") or f"{task.get('arn') or ecs.get('name')}/{c.get('name')}",
                **common,
                "Details": {"Container": {k: v for k, v in details.items() if v is not None}},
            }
        )
    if not out:  # Security Hub requires one resource; a finding without ECS details still names its account
        out.append({"Type": "Other", "Id": f"AWS::::Account:{doc.get('accountId')}", **common})
    return out


def to_asff(doc: dict[str, Any], *, region: str, product_account: str | None = None) -> dict[str, Any]:
    """The AwsSecurityFinding of a finding (GetFindings' shape), imported into ``region``'s hub."""
    service = doc.get("service") or {}
    account = str(doc.get("accountId"))
    partition = doc.get("partition", "aws")
    detector = service.get("detectorId") or "unknown"
    detector_arn = f"arn:{partition}:guardduty:{doc.get('region')}:{account}:detector/{detector}"
    finding_arn = doc.get("arn") or f"{detector_arn}/finding/{doc.get('id')}"
    product = product_account or account
    archived = bool(service.get("archived"))
    out: dict[str, Any] = {
        "SchemaVersion": "2018-10-08",
        "Id": finding_arn,
        "ProductArn": f"arn:{partition}:securityhub:{region}:{product}:product/{product}/default",
        "ProductName": PRODUCT_NAME,
        "CompanyName": COMPANY_NAME,
        "GeneratorId": detector_arn,
        "AwsAccountId": account,
        "Types": [asff_type(str(doc.get("type")))],
        "CreatedAt": doc.get("createdAt"),
        "UpdatedAt": doc.get("updatedAt"),
        "Severity": severity(float(doc.get("severity") or 0)),
        "Title": _clip(doc.get("title") or doc.get("type"), TITLE_MAX),
        "Description": _clip(doc.get("description") or doc.get("title") or doc.get("type"), DESCRIPTION_MAX),
        "ProductFields": {
            k: str(v)[:4096]
            for k, v in {
                "aws/guardduty/type": doc.get("type"),
                "aws/guardduty/service/count": service.get("count"),
                "aws/guardduty/service/archived": str(archived).lower(),
                "aws/guardduty/service/detectorId": service.get("detectorId"),
                "aws/guardduty/service/featureName": service.get("featureName"),
                "aws/guardduty/service/resourceRole": service.get("resourceRole"),
                "aws/guardduty/id": doc.get("id"),
            }.items()
            if v is not None
        },
        "Resources": _resources(doc),
        "Workflow": {"Status": "NEW"},
        "RecordState": "ARCHIVED" if archived else "ACTIVE",
    }
    for key, value in (
        ("FirstObservedAt", service.get("eventFirstSeen")),
        ("LastObservedAt", service.get("eventLastSeen")),
    ):
        if value:
            out[key] = value
    process = dig(service, "runtimeDetails", "process")
    if isinstance(process, dict):
        p = {
            "Name": process.get("name"),
            "Path": process.get("executablePath"),
            "Pid": process.get("pid"),
            "ParentPid": dig(process, "lineage", 0, "pid"),
            "LaunchedAt": process.get("startTime"),
        }
        out["Process"] = {k: _clip(v, 512) if isinstance(v, str) else v for k, v in p.items() if v is not None}
    action = service.get("action") or {}
    net = action.get("networkConnectionAction")
    network: dict[str, Any] = {}
    if isinstance(net, dict):
        remote = net.get("remoteIpDetails") or {}
        direction = {"INBOUND": "IN", "OUTBOUND": "OUT"}.get(str(net.get("connectionDirection")))
        network = {
            "Direction": direction,
            "Protocol": net.get("protocol"),
            "DestinationIpV4": remote.get("ipAddressV4"),
            "DestinationIpV6": remote.get("ipAddressV6"),
            "DestinationPort": dig(net, "remotePortDetails", "port"),
        }
    dns = action.get("dnsRequestAction")
    if isinstance(dns, dict) and dns.get("domain"):
        network.update(Direction="OUT", Protocol=dns.get("protocol"), DestinationDomain=dns["domain"])
    network = {k: v for k, v in network.items() if v is not None}
    if network:
        out["Network"] = network
    indicators = []
    for t in dig(service, "evidence", "threatIntelligenceDetails") or []:
        if not isinstance(t, dict):
            continue
        value, kind = network.get("DestinationDomain"), "DOMAIN"
        if value is None:
            value = network.get("DestinationIpV4") or network.get("DestinationIpV6")
            kind = "IPV4_ADDRESS" if network.get("DestinationIpV4") else "IPV6_ADDRESS"
        if value is None:
            continue
        indicators.append({"Type": kind, "Value": value, "Source": t.get("threatListName") or "unknown"})
    if indicators:
        out["ThreatIntelIndicators"] = indicators[:5]
    return {k: v for k, v in out.items() if v is not None}


class SecurityHubExporter(AwsExporter):
    type = "securityhub"
    service = "securityhub"
    config: SecurityHubConfig

    def format(self, finding: dict[str, Any]) -> dict[str, Any]:
        return to_asff(finding, region=self.config.region, product_account=self.config.product_account)

    async def export(self, items: Sequence[Item]) -> list[Failure]:
        failures: list[Failure] = []
        for start in range(0, len(items), MAX_FINDINGS_PER_CALL):
            chunk = list(items[start : start + MAX_FINDINGS_PER_CALL])
            try:
                resp = await self.call("batch_import_findings", Findings=[i.body for i in chunk])
            except Exception as exc:
                msg, retryable = aws_error(exc)
                failures += [Failure(i, msg, retryable) for i in chunk]
                continue
            by_id = {i.body.get("Id"): i for i in chunk}
            for failed in resp.get("FailedFindings") or []:
                item = by_id.get(failed.get("Id"))
                if item is None:
                    continue
                code = str(failed.get("ErrorCode") or "")
                retryable = code in ("ThrottlingException", "InternalException", "ServiceUnavailable")
                failures.append(Failure(item, f"{code}: {failed.get('ErrorMessage')}", retryable))
        return failures

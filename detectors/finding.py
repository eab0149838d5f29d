"""The GuardDuty runtime finding (schema 2.0) as pydantic models, camelCase as ``GetFindings`` returns it.

Field names follow botocore's ``guardduty`` service model (the wire names,
``locationName``), so what the sidecar writes, the backend stores and boto3
parses are one shape. Our additions, where GuardDuty has no field but a
responder needs one, are marked "ours" and are optional: ``commandLine`` and
``user`` in process and lineage entries, and free fields in ``context``.

The sidecar builds findings as plain dicts (fast); these models validate them
at the edges: the backend's ingest and the tests.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "2.0"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class LineageObject(_Model):
    startTime: str | None = None
    namespacePid: int | None = None
    userId: int | None = None
    name: str | None = None
    pid: int | None = None
    uuid: str | None = None
    executablePath: str | None = None
    euid: int | None = None
    parentUuid: str | None = None
    commandLine: str | None = None  # ours
    user: str | None = None  # ours


class ProcessDetails(_Model):
    name: str | None = None
    executablePath: str | None = None
    executableSha256: str | None = None
    namespacePid: int | None = None
    pwd: str | None = None
    pid: int | None = None
    startTime: str | None = None
    uuid: str | None = None
    parentUuid: str | None = None
    user: str | None = None
    userId: int | None = None
    euid: int | None = None
    lineage: list[LineageObject] | None = None
    commandLine: str | None = None  # ours


class RuntimeContext(BaseModel):
    """GuardDuty's RuntimeContext fields; other keys are allowed (our per-type additions)."""

    model_config = ConfigDict(extra="allow")

    modifyingProcess: ProcessDetails | None = None
    modifiedAt: str | None = None
    scriptPath: str | None = None
    libraryPath: str | None = None
    ldPreloadValue: str | None = None
    socketPath: str | None = None
    runcBinaryPath: str | None = None
    releaseAgentPath: str | None = None
    mountSource: str | None = None
    mountTarget: str | None = None
    fileSystemType: str | None = None
    flags: list[str] | None = None
    moduleName: str | None = None
    moduleFilePath: str | None = None
    moduleSha256: str | None = None
    shellHistoryFilePath: str | None = None
    targetProcess: ProcessDetails | None = None
    addressFamily: str | None = None
    ianaProtocolNumber: int | None = None
    memoryRegions: list[str] | None = None
    toolName: str | None = None
    toolCategory: str | None = None
    serviceName: str | None = None
    commandLineExample: str | None = None
    threatFilePath: str | None = None


class RuntimeDetails(_Model):
    process: ProcessDetails | None = None
    context: RuntimeContext | None = None


class ThreatIntelligenceDetail(_Model):
    threatListName: str | None = None
    threatNames: list[str] | None = None
    threatFileSha256: str | None = None


class Evidence(_Model):
    threatIntelligenceDetails: list[ThreatIntelligenceDetail] | None = None


class PortDetails(_Model):
    port: int | None = None
    portName: str | None = None


class IpDetails(_Model):
    ipAddressV4: str | None = None
    ipAddressV6: str | None = None


class NetworkConnectionAction(_Model):
    blocked: bool | None = None
    connectionDirection: str | None = None
    localPortDetails: PortDetails | None = None
    protocol: str | None = None
    localIpDetails: IpDetails | None = None
    remoteIpDetails: IpDetails | None = None
    remotePortDetails: PortDetails | None = None


class DnsRequestAction(_Model):
    domain: str | None = None
    protocol: str | None = None
    blocked: bool | None = None
    domainWithSuffix: str | None = None


class Action(_Model):
    actionType: str | None = None
    networkConnectionAction: NetworkConnectionAction | None = None
    dnsRequestAction: DnsRequestAction | None = None


class AdditionalInfo(_Model):
    value: str | None = None
    type: str | None = None


class Service(_Model):
    action: Action | None = None
    evidence: Evidence | None = None
    archived: bool | None = None
    count: int = Field(ge=1)
    detectorId: str | None = None
    eventFirstSeen: str
    eventLastSeen: str
    resourceRole: str | None = None
    serviceName: str = "guardduty"
    featureName: str | None = None
    additionalInfo: AdditionalInfo | None = None
    runtimeDetails: RuntimeDetails | None = None


class SecurityContext(_Model):
    privileged: bool | None = None
    allowPrivilegeEscalation: bool | None = None


class ContainerDetails(_Model):
    containerRuntime: str | None = None
    id: str | None = None
    name: str | None = None
    image: str | None = None
    imagePrefix: str | None = None
    securityContext: SecurityContext | None = None


class EcsTaskDetails(_Model):
    arn: str | None = None
    definitionArn: str | None = None
    version: str | None = None
    createdAt: str | None = None
    startedAt: str | None = None
    startedBy: str | None = None
    containers: list[ContainerDetails] | None = None
    group: str | None = None
    launchType: str | None = None


class EcsClusterDetails(_Model):
    name: str | None = None
    arn: str | None = None
    status: str | None = None
    taskDetails: EcsTaskDetails | None = None


class Resource(_Model):
    resourceType: str
    ecsClusterDetails: EcsClusterDetails | None = None
    containerDetails: ContainerDetails | None = None


class Finding(_Model):
    schemaVersion: Literal["2.0"] = "2.0"
    id: str = Field(min_length=1, max_length=300)
    arn: str | None = None
    type: str = Field(min_length=1, max_length=200)
    severity: float = Field(ge=0, le=10)
    title: str
    description: str
    createdAt: str
    updatedAt: str
    accountId: str = Field(pattern=r"^\d{12}$")
    region: str
    partition: str = "aws"
    confidence: float | None = None
    resource: Resource
    service: Service

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Finding:
        return cls.model_validate(data)

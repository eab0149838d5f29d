"""The path from a task to the collector: an interface VPC endpoint per VPC, with a security group for it.

Tasks in private subnets reach the backend's collector API through AWS PrivateLink: the backend's operator exposes
it as a VPC endpoint service (an NLB), and each VPC whose services the manager covers gets one interface endpoint
to it, in one subnet per availability zone the services use, behind a security group that lets the VPC's own
addresses in on TCP 443. That is GuardDuty's design for its own agent, and its failure reasons are reported the
same way: a VPC without ``enableDnsSupport`` and ``enableDnsHostnames`` cannot resolve the endpoint's private DNS
name, so nothing is created there and coverage shows "VPC endpoint creation failed: ..." for its clusters.

Everything created is tagged ``runtime-monitor:managed=true``; an endpoint to the same service that someone else
made is used as it is and never deleted. ``runtime-manager cleanup`` deletes only what carries the tag, endpoints
first and then (once their network interfaces are gone) the security groups, so that a stack can delete its VPC.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from backend.manager.aws import Backoff, error_code

log = logging.getLogger("backend.manager.network")

MANAGED_TAG_KEY = "runtime-monitor:managed"
MANAGED_TAG_VALUE = "true"
SECURITY_GROUP_NAME = "runtime-monitor-collector-endpoint"
COLLECTOR_PORT = 443
# Endpoint states that will never carry traffic again: such an endpoint is not reused (a new one is made).
GONE_STATES = frozenset({"deleted", "deleting", "failed", "rejected", "expired"})
ISSUE_PREFIX = "VPC endpoint creation failed"


def managed_tags(name: str) -> list[dict[str, str]]:
    return [{"Key": MANAGED_TAG_KEY, "Value": MANAGED_TAG_VALUE}, {"Key": "Name", "Value": name}]


def _is_managed(resource: dict[str, Any]) -> bool:
    return any(
        t.get("Key") == MANAGED_TAG_KEY and t.get("Value") == MANAGED_TAG_VALUE for t in resource.get("Tags", [])
    )


def all_endpoints(ec2: Any, backoff: Backoff, filters: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The region's VPC endpoints (a few per VPC), filtered here by VPC and service: not every EC2 implementation
    takes the vpc-id and service-name filters, every one returns the fields."""
    kwargs: dict[str, Any] = {"Filters": filters} if filters else {}
    return [
        e
        for page in backoff.pages(ec2.describe_vpc_endpoints, token_in="NextToken", **kwargs)
        for e in page.get("VpcEndpoints", [])
    ]


@dataclass
class VpcEndpointPlan:
    """One VPC's endpoint: what exists, what would be (or was) created, or why it cannot be."""

    vpc_id: str
    clusters: list[str]
    subnet_ids: list[str] = field(default_factory=list)  # one per availability zone, for a new endpoint
    # "exists" (reused), "create" (plan), "created", or "failed" (reason says why)
    action: str = "create"
    endpoint_id: str | None = None
    security_group_id: str | None = None
    managed: bool = True  # False: someone else's endpoint, used as it is
    private_dns: bool = False
    reason: str | None = None

    @property
    def issue(self) -> str | None:
        """The cluster issue coverage shows for this VPC's clusters (GuardDuty's wording), if creation failed."""
        return f"{ISSUE_PREFIX}: {self.vpc_id}: {self.reason}" if self.action == "failed" else None

    def wire(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class EndpointService:
    name: str
    private_dns_name: str | None
    availability_zones: set[str]


class VpcEndpoints:
    """Plans and creates the collector's interface endpoints (see the module's docstring)."""

    def __init__(self, ec2: Any, backoff: Backoff, service_name: str) -> None:
        self.ec2 = ec2
        self.backoff = backoff
        self.service_name = service_name
        self._service: EndpointService | None = None

    # -- reading ------------------------------------------------------------------------------------------------
    def endpoint_service(self) -> EndpointService | str:
        """The endpoint service's details, or why it cannot be used."""
        if self._service is not None:
            return self._service
        try:
            out = self.backoff.call(self.ec2.describe_vpc_endpoint_services, ServiceNames=[self.service_name])
        except ClientError as exc:
            if error_code(exc) == "InvalidServiceName":
                return (
                    f"the endpoint service {self.service_name} does not exist in this region or does not allow "
                    "this account (add it to the service's allowed principals)"
                )
            raise
        details = [d for d in out.get("ServiceDetails", []) if d.get("ServiceName") == self.service_name]
        if not details:
            return f"the endpoint service {self.service_name} is not available to this account"
        d = details[0]
        self._service = EndpointService(
            self.service_name, d.get("PrivateDnsName") or None, set(d.get("AvailabilityZones") or [])
        )
        return self._service

    def _existing_endpoint(self, vpc_id: str, endpoints: list[dict[str, Any]]) -> dict[str, Any] | None:
        """A usable endpoint to the service in the VPC, ours first, else anyone's."""
        found = [
            e
            for e in endpoints
            if e.get("VpcId") == vpc_id
            and e.get("ServiceName") == self.service_name
            and str(e.get("State", "")).lower() not in GONE_STATES
        ]
        found.sort(key=lambda e: (not _is_managed(e), e["VpcEndpointId"]))
        return found[0] if found else None

    def _dns_problem(self, vpc_id: str) -> str | None:
        off = []
        for attribute, key in (("enableDnsSupport", "EnableDnsSupport"), ("enableDnsHostnames", "EnableDnsHostnames")):
            out = self.backoff.call(self.ec2.describe_vpc_attribute, VpcId=vpc_id, Attribute=attribute)
            if not (out.get(key) or {}).get("Value"):
                off.append(attribute)
        if not off:
            return None
        fixes = " and ".join(
            f"aws ec2 modify-vpc-attribute --vpc-id {vpc_id} "
            + ("--enable-dns-support" if a == "enableDnsSupport" else "--enable-dns-hostnames")
            for a in off
        )
        return (
            f"{' and '.join(off)} {'is' if len(off) == 1 else 'are'} off; an interface endpoint's private DNS needs "
            f"both enableDnsSupport and enableDnsHostnames ({fixes})"
        )

    def _subnets(self, subnet_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        ids = sorted(set(subnet_ids))
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(ids), 100):
            try:
                page = self.backoff.call(self.ec2.describe_subnets, SubnetIds=ids[i : i + 100])
            except ClientError as exc:
                if error_code(exc) != "InvalidSubnetID.NotFound":
                    raise
                # one deleted subnet must not hide the others: ask one by one
                page = {"Subnets": []}
                for sid in ids[i : i + 100]:
                    try:
                        page["Subnets"] += self.backoff.call(self.ec2.describe_subnets, SubnetIds=[sid])["Subnets"]
                    except ClientError as inner:
                        if error_code(inner) != "InvalidSubnetID.NotFound":
                            raise
                        log.warning("subnet of a service not found", extra={"subnet": sid})
            for s in page.get("Subnets", []):
                out[s["SubnetId"]] = s
        return out

    def plan(self, subnets_by_cluster: dict[str, set[str]]) -> list[VpcEndpointPlan]:
        """What each VPC of these services' subnets has or needs (read-only)."""
        subnets = self._subnets(s for ids in subnets_by_cluster.values() for s in ids)
        by_vpc: dict[str, VpcEndpointPlan] = {}
        azs: dict[str, dict[str, str]] = {}  # vpc -> az -> first subnet (sorted ids: stable from run to run)
        for cluster in sorted(subnets_by_cluster):
            for sid in sorted(subnets_by_cluster[cluster]):
                s = subnets.get(sid)
                if s is None:
                    continue
                vpc = s["VpcId"]
                p = by_vpc.setdefault(vpc, VpcEndpointPlan(vpc, []))
                if cluster not in p.clusters:
                    p.clusters.append(cluster)
                azs.setdefault(vpc, {}).setdefault(s["AvailabilityZone"], sid)
        plans = [by_vpc[v] for v in sorted(by_vpc)]
        endpoints = all_endpoints(self.ec2, self.backoff) if plans else []
        for p in plans:
            existing = self._existing_endpoint(p.vpc_id, endpoints)
            if existing is not None:
                p.action, p.endpoint_id, p.managed = "exists", existing["VpcEndpointId"], _is_managed(existing)
                p.private_dns = bool(existing.get("PrivateDnsEnabled"))
                groups = existing.get("Groups") or []
                p.security_group_id = groups[0]["GroupId"] if groups else None
                continue
            service = self.endpoint_service()
            if isinstance(service, str):
                p.action, p.reason = "failed", service
                continue
            dns = self._dns_problem(p.vpc_id)
            if dns is not None:
                p.action, p.reason = "failed", dns
                continue
            by_az = azs.get(p.vpc_id, {})
            usable = {
                az: sid
                for az, sid in by_az.items()
                if not service.availability_zones or az in service.availability_zones
            }
            if not usable:
                p.action = "failed"
                p.reason = (
                    f"the services' subnets are in {', '.join(sorted(by_az))}, where the endpoint service "
                    f"{service.name} is not offered ({', '.join(sorted(service.availability_zones))})"
                )
                continue
            p.subnet_ids = [usable[az] for az in sorted(usable)]
            p.private_dns = service.private_dns_name is not None
            p.security_group_id = self._managed_security_group(p.vpc_id)
        return plans

    def _managed_security_group(self, vpc_id: str) -> str | None:
        out = self.backoff.call(
            self.ec2.describe_security_groups,
            Filters=[
                {"Name": "vpc-id", "Values": [vpc_id]},
                {"Name": "group-name", "Values": [SECURITY_GROUP_NAME]},
                {"Name": f"tag:{MANAGED_TAG_KEY}", "Values": [MANAGED_TAG_VALUE]},
            ],
        )
        groups = out.get("SecurityGroups", [])
        return str(groups[0]["GroupId"]) if groups else None

    # -- changing -----------------------------------------------------------------------------------------------
    def _vpc_cidrs(self, vpc_id: str) -> list[str]:
        vpc = self.backoff.call(self.ec2.describe_vpcs, VpcIds=[vpc_id])["Vpcs"][0]
        cidrs = [
            a["CidrBlock"]
            for a in vpc.get("CidrBlockAssociationSet") or []
            if (a.get("CidrBlockState") or {}).get("State", "associated") == "associated"
        ]
        return sorted(set(cidrs or [vpc["CidrBlock"]]))

    def _create_security_group(self, vpc_id: str) -> str:
        group_id = str(
            self.backoff.call(
                self.ec2.create_security_group,
                GroupName=SECURITY_GROUP_NAME,
                Description="runtime-monitor: HTTPS from this VPC to the collector's interface endpoint",
                VpcId=vpc_id,
                TagSpecifications=[{"ResourceType": "security-group", "Tags": managed_tags(SECURITY_GROUP_NAME)}],
            )["GroupId"]
        )
        self.backoff.call(
            self.ec2.authorize_security_group_ingress,
            GroupId=group_id,
            IpPermissions=[
                {
                    "IpProtocol": "tcp",
                    "FromPort": COLLECTOR_PORT,
                    "ToPort": COLLECTOR_PORT,
                    "IpRanges": [
                        {"CidrIp": cidr, "Description": "tasks of this VPC to the runtime-monitor collector"}
                        for cidr in self._vpc_cidrs(vpc_id)
                    ],
                }
            ],
        )
        log.info("security group created", extra={"vpc": vpc_id, "group": group_id})
        return group_id

    def ensure(self, plans: list[VpcEndpointPlan]) -> list[VpcEndpointPlan]:
        """Create what ``plans`` says to create; a VPC whose creation fails gets the reason, the others go on."""
        for p in plans:
            if p.action != "create":
                continue
            try:
                if p.security_group_id is None:
                    p.security_group_id = self._create_security_group(p.vpc_id)
                endpoint = self.backoff.call(
                    self.ec2.create_vpc_endpoint,
                    VpcEndpointType="Interface",
                    VpcId=p.vpc_id,
                    ServiceName=self.service_name,
                    SubnetIds=p.subnet_ids,
                    SecurityGroupIds=[p.security_group_id],
                    PrivateDnsEnabled=p.private_dns,
                    # the same token on every retry of this call: a throttled retry cannot make a second endpoint
                    ClientToken=f"runtime-monitor-{uuid.uuid4().hex}",
                    TagSpecifications=[
                        {"ResourceType": "vpc-endpoint", "Tags": managed_tags(f"runtime-monitor-{p.vpc_id}")}
                    ],
                )["VpcEndpoint"]
            except ClientError as exc:
                err = exc.response.get("Error", {})
                p.action, p.reason = "failed", f"{err.get('Code')}: {err.get('Message')}"
                log.warning("VPC endpoint creation failed", extra={"vpc": p.vpc_id, "reason": p.reason})
                continue
            p.action, p.endpoint_id = "created", endpoint["VpcEndpointId"]
            log.info("VPC endpoint created", extra={"vpc": p.vpc_id, "endpoint": p.endpoint_id})
        return plans


# -- cleanup ------------------------------------------------------------------------------------------------------


@dataclass
class CleanupResult:
    endpoints_deleted: list[str] = field(default_factory=list)
    security_groups_deleted: list[str] = field(default_factory=list)
    # what could not be deleted, and why (a security group someone attached elsewhere, a timeout)
    failures: dict[str, str] = field(default_factory=dict)

    def wire(self) -> dict[str, Any]:
        return {
            "endpointsDeleted": self.endpoints_deleted,
            "securityGroupsDeleted": self.security_groups_deleted,
            "failures": self.failures,
        }


def cleanup(
    ec2: Any,
    backoff: Backoff,
    *,
    vpc_ids: list[str] | None = None,
    wait_s: float = 600.0,
    poll_s: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> CleanupResult:
    """Delete the managed endpoints, wait until they are gone, then delete the managed security groups.

    A security group cannot be deleted while an endpoint's network interface uses it (DependencyViolation), and
    an endpoint takes a while to go: the groups are retried until ``wait_s`` has passed.
    """
    result = CleanupResult()
    tag_filter = [{"Name": f"tag:{MANAGED_TAG_KEY}", "Values": [MANAGED_TAG_VALUE]}]

    def ours(resource: dict[str, Any]) -> bool:
        # the tag filter again: an EC2 that ignored it must not make cleanup delete someone else's resources
        return _is_managed(resource) and (not vpc_ids or resource.get("VpcId") in vpc_ids)

    endpoints = [
        e["VpcEndpointId"]
        for e in all_endpoints(ec2, backoff, tag_filter)
        if ours(e) and str(e.get("State", "")).lower() != "deleted"
    ]
    for i in range(0, len(endpoints), 25):
        batch = endpoints[i : i + 25]
        out = backoff.call(ec2.delete_vpc_endpoints, VpcEndpointIds=batch)
        failed = {
            str(u.get("ResourceId")): f"{u.get('Error', {}).get('Code')}: {u.get('Error', {}).get('Message')}"
            for u in out.get("Unsuccessful", [])
        }
        result.failures.update(failed)
        result.endpoints_deleted += [e for e in batch if e not in failed]
    deadline = clock() + wait_s
    pending = set(result.endpoints_deleted)
    while pending:
        pending = {
            e["VpcEndpointId"]
            for e in all_endpoints(ec2, backoff, tag_filter)
            if e["VpcEndpointId"] in pending and str(e.get("State", "")).lower() != "deleted"
        }
        if not pending or clock() >= deadline:
            break
        sleep(poll_s)
    for e in sorted(pending):
        result.failures[e] = f"still deleting after {wait_s:g} s"
    groups = [
        g["GroupId"]
        for page in backoff.pages(ec2.describe_security_groups, token_in="NextToken", Filters=tag_filter)
        for g in page.get("SecurityGroups", [])
        if ours(g)
    ]
    for gid in groups:
        while True:
            try:
                backoff.call(ec2.delete_security_group, GroupId=gid)
                result.security_groups_deleted.append(gid)
                break
            except ClientError as exc:
                if error_code(exc) == "InvalidGroup.NotFound":
                    break
                if error_code(exc) != "DependencyViolation" or clock() >= deadline:
                    result.failures[gid] = f"{error_code(exc)}: {exc.response.get('Error', {}).get('Message')}"
                    break
                sleep(poll_s)
    return result

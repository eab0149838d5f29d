"""The collector's interface VPC endpoints: created once per VPC and reused, refused with the reason, cleaned up.

moto in server mode (tests/moto_server.py) with a real endpoint service (an NLB offered through
CreateVpcEndpointServiceConfiguration); the clusters and services come from tests/test_manager_automation.py's
EcsWorld.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from test_manager_automation import EcsWorld, ecs_world, settings

from backend.manager.aws import Backoff
from backend.manager.network import (
    MANAGED_TAG_KEY,
    SECURITY_GROUP_NAME,
    VpcEndpoints,
    cleanup,
)

if TYPE_CHECKING:
    from moto_server import MotoEndpoint


@pytest.fixture
def world(moto_endpoint: MotoEndpoint) -> Iterator[EcsWorld]:
    yield from ecs_world(moto_endpoint)


def endpoints(world: EcsWorld, vpc: str) -> list[dict[str, Any]]:
    return [
        e
        for e in world.ec2.describe_vpc_endpoints()["VpcEndpoints"]
        if e["VpcId"] == vpc and e["State"].lower() != "deleted"
    ]


def tags(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def managed_groups(world: EcsWorld, vpc: str) -> list[dict[str, Any]]:
    groups = world.ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["SecurityGroups"]
    return [g for g in groups if g["GroupName"] == SECURITY_GROUP_NAME]


def test_one_endpoint_per_vpc_created_once_and_reused(world: EcsWorld) -> None:
    service_name = world.endpoint_service()
    vpc, subnets, sg = world.vpc()
    other_vpc, other_subnets, other_sg = world.vpc()
    world.cluster("prod")
    world.cluster("staging")
    # two services of prod in both zones of one VPC, staging's in the same VPC and in another one
    world.service("prod", "web", world.task_definition("web", awsvpc=True), subnets, sg)
    world.service("prod", "api", world.task_definition("api", awsvpc=True), subnets[:1], sg)
    world.service("staging", "web", world.task_definition("sweb", awsvpc=True), subnets[1:], sg)
    world.service("staging", "jobs", world.task_definition("jobs", awsvpc=True), other_subnets, other_sg)
    world.service("staging", "bridge", world.task_definition("bridge"))  # no awsvpc: no VPC of its own
    manager = world.manager(settings(endpoint_service_name=service_name))

    out = manager.run_once()
    plans = {p["vpc_id"]: p for p in out["vpcEndpoints"]}
    assert set(plans) == {vpc, other_vpc}
    assert plans[vpc]["action"] == "created" and plans[vpc]["clusters"] == ["prod", "staging"]
    assert plans[other_vpc]["action"] == "created" and plans[other_vpc]["clusters"] == ["staging"]
    (ep,) = endpoints(world, vpc)
    assert ep["VpcEndpointId"] == plans[vpc]["endpoint_id"]
    assert ep["ServiceName"] == service_name and ep["VpcEndpointType"] == "Interface"
    assert sorted(ep["SubnetIds"]) == sorted(subnets)  # one per zone the services use
    assert ep["PrivateDnsEnabled"] is True  # the service has a private DNS name: the collector URL just works
    assert tags(ep)[MANAGED_TAG_KEY] == "true"
    (group,) = managed_groups(world, vpc)
    assert [g["GroupId"] for g in ep["Groups"]] == [group["GroupId"]]
    assert tags(group)[MANAGED_TAG_KEY] == "true"
    (rule,) = group["IpPermissions"]
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 443, 443)
    cidr = world.ec2.describe_vpcs(VpcIds=[vpc])["Vpcs"][0]["CidrBlock"]
    assert [r["CidrIp"] for r in rule["IpRanges"]] == [cidr]
    assert len(endpoints(world, other_vpc)) == 1

    # the next run finds them: nothing new
    again = world.manager(settings(endpoint_service_name=service_name)).run_once()
    assert {p["vpc_id"]: p["action"] for p in again["vpcEndpoints"]} == {vpc: "exists", other_vpc: "exists"}
    assert again["changes"] == 0
    assert len(endpoints(world, vpc)) == 1 and len(managed_groups(world, vpc)) == 1
    assert {p["vpc_id"]: p["endpoint_id"] for p in again["vpcEndpoints"]} == {
        v: p["endpoint_id"] for v, p in plans.items()
    }


def test_plan_says_what_it_would_create(world: EcsWorld) -> None:
    service_name = world.endpoint_service(private_dns=False)
    vpc, subnets, sg = world.vpc()
    world.cluster("prod")
    world.service("prod", "web", world.task_definition("web", awsvpc=True), subnets, sg)
    (p,) = world.manager(settings(endpoint_service_name=service_name)).survey().endpoints or []
    assert (p.action, p.vpc_id, p.clusters, p.private_dns) == ("create", vpc, ["prod"], False)
    assert sorted(p.subnet_ids) == sorted(subnets)
    assert endpoints(world, vpc) == [] and managed_groups(world, vpc) == []


def test_a_vpc_without_dns_hostnames_gets_nothing_and_the_reason(world: EcsWorld) -> None:
    service_name = world.endpoint_service()
    vpc, subnets, sg = world.vpc(dns_hostnames=False)
    good_vpc, good_subnets, good_sg = world.vpc()
    world.cluster("legacy")
    world.cluster("prod")
    world.service("legacy", "web", world.task_definition("web", awsvpc=True), subnets, sg)
    world.service("prod", "web", world.task_definition("pweb", awsvpc=True), good_subnets, good_sg)
    manager = world.manager(settings(endpoint_service_name=service_name))
    out = manager.run_once()
    plans = {p["vpc_id"]: p for p in out["vpcEndpoints"]}
    assert plans[good_vpc]["action"] == "created"  # one VPC's problem does not stop the others
    bad = plans[vpc]
    assert bad["action"] == "failed" and "endpoint_id" not in bad
    assert bad["reason"].startswith("enableDnsHostnames is off")
    assert f"aws ec2 modify-vpc-attribute --vpc-id {vpc} --enable-dns-hostnames" in bad["reason"]
    assert endpoints(world, vpc) == [] and managed_groups(world, vpc) == []
    # coverage: a cluster issue of the legacy cluster, GuardDuty's words first
    cov = {c["clusterName"]: c for c in out["coverage"]}
    assert cov["legacy"]["issue"] == f"VPC endpoint creation failed: {vpc}: {bad['reason']}"
    assert cov["prod"]["issue"] is None

    # both attributes off: both named
    vpc2, subnets2, sg2 = world.vpc(dns_hostnames=False, dns_support=False)
    world.service("legacy", "api", world.task_definition("api", awsvpc=True), subnets2, sg2)
    plan = {p.vpc_id: p for p in world.manager(settings(endpoint_service_name=service_name)).survey().endpoints or []}
    assert (plan[vpc2].reason or "").startswith("enableDnsSupport and enableDnsHostnames are off")

    # the attribute fixed: the next run creates it
    world.ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
    again = {
        p["vpc_id"]: p for p in world.manager(settings(endpoint_service_name=service_name)).run_once()["vpcEndpoints"]
    }
    assert again[vpc]["action"] == "created" and len(endpoints(world, vpc)) == 1


def test_an_unknown_endpoint_service_is_a_reason_not_a_crash(world: EcsWorld) -> None:
    vpc, subnets, sg = world.vpc()
    world.cluster("prod")
    world.service("prod", "web", world.task_definition("web", awsvpc=True), subnets, sg)
    missing = "com.amazonaws.vpce.us-east-1.vpce-svc-0123456789abcdef0"
    out = world.manager(settings(endpoint_service_name=missing)).run_once()
    (p,) = out["vpcEndpoints"]
    assert p["action"] == "failed" and missing in p["reason"] and "does not exist" in p["reason"]
    assert out["coverage"][0]["issue"].startswith(f"VPC endpoint creation failed: {vpc}: the endpoint service")
    assert endpoints(world, vpc) == []


def test_someone_elses_endpoint_is_used_and_never_deleted(world: EcsWorld) -> None:
    service_name = world.endpoint_service()
    vpc, subnets, sg = world.vpc()
    world.cluster("prod")
    world.service("prod", "web", world.task_definition("web", awsvpc=True), subnets, sg)
    theirs = world.ec2.create_vpc_endpoint(
        VpcEndpointType="Interface", VpcId=vpc, ServiceName=service_name, SubnetIds=subnets, SecurityGroupIds=[sg]
    )["VpcEndpoint"]["VpcEndpointId"]
    out = world.manager(settings(endpoint_service_name=service_name)).run_once()
    (p,) = out["vpcEndpoints"]
    assert (p["action"], p["endpoint_id"], p["managed"]) == ("exists", theirs, False)
    assert len(endpoints(world, vpc)) == 1 and managed_groups(world, vpc) == []
    result = cleanup(world.ec2, Backoff(sleep=lambda s: None), wait_s=0)
    assert result.endpoints_deleted == [] and result.security_groups_deleted == []
    assert [e["VpcEndpointId"] for e in endpoints(world, vpc)] == [theirs]


def test_cleanup_removes_only_what_the_manager_created(world: EcsWorld, moto_endpoint: MotoEndpoint) -> None:
    service_name = world.endpoint_service()
    vpc, subnets, sg = world.vpc()
    other_vpc, other_subnets, other_sg = world.vpc()
    world.cluster("prod")
    world.service("prod", "web", world.task_definition("web", awsvpc=True), subnets, sg)
    world.service("prod", "api", world.task_definition("api", awsvpc=True), other_subnets, other_sg)
    world.manager(settings(endpoint_service_name=service_name)).run_once()
    ours = {v: endpoints(world, v)[0]["VpcEndpointId"] for v in (vpc, other_vpc)}
    our_groups = {v: managed_groups(world, v)[0]["GroupId"] for v in (vpc, other_vpc)}
    # a look-alike the user made by hand: same group name, no tag (and another VPC's endpoint of theirs)
    lookalike_vpc, _, _ = world.vpc()
    lookalike = world.ec2.create_security_group(
        GroupName=SECURITY_GROUP_NAME, Description="made by hand", VpcId=lookalike_vpc
    )["GroupId"]
    theirs = world.ec2.create_vpc_endpoint(
        VpcEndpointType="Interface", VpcId=lookalike_vpc, ServiceName=service_name, SecurityGroupIds=[lookalike]
    )["VpcEndpoint"]["VpcEndpointId"]

    # restricted to one VPC first, through the command; throttled on the way (EC2's own error code)
    moto_endpoint.throttle("DeleteVpcEndpoints", 1, "RequestLimitExceeded")
    waits: list[float] = []
    only = cleanup(world.ec2, Backoff(sleep=waits.append), vpc_ids=[vpc], wait_s=5, poll_s=0, sleep=lambda s: None)
    assert only.endpoints_deleted == [ours[vpc]] and only.security_groups_deleted == [our_groups[vpc]]
    assert only.failures == {} and len(waits) == 1
    assert endpoints(world, vpc) == [] and managed_groups(world, vpc) == []
    assert len(endpoints(world, other_vpc)) == 1

    from backend.manager import cli

    assert cli.main([*moto_endpoint.cli_args(), "cleanup", "--wait", "5"]) == 0
    assert endpoints(world, other_vpc) == [] and managed_groups(world, other_vpc) == []
    assert [e["VpcEndpointId"] for e in endpoints(world, lookalike_vpc)] == [theirs]
    assert [g["GroupId"] for g in managed_groups(world, lookalike_vpc)] == [lookalike]
    # nothing of ours is left in the VPC: the stack can delete it
    for s in subnets:
        world.ec2.delete_subnet(SubnetId=s)
    world.ec2.delete_security_group(GroupId=sg)
    world.ec2.delete_vpc(VpcId=vpc)
    # cleaning up again is a no-op
    again = cleanup(world.ec2, Backoff(sleep=lambda s: None), wait_s=0)
    assert (again.endpoints_deleted, again.security_groups_deleted, again.failures) == ([], [], {})


class StubbornEc2:
    """EC2 as seen while endpoints take their time to go: the first describes still show them deleting, and a
    security group in use refuses deletion (DependencyViolation) until then. Wraps the real moto client."""

    def __init__(self, ec2: Any, describes_before_gone: int) -> None:
        self.ec2 = ec2
        self.left = describes_before_gone
        self.deleted: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ec2, name)

    def delete_vpc_endpoints(self, **kw: Any) -> Any:
        self.deleted |= set(kw["VpcEndpointIds"])
        return self.ec2.delete_vpc_endpoints(**kw)

    def describe_vpc_endpoints(self, **kw: Any) -> Any:
        out = self.ec2.describe_vpc_endpoints(**kw)
        if self.deleted and self.left > 0:
            self.left -= 1
            for e in out["VpcEndpoints"]:
                if e["VpcEndpointId"] in self.deleted:
                    e["State"] = "deleting"
        return out

    def delete_security_group(self, **kw: Any) -> Any:
        if self.left > 0:
            from botocore.exceptions import ClientError

            raise ClientError(
                {"Error": {"Code": "DependencyViolation", "Message": "resource has a dependent object"}},
                "DeleteSecurityGroup",
            )
        return self.ec2.delete_security_group(**kw)


def test_cleanup_waits_for_endpoints_to_go_before_deleting_their_groups(world: EcsWorld) -> None:
    service_name = world.endpoint_service()
    vpc, subnets, sg = world.vpc()
    world.cluster("prod")
    world.service("prod", "web", world.task_definition("web", awsvpc=True), subnets, sg)
    world.manager(settings(endpoint_service_name=service_name)).run_once()
    clock = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        clock[0] += s

    ec2 = StubbornEc2(world.ec2, describes_before_gone=3)
    result = cleanup(ec2, Backoff(sleep=lambda s: None), wait_s=60, poll_s=5, sleep=sleep, clock=lambda: clock[0])
    assert result.failures == {} and len(result.endpoints_deleted) == 1 and len(result.security_groups_deleted) == 1
    assert sleeps == [5, 5, 5]
    # an endpoint that never goes: cleanup gives up at the deadline and says so
    world.manager(settings(endpoint_service_name=service_name)).run_once()
    clock[0] = 0.0
    ec2 = StubbornEc2(world.ec2, describes_before_gone=1000)
    result = cleanup(ec2, Backoff(sleep=lambda s: None), wait_s=20, poll_s=5, sleep=sleep, clock=lambda: clock[0])
    (eid,) = result.failures.keys() - {g["GroupId"] for g in managed_groups(world, vpc)}
    assert result.failures[eid] == "still deleting after 20 s"
    assert any(v.startswith("DependencyViolation") for v in result.failures.values())


def test_plan_reads_subnets_once_and_survives_a_deleted_one(world: EcsWorld) -> None:
    service_name = world.endpoint_service()
    vpc, subnets, sg = world.vpc()
    world.cluster("prod")
    world.service("prod", "web", world.task_definition("web", awsvpc=True), subnets, sg)
    extra = world.ec2.create_subnet(VpcId=vpc, CidrBlock=_free_cidr(world, vpc))
    sid = extra["Subnet"]["SubnetId"]
    world.service("prod", "api", world.task_definition("api", awsvpc=True), [sid], sg)
    world.ec2.delete_subnet(SubnetId=sid)
    (p,) = VpcEndpoints(world.ec2, Backoff(sleep=lambda s: None), service_name).plan({"prod": {*subnets, sid}})
    assert p.vpc_id == vpc and p.action == "create" and sorted(p.subnet_ids) == sorted(subnets)


def _free_cidr(world: EcsWorld, vpc: str) -> str:
    cidr: str = world.ec2.describe_vpcs(VpcIds=[vpc])["Vpcs"][0]["CidrBlock"]
    return cidr.rsplit(".", 2)[0] + ".200.0/24"

"""runtime-manager run / plan: GuardDuty's cluster tag semantics, services rolled onto the sidecar, throttling.

AWS is moto in server mode (tests/moto_server.py), driven over HTTP by the same boto3 calls production makes.
:class:`EcsWorld` builds clusters, services, VPCs and an endpoint service the way a user's account has them;
tests/test_manager_network.py and tests/test_control_plane_coverage.py use it too.

moto limits worth knowing when reading these tests: UpdateService records a new deployment (a new id) but keeps the
deployment's old taskDefinition (the service's taskDefinition is the new one, as in ECS); services launch no tasks
(the tests start them with RunTask in the service's group, as ECS's scheduler would); RunTask fails for awsvpc task
definitions, so task definitions that tasks run from use the default network mode.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.config import Config

from backend.coverage import AUTO_MANAGED, DISABLED, MANUAL
from backend.manager import aws, cli
from backend.manager.automation import (
    DEFAULT_TAG_KEY,
    Manager,
    ManagerSettings,
    SettingsError,
    cluster_management,
    load_settings,
)
from backend.manager.aws import Backoff, ThrottledError
from backend.manager.inject import SidecarSpec, has_sidecar, inject
from backend.manager.network import MANAGED_TAG_KEY

if TYPE_CHECKING:
    from moto_server import MotoEndpoint

ROOT = Path(__file__).resolve().parent.parent
MANAGER = [sys.executable, "-m", "backend.manager.cli"]
ACCOUNT, REGION = "123456789012", "us-east-1"
IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/runtime-sidecar:0.1.0"
COLLECTOR = "https://collector.example.com"
SECRET_TEMPLATE = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:runtime-sidecar/{{cluster}}"
EXECUTION_ROLE = f"arn:aws:iam::{ACCOUNT}:role/ecsTaskExecutionRole"


def settings(**over: Any) -> ManagerSettings:
    return ManagerSettings(image=IMAGE, collector_url=COLLECTOR, token_secret_arn=SECRET_TEMPLATE, **over)


def spec(cluster: str) -> SidecarSpec:
    return settings().sidecar_spec(cluster, REGION)


_SESSION: list[boto3.session.Session] = []


def shared_session() -> boto3.session.Session:
    """One boto3 session for every test: each new session parses the ECS and EC2 models again (about a second)."""
    if not _SESSION:
        _SESSION.append(boto3.session.Session(region_name=REGION))
    return _SESSION[0]


class EcsWorld:
    """A user's account in moto: clusters, task definitions, services, VPCs, the collector's endpoint service."""

    def __init__(self, moto: MotoEndpoint) -> None:
        self.moto = moto
        self.session = shared_session()
        self.ecs = self.client("ecs")
        self.ec2 = self.client("ec2")
        self._cidr = 10
        self.execution_role("ecsTaskExecutionRole")

    def execution_role(self, name: str, *, can_pull: bool = True) -> str:
        """A task execution role as users make it: ECR pull (as AWS's managed policy grants it), the token secrets."""
        iam = self.client("iam")
        trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                 "Principal": {"Service": "ecs-tasks.amazonaws.com"}}]}  # fmt: skip
        arn = str(iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"])
        if can_pull:  # what AWS's AmazonECSTaskExecutionRolePolicy grants for images
            pull = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Resource": "*", "Action": [
                "ecr:GetAuthorizationToken", "ecr:BatchCheckLayerAvailability", "ecr:GetDownloadUrlForLayer",
                "ecr:BatchGetImage"]}]}  # fmt: skip
            iam.put_role_policy(RoleName=name, PolicyName="pull", PolicyDocument=json.dumps(pull))
        secrets = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "secretsmanager:GetSecretValue",
                   "Resource": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:runtime-sidecar/*"}]}  # fmt: skip
        iam.put_role_policy(RoleName=name, PolicyName="tokens", PolicyDocument=json.dumps(secrets))
        return arn

    def client(self, service: str) -> Any:
        return self.session.client(
            service, endpoint_url=self.moto.url, config=Config(retries={"total_max_attempts": 1})
        )

    @functools.cached_property
    def elbv2(self) -> Any:
        return self.client("elbv2")

    # -- network ---------------------------------------------------------------------------------------------------
    def vpc(self, *, dns_hostnames: bool = True, dns_support: bool = True) -> tuple[str, list[str], str]:
        """A VPC (id, one subnet in each of two zones, a security group for the app)."""
        self._cidr += 1
        vpc = self.ec2.create_vpc(CidrBlock=f"10.{self._cidr}.0.0/16")["Vpc"]["VpcId"]
        self.ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": dns_hostnames})
        self.ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsSupport={"Value": dns_support})
        subnets = [
            self.ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.{self._cidr}.{i}.0/24", AvailabilityZone=az)["Subnet"][
                "SubnetId"
            ]
            for i, az in enumerate(("us-east-1a", "us-east-1b"), start=1)
        ]
        sg = self.ec2.create_security_group(GroupName="app", Description="the app", VpcId=vpc)["GroupId"]
        return vpc, subnets, sg

    def endpoint_service(self, *, private_dns: bool = True) -> str:
        """The collector behind an NLB, offered as a VPC endpoint service (what the backend's operator sets up)."""
        _, subnets, _ = self.vpc()
        lb = self.elbv2.create_load_balancer(Name="collector", Subnets=subnets, Type="network", Scheme="internal")
        extra = {"PrivateDnsName": "collector.example.com"} if private_dns else {}
        cfg = self.ec2.create_vpc_endpoint_service_configuration(
            NetworkLoadBalancerArns=[lb["LoadBalancers"][0]["LoadBalancerArn"]], AcceptanceRequired=False, **extra
        )
        return str(cfg["ServiceConfiguration"]["ServiceName"])

    # -- ECS -------------------------------------------------------------------------------------------------------
    def cluster(self, name: str, tag: str | None = None, key: str = DEFAULT_TAG_KEY) -> str:
        tags = [{"key": key, "value": tag}] if tag is not None else []
        return str(self.ecs.create_cluster(clusterName=name, tags=tags)["cluster"]["clusterArn"])

    def task_definition(
        self,
        family: str,
        *,
        sidecar_for: str | None = None,
        execution_role: bool = True,
        awsvpc: bool = False,
        fargate: bool = True,
    ) -> str:
        """A Fargate app task definition; ``sidecar_for``: with the sidecar as `inject` adds it for that cluster.

        ``fargate=False`` for one that tasks run from: moto makes every Fargate task definition awsvpc."""
        doc: dict[str, Any] = {
            "family": family,
            "cpu": "256",
            "memory": "512",
            "containerDefinitions": [
                {"name": "app", "image": "public.ecr.aws/docker/library/nginx:1.27", "memory": 256, "essential": True}
            ],
        }
        if fargate:
            doc["requiresCompatibilities"] = ["FARGATE"]
        if awsvpc:
            doc["networkMode"] = "awsvpc"
        if execution_role:
            doc["executionRoleArn"] = EXECUTION_ROLE
        if sidecar_for is not None:
            doc = inject(doc, spec(sidecar_for))
        return str(self.ecs.register_task_definition(**doc)["taskDefinition"]["taskDefinitionArn"])

    def service(
        self,
        cluster: str,
        name: str,
        task_definition: str,
        subnets: list[str] | None = None,
        sg: str | None = None,
        **kw: Any,
    ) -> dict[str, Any]:
        if subnets is not None:
            kw["networkConfiguration"] = {
                "awsvpcConfiguration": {"subnets": subnets, "securityGroups": [sg], "assignPublicIp": "DISABLED"}
            }
        out: dict[str, Any] = self.ecs.create_service(
            cluster=cluster,
            serviceName=name,
            taskDefinition=task_definition,
            desiredCount=2,
            launchType="FARGATE",
            **kw,
        )["service"]
        return out

    def describe_service(self, cluster: str, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self.ecs.describe_services(cluster=cluster, services=[name])["services"][0]
        return out

    def run_task(self, cluster: str, task_definition: str, *, group: str | None = None, started_by: str = "") -> str:
        kw: dict[str, Any] = {"group": group} if group else {}
        out = self.ecs.run_task(
            cluster=cluster, taskDefinition=task_definition, launchType="FARGATE", startedBy=started_by, **kw
        )
        return str(out["tasks"][0]["taskArn"])

    def revisions(self, family: str) -> list[str]:
        return list(self.ecs.list_task_definitions(familyPrefix=family)["taskDefinitionArns"])

    def manager(self, cfg: ManagerSettings, *, backoff: Backoff | None = None, reporter: Any = None) -> Manager:
        aws_cfg = self.moto.config()
        return Manager(
            cfg,
            ecs=aws.client(aws_cfg, "ecs", self.session),
            ec2=aws.client(aws_cfg, "ec2", self.session),
            region=REGION,
            backoff=backoff or Backoff(sleep=lambda s: None),
            reporter=reporter,
            iam=aws.client(aws_cfg, "iam", self.session),
        )


def ecs_world(moto_endpoint: MotoEndpoint) -> Iterator[EcsWorld]:
    """The ``world`` fixture of the manager's test modules: an EcsWorld whose tasks stay RUNNING."""

    # moto moves a task on to DEACTIVATING, STOPPING... at every DescribeTasks unless told the moves are manual
    def transition(path: str, body: dict[str, Any]) -> None:
        req = urllib.request.Request(moto_endpoint.url + path, data=json.dumps(body).encode(), method="POST")
        urllib.request.urlopen(req, timeout=10).read()

    manual = {"progression": "manual", "times": 1_000_000}
    transition("/moto-api/state-manager/set-transition", {"model_name": "ecs::task", "transition": manual})
    try:
        yield EcsWorld(moto_endpoint)
    finally:
        transition("/moto-api/state-manager/unset-transition", {"model_name": "ecs::task"})


@pytest.fixture
def world(moto_endpoint: MotoEndpoint) -> Iterator[EcsWorld]:
    yield from ecs_world(moto_endpoint)


def by_name(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["clusterName"]: c for c in out["clusters"]}


# -- the tag's semantics ----------------------------------------------------------------------------------------


def test_cluster_management_follows_guardduty_tag_semantics() -> None:
    key = DEFAULT_TAG_KEY
    on = {
        (): AUTO_MANAGED,
        ((key, "true"),): AUTO_MANAGED,
        ((key, "TRUE"),): AUTO_MANAGED,
        ((key, "false"),): DISABLED,
        ((key, " False "),): DISABLED,
        ((key, "yes"),): AUTO_MANAGED,  # neither true nor false: as if untagged
        (("GuardDutyManaged", "false"),): AUTO_MANAGED,  # another key is not ours
    }
    off = {
        (): MANUAL,
        ((key, "true"),): AUTO_MANAGED,
        ((key, "false"),): DISABLED,
        ((key, "yes"),): MANUAL,
    }
    for automation, table in ((True, on), (False, off)):
        for tags, expected in table.items():
            mtype, why = cluster_management(dict(tags), key, automation)
            assert mtype == expected, (automation, tags, why)
    assert "neither true nor false" in cluster_management({key: "yes"}, key, True)[1]
    assert cluster_management({"Team-Managed": "false"}, "Team-Managed", True)[0] == DISABLED


def test_automation_on_rolls_every_cluster_but_the_excluded_and_a_second_run_changes_nothing(world: EcsWorld) -> None:
    _, subnets, sg = world.vpc()
    clusters = {"prod": None, "canary": "true", "billing": "false"}
    before: dict[str, dict[str, Any]] = {}
    for name, tag in clusters.items():
        world.cluster(name, tag)
        td = world.task_definition(f"{name}-web", awsvpc=True)
        before[name] = world.service(name, "web", td, subnets, sg)
    manager = world.manager(settings())

    out = manager.run_once()
    assert out["changes"] == 2 and out["reported"] is None and out["vpcEndpoints"] is None
    plans = by_name(out)
    assert {n: c["managementType"] for n, c in plans.items()} == {
        "billing": DISABLED,
        "canary": AUTO_MANAGED,
        "prod": AUTO_MANAGED,
    }
    assert plans["billing"]["services"] == []  # an excluded cluster's services are not even looked at
    for name in ("prod", "canary"):
        (svc,) = plans[name]["services"]
        assert svc["action"] == "injected" and svc["newTaskDefinition"] == f"{name}-web:2", svc
        now = world.describe_service(name, "web")
        new_arn = now["taskDefinition"]
        assert new_arn.endswith(f"task-definition/{name}-web:2")
        # a new deployment of the service (moto keeps the old ARN in the deployment itself; ECS has the new one)
        assert now["deployments"][0]["id"] != before[name]["deployments"][0]["id"]
        described = world.ecs.describe_task_definition(taskDefinition=new_arn, include=["TAGS"])
        td = described["taskDefinition"]
        assert has_sidecar(td) and td["pidMode"] == "task" and td["executionRoleArn"] == EXECUTION_ROLE
        (sidecar,) = [c for c in td["containerDefinitions"] if c["name"] == "runtime-sidecar"]
        # each cluster's sidecar reads its own cluster's token
        assert sidecar["secrets"] == [
            {"name": "RUNTIME_SIDECAR_TOKEN", "valueFrom": SECRET_TEMPLATE.replace("{cluster}", name)}
        ]
        assert {"key": MANAGED_TAG_KEY, "value": "true"} in described["tags"]
    # the excluded cluster: not a call that changes anything
    assert world.describe_service("billing", "web")["taskDefinition"] == before["billing"]["taskDefinition"]
    assert len(world.revisions("billing-web")) == 1

    again = world.manager(settings()).run_once()
    assert again["changes"] == 0
    assert [s["action"] for c in again["clusters"] for s in c["services"]] == ["none", "none"]
    assert len(world.revisions("prod-web")) == 2 and len(world.revisions("canary-web")) == 2


def test_automation_off_rolls_only_clusters_tagged_true(world: EcsWorld) -> None:
    for name, tag in {"prod": None, "canary": "true", "billing": "false", "odd": "maybe"}.items():
        world.cluster(name, tag)
        world.service(name, "web", world.task_definition(f"{name}-web"))
    out = world.manager(settings(automation=False)).run_once()
    plans = by_name(out)
    assert {n: c["managementType"] for n, c in plans.items()} == {
        "billing": DISABLED,
        "canary": AUTO_MANAGED,
        "odd": MANUAL,
        "prod": MANUAL,
    }
    assert out["changes"] == 1
    assert world.describe_service("canary", "web")["taskDefinition"].endswith("canary-web:2")
    for name in ("prod", "billing", "odd"):
        assert world.describe_service(name, "web")["taskDefinition"].endswith(f"{name}-web:1"), name
        assert len(world.revisions(f"{name}-web")) == 1


def test_a_custom_tag_key(world: EcsWorld) -> None:
    world.cluster("prod", "false", key="SecurityAgent")
    world.cluster("dev", "false")  # our default key: not the one configured
    for name in ("prod", "dev"):
        world.service(name, "web", world.task_definition(f"{name}-web"))
    out = world.manager(settings(tag_key="SecurityAgent")).run_once()
    assert {n: c["managementType"] for n, c in by_name(out).items()} == {"dev": AUTO_MANAGED, "prod": DISABLED}
    assert len(world.revisions("prod-web")) == 1 and len(world.revisions("dev-web")) == 2


def test_services_that_cannot_be_rolled_are_left_alone_with_the_reason(world: EcsWorld) -> None:
    world.cluster("prod")
    shared = world.task_definition("shared")
    world.service("prod", "a", shared)
    world.service("prod", "b", shared)  # two services, one task definition: one new revision for both
    world.service("prod", "no-role", world.task_definition("norole", execution_role=False))
    world.service("prod", "bluegreen", world.task_definition("bg"), deploymentController={"type": "CODE_DEPLOY"})
    world.service("prod", "old-platform", world.task_definition("old"), platformVersion="1.3.0")
    world.service("prod", "has-it", world.task_definition("ready", sidecar_for="prod"))
    weak = world.execution_role("weakRole", can_pull=False)
    weak_td = world.task_definition("weak")
    doc = world.ecs.describe_task_definition(taskDefinition=weak_td)["taskDefinition"]
    world.ecs.register_task_definition(
        family="weak", executionRoleArn=weak, containerDefinitions=doc["containerDefinitions"], cpu="256",
        memory="512", requiresCompatibilities=["FARGATE"],
    )  # fmt: skip
    world.service("prod", "weak-role", "weak:2")
    out = world.manager(settings()).run_once()
    services = {s["serviceName"]: s for s in by_name(out)["prod"]["services"]}
    assert {n: s["action"] for n, s in services.items()} == {
        "a": "injected",
        "b": "injected",
        "bluegreen": "skip",
        "has-it": "none",
        "no-role": "skip",
        "old-platform": "skip",
        "weak-role": "skip",
    }
    assert "weakRole cannot perform ecr:" in services["weak-role"]["reason"]
    assert "check-roles --fix" in services["weak-role"]["reason"]
    assert world.describe_service("prod", "weak-role")["taskDefinition"].endswith("weak:2")
    assert services["a"]["newTaskDefinition"] == services["b"]["newTaskDefinition"] == "shared:2"
    assert len(world.revisions("shared")) == 2
    assert "no execution role" in services["no-role"]["reason"]
    assert "CODE_DEPLOY deployment controller" in services["bluegreen"]["reason"]
    assert "1.3.0" in services["old-platform"]["reason"] and "1.4.0" in services["old-platform"]["reason"]
    for name, family in (("no-role", "norole"), ("bluegreen", "bg"), ("old-platform", "old"), ("has-it", "ready")):
        assert world.describe_service("prod", name)["taskDefinition"].endswith(f"{family}:1"), name
        assert len(world.revisions(family)) == 1


def test_plan_prints_what_run_would_change_and_changes_nothing(
    world: EcsWorld, moto_endpoint: MotoEndpoint, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    world.cluster("prod")
    world.cluster("billing", "false")
    world.service("prod", "web", world.task_definition("web"))
    world.service("billing", "ledger", world.task_definition("ledger"))
    # the settings from the environment, as in a container
    monkeypatch.setenv("RUNTIME_MANAGER_IMAGE", IMAGE)
    monkeypatch.setenv("RUNTIME_MANAGER_COLLECTOR_URL", COLLECTOR)
    monkeypatch.setenv("RUNTIME_MANAGER_TOKEN_SECRET_ARN", SECRET_TEMPLATE)
    assert cli.main([*moto_endpoint.cli_args(), "plan"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["changes"] == 1 and out["automation"] is True and out["tagKey"] == DEFAULT_TAG_KEY
    plans = by_name(out)
    assert plans["prod"]["services"] == [{"serviceName": "web", "taskDefinition": "web:1", "action": "inject"}]
    assert plans["billing"]["managementType"] == DISABLED and plans["billing"]["services"] == []
    assert len(world.revisions("web")) == 1
    assert world.describe_service("prod", "web")["taskDefinition"].endswith("web:1")
    # run --once through the same program does it
    assert cli.main([*moto_endpoint.cli_args(), "run", "--once"]) == 0
    assert json.loads(capsys.readouterr().out)["changes"] == 1
    assert world.describe_service("prod", "web")["taskDefinition"].endswith("web:2")


def test_missing_settings_are_named(
    world: EcsWorld, moto_endpoint: MotoEndpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([*moto_endpoint.cli_args(), "plan", "--image", IMAGE]) == 2
    err = capsys.readouterr().err
    assert "collector_url (--collector-url or RUNTIME_MANAGER_COLLECTOR_URL)" in err and "token_secret_arn" in err
    with pytest.raises(SettingsError) as exc:
        load_settings({"interval_s": 0}, env={})
    assert "--interval-s" in str(exc.value)


def test_settings_file_then_environment_then_flags(tmp_path: Any) -> None:
    path = tmp_path / "manager.yaml"
    path.write_text(
        f"image: {IMAGE}\ncollector_url: https://from-file\ntag_key: FromFile\nautomation: false\n"
        "secret_access_key: s3cret\n"
    )
    env = {"RUNTIME_MANAGER_CONFIG": str(path), "RUNTIME_MANAGER_TAG_KEY": "FromEnv"}
    s = load_settings({"collector_url": "https://from-flag", "tag_key": None}, env=env)
    assert (s.image, s.collector_url, s.tag_key, s.automation) == (IMAGE, "https://from-flag", "FromEnv", False)
    assert s.secret_access_key == "s3cret"
    path.write_text("colour: blue\n")
    with pytest.raises(SettingsError) as exc:
        load_settings(env=env)
    assert f"{path}: colour" in str(exc.value)


# -- throttling --------------------------------------------------------------------------------------------------


def test_throttled_calls_are_retried_with_backoff(world: EcsWorld, moto_endpoint: MotoEndpoint) -> None:
    world.cluster("prod")
    world.service("prod", "web", world.task_definition("web"))
    for action, times in (
        ("ListServices", 2),
        ("DescribeTaskDefinition", 1),
        ("RegisterTaskDefinition", 1),
        ("UpdateService", 3),
    ):
        moto_endpoint.throttle(action, times)
    waits: list[float] = []
    backoff = Backoff(sleep=waits.append)
    out = world.manager(settings(), backoff=backoff).run_once()
    assert out["changes"] == 1
    assert world.describe_service("prod", "web")["taskDefinition"].endswith("web:2")
    assert len(world.revisions("web")) == 2  # the throttled registration was not made twice
    assert sorted(moto_endpoint.throttled) == sorted(
        ["ListServices"] * 2 + ["DescribeTaskDefinition", "RegisterTaskDefinition"] + ["UpdateService"] * 3
    )
    assert backoff.retries == 7 and len(waits) == 7
    # full jitter under a growing cap: the third retry of UpdateService may wait up to 0.5 * 2**3 s
    assert all(0 <= w <= 4.0 for w in waits)

    # a throttle that does not end is an error (cli.main makes it exit 1), after max_attempts calls
    moto_endpoint.throttle("ListClusters", 100)
    with pytest.raises(ThrottledError):
        world.manager(settings(), backoff=Backoff(sleep=lambda s: None, max_attempts=3)).run_once()
    assert moto_endpoint.throttled.count("ListClusters") == 3


def test_run_keeps_going_and_stops_at_sigterm(world: EcsWorld, moto_endpoint: MotoEndpoint, tmp_path: Any) -> None:
    """`run` as ECS runs it: a process that loops, survives a failed run (the backend is down), and ends at
    SIGTERM promptly even while it waits to retry the backend."""
    world.cluster("prod")
    world.service("prod", "web", world.task_definition("web"))
    with socket.socket() as s:  # a port nothing listens on: the backend is down
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {
        **os.environ,
        "RUNTIME_MANAGER_IMAGE": IMAGE,
        "RUNTIME_MANAGER_COLLECTOR_URL": COLLECTOR,
        "RUNTIME_MANAGER_TOKEN_SECRET_ARN": SECRET_TEMPLATE,
        "RUNTIME_MANAGER_BACKEND_URL": down,
        "RUNTIME_MANAGER_ACCESS_KEY_ID": "AKRTEXAMPLE",
        "RUNTIME_MANAGER_SECRET_ACCESS_KEY": "secret",
    }
    stderr = tmp_path / "stderr"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [*MANAGER, *moto_endpoint.cli_args(), "--log-level", "INFO", "run", "--interval", "1"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 20
        while not world.describe_service("prod", "web")["taskDefinition"].endswith("web:2"):
            assert proc.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, "the service was never rolled: " + stderr.read_text()
            time.sleep(0.2)
        time.sleep(0.5)  # into the wait before the backend's second attempt
        assert proc.poll() is None, stderr.read_text()
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, stderr.read_text()
        assert time.monotonic() - stopped_at < 3, "SIGTERM did not cut the backend's retry wait short"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [json.loads(line) for line in stderr.read_text().splitlines() if line.startswith("{")]
    msgs = [line["msg"] for line in lines]
    assert "runtime-manager running" in msgs and "service rolled onto the sidecar" in msgs
    (failed,) = [line for line in lines if line["msg"] == "run failed; retrying at the next interval"]
    assert "did not take the coverage report" in failed["exc"]
    assert len(world.revisions("web")) == 2

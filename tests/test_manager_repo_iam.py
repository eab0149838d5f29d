"""runtime-manager against moto in server mode: the throttling Backoff, `publish-repo` (ECR) and `check-roles`
(IAM), with the same boto3 calls production makes, and the commands run as a user runs them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from botocore.exceptions import ClientError

from backend.manager import aws, iam, repo

if TYPE_CHECKING:
    from moto_server import MotoEndpoint


ROOT = Path(__file__).resolve().parent.parent
MANAGER = [str(ROOT / ".venv" / "bin" / "python"), "-m", "backend.manager.cli"]
ACCOUNT = "123456789012"
REPOSITORY_ARN = f"arn:aws:ecr:us-east-1:{ACCOUNT}:repository/runtime-sidecar"
SECRET = f"arn:aws:secretsmanager:us-east-1:{ACCOUNT}:secret:runtime-sidecar/token-AbCdEf"
TRUST = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"Service": "ecs-tasks.amazonaws.com"}, "Action": "sts:AssumeRole"}
        ],
    }
)
# AmazonECSTaskExecutionRolePolicy's statements, as AWS publishes them
EXECUTION_ROLE_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": [
                "ecr:GetAuthorizationToken",
                "ecr:BatchCheckLayerAvailability",
                "ecr:GetDownloadUrlForLayer",
                "ecr:BatchGetImage",
                "logs:CreateLogStream",
                "logs:PutLogEvents",
            ],
            "Resource": "*",
        }
    ],
}


def no_sleep(_: float) -> None:
    return None


def manager(endpoint: MotoEndpoint, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MANAGER, *endpoint.cli_args(), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


# -- Backoff ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("service", "action", "code", "call"),
    [
        ("ecs", "ListClusters", "ThrottlingException", lambda c: c.list_clusters()),
        ("ec2", "DescribeVpcs", "RequestLimitExceeded", lambda c: c.describe_vpcs()),
        ("iam", "ListRoles", "Throttling", lambda c: c.list_roles()),
        ("ecr", "DescribeRepositories", "ThrottlingException", lambda c: c.describe_repositories()),
    ],
)
def test_backoff_rides_out_each_protocols_throttling(
    moto_endpoint: MotoEndpoint, service: str, action: str, code: str, call: Any
) -> None:
    client = aws.client(moto_endpoint.config(), service)
    moto_endpoint.throttle(action, 3, code)
    waits: list[float] = []
    backoff = aws.Backoff(sleep=waits.append, rng=lambda: 1.0, base_s=0.5, cap_s=3.0)
    assert "ResponseMetadata" in backoff.call(call, client)
    assert moto_endpoint.throttled == [action] * 3
    assert backoff.retries == 3
    assert waits == [1.0, 2.0, 3.0], "exponential from base_s, capped at cap_s"


def test_backoff_gives_up_after_max_attempts_and_never_retries_other_errors(moto_endpoint: MotoEndpoint) -> None:
    ecr = aws.client(moto_endpoint.config(), "ecr")
    moto_endpoint.throttle("DescribeRepositories", 4)
    backoff = aws.Backoff(max_attempts=4, sleep=no_sleep)
    with pytest.raises(aws.ThrottledError, match="4 attempts") as raised:
        backoff.call(ecr.describe_repositories)
    assert aws.is_throttling(raised.value.last)
    assert len(moto_endpoint.throttled) == 4
    fresh = aws.Backoff(sleep=no_sleep)
    with pytest.raises(ClientError) as missing:
        fresh.call(ecr.describe_repositories, repositoryNames=["nothing-here"])
    assert aws.error_code(missing.value) == "RepositoryNotFoundException"
    assert fresh.retries == 0


def test_full_jitter_stays_within_the_exponential_bound() -> None:
    backoff = aws.Backoff(base_s=0.5, cap_s=20.0)
    for attempt in range(1, 10):
        bound = min(20.0, 0.5 * 2**attempt)
        waits = [backoff.delay(attempt) for _ in range(200)]
        assert all(0 <= w < bound for w in waits)
        assert max(waits) > bound / 2, "jitter spreads over the whole window"


def test_pages_retry_only_the_throttled_page(moto_endpoint: MotoEndpoint) -> None:
    client = aws.client(moto_endpoint.config(), "iam")
    for i in range(25):
        client.create_role(RoleName=f"r{i:02d}", AssumeRolePolicyDocument=TRUST)
    backoff = aws.Backoff(sleep=no_sleep)
    pages = backoff.pages(client.list_roles, token_in="Marker", MaxItems=10)
    first = next(pages)
    moto_endpoint.throttle("ListRoles", 2, "Throttling")
    rest = list(pages)
    names = [r["RoleName"] for p in [first, *rest] for r in p["Roles"]]
    assert sorted(names) == [f"r{i:02d}" for i in range(25)], "every role once: no page lost, none asked twice"
    assert len(rest) == 2 and backoff.retries == 2
    assert moto_endpoint.throttled == ["ListRoles", "ListRoles"]


# -- publish-repo ---------------------------------------------------------------------------------------------
def test_publish_repo_creates_then_is_idempotent_and_repairs_drift(moto_endpoint: MotoEndpoint) -> None:
    first = manager(moto_endpoint, "publish-repo", "--json", "--keep", "15", "--untagged-days", "3")
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert out["created"] is True
    ecr = moto_endpoint.client("ecr")
    (desc,) = ecr.describe_repositories(repositoryNames=["runtime-sidecar"])["repositories"]
    assert desc["imageTagMutability"] == "IMMUTABLE"
    assert desc["imageScanningConfiguration"]["scanOnPush"] is True
    assert out["repositoryUri"] == desc["repositoryUri"]
    rules = json.loads(ecr.get_lifecycle_policy(repositoryName="runtime-sidecar")["lifecyclePolicyText"])["rules"]
    by_status = {r["selection"]["tagStatus"]: r for r in rules}
    assert by_status["untagged"]["selection"]["countNumber"] == 3
    assert by_status["untagged"]["selection"]["countType"] == "sinceImagePushed"
    assert by_status["any"]["selection"] == {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": 15}
    assert by_status["any"]["rulePriority"] > by_status["untagged"]["rulePriority"], "ECR wants 'any' last"
    tags = ecr.list_tags_for_resource(resourceArn=desc["repositoryArn"])["tags"]
    assert repo.MANAGED_TAG in tags

    second = manager(moto_endpoint, "publish-repo", "--json", "--keep", "15", "--untagged-days", "3")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["changes"] == []
    assert json.loads(second.stdout)["created"] is False

    ecr.put_image_tag_mutability(repositoryName="runtime-sidecar", imageTagMutability="MUTABLE")
    ecr.put_image_scanning_configuration(
        repositoryName="runtime-sidecar", imageScanningConfiguration={"scanOnPush": False}
    )
    third = manager(moto_endpoint, "publish-repo", "--json")  # default keep/untagged-days differ from the first
    changes = json.loads(third.stdout)["changes"]
    assert changes == ["scan on push turned on", "tags made immutable", "lifecycle policy replaced"]
    (desc,) = ecr.describe_repositories(repositoryNames=["runtime-sidecar"])["repositories"]
    assert desc["imageTagMutability"] == "IMMUTABLE" and desc["imageScanningConfiguration"]["scanOnPush"]


def test_publish_repo_prints_the_push_commands(moto_endpoint: MotoEndpoint) -> None:
    done = manager(moto_endpoint, "publish-repo", "--name", "sec/runtime-sidecar", "--version", "1.2.3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    uri = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/sec/runtime-sidecar"
    assert lines[0].startswith(f"# {uri}: created")
    commands = [line for line in lines if not line.startswith("#")]
    assert commands[0].startswith("aws ecr get-login-password --region us-east-1 --endpoint-url http://127.0.0.1:")
    assert commands[0].endswith(
        f"docker login --username AWS --password-stdin {ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com"
    )
    assert commands[1].startswith("docker build --target sidecar --build-arg VERSION=1.2.3 ")
    assert commands[1].endswith(f"-t {uri}:1.2.3 .")
    assert commands[2] == f"docker push {uri}:1.2.3"


# -- check-roles: the policy evaluation -----------------------------------------------------------------------
PULL = "ecr:BatchGetImage"
AUTH = "ecr:GetAuthorizationToken"
RUNTIME_STAR = "arn:aws:ecr:*:*:repository/runtime-*"
IN_VPCE = {"StringEquals": {"aws:SourceVpce": "vpce-1"}}


@pytest.mark.parametrize(
    ("statement", "action", "resource", "allowed"),
    [
        ({"Action": "ecr:*", "Resource": "*"}, PULL, REPOSITORY_ARN, True),
        ({"Action": "*", "Resource": "*"}, PULL, REPOSITORY_ARN, True),
        ({"Action": "ECR:batchgetimage", "Resource": "*"}, PULL, REPOSITORY_ARN, True),  # actions ignore case
        ({"Action": "ecr:Get*", "Resource": "*"}, PULL, REPOSITORY_ARN, False),
        ({"Action": "ecr:Batch???Image", "Resource": "*"}, PULL, REPOSITORY_ARN, True),
        ({"Action": "ecr:*", "Resource": RUNTIME_STAR}, PULL, REPOSITORY_ARN, True),
        ({"Action": "ecr:*", "Resource": RUNTIME_STAR.upper()}, PULL, REPOSITORY_ARN, False),  # ARNs do not
        # GetAuthorizationToken is asked on "*": a repository-scoped grant does not cover it
        ({"Action": "ecr:*", "Resource": REPOSITORY_ARN}, AUTH, "*", False),
        ({"NotAction": "iam:*", "Resource": "*"}, PULL, REPOSITORY_ARN, True),
        ({"NotAction": "ecr:*", "Resource": "*"}, PULL, REPOSITORY_ARN, False),
        ({"Action": "ecr:*", "NotResource": REPOSITORY_ARN}, PULL, REPOSITORY_ARN, False),
        ({"Action": "ecr:*", "Resource": "*", "Condition": IN_VPCE}, PULL, REPOSITORY_ARN, False),
    ],
)
def test_evaluate_matches_iam_wildcards(statement: dict[str, Any], action: str, resource: str, allowed: bool) -> None:
    doc: dict[str, Any] = {"Statement": [{"Effect": "Allow", **statement}]}
    decision = iam.evaluate([("p", doc)], action, resource)
    assert decision.allowed is allowed
    assert not decision.denied


def test_explicit_deny_wins_over_any_allow() -> None:
    docs: list[tuple[str, dict[str, Any]]] = [
        ("a", {"Statement": {"Effect": "Allow", "Action": "ecr:*", "Resource": "*"}}),
        ("b", {"Statement": [{"Sid": "NoPull", "Effect": "Deny", "Action": "ecr:BatchGetImage", "Resource": "*"}]}),
    ]
    decision = iam.evaluate(docs, "ecr:BatchGetImage", REPOSITORY_ARN)
    assert decision.denied and decision.allowed
    assert decision.notes == ["ecr:BatchGetImage denied by b (NoPull)"]


# -- check-roles against IAM, ECS and ECR in moto --------------------------------------------------------------
def make_role(endpoint: MotoEndpoint, name: str, inline: str | None = None, **kwargs: Any) -> str:
    client = endpoint.client("iam")
    arn = str(client.create_role(RoleName=name, AssumeRolePolicyDocument=TRUST, **kwargs)["Role"]["Arn"])
    if inline:
        client.put_role_policy(RoleName=name, PolicyName="own", PolicyDocument=inline)
    return arn


def register_task(endpoint: MotoEndpoint, family: str, role_arn: str | None) -> str:
    kwargs: dict[str, Any] = {"executionRoleArn": role_arn} if role_arn else {}
    return str(
        endpoint.client("ecs").register_task_definition(
            family=family,
            requiresCompatibilities=["FARGATE"],
            networkMode="awsvpc",
            cpu="256",
            memory="512",
            containerDefinitions=[{"name": "app", "image": "busybox", "memory": 256}],
            **kwargs,
        )["taskDefinition"]["taskDefinitionArn"]
    )


def test_check_roles_of_a_cluster_reports_fixes_and_is_then_clean(moto_endpoint: MotoEndpoint) -> None:
    """Services and a standalone task of a cluster; roles that can, cannot, are denied, or lack only the secret."""
    client = moto_endpoint.client("iam")
    managed = client.create_policy(PolicyName="exec", PolicyDocument=json.dumps(EXECUTION_ROLE_POLICY))["Policy"]
    good = make_role(moto_endpoint, "good")
    client.attach_role_policy(RoleName="good", PolicyArn=managed["Arn"])
    bare = make_role(moto_endpoint, "bare", Path="/service-role/")
    other_repo = make_role(
        moto_endpoint,
        "other-repo",
        policy(
            {"Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*"},
            {"Effect": "Allow", "Action": "ecr:*", "Resource": f"arn:aws:ecr:us-east-1:{ACCOUNT}:repository/app"},
        ),
    )
    denied = make_role(
        moto_endpoint,
        "denied",
        policy(
            {"Effect": "Allow", "Action": "ecr:*", "Resource": "*"},
            {"Effect": "Deny", "Action": "ecr:BatchGetImage", "Resource": "*"},
        ),
    )
    ecs = moto_endpoint.client("ecs")
    ecs.create_cluster(clusterName="prod")
    ecs.create_cluster(clusterName="elsewhere")
    for family, role in [("web", good), ("api", bare), ("jobs", other_repo), ("locked", denied), ("norole", None)]:
        td = register_task(moto_endpoint, family, role)
        ecs.create_service(cluster="prod", serviceName=family, taskDefinition=td, desiredCount=0)
    # a standalone task's definition counts too; a cluster not asked for does not
    ec2 = moto_endpoint.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})  # moto's RunTask needs it (awsvpc)
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    standalone_role = make_role(moto_endpoint, "standalone")
    ecs.run_task(
        cluster="prod",
        taskDefinition=register_task(moto_endpoint, "batch", standalone_role),
        launchType="FARGATE",
        networkConfiguration={"awsvpcConfiguration": {"subnets": [subnet], "securityGroups": []}},
    )
    ignored = make_role(moto_endpoint, "ignored")
    ecs.create_service(
        cluster="elsewhere", serviceName="x", taskDefinition=register_task(moto_endpoint, "x", ignored), desiredCount=0
    )

    done = manager(moto_endpoint, "check-roles", "--cluster", "prod")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["repositoryArn"] == REPOSITORY_ARN  # not created yet: this account's ARN in this region
    roles = {r["roleArn"]: r for r in report["roles"]}
    assert set(roles) == {good, bare, other_repo, denied, standalone_role}
    assert roles[good]["canPull"] and roles[good]["missing"] == []
    assert roles[bare]["missing"] == list(iam.ECR_PULL_ACTIONS)
    assert roles[other_repo]["missing"] == list(iam.ECR_REPOSITORY_ACTIONS)
    assert roles[denied]["explicitlyDenied"] == ["ecr:BatchGetImage"]
    assert roles[standalone_role]["taskDefinitions"][0].endswith("task-definition/batch:1")
    assert [t.rsplit("/", 1)[1] for t in report["taskDefinitionsWithoutExecutionRole"]] == ["norole:1"]

    fixed = manager(moto_endpoint, "check-roles", "--cluster", "prod", "--fix")
    report = json.loads(fixed.stdout)
    roles = {r["roleArn"]: r for r in report["roles"]}
    assert fixed.returncode == 1, "the denied role and the task without a role remain"
    for arn in (bare, other_repo, standalone_role):
        assert roles[arn]["fixed"] and roles[arn]["canPull"], roles[arn]
    assert not roles[good]["fixed"]
    assert not roles[denied]["fixed"] and roles[denied]["missing"] == ["ecr:BatchGetImage"]
    put = client.get_role_policy(RoleName="bare", PolicyName=iam.FIX_POLICY_NAME)["PolicyDocument"]
    assert put == iam.fix_policy(REPOSITORY_ARN)
    assert iam.FIX_POLICY_NAME not in client.list_role_policies(RoleName="denied")["PolicyNames"]
    assert iam.FIX_POLICY_NAME not in client.list_role_policies(RoleName="ignored")["PolicyNames"]

    again = iam.check_roles(moto_endpoint.config(), role_arns=[bare, other_repo, standalone_role, good])
    assert again.ok and not any(r.fixed for r in again.roles)


def test_check_roles_counts_the_repository_policy_and_the_permissions_boundary(moto_endpoint: MotoEndpoint) -> None:
    client = moto_endpoint.client("iam")
    auth_only = policy({"Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*"})
    via_repo = make_role(moto_endpoint, "via-repo", auth_only)
    boundary = client.create_policy(
        PolicyName="only-logs", PolicyDocument=policy({"Effect": "Allow", "Action": "logs:*", "Resource": "*"})
    )["Policy"]["Arn"]
    bounded = make_role(
        moto_endpoint,
        "bounded",
        policy({"Effect": "Allow", "Action": "ecr:*", "Resource": "*"}),
        PermissionsBoundary=boundary,
    )
    ecr = moto_endpoint.client("ecr")
    repo.ensure_repository(ecr)
    ecr.set_repository_policy(
        repositoryName="runtime-sidecar",
        policyText=policy(
            {
                "Sid": "ExecutionRolePull",
                "Effect": "Allow",
                "Principal": {"AWS": via_repo},
                "Action": list(iam.ECR_REPOSITORY_ACTIONS),
            },
            # the account root delegates to IAM: it grants the bounded role nothing by itself
            {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, "Action": "ecr:*"},
        ),
    )
    report = iam.check_roles(moto_endpoint.config(), role_arns=[via_repo, bounded])
    roles = {r.role_arn: r for r in report.roles}
    assert roles[via_repo].ok, roles[via_repo].notes
    assert roles[bounded].missing == list(iam.ECR_PULL_ACTIONS)
    assert any("permissions boundary" in n for n in roles[bounded].notes)


def test_check_roles_with_the_token_secret_and_a_missing_role(moto_endpoint: MotoEndpoint) -> None:
    client = moto_endpoint.client("iam")
    managed = client.create_policy(PolicyName="exec", PolicyDocument=json.dumps(EXECUTION_ROLE_POLICY))["Policy"]
    role = make_role(moto_endpoint, "exec")
    client.attach_role_policy(RoleName="exec", PolicyArn=managed["Arn"])
    gone = f"arn:aws:iam::{ACCOUNT}:role/deleted-role"
    done = manager(
        moto_endpoint, "check-roles", "--role-arn", role, "--role-arn", gone, "--token-secret-arn", SECRET, "--fix"
    )
    roles = {r["roleArn"]: r for r in json.loads(done.stdout)["roles"]}
    assert roles[role]["fixed"] and roles[role]["canPull"]
    put = client.get_role_policy(RoleName="exec", PolicyName=iam.FIX_POLICY_NAME)["PolicyDocument"]
    assert {"Sid": "ReadRuntimeSidecarToken", "Effect": "Allow", "Action": "secretsmanager:GetSecretValue",
            "Resource": SECRET} in put["Statement"]  # fmt: skip
    assert roles[gone]["canPull"] is False and not roles[gone]["fixed"]
    assert roles[gone]["notes"] == ["role deleted-role does not exist"]
    assert done.returncode == 1


def test_check_roles_reads_the_aws_managed_execution_policy(
    moto_endpoint: MotoEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The policy most execution roles carry, as moto ships AWS's published document (it loads them on demand)."""
    monkeypatch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
    moto_endpoint.server.reset()
    client = moto_endpoint.client("iam")
    role = make_role(moto_endpoint, "ecsTaskExecutionRole")
    client.attach_role_policy(
        RoleName="ecsTaskExecutionRole",
        PolicyArn="arn:aws:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy",
    )
    (check,) = iam.check_roles(moto_endpoint.config(), role_arns=[role]).roles
    assert check.ok, check.notes


def test_check_roles_backs_off_when_iam_throttles(moto_endpoint: MotoEndpoint) -> None:
    role = make_role(moto_endpoint, "r", policy({"Effect": "Allow", "Action": "ecr:*", "Resource": "*"}))
    moto_endpoint.throttle("GetRole", 2, "Throttling")
    moto_endpoint.throttle("GetRolePolicy", 1, "Throttling")
    backoff = aws.Backoff(sleep=no_sleep)
    report = iam.check_roles(moto_endpoint.config(), role_arns=[role], backoff=backoff)
    assert report.ok
    assert backoff.retries == 3
    assert moto_endpoint.throttled == ["GetRole", "GetRole", "GetRolePolicy"]

"""`runtime-manager check-roles`: can each task execution role pull the sidecar image (and read its token)?

ECS pulls every image and fetches every secret of a task with the task's execution role before any container
starts; a sidecar the role cannot pull makes the whole task fail to start, the app with it. So before a service
is rolled to a revision with the sidecar, its execution role must allow the four ECR pull actions on the
sidecar's repository (and GetSecretValue / GetParameters on the token, when it is given).

IAM's policy simulator is not used: it needs iam:SimulatePrincipalPolicy, which read-only auditors often lack,
and moto does not serve it. The role's identity policies (inline and attached, their default versions), its
permissions boundary and the repository's resource policy are read and evaluated here with IAM's rules for these
cases: an explicit Deny wins, then an Allow from an identity policy (within the boundary) or from the
repository policy naming the role. Conditions are not evaluated: an Allow under a condition is not counted, a
Deny under one is, and both are reported, so the answer errs towards "cannot pull". Service control policies
are out of sight of an account's roles and are not checked.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from backend.manager import aws
from backend.manager.repo import DEFAULT_NAME

ECR_AUTH_ACTION = "ecr:GetAuthorizationToken"
ECR_REPOSITORY_ACTIONS = ("ecr:BatchCheckLayerAvailability", "ecr:GetDownloadUrlForLayer", "ecr:BatchGetImage")
ECR_PULL_ACTIONS = (ECR_AUTH_ACTION, *ECR_REPOSITORY_ACTIONS)
FIX_POLICY_NAME = "RuntimeSidecarEcrPull"


# -- policy evaluation ----------------------------------------------------------------------------------------
def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _wildcard(pattern: str, value: str, case_sensitive: bool) -> bool:
    # IAM wildcards: * any run, ? one character; nothing else is special
    regex = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.fullmatch(regex, value, 0 if case_sensitive else re.IGNORECASE) is not None


def _matches_action(statement: dict[str, Any], action: str) -> bool:
    if "NotAction" in statement:
        return not any(_wildcard(str(p), action, False) for p in _as_list(statement["NotAction"]))
    return any(_wildcard(str(p), action, False) for p in _as_list(statement.get("Action")))


def _matches_resource(statement: dict[str, Any], resource: str) -> bool:
    if "NotResource" in statement:
        return not any(_wildcard(str(p), resource, True) for p in _as_list(statement["NotResource"]))
    if "Resource" not in statement:  # resource policies may omit it: the resource itself
        return True
    return any(_wildcard(str(p), resource, True) for p in _as_list(statement["Resource"]))


def _matches_principal(statement: dict[str, Any], principal_arn: str) -> bool:
    principal = statement.get("Principal")
    if principal == "*":
        return True
    if not isinstance(principal, dict):
        return False
    return any(p in ("*", principal_arn) for p in _as_list(principal.get("AWS")))


@dataclass
class Decision:
    """Of one action on one resource under some policies: allowed, explicitly denied, or neither."""

    allowed: bool = False
    denied: bool = False
    notes: list[str] = field(default_factory=list)


def evaluate(
    documents: Iterable[tuple[str, dict[str, Any]]],
    action: str,
    resource: str,
    principal_arn: str | None = None,
) -> Decision:
    """Evaluate ``action`` on ``resource`` against (source name, policy document) pairs.

    With ``principal_arn`` the documents are resource policies: a statement applies only if its Principal names
    that ARN or ``*`` (an account root principal delegates to IAM and grants nothing by itself).
    """
    decision = Decision()
    for source, doc in documents:
        for statement in _as_list(doc.get("Statement")):
            if not isinstance(statement, dict):
                continue
            if principal_arn is not None and not _matches_principal(statement, principal_arn):
                continue
            if not (_matches_action(statement, action) and _matches_resource(statement, resource)):
                continue
            conditional = bool(statement.get("Condition"))
            sid = f" ({statement['Sid']})" if statement.get("Sid") else ""
            if statement.get("Effect") == "Deny":
                decision.denied = True
                decision.notes.append(
                    f"{action} denied by {source}{sid}"
                    + (" under a condition, counted as denied" if conditional else "")
                )
            elif statement.get("Effect") == "Allow":
                if conditional:
                    decision.notes.append(f"{action} allowed by {source}{sid} only under a condition, not counted")
                else:
                    decision.allowed = True
    return decision


def _document(raw: Any) -> dict[str, Any]:
    """A policy document as boto3 hands it over (a dict) or as IAM sends it (URL-encoded JSON)."""
    if isinstance(raw, dict):
        return raw
    text = str(raw)
    if text.lstrip().startswith("%7B") or "%22" in text:
        text = urllib.parse.unquote(text)
    doc = json.loads(text)
    return doc if isinstance(doc, dict) else {}


# -- reading a role -----------------------------------------------------------------------------------------
def role_name(role_arn: str) -> str:
    """``arn:aws:iam::123456789012:role/service-role/name`` -> ``name`` (IAM's API wants the name, not the path)."""
    return role_arn.rsplit("/", 1)[-1]


def _managed_document(iam: Any, policy_arn: str, backoff: aws.Backoff) -> dict[str, Any]:
    policy = backoff.call(iam.get_policy, PolicyArn=policy_arn)["Policy"]
    version = backoff.call(iam.get_policy_version, PolicyArn=policy_arn, VersionId=policy["DefaultVersionId"])
    return _document(version["PolicyVersion"]["Document"])


def role_policies(iam: Any, name: str, backoff: aws.Backoff) -> list[tuple[str, dict[str, Any]]]:
    """The role's identity policies: inline ones and the default version of each attached one."""
    docs: list[tuple[str, dict[str, Any]]] = []
    for page in backoff.pages(iam.list_role_policies, RoleName=name, token_in="Marker"):
        for policy_name in page.get("PolicyNames", []):
            got = backoff.call(iam.get_role_policy, RoleName=name, PolicyName=policy_name)
            docs.append((f"inline policy {policy_name}", _document(got["PolicyDocument"])))
    for page in backoff.pages(iam.list_attached_role_policies, RoleName=name, token_in="Marker"):
        for attached in page.get("AttachedPolicies", []):
            arn = attached["PolicyArn"]
            docs.append((f"managed policy {attached['PolicyName']}", _managed_document(iam, arn, backoff)))
    return docs


@dataclass
class RoleCheck:
    """Whether one execution role can pull the sidecar (and read its token)."""

    role_arn: str
    task_definitions: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # actions the role cannot perform on their resource
    denied: list[str] = field(default_factory=list)  # of those, explicitly denied (the fix cannot help)
    notes: list[str] = field(default_factory=list)
    exists: bool = True
    fixed: bool = False

    @property
    def ok(self) -> bool:
        return self.exists and not self.missing

    def to_json(self) -> dict[str, Any]:
        return {
            "roleArn": self.role_arn,
            "canPull": self.ok,
            "missing": self.missing,
            "explicitlyDenied": self.denied,
            "fixed": self.fixed,
            "taskDefinitions": self.task_definitions,
            "notes": self.notes,
        }


def secret_action(secret_arn: str) -> str:
    """What ECS calls with the execution role to fetch the token: Secrets Manager or SSM Parameter Store."""
    return "ssm:GetParameters" if ":ssm:" in secret_arn else "secretsmanager:GetSecretValue"


def check_role(
    iam: Any,
    role_arn: str,
    repository_arn: str,
    *,
    repository_policy: dict[str, Any] | None = None,
    token_secret_arn: str | None = None,
    backoff: aws.Backoff | None = None,
) -> RoleCheck:
    """Evaluate the role's policies for the ECR pull actions on ``repository_arn`` (and the token, if given)."""
    backoff = backoff or aws.Backoff()
    result = RoleCheck(role_arn)
    name = role_name(role_arn)
    try:
        role = backoff.call(iam.get_role, RoleName=name)["Role"]
    except Exception as exc:
        if aws.error_code(exc) != "NoSuchEntity":
            raise
        result.exists = False
        result.notes.append(f"role {name} does not exist")
        result.missing = list(ECR_PULL_ACTIONS)
        return result
    identity = role_policies(iam, name, backoff)
    boundary_arn = (role.get("PermissionsBoundary") or {}).get("PermissionsBoundaryArn")
    boundary = [("permissions boundary", _managed_document(iam, boundary_arn, backoff))] if boundary_arn else []
    wanted = [(ECR_AUTH_ACTION, "*")] + [(a, repository_arn) for a in ECR_REPOSITORY_ACTIONS]
    if token_secret_arn:
        wanted.append((secret_action(token_secret_arn), token_secret_arn))
    resource_docs = [("repository policy", repository_policy)] if repository_policy else []
    for action, resource in wanted:
        own = evaluate(identity, action, resource)
        result.notes += own.notes
        allowed, denied = own.allowed, own.denied
        if boundary:
            within = evaluate(boundary, action, resource)
            result.notes += within.notes
            denied = denied or within.denied
            if allowed and not within.allowed:
                allowed = False
                result.notes.append(f"{action} allowed by the role's policies but not by its permissions boundary")
        if resource_docs and resource == repository_arn:
            # same account: a repository policy naming the role grants on its own (unless the boundary denies)
            by_repo = evaluate(resource_docs, action, resource, principal_arn=role["Arn"])
            result.notes += by_repo.notes
            denied = denied or by_repo.denied
            allowed = allowed or by_repo.allowed
        if denied or not allowed:
            result.missing.append(action)
        if denied:
            result.denied.append(action)
    return result


def fix_policy(repository_arn: str, token_secret_arn: str | None = None) -> dict[str, Any]:
    """The inline policy --fix puts on a role: the ECR pull actions on the sidecar's repository only."""
    statements: list[dict[str, Any]] = [
        {"Sid": "EcrAuthorizationToken", "Effect": "Allow", "Action": ECR_AUTH_ACTION, "Resource": "*"},
        {
            "Sid": "PullRuntimeSidecar",
            "Effect": "Allow",
            "Action": list(ECR_REPOSITORY_ACTIONS),
            "Resource": repository_arn,
        },
    ]
    if token_secret_arn:
        statements.append(
            {
                "Sid": "ReadRuntimeSidecarToken",
                "Effect": "Allow",
                "Action": secret_action(token_secret_arn),
                "Resource": token_secret_arn,
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


def fix_role(
    iam: Any,
    check: RoleCheck,
    repository_arn: str,
    *,
    token_secret_arn: str | None = None,
    backoff: aws.Backoff | None = None,
) -> bool:
    """Put the RuntimeSidecarEcrPull inline policy on the role, unless an allow cannot help (explicit deny, no
    such role). True when the policy was put."""
    backoff = backoff or aws.Backoff()
    if not check.exists or check.denied:
        return False
    backoff.call(
        iam.put_role_policy,
        RoleName=role_name(check.role_arn),
        PolicyName=FIX_POLICY_NAME,
        PolicyDocument=json.dumps(fix_policy(repository_arn, token_secret_arn)),
    )
    return True


# -- which roles --------------------------------------------------------------------------------------------
def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def cluster_task_definitions(ecs: Any, clusters: Iterable[str], backoff: aws.Backoff) -> set[str]:
    """The task definitions of the clusters' services and running tasks (standalone tasks included)."""
    found: set[str] = set()
    for cluster in clusters:
        services = [
            arn for page in backoff.pages(ecs.list_services, cluster=cluster) for arn in page.get("serviceArns", [])
        ]
        for chunk in _chunks(services, 10):  # DescribeServices takes 10 at a time
            for svc in backoff.call(ecs.describe_services, cluster=cluster, services=chunk).get("services", []):
                if svc.get("taskDefinition"):
                    found.add(svc["taskDefinition"])
        tasks = [arn for page in backoff.pages(ecs.list_tasks, cluster=cluster) for arn in page.get("taskArns", [])]
        for chunk in _chunks(tasks, 100):  # DescribeTasks takes 100
            for task in backoff.call(ecs.describe_tasks, cluster=cluster, tasks=chunk).get("tasks", []):
                found.add(task["taskDefinitionArn"])
    return found


def execution_roles(
    ecs: Any, task_definitions: Iterable[str], backoff: aws.Backoff
) -> tuple[dict[str, list[str]], list[str]]:
    """Execution role ARN -> the task definitions using it; and the task definitions that have none."""
    roles: dict[str, list[str]] = {}
    without: list[str] = []
    for td in sorted(set(task_definitions)):
        doc = backoff.call(ecs.describe_task_definition, taskDefinition=td)["taskDefinition"]
        arn = doc.get("taskDefinitionArn", td)
        role = doc.get("executionRoleArn")
        if role:
            roles.setdefault(role, []).append(arn)
        else:
            without.append(arn)
    return roles, without


def repository_of(ecr: Any, sts: Any, name: str, backoff: aws.Backoff) -> tuple[str, dict[str, Any] | None]:
    """The repository's ARN and its resource policy (None without one). A repository not created yet still has
    an ARN: this account's, in this region."""
    try:
        repo = backoff.call(ecr.describe_repositories, repositoryNames=[name])["repositories"][0]
    except Exception as exc:
        if aws.error_code(exc) != "RepositoryNotFoundException":
            raise
        me = backoff.call(sts.get_caller_identity)
        partition = str(me["Arn"]).split(":")[1]  # aws, aws-cn, aws-us-gov
        return f"arn:{partition}:ecr:{ecr.meta.region_name}:{me['Account']}:repository/{name}", None
    try:
        text = backoff.call(ecr.get_repository_policy, repositoryName=name)["policyText"]
        policy = _document(text)
    except Exception as exc:
        if aws.error_code(exc) != "RepositoryPolicyNotFoundException":
            raise
        policy = None
    return str(repo["repositoryArn"]), policy


@dataclass
class RolesReport:
    repository_arn: str
    roles: list[RoleCheck]
    without_execution_role: list[str]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.roles) and not self.without_execution_role

    def to_json(self) -> dict[str, Any]:
        return {
            "repositoryArn": self.repository_arn,
            "ok": self.ok,
            "roles": [r.to_json() for r in self.roles],
            # without one ECS cannot pull from a private repository: GuardDuty's "no execution role" issue
            "taskDefinitionsWithoutExecutionRole": self.without_execution_role,
        }


def check_roles(
    cfg: aws.AwsConfig,
    *,
    clusters: list[str] | None = None,
    task_definitions: list[str] | None = None,
    role_arns: list[str] | None = None,
    repository: str = DEFAULT_NAME,
    token_secret_arn: str | None = None,
    fix: bool = False,
    backoff: aws.Backoff | None = None,
) -> RolesReport:
    """Check (and with ``fix`` repair) the execution roles of the given clusters' services and tasks, of the
    given task definitions and the given roles. With none of the three: every cluster of the region."""
    backoff = backoff or aws.Backoff()
    sess = aws.session(cfg)
    ecs, iam = aws.client(cfg, "ecs", sess), aws.client(cfg, "iam", sess)
    ecr, sts = aws.client(cfg, "ecr", sess), aws.client(cfg, "sts", sess)
    if clusters is None and not task_definitions and not role_arns:
        clusters = [a for p in backoff.pages(ecs.list_clusters) for a in p.get("clusterArns", [])]
    tds = set(task_definitions or [])
    if clusters:
        tds |= cluster_task_definitions(ecs, clusters, backoff)
    roles, without = execution_roles(ecs, tds, backoff)
    for arn in role_arns or []:
        roles.setdefault(arn, [])
    repository_arn, repository_policy = repository_of(ecr, sts, repository, backoff)
    checks = []
    for arn in sorted(roles):
        check = check_role(
            iam,
            arn,
            repository_arn,
            repository_policy=repository_policy,
            token_secret_arn=token_secret_arn,
            backoff=backoff,
        )
        check.task_definitions = roles[arn]
        if fix and not check.ok and fix_role(iam, check, repository_arn, token_secret_arn=token_secret_arn):
            after = check_role(
                iam,
                arn,
                repository_arn,
                repository_policy=repository_policy,
                token_secret_arn=token_secret_arn,
                backoff=backoff,
            )
            after.task_definitions, after.fixed = check.task_definitions, True
            after.notes.insert(0, f"inline policy {FIX_POLICY_NAME} put on the role (was missing {check.missing})")
            check = after
        checks.append(check)
    return RolesReport(repository_arn, checks, without)


def _run(args: argparse.Namespace) -> int:
    report = check_roles(
        aws.AwsConfig.from_args(args),
        clusters=args.cluster,
        task_definitions=args.task_definition,
        role_arns=args.role_arn,
        repository=args.repository,
        token_secret_arn=args.token_secret_arn,
        fix=args.fix,
    )
    sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    return 0 if report.ok else 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "check-roles",
        help="report task execution roles that cannot pull the sidecar image (--fix: grant it)",
        description="For each task execution role (of the clusters' services and tasks, of the given task "
        "definitions, or given), evaluate its policies for ecr:GetAuthorizationToken, "
        "ecr:BatchCheckLayerAvailability, ecr:GetDownloadUrlForLayer and ecr:BatchGetImage on the sidecar's "
        f"repository. --fix puts the inline policy {FIX_POLICY_NAME} on roles that lack them. Exit 1 if any role "
        "still cannot pull.",
    )
    p.add_argument("--cluster", action="append", metavar="CLUSTER", help="a cluster (repeatable; default: all)")
    p.add_argument("--task-definition", action="append", metavar="TD", help="a task definition (repeatable)")
    p.add_argument("--role-arn", action="append", metavar="ARN", help="an execution role (repeatable)")
    p.add_argument("--repository", default=DEFAULT_NAME, help=f"the sidecar's ECR repository (default {DEFAULT_NAME})")
    p.add_argument("--token-secret-arn", metavar="ARN", help="also check the agent token's secret can be read")
    p.add_argument("--fix", action="store_true", help=f"put the inline policy {FIX_POLICY_NAME} on failing roles")
    p.set_defaults(func=_run)

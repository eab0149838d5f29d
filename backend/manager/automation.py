"""Automated agent management with GuardDuty's semantics: `runtime-manager run`, `plan` and `cleanup`.

Which clusters the manager covers is decided by one cluster tag, ``RuntimeMonitoringManaged`` by default
(``--tag-key``), the way GuardDuty's ``GuardDutyManaged`` tag works for its own agent:

=================  ===============================  ===============================  ====================
automation         cluster tagged ``<key>=true``    cluster tagged ``<key>=false``   no tag (or another value)
=================  ===============================  ===============================  ====================
on (default)       covered (AUTO_MANAGED)           excluded (DISABLED)              covered (AUTO_MANAGED)
off                covered (AUTO_MANAGED)           excluded (DISABLED)              not managed (MANUAL)
=================  ===============================  ===============================  ====================

In a covered cluster, every ACTIVE service whose task definition lacks the sidecar gets a new task-definition
revision with it (``backend.manager.inject``) and ``UpdateService(forceNewDeployment)`` onto it: a running Fargate
task is immutable, a new deployment is the only way its replacement gets the agent. Excluded and unmanaged
clusters are never changed. A second run changes nothing (the services' task definitions have the sidecar).
Every AWS call backs off on throttling (``backend.manager.aws.Backoff``).

Each run also gives every VPC of the covered services an interface endpoint to the collector
(``backend.manager.network``, when ``endpoint_service_name`` is set) and reports the control plane's view of
coverage to the backend (``backend.manager.coverage_report``, when ``backend_url`` and an access key are set).

The manager's IAM permissions: ecs:ListClusters, DescribeClusters, ListServices, DescribeServices,
DescribeTaskDefinition, RegisterTaskDefinition, TagResource, UpdateService, ListTasks, DescribeTasks;
iam:PassRole on the task definitions' execution and task roles (registering a revision passes them again);
ec2:DescribeSubnets, DescribeVpcs, DescribeVpcAttribute, DescribeVpcEndpoints, DescribeVpcEndpointServices,
DescribeSecurityGroups, CreateSecurityGroup, AuthorizeSecurityGroupIngress, CreateVpcEndpoint, CreateTags, and for
`cleanup` DeleteVpcEndpoints and DeleteSecurityGroup.

Settings come from a file (``--config`` or RUNTIME_MANAGER_CONFIG: YAML or JSON, the names below), then the
environment (``RUNTIME_MANAGER_<NAME>``, e.g. RUNTIME_MANAGER_TAG_KEY), then flags, each overriding the one
before. The access key's secret is read from the file or RUNTIME_MANAGER_SECRET_ACCESS_KEY only (a flag would
show in ``ps``). ``token_secret_arn`` may contain ``{cluster}``: agent tokens are per cluster, so each cluster's
sidecar reads its own secret.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backend.coverage import AUTO_MANAGED, DISABLED, MANUAL
from backend.manager import aws
from backend.manager import iam as iam_checks
from backend.manager.aws import AwsConfig, Backoff, error_code, is_throttling
from backend.manager.coverage_report import (
    BackendReporter,
    ClusterReport,
    ReportError,
    ServiceState,
    TaskDefinitions,
    collect_cluster,
    family_revision,
)
from backend.manager.inject import CONTAINER_NAME, InjectError, SidecarSpec, has_sidecar, inject
from backend.manager.network import MANAGED_TAG_KEY, MANAGED_TAG_VALUE, VpcEndpointPlan, VpcEndpoints, cleanup

log = logging.getLogger("backend.manager.automation")

DEFAULT_TAG_KEY = "RuntimeMonitoringManaged"
ENV_PREFIX = "RUNTIME_MANAGER_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"


class SettingsError(Exception):
    """A configuration problem, worded for the operator."""


class ManagerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description="the sidecar image (your private ECR repository)")
    collector_url: str | None = Field(None, description="the collector API the sidecars send to (https://...)")
    token_secret_arn: str | None = Field(
        None, description="Secrets Manager or SSM parameter ARN of the agent token; {cluster} is the cluster's name"
    )
    endpoint_service_name: str | None = Field(
        None, description="VPC endpoint service of the collector (com.amazonaws.vpce.REGION.vpce-svc-...)"
    )
    tag_key: str = Field(DEFAULT_TAG_KEY, min_length=1, max_length=128, description="the cluster tag deciding coverage")
    automation: bool = Field(True, description="on: every cluster not tagged <key>=false; off: only <key>=true")
    backend_url: str | None = Field(None, description="the backend to report coverage to")
    access_key_id: str | None = Field(None, description="a backend access key of this account (reporting)")
    secret_access_key: str | None = Field(None, description="its secret (file or environment only)")
    interval_s: float = Field(300.0, ge=1, le=86400, description="seconds between runs of `run`")
    sidecar_cpu: int = Field(128, ge=0)
    sidecar_memory: int = Field(256, ge=64)
    sidecar_memory_reservation: int = Field(128, ge=0)
    log_group: str | None = None
    container_name: str = CONTAINER_NAME

    def missing_for_injection(self) -> list[str]:
        return [n for n in ("image", "collector_url", "token_secret_arn") if not getattr(self, n)]

    def sidecar_spec(self, cluster: str, region: str) -> SidecarSpec:
        assert self.image and self.collector_url and self.token_secret_arn
        return SidecarSpec(
            image=self.image,
            collector_url=self.collector_url,
            token_secret_arn=self.token_secret_arn.replace("{cluster}", cluster),
            region=region,
            cpu=self.sidecar_cpu,
            memory=self.sidecar_memory,
            memory_reservation=self.sidecar_memory_reservation,
            log_group=self.log_group,
            container_name=self.container_name,
        )

    @property
    def reporting(self) -> bool:
        return bool(self.backend_url and self.access_key_id and self.secret_access_key)


FLAG_FIELDS = (
    "image",
    "collector_url",
    "token_secret_arn",
    "endpoint_service_name",
    "tag_key",
    "automation",
    "backend_url",
    "access_key_id",
    "interval_s",
)


def load_settings(
    flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None, config_file: str | None = None
) -> ManagerSettings:
    """File, then environment, then flags (None: not given); SettingsError names the bad value's origin."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    path = config_file or env.get(CONFIG_ENV)
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise SettingsError(f"{path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise SettingsError(f"{path}: not YAML or JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise SettingsError(f"{path}: expected a mapping of settings")
        for k, v in loaded.items():
            values[str(k)], origin[str(k)] = v, f"{path}: {k}"
    for name in ManagerSettings.model_fields:
        var = ENV_PREFIX + name.upper()
        if var in env:
            values[name], origin[name] = env[var], var
    for name, v in (flags or {}).items():
        if v is not None:
            values[name], origin[name] = v, "--" + name.replace("_", "-")
    try:
        return ManagerSettings.model_validate(values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            problems.append(f"{origin.get(name, name)}: {err['msg']} (got {err.get('input')!r})")
        raise SettingsError("invalid runtime-manager settings:\n" + "\n".join(problems)) from None


# -- which clusters ------------------------------------------------------------------------------------------------


def cluster_management(tags: Mapping[str, str], tag_key: str, automation: bool) -> tuple[str, str]:
    """(GuardDuty's management type, why) of a cluster with these tags."""
    value = tags.get(tag_key)
    v = value.strip().lower() if value is not None else None
    if v == "false":
        return DISABLED, f"excluded: tagged {tag_key}=false"
    if v == "true":
        return AUTO_MANAGED, f"covered: tagged {tag_key}=true"
    ignored = f" (its tag {tag_key}={value!r} is neither true nor false: ignored)" if value is not None else ""
    if automation:
        return AUTO_MANAGED, f"covered: automation is on and the cluster is not tagged {tag_key}=false{ignored}"
    return MANUAL, f"not managed: automation is off and the cluster is not tagged {tag_key}=true{ignored}"


@dataclass
class ServicePlan:
    cluster: str
    name: str
    arn: str
    task_definition_arn: str
    # "none" (it has the sidecar), "inject" (planned), "injected" (done), "skip" (cannot), "failed" (AWS refused)
    action: str
    reason: str | None = None
    new_task_definition_arn: str | None = None
    subnets: list[str] = field(default_factory=list)
    register_input: dict[str, Any] | None = None

    def state(self) -> ServiceState:
        if self.action == "injected" and self.new_task_definition_arn:
            return ServiceState(self.name, self.new_task_definition_arn, True)
        return ServiceState(
            self.name,
            self.task_definition_arn,
            self.action == "none",
            None if self.action in ("none", "inject") else self.reason,
        )

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "serviceName": self.name,
            "taskDefinition": family_revision(self.task_definition_arn),
            "action": self.action,
        }
        if self.reason:
            out["reason"] = self.reason
        if self.new_task_definition_arn:
            out["newTaskDefinition"] = family_revision(self.new_task_definition_arn)
        return out


@dataclass
class ClusterPlan:
    name: str
    arn: str
    management_type: str
    reason: str
    services: list[ServicePlan] = field(default_factory=list)

    def wire(self) -> dict[str, Any]:
        return {
            "clusterName": self.name,
            "clusterArn": self.arn,
            "managementType": self.management_type,
            "reason": self.reason,
            "services": [s.wire() for s in self.services],
        }


@dataclass
class Survey:
    clusters: list[ClusterPlan]
    endpoints: list[VpcEndpointPlan] | None  # None: no endpoint service configured

    @property
    def services(self) -> list[ServicePlan]:
        return [s for c in self.clusters for s in c.services]

    def wire(self) -> dict[str, Any]:
        return {
            "clusters": [c.wire() for c in self.clusters],
            "vpcEndpoints": None if self.endpoints is None else [e.wire() for e in self.endpoints],
            "changes": sum(1 for s in self.services if s.action in ("inject", "injected"))
            + sum(1 for e in self.endpoints or [] if e.action in ("create", "created")),
        }


class Manager:
    """One region's reconciliation: survey (read-only), apply, endpoints, coverage."""

    def __init__(
        self,
        settings: ManagerSettings,
        *,
        ecs: Any,
        ec2: Any,
        region: str,
        backoff: Backoff | None = None,
        reporter: BackendReporter | None = None,
        iam: Any = None,
    ) -> None:
        self.settings = settings
        self.ecs = ecs
        self.ec2 = ec2
        self.region = region
        self.backoff = backoff or Backoff()
        self.reporter = reporter
        self.task_definitions = TaskDefinitions(ecs, self.backoff)
        # with an IAM client, a service is rolled only if its execution role can pull the sidecar and read its
        # token: ECS pulls every image and secret before any container starts, so a role that cannot would stop
        # the service's new tasks from starting at all (the sidecar being non-essential does not help)
        self.iam = iam
        self._role_checks: dict[tuple[str, str], str | None] = {}

    # -- reading ------------------------------------------------------------------------------------------------
    def clusters(self) -> list[ClusterPlan]:
        arns = [a for page in self.backoff.pages(self.ecs.list_clusters) for a in page.get("clusterArns", [])]
        out: list[ClusterPlan] = []
        for i in range(0, len(arns), 100):
            described = self.backoff.call(self.ecs.describe_clusters, clusters=arns[i : i + 100], include=["TAGS"])
            for c in described.get("clusters", []):
                if c.get("status", "ACTIVE") != "ACTIVE":
                    continue
                tags = {t["key"]: t.get("value", "") for t in c.get("tags") or []}
                mtype, why = cluster_management(tags, self.settings.tag_key, self.settings.automation)
                out.append(ClusterPlan(c["clusterName"], c["clusterArn"], mtype, why))
        return sorted(out, key=lambda c: c.name)

    def _services(self, cluster: str) -> list[dict[str, Any]]:
        arns = [a for page in self.backoff.pages(self.ecs.list_services, cluster=cluster) for a in page["serviceArns"]]
        out: list[dict[str, Any]] = []
        for i in range(0, len(arns), 10):
            described = self.backoff.call(self.ecs.describe_services, cluster=cluster, services=arns[i : i + 10])
            out += [s for s in described.get("services", []) if s.get("status") == "ACTIVE"]
        return sorted(out, key=lambda s: s["serviceName"])

    def plan_service(self, cluster: ClusterPlan, svc: dict[str, Any]) -> ServicePlan:
        td_arn = svc["taskDefinition"]
        network = (svc.get("networkConfiguration") or {}).get("awsvpcConfiguration") or {}
        plan = ServicePlan(
            cluster.name,
            svc["serviceName"],
            svc["serviceArn"],
            td_arn,
            "none",
            subnets=list(network.get("subnets") or []),
        )
        td = self.task_definitions.get(td_arn)
        if has_sidecar(td, self.settings.container_name):
            return plan
        controller = (svc.get("deploymentController") or {}).get("type") or "ECS"
        if controller != "ECS":
            plan.action = "skip"
            plan.reason = (
                f"it uses the {controller} deployment controller, which UpdateService cannot roll: deploy a task "
                "definition with the sidecar (runtime-manager inject) through it"
            )
            return plan
        if not td.get("executionRoleArn"):
            plan.action = "skip"
            plan.reason = (
                f"task definition {family_revision(td_arn)} has no execution role: the sidecar's image pull and "
                "token secret need one"
            )
            return plan
        problem = self._execution_role_problem(td["executionRoleArn"], cluster.name)
        if problem is not None:
            plan.action, plan.reason = "skip", problem
            return plan
        fargate = svc.get("launchType") == "FARGATE" or any(
            p.get("capacityProvider", "").startswith("FARGATE") for p in svc.get("capacityProviderStrategy") or []
        )
        try:
            doc = inject(
                td,
                self.settings.sidecar_spec(cluster.name, self.region),
                platform_version=svc.get("platformVersion") if fargate else None,
            )
        except InjectError as exc:
            plan.action, plan.reason = "skip", f"the sidecar cannot be added: {exc}"
            return plan
        tags = [t for t in doc.get("tags") or [] if t.get("key") != MANAGED_TAG_KEY]
        doc["tags"] = [*tags, {"key": MANAGED_TAG_KEY, "value": MANAGED_TAG_VALUE}]
        plan.action, plan.register_input = "inject", doc
        return plan

    def _execution_role_problem(self, role_arn: str, cluster: str) -> str | None:
        """Why ``role_arn`` cannot start a task with the sidecar (ECR pull, token secret), or None."""
        repository = ecr_repository_arn(self.settings.image)
        if self.iam is None or repository is None:  # an image from a public registry needs no ECR permission
            return None
        token = self.settings.sidecar_spec(cluster, self.region).token_secret_arn
        key = (role_arn, token)
        if key not in self._role_checks:
            check = iam_checks.check_role(self.iam, role_arn, repository, token_secret_arn=token, backoff=self.backoff)
            self._role_checks[key] = (
                None
                if check.ok
                else f"its execution role {role_arn} cannot "
                + ("be found" if not check.exists else "perform " + ", ".join(check.missing))
                + ": run `runtime-manager check-roles --fix` (new tasks with the sidecar would not start)"
            )
        return self._role_checks[key]

    def survey(self) -> Survey:
        """What `run` would change (nothing is changed)."""
        missing = self.settings.missing_for_injection()
        if missing:
            raise SettingsError(
                "the sidecar to inject is not configured: "
                + ", ".join(f"{n} (--{n.replace('_', '-')} or {ENV_PREFIX}{n.upper()})" for n in missing)
            )
        clusters = self.clusters()
        for c in clusters:
            if c.management_type == AUTO_MANAGED:  # excluded and unmanaged clusters are never touched
                c.services = [self.plan_service(c, s) for s in self._services(c.name)]
        endpoints = None
        if self.settings.endpoint_service_name:
            subnets: dict[str, set[str]] = {}
            for c in clusters:
                for s in c.services:
                    if s.subnets:
                        subnets.setdefault(c.name, set()).update(s.subnets)
            endpoints = VpcEndpoints(self.ec2, self.backoff, self.settings.endpoint_service_name).plan(subnets)
        return Survey(clusters, endpoints)

    # -- changing -----------------------------------------------------------------------------------------------
    def apply(self, survey: Survey) -> Survey:
        registered: dict[str, str] = {}  # old task definition ARN -> the revision with the sidecar (this run)
        for s in survey.services:
            if s.action != "inject":
                continue
            assert s.register_input is not None
            try:
                new_arn = registered.get(s.task_definition_arn)
                if new_arn is None:
                    out = self.backoff.call(self.ecs.register_task_definition, **s.register_input)
                    new_arn = str(out["taskDefinition"]["taskDefinitionArn"])
                    registered[s.task_definition_arn] = new_arn
                    log.info("task definition with the sidecar registered", extra={"taskDefinition": new_arn})
                self.backoff.call(
                    self.ecs.update_service,
                    cluster=s.cluster,
                    service=s.name,
                    taskDefinition=new_arn,
                    forceNewDeployment=True,
                )
            except ClientError as exc:
                if is_throttling(exc):
                    raise
                err = exc.response.get("Error", {})
                s.action, s.reason = "failed", f"AWS refused: {error_code(exc)}: {err.get('Message')}"
                log.warning("service not updated", extra={"cluster": s.cluster, "service": s.name, "error": s.reason})
                continue
            s.action, s.new_task_definition_arn = "injected", new_arn
            log.info("service rolled onto the sidecar", extra={"cluster": s.cluster, "service": s.name})
        if survey.endpoints is not None and self.settings.endpoint_service_name:
            VpcEndpoints(self.ec2, self.backoff, self.settings.endpoint_service_name).ensure(survey.endpoints)
        return survey

    def coverage(self, survey: Survey) -> list[ClusterReport]:
        issues: dict[str, list[str]] = {}
        for e in survey.endpoints or []:
            if e.action == "failed":
                for name in e.clusters:
                    issues.setdefault(name, []).append(f"{e.vpc_id}: {e.reason}")
        reports = []
        for c in survey.clusters:
            issue = f"VPC endpoint creation failed: {'; '.join(issues[c.name])}" if c.name in issues else None
            report = ClusterReport(c.name, c.arn, c.management_type, issue)
            collect_cluster(
                self.ecs,
                self.backoff,
                self.task_definitions,
                report,
                tag=self.settings.tag_key,
                services={s.name: s.state() for s in c.services},
                container_name=self.settings.container_name,
            )
            reports.append(report)
        return reports

    def run_once(self) -> dict[str, Any]:
        survey = self.apply(self.survey())
        reports = self.coverage(survey)
        out = survey.wire()
        out["coverage"] = [coverage_summary(r) for r in reports]
        out["reported"] = self.reporter.send(reports) if self.reporter is not None else None
        return out


def coverage_summary(report: ClusterReport) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for t in report.tasks:
        if t.issue:
            kind = t.issue.split(":", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "clusterName": report.name,
        "managementType": report.management_type,
        "issue": report.issue,
        "tasks": len(report.tasks),
        "withSidecar": sum(1 for t in report.tasks if not t.issue),
        "issues": kinds,
    }


# -- the commands ----------------------------------------------------------------------------------------------------


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    out = {name: getattr(args, name, None) for name in FLAG_FIELDS}
    if out["automation"] is not None:
        out["automation"] = out["automation"] == "on"
    return out


def build_manager(
    args: argparse.Namespace, settings: ManagerSettings, sleep: Callable[[float], Any] = time.sleep
) -> Manager:
    """The manager for the command line; ``sleep`` is every wait it makes (`run` makes SIGTERM cut them short)."""
    cfg = AwsConfig.from_args(args)
    sess = aws.session(cfg)
    region = cfg.region or sess.region_name
    if not region:
        raise SettingsError("no AWS region: pass --region or set AWS_REGION")
    reporter = None
    if settings.reporting:
        assert settings.backend_url and settings.access_key_id and settings.secret_access_key
        reporter = BackendReporter(
            settings.backend_url, settings.access_key_id, settings.secret_access_key, region, sleep=sleep
        )
    return Manager(
        settings,
        ecs=aws.client(cfg, "ecs", sess),
        ec2=aws.client(cfg, "ec2", sess),
        region=region,
        backoff=Backoff(sleep=sleep),
        reporter=reporter,
        iam=aws.client(cfg, "iam", sess),
    )


def ecr_repository_arn(image: str | None) -> str | None:
    """``ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPO[:TAG|@DIGEST]`` -> the repository's ARN; None if not ECR."""
    m = re.match(r"^(\d{12})\.dkr\.ecr(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/([^:@]+)", image or "")
    if m is None:
        return None
    partition = "aws-cn" if ".amazonaws.com.cn/" in (image or "") else "aws"
    return f"arn:{partition}:ecr:{m.group(2)}:{m.group(1)}:repository/{m.group(3)}"


def _print(out: Any) -> None:
    sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except SettingsError as exc:
            sys.stderr.write(f"runtime-manager {args.command}: {exc}\n")
            return 2
        except ReportError as exc:
            sys.stderr.write(f"runtime-manager {args.command}: {exc}\n")
            return 1

    return run


@_guarded
def cmd_plan(args: argparse.Namespace) -> int:
    settings = load_settings(_flags(args), config_file=args.config)
    manager = build_manager(args, settings)
    out = manager.survey().wire()
    out.update(region=manager.region, automation=settings.automation, tagKey=settings.tag_key)
    _print(out)
    return 0


@_guarded
def cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings(_flags(args), config_file=args.config)
    stop = threading.Event()
    # every wait (throttling backoff, the backend's retries, the interval) ends at SIGTERM: ECS allows 30 s
    manager = build_manager(args, settings, sleep=stop.wait)
    if not settings.reporting:
        log.warning("coverage is not reported: set backend_url, access_key_id and secret_access_key")
    if args.once:
        _print(manager.run_once())
        return 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("runtime-manager running", extra={"region": manager.region, "intervalSeconds": settings.interval_s})
    while not stop.is_set():
        started = time.monotonic()
        try:
            out = manager.run_once()
            log.info(
                "run done",
                extra={"changes": out["changes"], "reported": out["reported"], "seconds": time.monotonic() - started},
            )
        except SettingsError:
            raise
        except Exception:
            # one failed run (AWS unreachable, kept throttling, the backend down) must not end the service
            log.exception("run failed; retrying at the next interval")
        manager.task_definitions.cache.clear()
        stop.wait(settings.interval_s)
    return 0


@_guarded
def cmd_cleanup(args: argparse.Namespace) -> int:
    cfg = AwsConfig.from_args(args)
    result = cleanup(aws.client(cfg, "ec2"), Backoff(), vpc_ids=args.vpc_id or None, wait_s=args.wait)
    _print(result.wire())
    return 1 if result.failures else 0


def _settings_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help=f"settings file, YAML or JSON (or {CONFIG_ENV})")
    p.add_argument("--image", help="the sidecar image")
    p.add_argument("--collector-url", metavar="URL", help="the collector API the sidecars send to")
    p.add_argument(
        "--token-secret-arn", metavar="ARN", help="the agent token's secret or SSM parameter; {cluster}: its name"
    )
    p.add_argument("--endpoint-service-name", metavar="NAME", help="the collector's VPC endpoint service")
    p.add_argument(
        "--tag-key", help=f"the cluster tag that includes (true) or excludes (false); default {DEFAULT_TAG_KEY}"
    )
    p.add_argument("--automation", choices=["on", "off"], help="on (default): all clusters but <key>=false")
    p.add_argument("--backend-url", metavar="URL", help="the backend to report coverage to")
    p.add_argument(
        "--access-key-id", help="a backend access key (its secret: RUNTIME_MANAGER_SECRET_ACCESS_KEY or the file)"
    )


def register(subparsers: Any) -> None:
    run = subparsers.add_parser(
        "run",
        help="keep services' task definitions on the sidecar, VPC endpoints in place, coverage reported",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _settings_flags(run)
    run.add_argument("--once", action="store_true", help="one run, print what it did (JSON), exit (cron, tests)")
    run.add_argument("--interval", dest="interval_s", type=float, help="seconds between runs (default 300)")
    run.set_defaults(func=cmd_run)

    plan = subparsers.add_parser("plan", help="print what `run` would change (JSON); changes nothing")
    _settings_flags(plan)
    plan.set_defaults(func=cmd_plan)

    clean = subparsers.add_parser(
        "cleanup",
        help="delete the VPC endpoints and security groups the manager created (tagged runtime-monitor:managed)",
    )
    clean.add_argument("--vpc-id", action="append", help="only in this VPC (repeatable)")
    clean.add_argument("--wait", type=float, default=600.0, help="seconds to wait for endpoints to go (default 600)")
    clean.set_defaults(func=cmd_cleanup)

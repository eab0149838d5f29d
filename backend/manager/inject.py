"""Adding the sidecar to a task definition: `runtime-manager inject`, and what `run` registers as a new revision.

A Fargate task is immutable: the only way it gets the agent is a new task-definition revision with the sidecar
container in it, and a new deployment. :func:`inject` builds that revision from a RegisterTaskDefinition input or
a DescribeTaskDefinition output, idempotently, and refuses clearly what cannot work.

What the sidecar needs from the task (see ARCHITECTURE.md):
- ``pidMode: task``: one PID namespace for every container, so the sidecar sees the app's processes (Fargate
  platform 1.4.0 and later).
- ``SYS_PTRACE``: the only capability Fargate lets a task add; other containers' ``/proc/<pid>/exe``, ``cwd`` and
  ``environ`` need it.
- ``essential: false``: a failing sidecar never stops the app.
- app containers ``dependsOn`` the sidecar having STARTED, so it watches them from their first process (and ECS
  stops it after them).
- the agent token through ``secrets``, never in the environment or the command line.
- ``readonlyRootFilesystem`` with one writable task volume for its state (the findings spool, threat lists).

Sizing comes from the README's benchmarks: about 1% of a core and 55-70 MB RSS in a task, plus ~43 MB for a
250,000-entry user threat list. Hence 128 CPU units (a relative share within the task; the sidecar's own CPU
budget caps it at 20% of a core under load), a 128 MiB reservation and a 256 MiB hard limit.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("backend.manager.inject")

CONTAINER_NAME = "runtime-sidecar"
STATE_VOLUME = "runtime-sidecar-state"
STATE_DIR = "/var/lib/runtime-sidecar"
DEFAULT_LOG_GROUP = "/ecs/runtime-sidecar"
MAX_CONTAINERS = 10  # ECS: containers per task definition

# DescribeTaskDefinition's keys that RegisterTaskDefinition refuses.
READ_ONLY_KEYS = (
    "taskDefinitionArn",
    "revision",
    "status",
    "requiresAttributes",
    "compatibilities",
    "registeredAt",
    "registeredBy",
    "deregisteredAt",
)

# Docker's default capabilities the sidecar does not use. Kept: SYS_PTRACE (added), NET_RAW (DNS and SYN capture),
# DAC_OVERRIDE (reading other containers' files through /proc/<pid>/root as root, whatever their modes).
DROPPED_CAPABILITIES = (
    "AUDIT_WRITE",
    "CHOWN",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
)

# Fargate's valid task sizes (Linux): CPU units -> memory MiB. 8 and 16 vCPU need platform 1.4.0, which pidMode
# task needs anyway.
FARGATE_SIZES: dict[int, tuple[int, ...]] = {
    256: (512, 1024, 2048),
    512: tuple(range(1024, 4096 + 1, 1024)),
    1024: tuple(range(2048, 8192 + 1, 1024)),
    2048: tuple(range(4096, 16384 + 1, 1024)),
    4096: tuple(range(8192, 30720 + 1, 1024)),
    8192: tuple(range(16384, 61440 + 1, 4096)),
    16384: tuple(range(32768, 122880 + 1, 8192)),
}
# Fargate's on-demand price ratio (us-east-1, Linux/x86): one vCPU-hour costs about what 9.1 GB-hours cost. The
# next size up is the cheapest valid one that holds the task, not the first in the table.
_GB_PER_VCPU_PRICE = 9.1

_SECRET_ARN = re.compile(
    r"^arn:aws[a-z-]*:(secretsmanager:[a-z0-9-]+:\d{12}:secret:.+|ssm:[a-z0-9-]+:\d{12}:parameter/.+)$"
)


class InjectError(Exception):
    """This task definition cannot get the sidecar; the message says why, for the operator."""


@dataclass
class SidecarSpec:
    """The sidecar container to add. cpu in CPU units, memory in MiB (hard limit), memory_reservation (soft)."""

    image: str
    collector_url: str
    token_secret_arn: str  # Secrets Manager secret or SSM parameter ARN holding RUNTIME_SIDECAR_TOKEN
    region: str
    cpu: int = 128
    memory: int = 256
    memory_reservation: int = 128
    log_group: str | None = None  # None: the app's awslogs group if it has one, else DEFAULT_LOG_GROUP
    container_name: str = CONTAINER_NAME
    extra_environment: dict[str, str] = field(default_factory=dict)


def register_input(task_definition: dict[str, Any]) -> dict[str, Any]:
    """RegisterTaskDefinition's input from either that input or a DescribeTaskDefinition output.

    A DescribeTaskDefinition output (``{"taskDefinition": {...}, "tags": [...]}``) is unwrapped, its tags kept,
    and the read-only keys are dropped. The argument is not modified.
    """
    doc = copy.deepcopy(task_definition)
    if isinstance(doc.get("taskDefinition"), dict):
        tags = doc.get("tags") or []
        doc = doc["taskDefinition"]
        if tags and "tags" not in doc:
            doc["tags"] = tags
    for key in READ_ONLY_KEYS:
        doc.pop(key, None)
    if not isinstance(doc.get("containerDefinitions"), list) or not doc["containerDefinitions"]:
        raise InjectError("not a task definition: no containerDefinitions")
    if not doc.get("family"):
        raise InjectError("not a task definition: no family")
    return doc


def _image_repository(image: str) -> str:
    """The repository's last path component of an image reference (``.../runtime-sidecar:1.2@sha256:...``)."""
    name = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return name.split(":", 1)[0]


def has_sidecar(task_definition: dict[str, Any], container_name: str = CONTAINER_NAME) -> bool:
    """Whether a container of this task definition is the sidecar (by its name or its image's repository)."""
    doc = task_definition.get("taskDefinition", task_definition)
    return any(
        c.get("name") == container_name or _image_repository(str(c.get("image", ""))) == CONTAINER_NAME
        for c in doc.get("containerDefinitions") or []
    )


def is_fargate(task_definition: dict[str, Any]) -> bool:
    return "FARGATE" in (task_definition.get("requiresCompatibilities") or [])


def parse_cpu(value: Any) -> int:
    """Task-level cpu as CPU units: ``"512"``, ``512``, ``"0.5 vCPU"``, ``"1vcpu"``."""
    text = str(value).strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*vcpu", text)
    if m:
        return round(float(m.group(1)) * 1024)
    if re.fullmatch(r"\d+", text):
        return int(text)
    raise InjectError(f"task cpu {value!r} is neither CPU units nor 'N vCPU'")


def parse_memory(value: Any) -> int:
    """Task-level memory in MiB: ``"1024"``, ``1024``, ``"1 GB"``, ``"0.5GB"``."""
    text = str(value).strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*gb", text)
    if m:
        return round(float(m.group(1)) * 1024)
    if re.fullmatch(r"\d+", text):
        return int(text)
    raise InjectError(f"task memory {value!r} is neither MiB nor 'N GB'")


def fargate_size(cpu_needed: int, memory_needed: int) -> tuple[int, int] | None:
    """The cheapest valid Fargate (cpu, memory) holding both needs, or None when even the largest cannot."""
    best: tuple[float, int, int] | None = None
    for cpu, memories in FARGATE_SIZES.items():
        if cpu < cpu_needed:
            continue
        for memory in memories:
            if memory < memory_needed:
                continue
            price = cpu / 1024 * _GB_PER_VCPU_PRICE + memory / 1024
            if best is None or (price, cpu) < (best[0], best[1]):
                best = (price, cpu, memory)
            break  # larger memories at this cpu only cost more
    return None if best is None else (best[1], best[2])


def is_valid_fargate_size(cpu: int, memory: int) -> bool:
    return memory in FARGATE_SIZES.get(cpu, ())


def _version_tuple(version: str) -> tuple[int, ...] | None:
    if not re.fullmatch(r"\d+(\.\d+)*", version):
        return None
    return tuple(int(p) for p in version.split("."))


def _check_injectable(doc: dict[str, Any], spec: SidecarSpec, platform_version: str | None) -> None:
    family = doc["family"]
    os_family = str((doc.get("runtimePlatform") or {}).get("operatingSystemFamily") or "LINUX")
    if os_family != "LINUX":
        raise InjectError(
            f"{family}: runtimePlatform {os_family}: the sidecar reads Linux's /proc and netlink; Windows tasks "
            "cannot run it"
        )
    fargate = is_fargate(doc)
    if doc.get("pidMode") == "host":
        if fargate:
            raise InjectError(f"{family}: pidMode host is not available on Fargate; the sidecar needs pidMode task")
        raise InjectError(
            f"{family}: pidMode host shares the instance's PID namespace, so a sidecar in this task would watch "
            "(and attribute to this task) every process on the instance; run it as a daemon service instead, or "
            "use pidMode task"
        )
    if fargate and platform_version and platform_version.upper() != "LATEST":
        parsed = _version_tuple(platform_version)
        if parsed is None or parsed < (1, 4, 0):
            raise InjectError(
                f"{family}: Fargate platform version {platform_version}: pidMode task (one PID namespace for the "
                "task, without which the sidecar sees only itself) needs 1.4.0 or later"
            )
    if len(doc["containerDefinitions"]) >= MAX_CONTAINERS:
        raise InjectError(f"{family}: no room: ECS allows {MAX_CONTAINERS} containers per task definition")
    if not _SECRET_ARN.match(spec.token_secret_arn):
        raise InjectError(
            f"token secret {spec.token_secret_arn!r}: expected a Secrets Manager secret ARN or an SSM parameter ARN"
        )
    if not spec.collector_url.startswith(("https://", "http://")):
        raise InjectError(f"collector URL {spec.collector_url!r}: expected https://...")
    if any(k == "RUNTIME_SIDECAR_TOKEN" for k in spec.extra_environment):
        raise InjectError("RUNTIME_SIDECAR_TOKEN must come from the secret, never the environment")
    if spec.memory_reservation > spec.memory:
        raise InjectError(f"sidecar memory reservation {spec.memory_reservation} MiB exceeds its limit {spec.memory}")


def _log_configuration(doc: dict[str, Any], spec: SidecarSpec) -> dict[str, Any]:
    group = spec.log_group
    create = False
    if group is None:
        # the app's group: the execution role can already write there
        for c in doc["containerDefinitions"]:
            lc = c.get("logConfiguration") or {}
            if lc.get("logDriver") == "awslogs" and (lc.get("options") or {}).get("awslogs-group"):
                group = str(lc["options"]["awslogs-group"])
                break
    if group is None:
        group, create = DEFAULT_LOG_GROUP, True
    options = {
        "awslogs-group": group,
        "awslogs-region": spec.region,
        "awslogs-stream-prefix": spec.container_name,
        # a slow CloudWatch never blocks the sidecar's stderr (it would stall detection)
        "mode": "non-blocking",
        "max-buffer-size": "4m",
    }
    if create:
        options["awslogs-create-group"] = "true"
    return {"logDriver": "awslogs", "options": options}


def sidecar_container(doc: dict[str, Any], spec: SidecarSpec) -> dict[str, Any]:
    """The sidecar's container definition for this task definition (its log group may follow the app's)."""
    environment = {
        "RUNTIME_SIDECAR_COLLECTOR_URL": spec.collector_url,
        "RUNTIME_SIDECAR_STATE_DIR": STATE_DIR,
        **spec.extra_environment,
    }
    return {
        "name": spec.container_name,
        "image": spec.image,
        "essential": False,
        "cpu": spec.cpu,
        "memory": spec.memory,
        "memoryReservation": spec.memory_reservation,
        "command": ["run"],
        "environment": [{"name": k, "value": v} for k, v in sorted(environment.items())],
        "secrets": [{"name": "RUNTIME_SIDECAR_TOKEN", "valueFrom": spec.token_secret_arn}],
        "linuxParameters": {"capabilities": {"add": ["SYS_PTRACE"], "drop": list(DROPPED_CAPABILITIES)}},
        "readonlyRootFilesystem": True,
        "mountPoints": [{"sourceVolume": STATE_VOLUME, "containerPath": STATE_DIR, "readOnly": False}],
        "healthCheck": {
            "command": ["CMD", "runtime-sidecar", "health"],
            "interval": 30,
            "timeout": 5,
            "retries": 3,
            "startPeriod": 30,
        },
        "logConfiguration": _log_configuration(doc, spec),
    }


def _resize(doc: dict[str, Any], apps: list[dict[str, Any]], spec: SidecarSpec) -> None:
    """Task-level cpu/memory that hold the app and the sidecar (a valid Fargate size on Fargate)."""
    family = doc["family"]
    fargate = is_fargate(doc)
    if "cpu" not in doc or "memory" not in doc:
        if fargate:
            raise InjectError(f"{family}: a Fargate task definition needs task-level cpu and memory")
        return  # EC2 without task-level sizes: each container carries its own (the sidecar's are set)
    cpu, memory = parse_cpu(doc["cpu"]), parse_memory(doc["memory"])
    # ECS: the containers' declared cpu (a share of the task's) must fit the task. CPU is shared, not reserved:
    # the sidecar idles at ~1% of a core, so it takes no more than its declared share.
    cpu_needed = sum(int(c.get("cpu") or 0) for c in apps) + spec.cpu
    declared = [int(c.get("memory") or c.get("memoryReservation") or 0) for c in apps]
    # Memory is not compressible: an app container without its own memory was sized to the whole task, so the
    # task grows by what the sidecar typically holds. Declared limits must fit with the sidecar's hard limit.
    memory_needed = sum(declared) + spec.memory
    if not all(declared):
        memory_needed = max(memory_needed, memory + spec.memory_reservation)
    if fargate:
        if cpu_needed <= cpu and memory_needed <= memory and is_valid_fargate_size(cpu, memory):
            return
        size = fargate_size(max(cpu, cpu_needed), max(memory, memory_needed))
        if size is None:
            raise InjectError(
                f"{family}: no room: the task with the sidecar needs {cpu_needed} CPU units and {memory_needed} MiB, "
                "more than Fargate's largest size (16 vCPU, 120 GB)"
            )
        log.info(
            "task size raised for the sidecar",
            extra={"family": family, "from": [cpu, memory], "to": list(size)},
        )
        cpu, memory = size
    else:
        cpu, memory = max(cpu, cpu_needed), max(memory, memory_needed)
    doc["cpu"], doc["memory"] = str(cpu), str(memory)


def inject(task_definition: dict[str, Any], spec: SidecarSpec, platform_version: str | None = None) -> dict[str, Any]:
    """The task definition with the sidecar, ready for RegisterTaskDefinition.

    ``task_definition`` is a RegisterTaskDefinition input or a DescribeTaskDefinition output (unchanged by this
    call). One that has the sidecar already comes back as it is (read-only keys dropped), so ``inject`` of its own
    result is that result. ``platform_version`` (a service's Fargate platform version, when known) is checked
    against the 1.4.0 that ``pidMode: task`` needs. Raises InjectError for what cannot work.
    """
    doc = register_input(task_definition)
    if has_sidecar(doc, spec.container_name):
        return doc
    _check_injectable(doc, spec, platform_version)
    family = doc["family"]
    apps = doc["containerDefinitions"]
    if doc.get("networkMode") in (None, "bridge", "none"):
        log.warning(
            "network events limited",
            extra={
                "family": family,
                "reason": f"networkMode {doc.get('networkMode') or 'bridge'}: each container has its own network "
                "namespace, so the sidecar sees its own sockets and packets only; use awsvpc",
            },
        )
    _resize(doc, apps, spec)
    doc["pidMode"] = "task"
    for c in apps:
        deps = c.setdefault("dependsOn", [])
        if not any(d.get("containerName") == spec.container_name for d in deps):
            deps.append({"containerName": spec.container_name, "condition": "START"})
    volumes = doc.setdefault("volumes", [])
    if not any(v.get("name") == STATE_VOLUME for v in volumes):
        # no host path: task storage on Fargate, a task-scoped Docker volume on EC2
        volumes.append({"name": STATE_VOLUME})
    # first in the list: the order people read it in, and the order ECS starts containers without dependencies
    doc["containerDefinitions"] = [sidecar_container(doc, spec), *apps]
    return doc


# -- CLI ------------------------------------------------------------------------------------------------------
def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key, value


def _region(args: argparse.Namespace) -> str | None:
    if args.region:
        return str(args.region)
    # the secret lives in the task's region: arn:aws:secretsmanager:REGION:...
    parts = str(args.token_secret_arn).split(":")
    return parts[3] if len(parts) > 3 and parts[3] else None


def _run(args: argparse.Namespace) -> int:
    try:
        raw = sys.stdin.read() if args.taskdef == "-" else Path(args.taskdef).read_text(encoding="utf-8")
        doc = json.loads(raw)
    except OSError as exc:
        sys.stderr.write(f"runtime-manager inject: {args.taskdef}: {exc.strerror}\n")
        return 2
    except ValueError as exc:
        sys.stderr.write(f"runtime-manager inject: {args.taskdef}: not JSON: {exc}\n")
        return 2
    region = _region(args)
    if not region:
        sys.stderr.write("runtime-manager inject: no region: pass --region\n")
        return 2
    spec = SidecarSpec(
        image=args.image,
        collector_url=args.collector_url,
        token_secret_arn=args.token_secret_arn,
        region=region,
        cpu=args.cpu,
        memory=args.memory,
        memory_reservation=args.memory_reservation,
        log_group=args.log_group,
        container_name=args.container_name,
        extra_environment=dict(args.env or []),
    )
    try:
        out = inject(doc if isinstance(doc, dict) else {}, spec, platform_version=args.platform_version)
    except InjectError as exc:
        sys.stderr.write(f"runtime-manager inject: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inject",
        help="print a task definition with the sidecar added",
        description="Print TASKDEF (RegisterTaskDefinition input or DescribeTaskDefinition output) with the "
        "sidecar added, ready for `aws ecs register-task-definition --cli-input-json`. Idempotent.",
    )
    p.add_argument("taskdef", metavar="TASKDEF.json", help="the task definition ('-' for stdin)")
    p.add_argument("--image", required=True, help="the sidecar image (your private ECR repository)")
    p.add_argument("--collector-url", required=True, metavar="URL", help="the backend's collector API")
    p.add_argument(
        "--token-secret-arn",
        required=True,
        metavar="ARN",
        help="Secrets Manager secret or SSM parameter holding the cluster's agent token",
    )
    p.add_argument("--cpu", type=int, default=128, help="sidecar CPU units (default 128)")
    p.add_argument("--memory", type=int, default=256, help="sidecar memory hard limit, MiB (default 256)")
    p.add_argument("--memory-reservation", type=int, default=128, help="sidecar memory reservation, MiB")
    p.add_argument("--log-group", help=f"awslogs group (default: the app's, else {DEFAULT_LOG_GROUP})")
    p.add_argument("--container-name", default=CONTAINER_NAME)
    p.add_argument("--env", action="append", type=_key_value, metavar="NAME=VALUE", help="extra sidecar setting")
    p.add_argument("--platform-version", help="the service's Fargate platform version, checked against 1.4.0")
    p.set_defaults(func=_run)

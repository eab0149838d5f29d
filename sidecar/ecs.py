"""ECS identity (task metadata endpoint v4) and the mapping of processes to containers.

The identity says where findings come from: cluster, task, account, region and
the task's containers with their images. It is read once at start from
``${ECS_CONTAINER_METADATA_URI_V4}`` (the sidecar's own container) and
``${ECS_CONTAINER_METADATA_URI_V4}/task``, and re-read when a container the
task starts later shows up. Without the variable, or when the endpoint stays
down, the sidecar runs in local mode with the host as its identity: a dead
metadata endpoint must never stop the detection.

:class:`ContainerResolver` tells which container a process runs in, cheapest
and most trustworthy evidence first: its cgroup path, a cache by mount
namespace, the one metadata variable ECS puts in every container's
environment, the sidecar's own mount namespace, and finally an id derived from
the mount namespace so that an unknown container's processes still group.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, TypeVar

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from collectors import procfs
from collectors.capabilities import namespace_inode
from collectors.events import ContainerRef

log = logging.getLogger("sidecar.ecs")

METADATA_ENV: Final = "ECS_CONTAINER_METADATA_URI_V4"
LOCAL_CLUSTER: Final = "local"
DEFAULT_ACCOUNT_ID: Final = "000000000000"
DEFAULT_REGION: Final = "local"
# The agent's answers are a few KB; anything far bigger is not task metadata.
MAX_RESPONSE_BYTES: Final = 4 << 20
# A container that starts late is looked up by its endpoint id; bound the
# lookups one refresh makes so a flood of odd ids cannot become a flood of requests.
MAX_ENDPOINT_LOOKUPS: Final = 8

Mode = Literal["ecs", "local"]
_M = TypeVar("_M", bound=BaseModel)


# -- the endpoint's JSON ------------------------------------------------------------------------------------------


class _Metadata(BaseModel):
    # The agent adds fields over time (AWS promises only never to remove or
    # rename): ignore what we do not know rather than fail on a newer agent.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True, coerce_numbers_to_str=True)


class Limits(_Metadata):
    cpu: float | None = Field(default=None, alias="CPU")
    memory: int | None = Field(default=None, alias="Memory")


class NetworkMetadata(_Metadata):
    network_mode: str | None = Field(default=None, alias="NetworkMode")
    ipv4_addresses: list[str] = Field(default_factory=list, alias="IPv4Addresses")
    ipv6_addresses: list[str] = Field(default_factory=list, alias="IPv6Addresses")
    mac_address: str | None = Field(default=None, alias="MACAddress")
    private_dns_name: str | None = Field(default=None, alias="PrivateDNSName")
    ipv4_subnet_cidr_block: str | None = Field(default=None, alias="IPv4SubnetCIDRBlock")
    domain_name_servers: list[str] = Field(default_factory=list, alias="DomainNameServers")


class ContainerMetadata(_Metadata):
    """One container, as ``${URI}`` returns it and as each item of ``/task``'s Containers."""

    docker_id: str = Field(alias="DockerId", min_length=1)
    name: str = Field(alias="Name")
    docker_name: str | None = Field(default=None, alias="DockerName")
    image: str | None = Field(default=None, alias="Image")
    image_id: str | None = Field(default=None, alias="ImageID")
    labels: dict[str, str] = Field(default_factory=dict, alias="Labels")
    desired_status: str | None = Field(default=None, alias="DesiredStatus")
    known_status: str | None = Field(default=None, alias="KnownStatus")
    limits: Limits | None = Field(default=None, alias="Limits")
    created_at: str | None = Field(default=None, alias="CreatedAt")
    started_at: str | None = Field(default=None, alias="StartedAt")
    type: str | None = Field(default=None, alias="Type")
    container_arn: str | None = Field(default=None, alias="ContainerARN")
    log_driver: str | None = Field(default=None, alias="LogDriver")
    networks: list[NetworkMetadata] = Field(default_factory=list, alias="Networks")


class TaskMetadata(_Metadata):
    """The ``${URI}/task`` document."""

    cluster: str = Field(alias="Cluster", min_length=1)
    task_arn: str = Field(alias="TaskARN")
    family: str = Field(alias="Family")
    revision: str = Field(alias="Revision")
    desired_status: str | None = Field(default=None, alias="DesiredStatus")
    known_status: str | None = Field(default=None, alias="KnownStatus")
    limits: Limits | None = Field(default=None, alias="Limits")
    pull_started_at: str | None = Field(default=None, alias="PullStartedAt")
    pull_stopped_at: str | None = Field(default=None, alias="PullStoppedAt")
    availability_zone: str | None = Field(default=None, alias="AvailabilityZone")
    launch_type: str | None = Field(default=None, alias="LaunchType")
    service_name: str | None = Field(default=None, alias="ServiceName")
    vpc_id: str | None = Field(default=None, alias="VPCID")
    containers: list[ContainerMetadata] = Field(default_factory=list, alias="Containers")

    @field_validator("task_arn")
    @classmethod
    def _task_arn(cls, v: str) -> str:
        parse_task_arn(v)  # account and region come from it: refuse a document without them
        return v


# -- ARNs and digests ---------------------------------------------------------------------------------------------

# Both ARN formats: the long one (task/CLUSTER/ID, the default since 2021) and
# the old one without the cluster (task/UUID), which accounts could keep.
_TASK_ARN = re.compile(
    r"^arn:(?P<partition>aws[a-z-]*):ecs:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
    r"task/(?:(?P<cluster>[A-Za-z0-9_-]{1,255})/)?(?P<task_id>[A-Za-z0-9-]{1,128})$"
)
_CLUSTER_ARN = re.compile(r"^arn:aws[a-z-]*:ecs:[a-z0-9-]+:\d{12}:cluster/(?P<name>[A-Za-z0-9_-]{1,255})$")
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class TaskArn:
    partition: str
    region: str
    account_id: str
    cluster: str | None
    task_id: str


def parse_task_arn(arn: str) -> TaskArn:
    """Split ``arn:PARTITION:ecs:REGION:ACCOUNT:task/[CLUSTER/]TASKID``; ValueError if it is not one."""
    m = _TASK_ARN.match(arn)
    if m is None:
        raise ValueError(f"not an ECS task ARN: {arn[:200]!r}")
    return TaskArn(m["partition"], m["region"], m["account"], m["cluster"], m["task_id"])


def image_digest(image: str | None, image_id: str | None) -> str | None:
    """The ``sha256:...`` digest of a container's image: ImageID, else a digest pinned in the image name."""
    for candidate in (image_id, image.rpartition("@")[2] if image and "@" in image else None):
        if candidate and _SHA256.fullmatch(candidate):
            return candidate
    return None


# -- the identity -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContainerIdentity:
    name: str
    docker_id: str
    image: str | None = None
    image_digest: str | None = None
    docker_name: str | None = None
    container_arn: str | None = None
    # NORMAL for task-definition containers; the agent's own (CNI_PAUSE, ...) otherwise
    type: str | None = None

    @classmethod
    def from_metadata(cls, m: ContainerMetadata) -> ContainerIdentity:
        return cls(
            name=m.name,
            docker_id=m.docker_id,
            image=m.image,
            image_digest=image_digest(m.image, m.image_id),
            docker_name=m.docker_name,
            container_arn=m.container_arn,
            type=m.type,
        )

    def ref(self, source: str) -> ContainerRef:
        return ContainerRef(
            name=self.name, id=self.docker_id, image=self.image, image_digest=self.image_digest, source=source
        )


@dataclass(frozen=True, slots=True)
class TaskIdentity:
    """Who we are: an ECS task, or (local mode) the host."""

    mode: Mode
    cluster_name: str
    cluster_arn: str
    task_arn: str
    task_id: str
    family: str | None
    revision: str | None
    launch_type: str | None
    availability_zone: str | None
    region: str
    account_id: str
    partition: str = "aws"
    containers: tuple[ContainerIdentity, ...] = ()
    self_container: ContainerIdentity | None = None
    hostname: str = ""
    # The metadata URI, kept to re-read /task; None in local mode.
    metadata_uri: str | None = None
    # Endpoint id (last component of a container's metadata URI) -> DockerId.
    # Fargate uses the DockerId itself; the EC2 agent uses its own UUIDs.
    endpoint_ids: Mapping[str, str] = field(default_factory=dict)
    # Why an ECS task runs in local mode (endpoint down, garbage answer), for heartbeats.
    local_reason: str | None = None

    @property
    def is_local(self) -> bool:
        return self.mode == "local"

    def container(self, docker_id: str) -> ContainerIdentity | None:
        for c in self.containers:
            if c.docker_id == docker_id:
                return c
        return None

    def summary(self) -> dict[str, Any]:
        """The identity as one flat log/heartbeat object (camelCase like the rest of our JSON)."""
        return {
            "mode": self.mode,
            "clusterName": self.cluster_name,
            "clusterArn": self.cluster_arn,
            "taskArn": self.task_arn,
            "taskId": self.task_id,
            "family": self.family,
            "revision": self.revision,
            "launchType": self.launch_type,
            "availabilityZone": self.availability_zone,
            "region": self.region,
            "accountId": self.account_id,
            "partition": self.partition,
            "hostname": self.hostname,
            "selfContainer": self.self_container.name if self.self_container else None,
            "containers": [
                {"name": c.name, "id": c.docker_id, "image": c.image, "imageDigest": c.image_digest}
                for c in self.containers
            ],
            "localReason": self.local_reason,
        }


def endpoint_id_of(uri: str) -> str:
    """The container's id in its metadata URI: its last path component."""
    return uri.rstrip("/").rpartition("/")[2]


def _machine_id() -> str | None:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, encoding="ascii") as f:
                value = f.read().strip()
        except (OSError, UnicodeDecodeError):
            continue
        if value:
            return value
    return None


def local_identity(
    *, account_id: str | None = None, region: str | None = None, reason: str | None = None
) -> TaskIdentity:
    """The host as identity: cluster "local", task id the hostname (else the machine id)."""
    account = account_id or DEFAULT_ACCOUNT_ID
    reg = region or DEFAULT_REGION
    hostname = socket.gethostname()
    task_id = hostname or _machine_id() or "localhost"
    # Findings need ARNs; these say plainly that they name no real AWS resource.
    return TaskIdentity(
        mode="local",
        cluster_name=LOCAL_CLUSTER,
        cluster_arn=f"arn:aws:ecs:{reg}:{account}:cluster/{LOCAL_CLUSTER}",
        task_arn=f"arn:aws:ecs:{reg}:{account}:task/{LOCAL_CLUSTER}/{task_id}",
        task_id=task_id,
        family=None,
        revision=None,
        launch_type=None,
        availability_zone=None,
        region=reg,
        account_id=account,
        hostname=hostname,
        local_reason=reason,
    )


def _merge_containers(
    old: Iterable[ContainerIdentity], new: Iterable[ContainerMetadata]
) -> tuple[ContainerIdentity, ...]:
    # Keep containers that left the list: their processes' late events still
    # need a name. Fresh metadata wins (an ImageID appears once the pull ends).
    merged: dict[str, ContainerIdentity] = {c.docker_id: c for c in old}
    for m in new:
        merged[m.docker_id] = ContainerIdentity.from_metadata(m)
    return tuple(merged.values())


def identity_from_metadata(task: TaskMetadata, me: ContainerMetadata | None, uri: str) -> TaskIdentity:
    arn = parse_task_arn(task.task_arn)
    if task.cluster.startswith("arn:"):
        m = _CLUSTER_ARN.match(task.cluster)
        cluster_name = m["name"] if m else task.cluster.rpartition("/")[2]
        cluster_arn = task.cluster
    else:
        cluster_name = task.cluster
        cluster_arn = f"arn:{arn.partition}:ecs:{arn.region}:{arn.account_id}:cluster/{task.cluster}"
    containers = _merge_containers((), task.containers)
    endpoint_id = endpoint_id_of(uri)
    self_container: ContainerIdentity | None = None
    if me is not None:
        self_container = ContainerIdentity.from_metadata(me)
        if all(c.docker_id != me.docker_id for c in containers):
            containers += (self_container,)
    else:
        # Without the container endpoint's answer, Fargate's endpoint id is still our DockerId.
        self_container = next((c for c in containers if c.docker_id == endpoint_id), None)
    endpoint_ids = {endpoint_id: self_container.docker_id} if self_container else {}
    return TaskIdentity(
        mode="ecs",
        cluster_name=cluster_name,
        cluster_arn=cluster_arn,
        task_arn=task.task_arn,
        task_id=arn.task_id,
        family=task.family,
        revision=task.revision,
        launch_type=task.launch_type,
        availability_zone=task.availability_zone,
        region=arn.region,
        account_id=arn.account_id,
        partition=arn.partition,
        containers=containers,
        self_container=self_container,
        hostname=socket.gethostname(),
        metadata_uri=uri,
        endpoint_ids=endpoint_ids,
    )


# -- the HTTP client ----------------------------------------------------------------------------------------------


class MetadataError(Exception):
    """The metadata endpoint gave no usable answer."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class MetadataUnavailable(MetadataError):
    """Down, refusing, timing out or failing (5xx): worth retrying."""


class MetadataInvalid(MetadataError):
    """It answered, but not with task metadata (malformed JSON, another shape, a 4xx)."""


class TaskMetadataClient:
    """GETs on the v4 endpoint with a per-attempt timeout and retries with exponential backoff."""

    def __init__(
        self,
        uri: str,
        session: aiohttp.ClientSession,
        *,
        timeout: float = 2.0,
        retries: int = 3,
        backoff: float = 0.1,
    ) -> None:
        self.uri = uri.rstrip("/")
        self.session = session
        self.timeout = timeout
        self.retries = max(1, retries)
        self.backoff = backoff

    async def container(self) -> ContainerMetadata:
        return await self._get_model(self.uri, ContainerMetadata)

    async def task(self) -> TaskMetadata:
        return await self._get_model(f"{self.uri}/task", TaskMetadata)

    async def container_at(self, endpoint_id: str) -> ContainerMetadata:
        """Another container's metadata, by the endpoint id found in its environment."""
        base = self.uri.rpartition("/")[0]
        return await self._get_model(f"{base}/{endpoint_id}", ContainerMetadata)

    async def _get_model(self, url: str, model: type[_M]) -> _M:
        last: MetadataError | None = None
        for attempt in range(self.retries):
            if attempt:
                await asyncio.sleep(min(self.backoff * 2 ** (attempt - 1), 2.0))
            try:
                return model.model_validate(await self._get_json(url))
            except ValidationError as exc:
                last = MetadataInvalid(f"{url} answered JSON that is not {model.__name__}: {_brief(exc)}")
            except MetadataError as exc:
                if not exc.retryable:
                    raise
                last = exc
        assert last is not None
        raise last

    async def _get_json(self, url: str) -> Any:
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                body = await resp.content.read(MAX_RESPONSE_BYTES + 1)
                status = resp.status
        except TimeoutError:
            raise MetadataUnavailable(f"{url} did not answer within {self.timeout:g}s") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise MetadataUnavailable(f"{url} unreachable: {exc!r}") from None
        if status >= 500:
            raise MetadataUnavailable(f"{url} answered HTTP {status}")
        if status != 200:
            # a wrong endpoint id stays wrong: no retry
            raise MetadataInvalid(f"{url} answered HTTP {status}", retryable=False)
        if len(body) > MAX_RESPONSE_BYTES:
            raise MetadataInvalid(f"{url} answered more than {MAX_RESPONSE_BYTES} bytes")
        try:
            return json.loads(body)
        except ValueError as exc:
            raise MetadataInvalid(f"{url} answered malformed JSON ({exc}): {body[:80]!r}") from None


def _brief(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:3]]
    return "; ".join(parts)


async def load_identity(
    uri: str | None,
    # per attempt, not overall: an attempt that hangs must leave time for the retries
    timeout: float = 2.0,  # noqa: ASYNC109
    retries: int = 3,
    *,
    account_id: str | None = None,
    region: str | None = None,
) -> TaskIdentity:
    """The task's identity from the v4 endpoint, or the host's (local mode). Never raises for the endpoint.

    ``account_id`` and ``region`` are only for local mode: in ECS they come from the task ARN.
    """
    if not uri:
        return local_identity(account_id=account_id, region=region)
    try:
        async with aiohttp.ClientSession() as session:
            client = TaskMetadataClient(uri, session, timeout=timeout, retries=retries)
            task = await client.task()
            me: ContainerMetadata | None
            try:
                me = await client.container()
            except MetadataError as exc:
                log.warning("ECS container metadata unavailable, own container guessed from /task: %s", exc)
                me = None
            identity = identity_from_metadata(task, me, uri)
    except MetadataInvalid as exc:
        log.error("ECS task metadata endpoint gave an unusable answer, running in local mode: %s", exc)
        return local_identity(account_id=account_id, region=region, reason=f"invalid metadata: {exc}")
    except MetadataUnavailable as exc:
        log.warning("ECS task metadata endpoint unreachable after %d attempts, running in local mode: %s", retries, exc)
        return local_identity(account_id=account_id, region=region, reason=f"metadata unavailable: {exc}")
    except Exception as exc:  # the sidecar must start whatever the endpoint does
        log.error("ECS task metadata could not be read, running in local mode: %r", exc)
        return local_identity(account_id=account_id, region=region, reason=f"metadata error: {exc!r}")
    log.info(
        "ECS task identity: cluster=%s task=%s family=%s:%s containers=%d",
        identity.cluster_name,
        identity.task_id,
        identity.family,
        identity.revision,
        len(identity.containers),
    )
    return identity


async def refresh_containers(
    identity: TaskIdentity,
    timeout: float = 2.0,  # noqa: ASYNC109 - per attempt, like load_identity
    retries: int = 1,
    *,
    endpoint_ids: Iterable[str] = (),
) -> TaskIdentity:
    """Re-read ``/task`` for containers that started later; the same identity if that fails.

    ``endpoint_ids`` that name no known container afterwards are looked up on
    their own container endpoint (the EC2 agent's endpoint ids are not DockerIds).
    """
    if identity.mode != "ecs" or not identity.metadata_uri:
        return identity
    try:
        async with aiohttp.ClientSession() as session:
            client = TaskMetadataClient(identity.metadata_uri, session, timeout=timeout, retries=retries)
            task = await client.task()
            containers = _merge_containers(identity.containers, task.containers)
            known = {c.docker_id for c in containers}
            mapping = dict(identity.endpoint_ids)
            extra: list[ContainerMetadata] = []
            lookups = [e for e in dict.fromkeys(endpoint_ids) if e not in known and e not in mapping]
            for eid in lookups[:MAX_ENDPOINT_LOOKUPS]:
                try:
                    other = await client.container_at(eid)
                except MetadataError as exc:
                    log.debug("no container behind endpoint id %s: %s", eid, exc)
                    continue
                mapping[eid] = other.docker_id
                if other.docker_id not in known:
                    extra.append(other)
    except MetadataError as exc:
        log.warning("ECS task metadata refresh failed, keeping the known containers: %s", exc)
        return identity
    except Exception as exc:  # a refresh is best effort; never take the resolver down
        log.warning("ECS task metadata refresh failed: %r", exc)
        return identity
    merged = _merge_containers(containers, extra)
    if merged == identity.containers and mapping == identity.endpoint_ids:
        return identity  # nothing new: spare the resolver a cache flush
    return replace(identity, containers=merged, endpoint_ids=mapping)


# -- processes to containers --------------------------------------------------------------------------------------

_ENV_KEY: Final = METADATA_ENV.encode() + b"="
# A Docker/containerd id, or a Fargate DockerId (<32-hex task id>-<number>).
_CONTAINER_ID = re.compile(r"[0-9a-f]{64}|[0-9a-f]{32}-[0-9]{1,20}")
_ENDPOINT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# Prefix and suffix that runtimes wrap ids in with the systemd cgroup driver:
# docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope, libpod-<id>.scope.
_ID_PREFIXES: Final = ("docker-", "cri-containerd-", "crio-", "libpod-", "containerd-")
_SYSTEMD_UNIT_SUFFIXES: Final = (".slice", ".service", ".scope")


def endpoint_id_from_environ(env: bytes) -> str | None:
    """The container id in ECS_CONTAINER_METADATA_URI_V4 of a NUL-separated environment block.

    Only that value is ever sliced out: the rest of the block holds the
    container's secrets and is neither decoded nor kept.
    """
    if env.startswith(_ENV_KEY):
        start = len(_ENV_KEY)
    else:
        at = env.find(b"\0" + _ENV_KEY)
        if at < 0:
            return None
        start = at + 1 + len(_ENV_KEY)
    end = env.find(b"\0", start)
    value = env[start : end if end >= 0 else len(env)]
    eid = value.rstrip(b"/").rpartition(b"/")[2]
    try:
        text = eid.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if _ENDPOINT_ID.fullmatch(text) else None


def _read_endpoint_id(pid: int, start_ticks: int) -> str | None:
    """Read the metadata variable of one process, None if absent, unreadable or the pid was reused."""
    try:
        dfd = procfs.open_pid_dir(pid)
    except procfs.ProcfsError:
        return None
    try:
        # The directory fd pins the process; the start time proves it is the one we were given.
        if procfs.parse_stat(procfs.read_small("stat", dfd))[3] != start_ticks:
            return None
        return endpoint_id_from_environ(procfs.read_all("environ", dfd))
    except (OSError, ValueError, IndexError):
        return None
    finally:
        os.close(dfd)


@dataclass(frozen=True, slots=True)
class _CgroupIds:
    # normalised path components, deepest first, without repeats
    components: tuple[str, ...]
    # the deepest component that looks like a container id
    candidate: str | None
    # a path is a systemd slice/unit (a host service, in local mode)
    systemd_unit: bool


def parse_cgroup(text: str | None) -> _CgroupIds:
    """Container-id candidates from /proc/<pid>/cgroup, v1 or v2, any runtime layout."""
    components: dict[str, None] = {}
    systemd_unit = False
    for line in (text or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        path = parts[2].strip()
        for raw_comp in reversed(path.split("/")):
            if not raw_comp:
                continue
            if raw_comp.endswith(_SYSTEMD_UNIT_SUFFIXES):
                systemd_unit = True
            comp = raw_comp.removesuffix(".scope")
            for prefix in _ID_PREFIXES:
                if comp.startswith(prefix):
                    comp = comp[len(prefix) :]
                    break
            components.setdefault(comp, None)
    comps = tuple(components)
    candidate = next((c for c in comps if _CONTAINER_ID.fullmatch(c)), None)
    return _CgroupIds(comps, candidate, systemd_unit and candidate is None)


@dataclass(frozen=True, slots=True)
class _MntEntry:
    ref: ContainerRef | None
    # The process the mapping was made from: while it lives, its mount
    # namespace lives, so the inode cannot have been reused by a new container.
    anchor_pid: int
    anchor_start_ticks: int


class ContainerResolver:
    """``resolver(raw) -> ContainerRef | None``: the container a process runs in (None: a host process).

    Returned refs are shared between processes of a container: treat them as read-only.
    ``on_unknown(container_id)`` is called (at most once per id per ``report_interval``)
    when a container id names no known container, so that the caller can
    re-read the task metadata; see :class:`MetadataRefresher`.
    """

    def __init__(
        self,
        identity: TaskIdentity,
        *,
        on_unknown: Callable[[str], None] | None = None,
        report_interval: float = 30.0,
        cache_size: int = 4096,
        self_mnt_ns: int | None = None,
        host_mnt_ns: Iterable[int] | None = None,
    ) -> None:
        self.on_unknown = on_unknown
        self.report_interval = report_interval
        self.cache_size = max(1, cache_size)
        self.self_mnt_ns = namespace_inode("mnt") if self_mnt_ns is None else self_mnt_ns
        if host_mnt_ns is None:
            # Local mode: the sidecar's namespace, and init's for a sidecar in a container with pid=host.
            host = {self.self_mnt_ns, namespace_inode("mnt", 1)}
            host_mnt_ns = {ns for ns in host if ns is not None}
        self.host_mnt_ns = frozenset(host_mnt_ns)
        self.stats: Counter[str] = Counter()
        self._cgroups: OrderedDict[str, _CgroupIds] = OrderedDict()
        self._mnt: OrderedDict[int, _MntEntry] = OrderedDict()
        self._reported: OrderedDict[str, float] = OrderedDict()
        self._identity = identity
        self._cgroup_refs: dict[str, ContainerRef] = {}
        self._environ_refs: dict[str, ContainerRef] = {}
        self._self_ref: ContainerRef | None = None
        self.update(identity)

    @property
    def identity(self) -> TaskIdentity:
        return self._identity

    def update(self, identity: TaskIdentity) -> None:
        """Take a refreshed identity (new containers); forget mappings made without it."""
        self._identity = identity
        self._cgroup_refs = {c.docker_id: c.ref("cgroup") for c in identity.containers}
        self._environ_refs = {c.docker_id: c.ref("environ") for c in identity.containers}
        me = identity.self_container
        self._self_ref = me.ref("self") if me is not None and identity.mode == "ecs" else None
        self._mnt.clear()

    def cache_info(self) -> dict[str, int]:
        return {"cgroup": len(self._cgroups), "mntns": len(self._mnt), "reported": len(self._reported)}

    def __call__(self, raw: procfs.RawProcess) -> ContainerRef | None:
        try:
            return self._resolve(raw)
        except Exception:  # a resolver bug must not lose the process event
            self.stats["errors"] += 1
            log.debug("container resolution failed for pid %s", getattr(raw, "pid", "?"), exc_info=True)
            return None

    def _resolve(self, raw: procfs.RawProcess) -> ContainerRef | None:
        local = self._identity.mode == "local"
        ids = self._parse_cgroup(raw.cgroup)
        # (a) the cgroup path names a known container
        for comp in ids.components:
            ref = self._cgroup_refs.get(comp)
            if ref is not None:
                self.stats["cgroup"] += 1
                return ref
        if ids.candidate is not None:
            if local:
                # A docker/containerd container on this host: we know its id, not its name.
                self.stats["cgroup_unknown"] += 1
                return ContainerRef(name=None, id=ids.candidate, source="cgroup")
            self._report(ids.candidate)
        mnt = raw.mnt_ns
        if local and (mnt is None or mnt in self.host_mnt_ns):
            self.stats["host"] += 1
            return None
        # (b) this mount namespace was mapped already
        if mnt is not None:
            cached = self._cached(mnt, raw)
            if cached is not None:
                self.stats["mntns_cache"] += 1
                return cached.ref
        # (c) the metadata URI ECS put in the container's environment
        eid = _read_endpoint_id(raw.pid, raw.start_ticks)
        if eid is not None:
            ref = self._environ_refs.get(self._identity.endpoint_ids.get(eid, eid))
            if ref is not None:
                self.stats["environ"] += 1
                self._remember(mnt, raw, ref)
                return ref
            if not local:
                self._report(eid)
        # (d) the sidecar's own container, unless the cgroup names another one (whose id we learn late)
        if mnt is not None and mnt == self.self_mnt_ns and self._self_ref is not None and ids.candidate is None:
            self.stats["self"] += 1
            return self._self_ref
        # (e) a container we cannot name
        unknown: ContainerRef | None
        if local and ids.systemd_unit:
            # systemd sandboxing (PrivateTmp, ProtectSystem) gives host services their own mount namespace
            unknown = None
        elif ids.candidate is not None:
            unknown = ContainerRef(name=None, id=ids.candidate, source="cgroup")
        elif mnt is not None:
            unknown = ContainerRef(name=None, id=f"mntns:{mnt}", source="mntns")
        else:
            unknown = None if local else ContainerRef(name=None, id=None, source="unknown")
        self.stats["unknown"] += 1
        self._remember(mnt, raw, unknown)
        return unknown

    def _parse_cgroup(self, text: str | None) -> _CgroupIds:
        if not text:
            return parse_cgroup(None)
        hit = self._cgroups.get(text)
        if hit is not None:
            self._cgroups.move_to_end(text)
            return hit
        ids = parse_cgroup(text)
        self._cgroups[text] = ids
        if len(self._cgroups) > self.cache_size:
            self._cgroups.popitem(last=False)
        return ids

    def _cached(self, mnt: int, raw: procfs.RawProcess) -> _MntEntry | None:
        entry = self._mnt.get(mnt)
        if entry is None:
            return None
        if entry.anchor_pid != raw.pid or entry.anchor_start_ticks != raw.start_ticks:
            try:
                alive = procfs.read_start_ticks(entry.anchor_pid) == entry.anchor_start_ticks
            except (procfs.ProcfsError, ValueError, IndexError):
                alive = False
            if not alive:
                # The namespace may have died with it and its inode gone to a new container: look again.
                del self._mnt[mnt]
                return None
        self._mnt.move_to_end(mnt)
        return entry

    def _remember(self, mnt: int | None, raw: procfs.RawProcess, ref: ContainerRef | None) -> None:
        if mnt is None:
            return
        self._mnt[mnt] = _MntEntry(ref, raw.pid, raw.start_ticks)
        self._mnt.move_to_end(mnt)
        if len(self._mnt) > self.cache_size:
            self._mnt.popitem(last=False)

    def _report(self, container_id: str) -> None:
        if self.on_unknown is None:
            return
        now = time.monotonic()
        last = self._reported.get(container_id)
        if last is not None and now - last < self.report_interval:
            return
        self._reported[container_id] = now
        self._reported.move_to_end(container_id)
        while len(self._reported) > 256:
            self._reported.popitem(last=False)
        self.stats["refresh_requests"] += 1
        try:
            self.on_unknown(container_id)
        except Exception:
            log.warning("container refresh callback failed", exc_info=True)


class MetadataRefresher:
    """Re-reads the task metadata when the resolver meets an unknown container, at most once per ``min_interval``.

    Constructing it hooks it in as ``resolver.on_unknown``. ``request`` is
    synchronous and cheap (the resolver runs inside the process collector);
    the HTTP work runs as a task on the running event loop.
    """

    def __init__(
        self,
        resolver: ContainerResolver,
        *,
        min_interval: float = 10.0,
        timeout: float = 2.0,
        retries: int = 1,
    ) -> None:
        self.resolver = resolver
        self.min_interval = min_interval
        self.timeout = timeout
        self.retries = retries
        self.refreshes = 0
        self._pending: dict[str, None] = {}
        self._task: asyncio.Task[None] | None = None
        self._last = float("-inf")
        resolver.on_unknown = self.request

    def request(self, container_id: str) -> None:
        if self.resolver.identity.mode != "ecs":
            return
        if len(self._pending) < 64:
            self._pending[container_id] = None
        if self._task is not None and not self._task.done():
            return  # the running refresh (or the one waiting out min_interval) will take it
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not on the loop: the next request from the loop takes the pending ids
        self._task = loop.create_task(self._run(), name="ecs-metadata-refresh")

    async def _run(self) -> None:
        delay = self._last + self.min_interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        ids, self._pending = list(self._pending), {}
        self._last = time.monotonic()
        identity = await refresh_containers(self.resolver.identity, self.timeout, self.retries, endpoint_ids=ids)
        self.refreshes += 1
        if identity is not self.resolver.identity:
            added = len(identity.containers) - len(self.resolver.identity.containers)
            log.info("ECS task metadata refreshed: %d new container(s)", added)
            self.resolver.update(identity)

    async def wait(self) -> None:
        """Until the refresh in flight (if any) is done: for shutdown and tests."""
        if self._task is not None:
            await asyncio.shield(self._task)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

"""A real ECS task metadata endpoint v4, for tests (a helper, not a test module).

Serves the documented JSON shapes over HTTP on 127.0.0.1 from a background
thread, so it runs the same under sync pytest code, async tests and other
helpers. Besides the normal answers it can misbehave on purpose: malformed
JSON, JSON of another shape, HTTP 500, or a hang, to test the client's errors.

    server = MetadataServer(fargate_task_json())
    server.start()
    os.environ["ECS_CONTAINER_METADATA_URI_V4"] = server.container_uri(docker_id)
    ...
    server.stop()
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import uuid
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

ServerMode = Literal["ok", "malformed", "wrong-shape", "error", "hang"]

DEFAULT_CONTAINERS: tuple[tuple[str, str], ...] = (
    ("app", "public.ecr.aws/docker/library/python:3.11-slim"),
    ("runtime-sidecar", "123456789012.dkr.ecr.us-east-1.amazonaws.com/runtime-sidecar:0.1.0"),
)

# A v1 cgroup file lists one line per hierarchy; these are the ones Fargate's
# and Amazon Linux 2's kernels mount.
_V1_HIERARCHIES = (
    "11:devices",
    "10:pids",
    "9:freezer",
    "8:perf_event",
    "7:hugetlb",
    "6:cpuset",
    "5:net_cls,net_prio",
    "4:memory",
    "3:blkio",
    "2:cpu,cpuacct",
    "1:name=systemd",
)


def _hex(*parts: str, n: int = 64) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:n]


def _fargate_number(task_id: str, name: str) -> str:
    # Fargate's DockerId suffix is a 10-digit number, stable for the container.
    return str(1_000_000_000 + int(_hex(task_id, name, n=12), 16) % 9_000_000_000)


def _task_json(
    *,
    launch_type: Literal["FARGATE", "EC2"],
    cluster: str,
    task_id: str | None,
    family: str,
    revision: int,
    containers: Sequence[tuple[str, str]],
    account: str,
    region: str,
    az: str,
) -> dict[str, Any]:
    task_id = task_id or uuid.uuid4().hex
    cluster_arn = f"arn:aws:ecs:{region}:{account}:cluster/{cluster}"
    task_arn = f"arn:aws:ecs:{region}:{account}:task/{cluster}/{task_id}"
    fargate = launch_type == "FARGATE"
    subnet_ip = 100 + int(task_id[:2], 16) % 100
    items: list[dict[str, Any]] = []
    for n, (name, image) in enumerate(containers):
        if fargate:
            docker_id = f"{task_id}-{_fargate_number(task_id, name)}"
            docker_name = name
        else:
            docker_id = _hex(task_id, name)
            docker_name = f"ecs-{family}-{revision}-{name}-{_hex(task_id, name, 'name', n=20)}"
        network: dict[str, Any]
        if fargate:
            network = {
                "NetworkMode": "awsvpc",
                "IPv4Addresses": [f"10.0.2.{subnet_ip}"],
                "AttachmentIndex": 0,
                "MACAddress": "0e:9e:32:c7:48:85",
                "IPv4SubnetCIDRBlock": "10.0.2.0/24",
                "DomainNameServers": ["10.0.0.2"],
                "DomainNameSearchList": [f"{region}.compute.internal"],
                "PrivateDNSName": f"ip-10-0-2-{subnet_ip}.{region}.compute.internal",
                "SubnetGatewayIpv4Address": "10.0.2.1/24",
            }
        else:
            network = {"NetworkMode": "bridge", "IPv4Addresses": [f"172.17.0.{n + 2}"]}
        item: dict[str, Any] = {
            "DockerId": docker_id,
            "Name": name,
            "DockerName": docker_name,
            "Image": image,
            "ImageID": f"sha256:{_hex('image', image)}",
            "Labels": {
                "com.amazonaws.ecs.cluster": cluster_arn if fargate else cluster,
                "com.amazonaws.ecs.container-name": name,
                "com.amazonaws.ecs.task-arn": task_arn,
                "com.amazonaws.ecs.task-definition-family": family,
                "com.amazonaws.ecs.task-definition-version": str(revision),
            },
            "DesiredStatus": "RUNNING",
            "KnownStatus": "RUNNING",
            "Limits": {"CPU": 2, "Memory": 0} if fargate else {"CPU": 10, "Memory": 128},
            "CreatedAt": "2024-05-14T09:31:02.419145386Z",
            "StartedAt": "2024-05-14T09:31:03.286391512Z",
            "Type": "NORMAL",
            "LogDriver": "awslogs",
            "LogOptions": {
                "awslogs-group": f"/ecs/{family}",
                "awslogs-region": region,
                "awslogs-stream": f"ecs/{name}/{task_id}",
            },
            "ContainerARN": f"arn:aws:ecs:{region}:{account}:container/{cluster}/{task_id}/{uuid.uuid4()}",
            "Networks": [network],
        }
        if fargate:
            item["Snapshotter"] = "overlayfs"
        items.append(item)
    task: dict[str, Any] = {
        "Cluster": cluster_arn if fargate else cluster,
        "TaskARN": task_arn,
        "Family": family,
        "Revision": str(revision),
        "DesiredStatus": "RUNNING",
        "KnownStatus": "RUNNING",
        "Limits": {"CPU": 0.25, "Memory": 512},
        "PullStartedAt": "2024-05-14T09:30:51.924301153Z",
        "PullStoppedAt": "2024-05-14T09:31:01.704386547Z",
        "AvailabilityZone": az,
        "LaunchType": launch_type,
        "Containers": items,
    }
    if fargate:
        task["ClockDrift"] = {
            "ClockErrorBound": 0.446931,
            "ReferenceTimestamp": "2024-05-14T09:30:50Z",
            "ClockSynchronizationStatus": "SYNCHRONIZED",
        }
        task["EphemeralStorageMetrics"] = {"Utilized": 261, "Reserved": 20496}
        task["FaultInjectionEnabled"] = False
    else:
        task["ServiceName"] = f"{family}-service"
        task["VPCID"] = "vpc-0123456789abcdef0"
    return task


def fargate_task_json(
    *,
    cluster: str = "prod",
    task_id: str | None = None,
    family: str = "web",
    revision: int = 7,
    containers: Sequence[tuple[str, str]] = DEFAULT_CONTAINERS,
    account: str = "123456789012",
    region: str = "us-east-1",
    az: str = "us-east-1a",
) -> dict[str, Any]:
    """The /task JSON of a Fargate task; DockerIds are ``<taskid>-<10 digits>``."""
    return _task_json(
        launch_type="FARGATE",
        cluster=cluster,
        task_id=task_id,
        family=family,
        revision=revision,
        containers=containers,
        account=account,
        region=region,
        az=az,
    )


def ec2_task_json(
    *,
    cluster: str = "prod",
    task_id: str | None = None,
    family: str = "web",
    revision: int = 7,
    containers: Sequence[tuple[str, str]] = DEFAULT_CONTAINERS,
    account: str = "123456789012",
    region: str = "us-east-1",
    az: str = "us-east-1a",
) -> dict[str, Any]:
    """The /task JSON of an ECS-on-EC2 task: short cluster name, 64-hex DockerIds."""
    return _task_json(
        launch_type="EC2",
        cluster=cluster,
        task_id=task_id,
        family=family,
        revision=revision,
        containers=containers,
        account=account,
        region=region,
        az=az,
    )


def task_id_of(task: dict[str, Any]) -> str:
    return str(task["TaskARN"]).rsplit("/", 1)[1]


def docker_id_of(task: dict[str, Any], name: str) -> str:
    for c in task["Containers"]:
        if c["Name"] == name:
            return str(c["DockerId"])
    raise KeyError(name)


def ecs_cgroup_path(task: dict[str, Any], name: str) -> str:
    """The cgroup path of a task's container: ``/ecs/<taskid>/<DockerId>`` on Fargate and on EC2."""
    return f"/ecs/{task_id_of(task)}/{docker_id_of(task, name)}"


def cgroup_v1_text(path: str) -> str:
    """A /proc/<pid>/cgroup file of a cgroup v1 host, every hierarchy at ``path``."""
    return "".join(f"{h}:{path}\n" for h in _V1_HIERARCHIES)


def _stats(docker_id: str) -> dict[str, Any]:
    # The Docker stats shape the agent relays, trimmed to what identifies it.
    return {
        "read": "2024-05-14T09:41:03.123456789Z",
        "preread": "2024-05-14T09:41:02.123456789Z",
        "id": docker_id,
        "num_procs": 0,
        "pids_stats": {"current": 3},
        "cpu_stats": {"cpu_usage": {"total_usage": 1823004000, "usage_in_kernelmode": 210000000}, "online_cpus": 2},
        "memory_stats": {"usage": 48418816, "limit": 9223372036854771712},
        "networks": {"eth1": {"rx_bytes": 564655295, "tx_bytes": 3136346, "rx_packets": 384549}},
    }


class MetadataServer:
    """The v4 endpoint on 127.0.0.1:<free port>. ``mode`` makes it misbehave; ``fail_first`` 500s first."""

    def __init__(self, task: dict[str, Any]) -> None:
        self.requests: list[str] = []
        self.mode: ServerMode = "ok"
        # Answer HTTP 500 to this many requests before behaving per mode (retry tests).
        self.fail_first = 0
        self._task = copy.deepcopy(task)
        # endpoint id -> DockerId, for the EC2 agent's endpoint ids that are not DockerIds
        self._aliases: dict[str, str] = {}
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.base = ""

    # -- control ------------------------------------------------------------------------------------------------
    def start(self) -> str:
        handler = type("Handler", (_Handler,), {"owner": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False  # a hanging handler must not block stop()
        self._httpd = httpd
        # a short poll interval: stop() waits up to one interval for the loop to notice
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="ecs-metadata-server", daemon=True
        )
        self._thread.start()
        self.base = f"http://127.0.0.1:{httpd.server_address[1]}"
        return self.base

    def stop(self) -> None:
        self._release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MetadataServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def container_uri(self, docker_id: str) -> str:
        return f"{self.base}/v4/{docker_id}"

    def set_task(self, task: dict[str, Any]) -> None:
        with self._lock:
            self._task = copy.deepcopy(task)

    def set_mode(self, mode: ServerMode, *, fail_first: int = 0) -> None:
        with self._lock:
            self.mode = mode
            self.fail_first = fail_first

    def add_endpoint_alias(self, endpoint_id: str, docker_id: str) -> None:
        """Serve a container under another endpoint id too, as the EC2 agent does."""
        with self._lock:
            self._aliases[endpoint_id] = docker_id

    # -- answers ------------------------------------------------------------------------------------------------
    def answer(self, path: str) -> tuple[int, bytes]:
        """Status and body for a GET of ``path`` (the hang mode is the handler's)."""
        self.requests.append(path)
        with self._lock:
            mode = self.mode
            if self.fail_first > 0:
                self.fail_first -= 1
                return 500, b'{"error": "internal server error"}'
            task = self._task
            aliases = dict(self._aliases)
        if mode == "error":
            return 500, b"Internal Server Error"
        if mode == "malformed":
            return 200, b'{"Cluster": "arn:aws:ecs:us-east-1:123456789012:cluster/prod", "TaskARN": "arn:aws:ecs:us-'
        if mode == "wrong-shape":
            return 200, json.dumps({"Message": "hello", "Containers": "none"}).encode()
        parts = [p for p in path.split("?", 1)[0].split("/") if p]
        if len(parts) < 2 or parts[0] != "v4":
            return 404, b"404 page not found\n"
        endpoint_id, rest = parts[1], parts[2:]
        docker_id = aliases.get(endpoint_id, endpoint_id)
        containers = {c["DockerId"]: c for c in task.get("Containers", [])}
        if docker_id not in containers:
            return 404, json.dumps({"error": f"unable to get container ID for endpoint {endpoint_id}"}).encode()
        body: Any
        if rest == []:
            body = containers[docker_id]
        elif rest == ["task"]:
            body = task
        elif rest == ["stats"]:
            body = _stats(docker_id)
        elif rest == ["task", "stats"]:
            body = {cid: _stats(cid) for cid in containers}
        else:
            return 404, b"404 page not found\n"
        return 200, json.dumps(body).encode()


class _Handler(BaseHTTPRequestHandler):
    owner: MetadataServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        owner = self.owner
        if owner.mode == "hang":
            owner.requests.append(self.path)
            owner._release.wait(timeout=60)
            self.close_connection = True
            return
        status, body = owner.answer(self.path)
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if status == 200 else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # pytest captures stderr; the request list is the record

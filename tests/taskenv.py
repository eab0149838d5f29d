"""An emulated ECS task (`pidMode: task` on Fargate) for tests: real namespaces, real processes, the real sidecar.

    with TaskEnv(tmp_path) as task:                       # or the `task_env` fixture (tests/conftest.py)
        events = tmp_path / "events.jsonl"
        sidecar = task.start_sidecar(["run", "--events-out", str(events)])
        rc, out = task.run("app", ["sh", "-c", "curl -s $ECS_CONTAINER_METADATA_URI_V4"])
        ev = sidecar.wait_for_event(lambda e: e["process"]["executablePath"] == "/usr/bin/curl")
        assert ev["process"]["containerName"] == "app"
        assert sidecar.stop() == 0

What a task is made of (the processes inside are described in tests/taskenv_init.py, which runs them):

* a new PID namespace and a private mount namespace with their own /proc; PID 1 is a small init that reaps
  orphans, like ECS's pause/init;
* a throwaway *named* cgroup v1 hierarchy, mounted only in that mount namespace, with
  ``/ecs/<taskid>/<DockerId>`` per container, as the sidecar sees them on Fargate (if the mount fails,
  ``cgroup_error`` says why and containers are not in any /ecs cgroup);
* per application container, a container-init in its own mount namespace and root file system (read-only
  binds of /usr, /bin, ...; a private copy of /etc; its own /tmp, /root, /var, /dev, /proc) with the Fargate
  environment, a fake secret, Docker's default capabilities; the tests' commands are its children;
* the sidecar container: its own mount namespace that keeps the host's files (so the venv works) but has the
  task's /proc and cannot reach the other containers' files except through /proc/<pid>/root, its own cgroup,
  Fargate's capability set (Docker's defaults + SYS_PTRACE, optionally without NET_RAW);
* the task metadata endpoint v4 (tests/ecs_metadata_server.py) on 127.0.0.1, which the task shares (one network
  namespace, as with awsvpc).

All pids in this API are pids in the task's PID namespace (what the sidecar sees), unless named host_pid.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from ecs_metadata_server import MetadataServer, fargate_task_json

REPO_ROOT = Path(__file__).resolve().parent.parent
INIT_SCRIPT = Path(__file__).resolve().with_name("taskenv_init.py")
# The sidecar runs from the project's venv (the host file system is its image).
SIDECAR_PYTHON = str(REPO_ROOT / ".venv" / "bin" / "python") if (REPO_ROOT / ".venv").is_dir() else sys.executable

# Linux capability numbers (include/uapi/linux/capability.h).
CAPABILITIES: dict[str, int] = {
    name: bit
    for bit, name in enumerate(
        "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE "  # noqa: SIM905
        "NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT "
        "SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE "
        "AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ "
        "PERFMON BPF CHECKPOINT_RESTORE".split()
    )
}
# What Docker/containerd give a container by default, hence every Fargate container.
DOCKER_DEFAULT_CAPS: frozenset[str] = frozenset(
    "CHOWN DAC_OVERRIDE FSETID FOWNER MKNOD NET_RAW SETGID SETUID SETFCAP SETPCAP NET_BIND_SERVICE "  # noqa: SIM905
    "SYS_CHROOT KILL AUDIT_WRITE".split()
)
# The most a Fargate task can have: the defaults plus the one capability it may add.
FARGATE_SIDECAR_CAPS: frozenset[str] = DOCKER_DEFAULT_CAPS | {"SYS_PTRACE"}

DEFAULT_APP_IMAGE = "public.ecr.aws/docker/library/python:3.11-slim"
SIDECAR_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/runtime-sidecar:0.1.0"
_CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# One named cgroup v1 hierarchy per test process, shared by its tasks (each has its own /ecs/<task>): the kernel
# can destroy a hierarchy only some 100 ms after its last cgroups are removed, a wait paid once per process.
# The name carries the process's pid, so that a hierarchy left behind by a killed test run can be recognised
# (its owner is gone) and removed, without touching a concurrent run's.
_HIERARCHY_PREFIX = "rtsd-te-"
_HIERARCHY_RE = re.compile(rf"^\d+:name=({_HIERARCHY_PREFIX}(\d+)-[0-9a-z]+):", re.M)
_hierarchy: tuple[int, str] | None = None  # (pid, name) of this process's
_hierarchy_used = False


def process_hierarchy() -> str:
    """The name of this test process's cgroup hierarchy."""
    global _hierarchy
    if _hierarchy is None or _hierarchy[0] != os.getpid():
        _hierarchy = (os.getpid(), f"{_HIERARCHY_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
    return _hierarchy[1]


def cap_mask(caps: Iterable[str]) -> int:
    """The bit mask /proc/<pid>/status shows (CapEff, ...) for a set of capability names."""
    mask = 0
    for name in caps:
        mask |= 1 << CAPABILITIES[name.upper().removeprefix("CAP_")]
    return mask


class TaskEnvError(RuntimeError):
    """The emulated task could not do what was asked (the message says what the inside reported)."""


@dataclass(frozen=True)
class ContainerSpec:
    """An application container of the task definition."""

    name: str
    image: str = DEFAULT_APP_IMAGE
    uid: int = 0  # the container's USER; its processes can switch only if it is root
    gid: int | None = None  # default: uid
    caps: frozenset[str] | None = DOCKER_DEFAULT_CAPS  # None keeps all of root's capabilities
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Container:
    """A running container of the task. `pid` is its container-init (None for the sidecar: its main process
    is the sidecar itself, see SidecarHandle)."""

    name: str
    docker_id: str
    image: str
    metadata_uri: str
    cgroup: str | None  # /ecs/<taskid>/<DockerId> as /proc/<pid>/cgroup shows it; None without cgroups
    hostname: str
    env: Mapping[str, str]
    secret: str  # the value of DB_PASSWORD in its environment ("" for the sidecar)
    pid: int | None = None
    socket: Path | None = None
    log: Path | None = None  # stdout/stderr of its init and of spawned processes (`docker logs`)
    uid: int = 0


@dataclass(frozen=True)
class ExecResult:
    pid: int
    returncode: int | None  # None when not waited for
    stdout: str
    stderr: str


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


class _JsonLines:
    """Incremental reader of a JSON-lines file that another process is appending to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[dict[str, Any]] = []
        self._offset = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.items
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")  # the last piece may be half-written
        for line in lines:
            if line.strip():
                try:
                    item = json.loads(line)
                except ValueError:
                    continue
                if isinstance(item, dict):
                    self.items.append(item)
        return self.items


def _option(args: Sequence[str], env: Mapping[str, str], flag: str, variable: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return env.get(variable)


def _matches(predicate: Callable[[dict[str, Any]], object], item: dict[str, Any]) -> bool:
    # Forgiving: `lambda e: e["process"]["commandLine"] == ...` must not blow up on events without "process".
    try:
        return bool(predicate(item))
    except (KeyError, IndexError, TypeError, AttributeError):
        return False


class SidecarHandle:
    """The sidecar container's main process (a child of the task's PID 1, like a real container's)."""

    def __init__(
        self,
        task: TaskEnv,
        pid: int,
        *,
        argv: list[str],
        env: Mapping[str, str],
        stdout: Path,
        stderr: Path,
        events_path: Path | None,
        findings_path: Path | None,
    ) -> None:
        self.task = task
        self.pid = pid
        self.argv = argv
        self.env = dict(env)
        self.stdout_path = stdout
        self.stderr_path = stderr
        self.events_path = events_path
        self.findings_path = findings_path
        self.returncode: int | None = None
        self._events = _JsonLines(events_path) if events_path else None
        self._findings = _JsonLines(findings_path) if findings_path else None

    @property
    def host_pid(self) -> int:
        return self.task.host_pid(self.pid)

    # -- life cycle -------------------------------------------------------------------------------------------
    def poll(self) -> int | None:
        """Exit code (negative: killed by that signal) or None while it runs."""
        if self.returncode is None and not self.task.closed:
            self.returncode = self.task.wait_exit(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float = 10.0) -> int:
        if self.poll() is None:
            self.returncode = self.task.wait_exit(self.pid, timeout)
        if self.returncode is None:
            raise TimeoutError(f"sidecar pid {self.pid} still running after {timeout}s")
        return self.returncode

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (what ECS sends), wait up to `timeout`, then SIGKILL. Returns the exit code."""
        if self.poll() is not None:
            assert self.returncode is not None
            return self.returncode
        self.task.kill(self.pid, signal.SIGTERM)
        self.returncode = self.task.wait_exit(self.pid, timeout)
        if self.returncode is None:
            self.task.kill(self.pid, signal.SIGKILL)
            self.returncode = self.task.wait_exit(self.pid, 5)
        if self.returncode is None:
            raise TaskEnvError(f"sidecar pid {self.pid} survived SIGKILL")
        return self.returncode

    # -- output -----------------------------------------------------------------------------------------------
    def stdout_text(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr_lines(self) -> list[str]:
        return _read_lines(self.stderr_path)

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log records among the stderr lines."""
        records = []
        for line in self.stderr_lines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def events(self) -> list[dict[str, Any]]:
        """Every complete event line written so far to --events-out."""
        if self._events is None:
            raise TaskEnvError("the sidecar was started without --events-out / RUNTIME_SIDECAR_EVENTS_OUT")
        return list(self._events.read())

    def findings(self) -> list[dict[str, Any]]:
        if self._findings is None:
            raise TaskEnvError("the sidecar was started without --findings-out / RUNTIME_SIDECAR_FINDINGS_OUT")
        return list(self._findings.read())

    def wait_for_event(self, predicate: Callable[[dict[str, Any]], object], timeout: float = 10.0) -> dict[str, Any]:
        """The first event (in file order) for which predicate is true; fails with context after `timeout`."""
        return self._wait_for(self.events, "event", predicate, timeout)

    def wait_for_finding(self, predicate: Callable[[dict[str, Any]], object], timeout: float = 10.0) -> dict[str, Any]:
        return self._wait_for(self.findings, "finding", predicate, timeout)

    def _wait_for(
        self,
        read: Callable[[], list[dict[str, Any]]],
        what: str,
        predicate: Callable[[dict[str, Any]], object],
        timeout: float,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            exited = self.poll() is not None  # checked before reading: its last lines are then in the file
            items = read()
            for item in items[checked:]:
                if _matches(predicate, item):
                    return item
            checked = len(items)
            if exited or time.monotonic() >= deadline:
                state = f"exited with {self.returncode}" if exited else f"still running after {timeout}s"
                tail = "\n".join(self.stderr_lines()[-20:])
                raise AssertionError(f"no matching {what} among {len(items)}; sidecar {state}; stderr tail:\n{tail}")
            time.sleep(0.05)


# Tasks not closed yet: closed at interpreter exit if a test forgot (the launchers' lifeline pipes cover a crash).
_live_tasks: set[TaskEnv] = set()
_stale_checked = False
_stale_lock = threading.Lock()


@atexit.register
def _at_exit() -> None:
    for task in list(_live_tasks):
        try:
            task.close()
        except TaskEnvError:
            pass
    if _hierarchy_used:
        release_cgroup_hierarchy()


def _cleanup_cgroup(name: str, subtree: str | None = None) -> str | None:
    """Run taskenv_init's cgroup cleanup (it needs a mount namespace of its own); None or what went wrong."""
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(INIT_SCRIPT), "cleanup-cgroup", name, *([subtree] if subtree else [])],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return None if result.returncode == 0 else f"cleanup-cgroup {name} {subtree}: {result.stderr.decode()[-500:]}"


def _mark_hierarchy_used() -> None:
    global _hierarchy_used
    _hierarchy_used = True


def hierarchy_exists(name: str) -> bool:
    return f":name={name}:" in Path("/proc/self/cgroup").read_text()


def release_cgroup_hierarchy() -> bool:
    """Destroy this process's cgroup hierarchy (at exit, automatically); True if it no longer exists. Refused
    while tasks of this process are running. The next task makes a new one."""
    global _hierarchy_used
    if _live_tasks:
        raise TaskEnvError("tasks are still running")
    name = process_hierarchy()
    if hierarchy_exists(name) and _cleanup_cgroup(name) is not None:
        return False
    _hierarchy_used = False
    return not hierarchy_exists(name)


def remove_stale_hierarchies() -> list[str]:
    """Remove the cgroup hierarchies of test processes that died without tearing their tasks down (a named v1
    hierarchy outlives its mounts while it has cgroups). Returns their names."""
    removed = []
    for match in _HIERARCHY_RE.finditer(Path("/proc/self/cgroup").read_text()):
        name, owner = match.group(1), int(match.group(2))
        if owner == os.getpid() or Path(f"/proc/{owner}").exists():
            continue
        _cleanup_cgroup(name)
        removed.append(name)
    return removed


def _ns_inode(host_pid: int, kind: str) -> int | None:
    try:
        link = os.readlink(f"/proc/{host_pid}/ns/{kind}")
    except OSError:
        return None
    return int(link[link.index("[") + 1 : -1])


class TaskEnv:
    """One emulated Fargate task. Use as a context manager (or call start() and close())."""

    def __init__(
        self,
        base_dir: Path,
        containers: Sequence[str | ContainerSpec] = ("app", "worker"),
        *,
        sidecar_name: str = "runtime-sidecar",
        net_raw: bool = True,
        cluster: str = "prod",
        family: str = "web",
        revision: int = 7,
        region: str = "us-east-1",
        task_id: str | None = None,
        cgroup_name: str | None = None,
    ) -> None:
        """`base_dir`: an empty directory of the test's (e.g. tmp_path_factory.mktemp("task")); the task keeps
        everything there. `net_raw=False` drops NET_RAW from the sidecar too (a task definition that drops it).
        `cgroup_name`: a cgroup hierarchy of its own, destroyed at close, instead of the test process's shared
        one (an invalid name simulates a host where named cgroup v1 hierarchies cannot be mounted)."""
        self.base_dir = Path(base_dir)
        self.specs = [c if isinstance(c, ContainerSpec) else ContainerSpec(c) for c in containers]
        names = [s.name for s in self.specs] + [sidecar_name]
        if len(set(names)) != len(names):
            raise ValueError(f"container names must be unique: {names}")
        self.sidecar_name = sidecar_name
        self.sidecar_caps = FARGATE_SIDECAR_CAPS if net_raw else FARGATE_SIDECAR_CAPS - {"NET_RAW"}
        self.task_id = task_id or uuid.uuid4().hex
        self.region = region
        self.task_json: dict[str, Any] = fargate_task_json(
            cluster=cluster,
            task_id=self.task_id,
            family=family,
            revision=revision,
            containers=[(s.name, s.image) for s in self.specs] + [(sidecar_name, SIDECAR_IMAGE)],
            region=region,
            az=f"{region}a",
        )
        self.cgroup_name = cgroup_name or process_hierarchy()
        self.cgroup_parent = f"/ecs/{self.task_id}"
        # Hidden from the sidecar: container roots, container logs, control sockets, the cgroup mount.
        self.private_dir = self.base_dir / "private"
        # Visible to the sidecar (host view): a place for its output files.
        self.out_dir = self.base_dir / "out"
        self.metadata = MetadataServer(self.task_json)
        self.metadata_url = ""
        self.containers: dict[str, Container] = {}
        self.cgroup_error: str | None = None
        self.init_host_pid: int | None = None
        self.pidns_inode: int | None = None
        self.startup_seconds = 0.0
        self.closed = False
        self._started = False
        self._launcher: subprocess.Popen[bytes] | None = None
        self._short_ctl_dir: Path | None = None
        self._sidecars: list[SidecarHandle] = []
        self._lock = threading.Lock()

    # -- properties -----------------------------------------------------------------------------------------------
    @property
    def cgroup_enabled(self) -> bool:
        return self.cgroup_error is None

    @property
    def app_containers(self) -> list[Container]:
        return [self.containers[s.name] for s in self.specs]

    @property
    def sidecar(self) -> Container:
        return self.containers[self.sidecar_name]

    def container(self, name: str | Container) -> Container:
        if isinstance(name, Container):
            return name
        try:
            return self.containers[name]
        except KeyError:
            raise KeyError(f"no container {name!r} in this task (has {sorted(self.containers)})") from None

    def docker_id(self, name: str) -> str:
        return self.container(name).docker_id

    # -- life cycle -----------------------------------------------------------------------------------------------
    def __enter__(self) -> TaskEnv:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> TaskEnv:
        if self._started:
            raise TaskEnvError("a TaskEnv starts once")
        self._started = True
        self._remove_stale_once()  # once per process, not counted in startup_seconds
        t0 = time.monotonic()
        _live_tasks.add(self)
        try:
            self._start()
        except BaseException:
            try:
                self.close()
            except TaskEnvError:
                pass  # the start's failure is the news
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _start(self) -> None:
        self.metadata_url = self.metadata.start()
        for sub in ("roots", "logs", "ctl"):
            (self.private_dir / sub).mkdir(parents=True)
        self.out_dir.mkdir(parents=True)
        ctl_dir = self.private_dir / "ctl"
        if len(str(ctl_dir)) > 80:  # sun_path holds 108 bytes
            self._short_ctl_dir = ctl_dir = Path(tempfile.mkdtemp(prefix="taskenv-", dir="/tmp"))
        self._control_socket = ctl_dir / "init.sock"

        docker_ids = {c["Name"]: c["DockerId"] for c in self.task_json["Containers"]}
        container_specs: list[dict[str, Any]] = []
        for index, spec in enumerate(self.specs):
            container = self._describe(
                spec.name,
                docker_ids[spec.name],
                spec.image,
                spec.env,
                uid=spec.uid,
                secret=f"hunter2-{secrets.token_hex(8)}",
                socket=ctl_dir / f"c{index}.sock",
                log=self.private_dir / "logs" / f"{spec.name}.log",
            )
            self.containers[spec.name] = container
            container_specs.append(
                {
                    "name": spec.name,
                    "docker_id": container.docker_id,
                    "hostname": container.hostname,
                    # Where task-init builds its root, on a tmpfs that only the task's mount namespace has.
                    "root": str(self.private_dir / "roots" / spec.name),
                    "socket": str(container.socket),
                    "log": str(container.log),
                    "env": dict(container.env),
                    "uid": spec.uid,
                    "gid": spec.uid if spec.gid is None else spec.gid,
                    "cap_keep": None if spec.caps is None else cap_mask(spec.caps),
                }
            )
        self.containers[self.sidecar_name] = self._describe(
            self.sidecar_name, docker_ids[self.sidecar_name], SIDECAR_IMAGE, {}, uid=0, secret=""
        )
        init_spec = {
            "control_socket": str(self._control_socket),
            "roots_dir": str(self.private_dir / "roots"),
            "cgroup": {
                "name": self.cgroup_name,
                "mountpoint": str(self.private_dir / "cgroup"),
                "parent": self.cgroup_parent,
            },
            "containers": container_specs,
            "sidecar": {"name": self.sidecar_name, "docker_id": self.sidecar.docker_id},
        }
        with open(self.private_dir / "init.log", "wb") as init_log:
            # A new session: Ctrl-C at the terminal goes to pytest (which then tears the task down), not to it.
            self._launcher = subprocess.Popen(
                [sys.executable, "-I", "-S", str(INIT_SCRIPT), "task"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=init_log,
                start_new_session=True,
            )
        assert self._launcher.stdin is not None
        # One line, and the pipe stays open: the launcher kills the task when it closes (close(), or our death).
        self._launcher.stdin.write(json.dumps(init_spec).encode() + b"\n")
        self._launcher.stdin.flush()
        ready = self._read_ready(timeout=20)
        self.cgroup_error = ready["cgroup_error"]
        if self.cgroup_error is None and self.cgroup_name == process_hierarchy():
            _mark_hierarchy_used()
        for name, pid in ready["containers"].items():
            self.containers[name] = dataclasses.replace(self.containers[name], pid=pid)
        if not self.cgroup_enabled:
            for name, container in self.containers.items():
                self.containers[name] = dataclasses.replace(container, cgroup=None)
        self.pidns_inode = _ns_inode(self.init_host_pid or 0, "pid")

    def _describe(
        self,
        name: str,
        docker_id: str,
        image: str,
        extra_env: Mapping[str, str],
        *,
        uid: int,
        secret: str,
        socket: Path | None = None,
        log: Path | None = None,
    ) -> Container:
        """The container's identity and environment, as ECS would set them up."""
        hostname = f"{name}-{self.task_id[:12]}"
        uri = self.metadata.container_uri(docker_id)
        env = {
            "PATH": _CONTAINER_PATH,
            "HOSTNAME": hostname,
            "HOME": "/root" if uid == 0 else "/",
            "AWS_EXECUTION_ENV": "AWS_ECS_FARGATE",
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "ECS_CONTAINER_METADATA_URI_V4": uri,
        }
        if secret:
            env["DB_PASSWORD"] = secret  # a secret injected by ECS: it must never show up in events/findings
        env.update(extra_env)
        return Container(
            name=name,
            docker_id=docker_id,
            image=image,
            metadata_uri=uri,
            cgroup=f"{self.cgroup_parent}/{docker_id}",
            hostname=hostname,
            env=env,
            secret=secret,
            socket=socket,
            log=log,
            uid=uid,
        )

    def _read_ready(self, timeout: float) -> dict[str, Any]:
        assert self._launcher is not None and self._launcher.stdout is not None
        fd = self._launcher.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                message = json.loads(line)
                if "init_host_pid" in message:
                    self.init_host_pid = int(message["init_host_pid"])
                elif "error" in message:
                    raise TaskEnvError(f"task-init failed: {message['error']}\n{self._init_log()}")
                else:
                    if self.init_host_pid is None:  # the launcher writes it right after fork(): just before
                        continue
                    return dict(message)
            remaining = deadline - time.monotonic()
            # poll(), not select(): select() fails outright for fds >= 1024, which a test process holding
            # many pidfds (the polling source's) reaches.
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise TaskEnvError(f"task-init not ready after {timeout}s\n{self._init_log()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise TaskEnvError(f"task-init exited ({self._launcher.wait()})\n{self._init_log()}")
            buf += chunk

    def _init_log(self) -> str:
        return "\n".join(_read_lines(self.private_dir / "init.log")[-30:])

    @staticmethod
    def _remove_stale_once() -> None:
        global _stale_checked
        with _stale_lock:
            if not _stale_checked:
                _stale_checked = True
                remove_stale_hierarchies()

    def close(self) -> None:
        """Kill everything in the task, remove its cgroups, stop the metadata server. Idempotent, and safe after
        a failed start. (The containers' roots are on a tmpfs of the task's mount namespace: gone with it.)"""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        _live_tasks.discard(self)
        problems: list[str] = []
        cgroups_removed = False
        if self._launcher is not None:
            if self._launcher.poll() is None and self.init_host_pid is not None:
                try:
                    answer = self._ctl({"op": "shutdown"}, timeout=15)
                    cgroups_removed = bool(answer.get("cgroups_removed"))
                except (OSError, TaskEnvError, ValueError) as exc:
                    problems.append(f"shutdown: {exc}")
            for pipe in (self._launcher.stdin, self._launcher.stdout):
                if pipe is not None:
                    try:
                        pipe.close()  # if task-init did not shut down, this makes the launcher kill it
                    except OSError:
                        pass
            try:
                self._launcher.wait(timeout=10)
            except subprocess.TimeoutExpired:
                # The launcher's death takes PID 1 (parent-death signal), and PID 1's the whole namespace.
                self._launcher.kill()
                self._launcher.wait()
            self._wait_init_gone(problems)
        for handle in self._sidecars:
            if handle.returncode is None:
                handle.returncode = -signal.SIGKILL
        if self._launcher is not None and not cgroups_removed and self.cgroup_error is None:
            # task-init could not clean up (killed, hung): do it from outside.
            problem = _cleanup_cgroup(self.cgroup_name, self.cgroup_parent)
            if problem:
                problems.append(problem)
        if self._launcher is not None and self.cgroup_name != process_hierarchy() and self.cgroup_error is None:
            problem = _cleanup_cgroup(self.cgroup_name)  # a hierarchy of its own: destroy it now
            if problem:
                problems.append(problem)
        self.metadata.stop()
        if self._short_ctl_dir is not None:
            shutil.rmtree(self._short_ctl_dir, ignore_errors=True)
        if problems:
            raise TaskEnvError("; ".join(problems))

    def _wait_init_gone(self, problems: list[str]) -> None:
        """PID 1 is the launcher's child, not ours: wait until the kernel has reaped it (its exit waits for the
        whole namespace to be gone)."""
        if self.init_host_pid is None:
            return
        deadline = time.monotonic() + 10
        while _ns_inode(self.init_host_pid, "pid") == self.pidns_inode and self.pidns_inode is not None:
            if time.monotonic() > deadline:
                problems.append(f"task-init (host pid {self.init_host_pid}) did not exit")
                return
            time.sleep(0.01)

    # -- talking to the inside ------------------------------------------------------------------------------------
    def _ctl(self, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """One request to task-init (PID 1)."""
        if self._launcher is None:
            raise TaskEnvError("task not started")
        answer = _ask(self._control_socket, request, timeout)[0]
        if "error" in answer:
            raise TaskEnvError(f"task-init: {request['op']}: {answer['error']}")
        return answer

    def _check_open(self) -> None:
        if self.closed or not self._started:
            raise TaskEnvError("the task is not running")

    def execute(
        self,
        container: str | Container,
        argv: Sequence[str],
        *,
        wait: bool = True,
        timeout: float = 10.0,
        uid: int | None = None,
        gid: int | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: str | None = None,
    ) -> ExecResult:
        """Run argv as a child of the container's init, like `docker exec`, but with realistic lineage.

        `env` is added to the container's environment; `cwd` (default /) is inside the container; `uid`/`gid`
        switch user (gid defaults to uid); `stdin` is fed to it. With wait, returns its exit code and output,
        raising TimeoutError (after killing it) past `timeout`; without, returns once it is exec'd, its output
        going to the container's log."""
        self._check_open()
        c = self.container(container)
        if c.socket is None:
            raise TaskEnvError(
                f"{c.name} has no container-init to run commands (the sidecar's process is its "
                "main process: use start_sidecar_command)"
            )
        request: dict[str, Any] = {
            "argv": list(argv),
            "wait": wait,
            "timeout": timeout,
            "cwd": cwd,
            "env": dict(env or {}),
            "stdin": stdin,
        }
        if uid is not None:
            request["uid"] = uid
            request["gid"] = uid if gid is None else gid
        elif gid is not None:
            raise ValueError("gid needs uid")
        answers = _ask(c.socket, request, timeout + 10, lines=2 if wait else 1)
        first = answers[0]
        if "error" in first:
            raise TaskEnvError(f"{c.name}: cannot run {list(argv)}: {first['error']}")
        if not wait:
            return ExecResult(int(first["pid"]), None, "", "")
        result = answers[1]
        if result.get("timeout"):
            raise TimeoutError(
                f"{c.name}: {list(argv)} still running after {timeout}s (killed); "
                f"stdout={result['stdout']!r} stderr={result['stderr']!r}"
            )
        return ExecResult(int(first["pid"]), int(result["rc"]), result["stdout"], result["stderr"])

    def run(
        self,
        container: str | Container,
        argv: Sequence[str],
        *,
        wait: bool = True,
        timeout: float = 10.0,
        uid: int | None = None,
        gid: int | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: str | None = None,
    ) -> tuple[int, str]:
        """(exit code, stdout) of argv run in the container (see execute). With wait=False it returns (0, "")
        as soon as the command is started (use spawn() to get its pid)."""
        result = self.execute(
            container, argv, wait=wait, timeout=timeout, uid=uid, gid=gid, cwd=cwd, env=env, stdin=stdin
        )
        return (0 if result.returncode is None else result.returncode), result.stdout

    def spawn(
        self,
        container: str | Container,
        argv: Sequence[str],
        *,
        uid: int | None = None,
        gid: int | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: str | None = None,
    ) -> int:
        """Start argv in the container without waiting; its pid in the task. Its parent (container-init) reaps
        it; kill it with kill() or let the task's teardown do it."""
        return self.execute(container, argv, wait=False, uid=uid, gid=gid, cwd=cwd, env=env, stdin=stdin).pid

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> bool:
        """Signal a process of the task (sent by PID 1); False if there is no such process."""
        self._check_open()
        return bool(self._ctl({"op": "kill", "pid": pid, "signal": int(sig)})["ok"])

    def alive(self, pid: int) -> bool:
        """True while the process runs (a zombie does not count)."""
        self._check_open()
        return bool(self._ctl({"op": "alive", "pid": pid})["alive"])

    def wait_gone(self, pid: int, timeout: float = 5.0) -> None:
        """Wait until the process has exited and been reaped by its parent (no longer in the task's /proc)."""
        self._check_open()
        deadline = time.monotonic() + timeout
        while self._ctl({"op": "alive", "pid": pid})["exists"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"pid {pid} still in the task after {timeout}s")
            time.sleep(0.01)

    def wait_exit(self, pid: int, timeout: float) -> int | None:
        """Exit code of a process PID 1 reaped (the sidecar's main process, container-inits, orphans): None
        if it has not exited within `timeout`. Other processes are reaped by their own parents: use
        wait_gone()."""
        self._check_open()
        status = self._ctl({"op": "wait", "pid": pid, "timeout": timeout}, timeout=timeout + 10)["status"]
        return None if status is None else int(status)

    def processes(self) -> list[dict[str, Any]]:
        """Every process of the task as its /proc shows them: dicts with pid, ppid, comm."""
        self._check_open()
        return list(self._ctl({"op": "pids"})["processes"])

    def pids(self) -> list[int]:
        return sorted(p["pid"] for p in self.processes())

    def host_pid(self, pid: int) -> int:
        """The host's pid of a task process (for reading the host's /proc/<pid>/...)."""
        if pid == 1 and self.init_host_pid is not None:
            return self.init_host_pid
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or _ns_inode(int(entry), "pid") != self.pidns_inode:
                continue
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            nspids = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
            if nspids and int(nspids[-1]) == pid:
                return int(entry)
        raise ProcessLookupError(f"no process {pid} in the task")

    def path_in(self, container: str | Container, path: str) -> Path:
        """A host path to `path` in a container's file system (through /proc/<pid>/root of its init, which is
        also how the sidecar sees it): its root exists only in the task's mount namespaces."""
        c = self.container(container)
        if c.pid is None:
            return Path(path)  # the sidecar container sees the host's files
        return Path(f"/proc/{self.host_pid(c.pid)}/root") / path.lstrip("/")

    # -- the sidecar ----------------------------------------------------------------------------------------------
    def start_sidecar(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> SidecarHandle:
        """`<venv python> -m sidecar <args>` as the sidecar container's main process."""
        return self.start_sidecar_command([SIDECAR_PYTHON, "-m", "sidecar", *args], env)

    def start_detecting(
        self, out_dir: Path, args: Sequence[str] = (), env: Mapping[str, str] | None = None, *, warmup: float = 1.5
    ) -> SidecarHandle:
        """The sidecar with --findings-out and --events-out in `out_dir`, once its process source reported its
        first process and the other sources had `warmup` seconds for their first pass."""
        sidecar = self.start_sidecar(
            ["run", "--findings-out", str(out_dir / "f.jsonl"), "--events-out", str(out_dir / "e.jsonl"), *args], env
        )
        sidecar.wait_for_event(lambda e: e["kind"] == "process.exec", timeout=20)
        time.sleep(warmup)
        return sidecar

    def start_sidecar_command(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> SidecarHandle:
        """Any command as the sidecar container's main process: same namespaces, cgroup, environment and
        capabilities as the sidecar gets. `env` is added to the container's environment."""
        self._check_open()
        if any(h.poll() is None for h in self._sidecars):
            raise TaskEnvError("the sidecar container is already running")
        n = len(self._sidecars)
        stdout = self.private_dir / "logs" / f"sidecar-{n}.stdout"
        stderr = self.private_dir / "logs" / f"sidecar-{n}.stderr"
        full_env = dict(self.sidecar.env)
        full_env.update(
            {
                "PATH": f"{Path(SIDECAR_PYTHON).parent}:{_CONTAINER_PATH}",
                "PYTHONPATH": str(REPO_ROOT),
                "PYTHONDONTWRITEBYTECODE": "1",
            }
        )
        full_env.update(env or {})
        args = list(argv)
        hide = [str(self.private_dir)] + ([str(self._short_ctl_dir)] if self._short_ctl_dir else [])
        answer = self._ctl(
            {
                "op": "exec",
                "argv": args,
                "env": full_env,
                "cwd": str(REPO_ROOT),
                "docker_id": self.sidecar.docker_id,
                "stdout": str(stdout),
                "stderr": str(stderr),
                "hide": hide,
                "cap_keep": cap_mask(self.sidecar_caps),
            }
        )

        def resolve(value: str | None) -> Path | None:
            if value is None:
                return None
            if value == "-":
                return stdout
            return REPO_ROOT / value  # absolute paths stay as they are

        handle = SidecarHandle(
            self,
            int(answer["pid"]),
            argv=args,
            env=full_env,
            stdout=stdout,
            stderr=stderr,
            events_path=resolve(_option(args, full_env, "--events-out", "RUNTIME_SIDECAR_EVENTS_OUT")),
            findings_path=resolve(_option(args, full_env, "--findings-out", "RUNTIME_SIDECAR_FINDINGS_OUT")),
        )
        self._sidecars.append(handle)
        return handle


def _ask(path: Path, request: dict[str, Any], timeout: float, lines: int = 1) -> list[dict[str, Any]]:
    """Send one JSON request line on a unix socket, read `lines` JSON answer lines (fewer if it errs)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise TaskEnvError(f"cannot reach {path}: {exc}") from exc
        sock.sendall(json.dumps(request).encode() + b"\n")
        answers: list[dict[str, Any]] = []
        buf = b""
        while len(answers) < lines:
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    if answers:
                        return answers
                    raise TaskEnvError(f"{path}: connection closed without an answer to {request}")
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            answer = json.loads(line)
            answers.append(answer)
            if "error" in answer:
                break
        return answers

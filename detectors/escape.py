"""Container escapes: the runtime's socket, runc, cgroup release agents, host mounts, kernel modules.

* ``PrivilegeEscalation:Runtime/DockerSocketAccessed``: ``net.unix_connect`` (the socket source reports
  connections to the Docker/containerd/CRI-O/Podman sockets it watches) made by a container's process; and
  ``file.modify`` of category ``docker_socket`` with operation ``attribute`` (``chmod 666 docker.sock``:
  opening the socket to every user of the container). Not findings: a host process talking to the socket
  (the docker CLI on an EC2 host, in local mode); a connection the source could not tie to any process
  (counted: on a host that is mostly the short-lived CLI); a docker.sock created or deleted (a
  Docker-in-Docker container runs its own daemon). Context ``socketPath`` (GuardDuty's).
* ``PrivilegeEscalation:Runtime/RuncContainerEscape``:

  (a) CVE-2019-5736's first step inside the container: an executable of a binary directory rewritten to
      start with ``#!/proc/self/exe``, so that the next ``docker exec`` makes runc execute itself through
      the container's file and expose its own binary. A ``file.modify`` of category ``binary_dir`` (only
      executables are reported) is checked by reading the first 64 bytes of that file through
      ``/proc/<pid>/root`` of a process of its container: bounded (one open, one 64-byte read, only for
      these events, which the file source coalesces), no symlink is followed at the last component and
      non-regular files are not read (a FIFO would block).
  (b) ``proc.runc_write`` from the kernel-traces source: a process holding a file named ``runc`` open for
      writing (the overwrite itself, through ``/proc/<runc pid>/exe`` or the path).

  Context ``runcBinaryPath`` (GuardDuty's); ``interpreterLine`` (ours) for (a).
* ``PrivilegeEscalation:Runtime/CGroupsReleaseAgentModified``: ``file.modify`` of category
  ``release_agent`` (the file source watches the release_agent of every cgroup v1 hierarchy mounted in a
  container). Context ``releaseAgentPath``.
* ``PrivilegeEscalation:Runtime/ContainerMountsHostDirectory``: ``mount.add`` with ``hostMount`` in a
  container's mount namespace. The kernel-traces source takes a container's mounts as they are when it
  first reads them (its runtime's setup) as a baseline, so only mounts made later are events. Not findings:
  mounts in the host's namespaces (local mode: systemd, the container runtime, ``unshare`` on a host);
  ``tmpfs``, ``mqueue`` and binds of the container's own files (not host mounts). ``mountSource`` is what
  GuardDuty calls it: the host path for a bind (the mount's root in its filesystem), else the source
  (``proc``, a device). Context ``mountSource``, ``mountTarget``, ``fileSystemType``, ``flags`` (the mount
  options, as a list), ``mountKind`` (ours). Note that the process named is the namespace's process the source read
  the table through, not necessarily the one that called mount(2): /proc keeps no author for a mount.
* ``DefenseEvasion:Runtime/KernelModuleLoaded``: ``kernel.module`` with ``op`` load. Only where
  /proc/modules is the host's (ECS on EC2, local mode). Context ``moduleName``, ``taints`` (ours).
"""

from __future__ import annotations

import os
import re
import stat as stat_mod
from collections import Counter
from collections.abc import Iterable
from typing import Any

from collectors.events import ContainerRef, ProcessInfo, RuntimeEvent
from detectors.base import Detection, Detector

DOCKER_SOCKET = "PrivilegeEscalation:Runtime/DockerSocketAccessed"
RUNC_ESCAPE = "PrivilegeEscalation:Runtime/RuncContainerEscape"
RELEASE_AGENT = "PrivilegeEscalation:Runtime/CGroupsReleaseAgentModified"
HOST_MOUNT = "PrivilegeEscalation:Runtime/ContainerMountsHostDirectory"
KERNEL_MODULE = "DefenseEvasion:Runtime/KernelModuleLoaded"

# Container runtime API sockets, by file name (a socket source configured with other paths is trusted).
RUNTIME_SOCKETS = re.compile(r"(?:^|/)(?:docker|containerd|crio|podman|dockershim|cri-dockerd)\.sock$")
RUNC_SHEBANG = b"#!/proc/self/exe"
HEAD_BYTES = 64


def file_container(data: dict[str, Any]) -> ContainerRef | None:
    """The container a file event belongs to (its namespace's), for when the writer is not a container's."""
    name, cid = data.get("containerName"), data.get("containerId")
    if not isinstance(name, str) and not isinstance(cid, str):
        return None
    return ContainerRef(name if isinstance(name, str) else None, cid if isinstance(cid, str) else None)


def file_process(event: RuntimeEvent) -> ProcessInfo | None:
    """The writer of a file event, unless the file source only guessed it."""
    data = event.data or {}
    return None if data.get("modifyingProcessGuessed") else event.process


class DockerSocketDetector(Detector):
    name = "docker_socket"
    types = (DOCKER_SOCKET,)
    kinds = ("net.unix_connect", "file.modify")

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.skipped: Counter[str] = Counter()

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        data = event.data or {}
        if event.kind == "file.modify":
            if data.get("category") != "docker_socket" or data.get("fileOperation") != "attribute":
                return ()
            path = data.get("filePath")
            p = file_process(event)
            return (
                Detection(
                    DOCKER_SOCKET,
                    p,
                    context={"socketPath": path, "fileOperation": "attribute"},
                    key=(path, "attribute"),
                    time=event.time,
                    container=file_container(data),
                ),
            )
        path = data.get("socketPath")
        if not isinstance(path, str) or not RUNTIME_SOCKETS.search(path):
            return ()
        p = event.process
        if p is None:
            self.skipped["unattributed"] += 1
            return ()
        if p.container is None:
            self.skipped["host_process"] += 1
            return ()
        return (
            Detection(
                DOCKER_SOCKET,
                p,
                context={"socketPath": path, "addressFamily": "AF_UNIX"},
                key=(path,),
                time=event.time,
            ),
        )

    def snapshot(self) -> dict[str, Any]:
        return dict(self.skipped)


def read_head(pid: int, path: str, limit: int = HEAD_BYTES) -> bytes | None:
    """The first ``limit`` bytes of a regular file of pid's root, or None.

    The last component is opened without following a symlink (an absolute symlink would be resolved
    against our root, not the container's); O_NONBLOCK so that a FIFO cannot block the detector."""
    if not path.startswith("/") or "\0" in path:
        return None
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(f"/proc/{pid}/root{path}", flags)
    except OSError:
        return None
    try:
        if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


class RuncEscapeDetector(Detector):
    name = "runc_escape"
    types = (RUNC_ESCAPE,)
    kinds = ("file.modify", "proc.runc_write")

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.stats: Counter[str] = Counter()

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        data = event.data or {}
        if event.kind == "proc.runc_write":
            p = event.process
            path = data.get("path")
            if p is None or not isinstance(path, str):
                return ()
            context = {"runcBinaryPath": path, "accessMode": data.get("accessMode"), "fd": data.get("fd")}
            return (Detection(RUNC_ESCAPE, p, context=context, key=(path,), time=event.time),)
        if data.get("category") != "binary_dir" or data.get("fileOperation") == "delete":
            return ()
        if not data.get("isExecutable"):
            return ()
        path = data.get("newPath") if data.get("fileOperation") == "rename" else data.get("filePath")
        if not isinstance(path, str):
            return ()
        readers = self._readers(event)
        if not readers:
            self.stats["no_reader"] += 1
            return ()
        self.stats["heads_read"] += 1
        # the writer may have exited before the table knows: the next process of the namespace reads it then
        head = next((h for h in (read_head(r, path) for r in readers) if h is not None), None)
        if head is None or not head.startswith(RUNC_SHEBANG):
            return ()
        line = head.split(b"\n", 1)[0].decode("utf-8", "replace")
        return (
            Detection(
                RUNC_ESCAPE,
                file_process(event),
                context={"runcBinaryPath": path, "interpreterLine": line, "fileOperation": data.get("fileOperation")},
                key=(path,),
                time=event.time,
                container=file_container(data),
            ),
        )

    def _readers(self, event: RuntimeEvent, most: int = 3) -> list[int]:
        """Live processes whose root is the file's container's: the writer first, then others of its namespace."""
        data = event.data or {}
        ns = data.get("containerMntNs")
        p = event.process
        out = []
        if p is not None and (ns is None or p.mnt_ns == ns) and p.exited_at is None:
            out.append(p.pid)
        if ns is not None:
            for cand in self.ctx.table.live():
                if len(out) >= most:
                    break
                if cand.mnt_ns == ns and cand.exited_at is None and cand.pid not in out:
                    out.append(cand.pid)
        return out

    def snapshot(self) -> dict[str, Any]:
        return dict(self.stats)


class ReleaseAgentDetector(Detector):
    name = "release_agent"
    types = (RELEASE_AGENT,)
    kinds = ("file.modify",)

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        data = event.data or {}
        if data.get("category") != "release_agent":
            return ()
        path = data.get("filePath")
        context: dict[str, Any] = {"releaseAgentPath": path, "fileOperation": data.get("fileOperation")}
        if data.get("seenByScan"):
            context["seenByScan"] = True
        return (
            Detection(
                RELEASE_AGENT,
                file_process(event),
                context=context,
                key=(path,),
                time=event.time,
                container=file_container(data),
            ),
        )


class HostMountDetector(Detector):
    name = "host_mount"
    types = (HOST_MOUNT,)
    kinds = ("mount.add",)

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.skipped: Counter[str] = Counter()

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        data = event.data or {}
        p = event.process
        if data.get("hostMount") is not True or p is None:
            return ()
        if p.container is None:
            self.skipped["host_namespace"] += 1
            return ()
        kind = data.get("mountKind")
        source = data.get("root") if kind == "bind" else data.get("source")
        target = data.get("mountPoint")
        fs_type = data.get("fsType")
        context = {
            "mountSource": source,
            "mountTarget": target,
            "fileSystemType": fs_type,
            "flags": options.split(",") if isinstance(options := data.get("options"), str) and options else None,
            "mountKind": kind,
        }
        return (
            Detection(
                HOST_MOUNT,
                p,
                context={k: v for k, v in context.items() if v is not None},
                key=(target, fs_type, source),
                time=event.time,
            ),
        )

    def snapshot(self) -> dict[str, Any]:
        return dict(self.skipped)


class KernelModuleDetector(Detector):
    name = "kernel_module"
    types = (KERNEL_MODULE,)
    kinds = ("kernel.module",)

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        data = event.data or {}
        name = data.get("moduleName")
        if data.get("op") != "load" or not isinstance(name, str) or not name:
            return ()
        context: dict[str, Any] = {"moduleName": name}
        if data.get("taints"):
            context["taints"] = str(data["taints"])
        return (Detection(KERNEL_MODULE, event.process, context=context, key=(name,), time=event.time),)


DETECTORS: tuple[type[Detector], ...] = (
    DockerSocketDetector,
    RuncEscapeDetector,
    ReleaseAgentDetector,
    HostMountDetector,
    KernelModuleDetector,
)

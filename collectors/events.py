"""Typed runtime events: what every collector produces and everyone else reads.

The JSON form (``to_json``) is the ``--events-out`` contract of ARCHITECTURE.md:
camelCase keys, one event per line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

_second_cache: tuple[int, str] = (-1, "")


def iso_time(ts: float) -> str:
    """RFC 3339 UTC with milliseconds. The seconds part is cached: events come in bursts."""
    global _second_cache
    sec = int(ts)
    if _second_cache[0] != sec:
        _second_cache = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{_second_cache[1]}.{int((ts - sec) * 1000):03d}Z"


@dataclass(slots=True)
class ContainerRef:
    """The container a process belongs to, as far as we can tell."""

    name: str | None
    id: str | None
    image: str | None = None
    image_digest: str | None = None
    # how the mapping was made: cgroup, environ, self, mntns (unknown container)
    source: str = "unknown"


@dataclass(slots=True)
class ProcessInfo:
    """One process image: a pid from one exec until the next exec or its exit."""

    pid: int
    nspid: int
    ppid: int
    name: str
    executable_path: str | None
    executable_deleted: bool
    executable_sha256: str | None
    command_line: str | None
    cwd: str | None
    uid: int
    euid: int
    gid: int
    egid: int
    user: str | None
    euser: str | None
    start_ticks: int
    start_time: float
    uuid: str
    parent_uuid: str | None
    ld_preload: str | None
    ld_library_path: str | None
    container: ContainerRef | None
    mnt_ns: int | None
    tracer_pid: int = 0
    # exec in place (same pid, new image): how many images this pid ran before
    exec_seq: int = 0
    # fstat of the executable, for "new binary" checks and hashing
    exe_ino: int | None = None
    exe_dev: int | None = None
    exe_mtime_ns: int | None = None
    exe_ctime_ns: int | None = None
    exe_setuid: bool = False
    exited_at: float | None = None
    exit_code: int | None = None
    # False when the process vanished before its details could be read.
    complete: bool = True
    # True when, at capture, it still ran the address space it was forked with from its parent (a subshell, a
    # pre-fork worker): same image, never exec'd. Told by the randomized stack start (procfs.forked_from).
    forked: bool = False
    # to_json() serialized once: the exec and exit events of a process share it.
    _json: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        c = self.container
        return {
            "pid": self.pid,
            "namespacePid": self.nspid,
            "ppid": self.ppid,
            "name": self.name,
            "executablePath": self.executable_path,
            "executableDeleted": self.executable_deleted,
            "executableSha256": self.executable_sha256,
            "commandLine": self.command_line,
            "pwd": self.cwd,
            "uid": self.uid,
            "euid": self.euid,
            "gid": self.gid,
            "egid": self.egid,
            "user": self.user,
            "euser": self.euser,
            "startTime": iso_time(self.start_time),
            "uuid": self.uuid,
            "parentUuid": self.parent_uuid,
            "ldPreload": self.ld_preload,
            "ldLibraryPath": self.ld_library_path,
            "containerName": c.name if c else None,
            "containerId": c.id if c else None,
            "containerImage": c.image if c else None,
            "complete": self.complete,
        }

    def json_bytes(self) -> bytes:
        if self._json is None:
            self._json = orjson.dumps(self.to_json())
        return self._json

    def invalidate_json(self) -> None:
        self._json = None


@dataclass(slots=True)
class RuntimeEvent:
    kind: str
    process: ProcessInfo | None
    time: float = field(default_factory=time.time)
    data: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "time": iso_time(self.time)}
        if self.process is not None:
            out["process"] = self.process.to_json()
        if self.data:
            out.update(self.data)
        return out

    def to_bytes(self) -> bytes:
        """The event as one JSON object; the process part is reused, not re-serialized."""
        head = orjson.dumps({"kind": self.kind, "time": iso_time(self.time), **(self.data or {})})
        if self.process is None:
            return head
        return head[:-1] + b',"process":' + self.process.json_bytes() + b"}"

"""What every detector shares: the Detection it returns, the context it reads, its base class.

A detector is a small unit with one job: it declares the event kinds it reads
(``kinds``) and the catalog types it can emit (``types``), and turns one
event plus the process table into zero or more :class:`Detection`. It does
not build findings, aggregate repeats, apply allowlists or write anything:
the :class:`~detectors.engine.DetectorEngine` does that for all of them.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from collectors.events import ContainerRef, ProcessInfo, RuntimeEvent, iso_time
from collectors.process_table import ProcessTable

if TYPE_CHECKING:
    from detectors.intel import ThreatIntel


@dataclass(frozen=True, slots=True)
class ThreatEvidence:
    """One threat-list hit: ``service.evidence.threatIntelligenceDetails[]``."""

    list_name: str
    threat_names: tuple[str, ...] = ()
    file_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"threatListName": self.list_name, "threatNames": list(self.threat_names)}
        if self.file_sha256:
            out["threatFileSha256"] = self.file_sha256
        return out


@dataclass(slots=True)
class Detection:
    """One observation of a catalog type: what a detector returns.

    ``key`` holds the fields that define the pattern beyond the type, the
    container and the executable (a remote address, a domain, a file path):
    detections with equal keys aggregate into one finding.
    """

    type: str
    process: ProcessInfo | None
    # service.runtimeDetails.context: GuardDuty's RuntimeContext fields (camelCase), plus our own where
    # GuardDuty has none (documented in the catalog's description of the type).
    context: dict[str, Any] = field(default_factory=dict)
    key: tuple[Any, ...] = ()
    # a level of the catalog entry's [type.levels] when the type's severity varies
    level: str | None = None
    evidence: list[ThreatEvidence] = field(default_factory=list)
    # service.action (NETWORK_CONNECTION / DNS_REQUEST), see network_action() and dns_action()
    action: dict[str, Any] | None = None
    # extra fields for the title/description templates only
    facts: dict[str, Any] = field(default_factory=dict)
    # when it happened (the event's time); None: now
    time: float | None = None
    # the container, when there is no process (a DNS query nobody could be tied to)
    container: ContainerRef | None = None

    @property
    def where(self) -> ContainerRef | None:
        if self.process is not None and self.process.container is not None:
            return self.process.container
        return self.container


@dataclass(frozen=True, slots=True)
class ListSpec:
    """A threat or trusted list named in the policy: a file, its format, what it lists."""

    path: str
    format: str = "auto"  # auto (by extension/content) | plain | stix | otx
    category: str | None = None  # c2, mining, tor, blackhole, drop_point, dga, drive_by, phishing, ...
    name: str | None = None  # threatListName in findings; default: the file name


class ContainerStarts:
    """When each container started: its mount namespace's earliest process seen (exec events and the table)."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._starts: dict[Any, float] = {}
        self.max_entries = max_entries

    @staticmethod
    def _key(info: ProcessInfo) -> Any:
        if info.mnt_ns is not None:
            return info.mnt_ns
        return info.container.id if info.container is not None else None

    def observe(self, info: ProcessInfo) -> None:
        key = self._key(info)
        if key is None or info.start_time <= 0:
            return
        cur = self._starts.get(key)
        if cur is None or info.start_time < cur:
            if cur is None and len(self._starts) >= self.max_entries:
                self._starts.pop(next(iter(self._starts)))
            self._starts[key] = info.start_time

    def __call__(self, info: ProcessInfo) -> float | None:
        return self._starts.get(self._key(info))


@dataclass(slots=True)
class DetectorContext:
    """What detectors may read besides the event: the process table, threat intelligence, container starts."""

    table: ProcessTable
    intel: ThreatIntel | None = None
    # when a process's container started (the engine feeds it every exec)
    container_start: ContainerStarts = field(default_factory=ContainerStarts)
    # pids of the sidecar itself: its own activity is never a finding
    self_pids: frozenset[int] = field(default_factory=lambda: frozenset({os.getpid()}))
    clock: Callable[[], float] = time.time

    def parent(self, info: ProcessInfo) -> ProcessInfo | None:
        parent = self.table.parent_of(info)
        if parent is None and info.ppid:
            live = self.table.get(info.ppid)
            # only if it is really the parent: started no later than the child
            if live is not None and live.start_time <= info.start_time + 0.01:
                parent = live
        return parent

    def lineage(self, info: ProcessInfo, max_depth: int = 16) -> list[ProcessInfo]:
        return self.table.lineage(info, max_depth, parent=self.parent)


class Detector:
    """Base class: declare ``name``, ``types`` and ``kinds``, implement ``on_event``."""

    name: ClassVar[str]
    types: ClassVar[tuple[str, ...]]
    kinds: ClassVar[tuple[str, ...]]

    def __init__(self, ctx: DetectorContext) -> None:
        self.ctx = ctx

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        raise NotImplementedError

    def tick(self, now: float) -> Iterable[Detection]:
        """Called about once a second (the agent's flush loop): detections held back that are now due."""
        return ()

    def snapshot(self) -> dict[str, Any]:
        """Counters for the stats log line; override to add some."""
        return {}


# -- helpers detectors share ------------------------------------------------------------------------------------


# Shells, and interpreters that run a script or a -c/-e program: what a reverse shell, a dropped script
# or a typed pipeline runs in. busybox is not here: its applets (wget, nc) are not shells; busybox sh has comm "sh".
SHELL_NAMES = frozenset(
    {"sh", "bash", "dash", "zsh", "ash", "ksh", "mksh", "pdksh", "csh", "tcsh", "fish", "yash", "rbash"}
)
INTERPRETER_NAME = re.compile(
    r"^(?:(?:python|pypy|perl|ruby|irb|php|php-cgi|lua|luajit|tclsh|expect)[0-9.]*|node|nodejs|deno|bun)$"
)


def process_names(info: ProcessInfo) -> tuple[str, str]:
    """(comm, executable basename): a renamed copy changes one, a symlinked applet the other."""
    return info.name or "", os.path.basename(info.executable_path or "")


def is_shell(info: ProcessInfo) -> bool:
    return any(n in SHELL_NAMES for n in process_names(info))


def is_interpreter(info: ProcessInfo) -> bool:
    return any(INTERPRETER_NAME.match(n) for n in process_names(info))


def process_details(info: ProcessInfo, lineage: Sequence[ProcessInfo] | None = None) -> dict[str, Any]:
    """GuardDuty's ProcessDetails (plus ``commandLine``, ours) of a process; ``lineage`` nearest ancestor first."""
    out: dict[str, Any] = {
        "name": info.name,
        "executablePath": info.executable_path,
        "executableSha256": info.executable_sha256,
        "namespacePid": info.nspid,
        "pwd": info.cwd,
        "pid": info.pid,
        "startTime": iso_time(max(info.start_time, 0.0)),
        "uuid": info.uuid,
        "parentUuid": info.parent_uuid,
        "user": info.user,
        "userId": info.uid,
        "euid": info.euid,
        "commandLine": info.command_line,
    }
    if lineage is not None:
        out["lineage"] = [lineage_object(p) for p in lineage]
    return out


def lineage_object(info: ProcessInfo) -> dict[str, Any]:
    """GuardDuty's LineageObject (plus ``commandLine`` and ``user``, ours: the console shows the tree)."""
    return {
        "startTime": iso_time(max(info.start_time, 0.0)),
        "namespacePid": info.nspid,
        "userId": info.uid,
        "name": info.name,
        "pid": info.pid,
        "uuid": info.uuid,
        "executablePath": info.executable_path,
        "euid": info.euid,
        "parentUuid": info.parent_uuid,
        "commandLine": info.command_line,
        "user": info.user,
    }


def _ip_details(ip: str | None) -> dict[str, Any] | None:
    if not ip:
        return None
    return {"ipAddressV6": ip} if ":" in ip else {"ipAddressV4": ip}


def network_action(data: dict[str, Any]) -> dict[str, Any]:
    """service.action for a connection event (net.connect/accept/syn/stdio_socket fields)."""
    proto = str(data.get("protocol") or ("TCP" if data.get("ianaProtocolNumber", 6) == 6 else "UDP")).upper()
    act: dict[str, Any] = {
        "connectionDirection": data.get("direction") or "UNKNOWN",
        "protocol": proto,
        "blocked": False,
    }
    if data.get("localPort") is not None:
        act["localPortDetails"] = {"port": data["localPort"]}
    if data.get("remotePort") is not None:
        act["remotePortDetails"] = {"port": data["remotePort"]}
    if (local := _ip_details(data.get("localIp"))) is not None:
        act["localIpDetails"] = local
    if (remote := _ip_details(data.get("remoteIp"))) is not None:
        act["remoteIpDetails"] = remote
    return {"actionType": "NETWORK_CONNECTION", "networkConnectionAction": act}


def dns_action(domain: str, data: dict[str, Any]) -> dict[str, Any]:
    """service.action for a DNS query."""
    return {
        "actionType": "DNS_REQUEST",
        "dnsRequestAction": {
            "domain": domain,
            "protocol": str(data.get("transport") or "UDP").upper(),
            "blocked": False,
        },
    }


def normalize_domain(name: str | None) -> str:
    return (name or "").rstrip(".").lower()

"""NewBinaryExecuted, SuspiciousShellCreated, ElevationToRoot: what a process does, not what it is called.

Execution:Runtime/NewBinaryExecuted
    A container process runs an executable whose ctime or mtime is later
    than its container's start (``ctx.container_start``, plus
    ``START_SLACK``: process start times inherit btime's truncation to whole
    seconds). Scripts are not binaries: ``python3 x.py`` runs the old
    interpreter, so nothing fires. ``file.modify`` events of category
    binary_dir are remembered (path -> writer, time) to name the writer in
    ``modifyingProcess`` and ``modifiedAt``; the file watch coalesces bursts
    and often reports after the exec, so a detection without its writer
    waits up to ``WAIT`` seconds for it (released by the next event of any
    kind this detector reads once the wait is over). Writing without executing never
    fires. A package manager installing a binary at run time and then
    running it fires like anything else: the image no longer says what the
    container runs (that is the drift this type is about), and the writer
    (dpkg, pip...) is in ``modifyingProcess`` for the analyst or an
    exception to see. What a package manager writes in an image build step
    predates every container of that image: no finding.

Execution:Runtime/SuspiciousShellCreated (Low)
    A shell that reads commands (``-i``, or no ``-c`` and no script: its
    stdin) whose nearest non-shell ancestor is network-facing: it listens
    (``net.listen``) or accepted a connection (``net.accept``), or its
    parent with the same executable does (pre-fork servers: the master
    listens, the worker accepts and forks). ``sh -c`` one-shot commands are
    what system()/subprocess do and are not reported, nor a stdin shell
    that is a component of a ``sh -c`` pipeline. sshd, dropbear and telnetd
    are excluded: their sessions are authenticated logins, which is what
    they are for. The listen event may arrive after the shell started
    (sockets are polled): recent shells are re-checked when it does.

PrivilegeEscalation:Runtime/SuspiciousCommand, ``setuid_file_created`` (Medium)
    A regular file in a binary or temp dir becomes setuid root at run time
    (``install -m 4755 /bin/bash /var/tmp/.b``, ``os.chmod(p, 0o4755)``): the
    file watch's create/attribute event, and the file's mode read through the
    container's root.

PrivilegeEscalation:Runtime/ElevationToRoot (Medium)
    ``proc.uid_change`` to euid or uid 0 from a process whose real and
    effective uids were both non-zero (a root process dropping and regaining
    privileges is not an elevation), through a setuid executable
    (``setuidExe``) or, when not inferred, any other way (capabilities).
    A child that merely inherited root from an elevated parent is not
    reported again. The normal setuid family (sudo, su, doas, pkexec,
    passwd, ping, mount...) is excluded only at its standard paths and only
    if the file predates the container: a copy of bash/dash/find/python
    made setuid, any setuid binary outside /usr/bin, /bin, /usr/sbin, /sbin,
    or one created after the container started fires.
"""

from __future__ import annotations

import os
import stat
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any

from collectors.events import ProcessInfo, RuntimeEvent, iso_time
from collectors.files import BINARY, WATCHED
from detectors.base import Detection, Detector, DetectorContext, is_shell, process_details
from detectors.tools import example, is_interactive_flag, shell_mode

NEW_BINARY = "Execution:Runtime/NewBinaryExecuted"
SHELL_CREATED = "Execution:Runtime/SuspiciousShellCreated"
ELEVATION = "PrivilegeEscalation:Runtime/ElevationToRoot"
SETUID_TYPE = "PrivilegeEscalation:Runtime/SuspiciousCommand"

START_SLACK = 2.0  # seconds: container start times can be early by up to 1 s (btime), files copied at start
SYSTEM_DIRS = ("/usr/bin/", "/bin/", "/usr/sbin/", "/sbin/")
# helpers packages install setuid under /usr/lib or /usr/libexec
HELPER_DIRS = ("/usr/lib/", "/usr/libexec/", "/lib/")
NORMAL_SETUID = frozenset(
    {"sudo", "su", "doas", "pkexec", "newgrp", "sg", "passwd", "chsh", "chfn", "gpasswd", "chage", "expiry", "ping",
     "ping6", "mount", "umount", "fusermount", "fusermount3", "unix_chkpwd", "ssh-keysign", "crontab", "at",
     "dbus-daemon-launch-helper", "polkit-agent-helper-1", "traceroute6.iputils", "ntfs-3g", "Xorg.wrap",
     "pppd", "staprun", "snap-confine", "newuidmap", "newgidmap", "sudoedit", "vmware-user-suid-wrapper"}
)  # fmt: skip
# the directories whose writes the file watch reports (category binary_dir)
WATCHED_BINARY_DIRS = frozenset(path for path, rule in WATCHED if rule is BINARY)
LOGIN_SERVERS = frozenset({"sshd", "sshd-session", "dropbear", "telnetd", "in.telnetd", "login"})


def _iso_ns(ns: int | None) -> str | None:
    return iso_time(ns / 1e9) if ns else None


class NewBinaryDetector(Detector):
    name = "new_binary"
    types = (NEW_BINARY,)
    # a held detection goes out from tick() when its wait is over
    kinds = ("process.exec", "file.modify")
    WAIT = 3.0  # seconds an exec waits for the file watch's (coalesced, later) event naming the writer

    def __init__(self, ctx: DetectorContext, max_writes: int = 4096) -> None:
        super().__init__(ctx)
        # (container mount ns or id, path) -> (writer details, time, guessed)
        self._writes: OrderedDict[tuple[Any, str], tuple[dict[str, Any] | None, float, bool]] = OrderedDict()
        self._held: OrderedDict[tuple[Any, str], tuple[float, Detection]] = OrderedDict()
        self.max_writes = max_writes

    @staticmethod
    def _where(info: ProcessInfo | None, data: dict[str, Any]) -> Any:
        if data.get("containerMntNs") is not None:
            return data["containerMntNs"]
        if info is not None:
            return info.mnt_ns if info.mnt_ns is not None else (info.container.id if info.container else None)
        return data.get("containerId")

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        p = event.process
        data = event.data or {}
        out: list[Detection] = []
        if len(self._held) > 256:  # bounded: the oldest goes out without its writer
            out.extend(self.tick(self.ctx.clock()))
        if event.kind == "file.modify":
            if data.get("category") == "binary_dir" and data.get("filePath") and data.get("fileOperation") != "delete":
                key = (self._where(p, data), str(data["filePath"]))
                writer = process_details(p) if p is not None else None
                self._writes[key] = (writer, event.time, bool(data.get("modifyingProcessGuessed")))
                self._writes.move_to_end(key)
                while len(self._writes) > self.max_writes:
                    self._writes.popitem(last=False)
                waiting = self._held.pop(key, None)
                if waiting is not None:
                    out.append(self._fill(waiting[1], key))
            return out
        if event.kind != "process.exec":
            return out
        if p is None or p.container is None or not p.executable_path or p.executable_deleted:
            return out  # host processes; deleted/memfd executables are the fileless family's
        started = self.ctx.container_start(p)
        if started is None:
            return out
        changed_ns = max(p.exe_ctime_ns or 0, p.exe_mtime_ns or 0)
        if not changed_ns or changed_ns / 1e9 <= started + START_SLACK:
            return out
        changed = _iso_ns(changed_ns)
        det = Detection(
            NEW_BINARY,
            p,
            context={"modifiedAt": changed, "executableCreatedOrModifiedAt": changed},
            key=(p.executable_path, p.executable_sha256),
            facts={"modifiedAt": changed},
            time=event.time,
        )
        key = (self._where(p, {}), p.executable_path)
        if key in self._writes:
            out.append(self._fill(det, key))
        elif os.path.dirname(p.executable_path) not in WATCHED_BINARY_DIRS:
            out.append(det)  # no file event will come for it: no writer to wait for
        elif key not in self._held:
            self._held[key] = (self.ctx.clock() + self.WAIT, det)
        return out

    def tick(self, now: float) -> Iterable[Detection]:
        out: list[Detection] = []
        while self._held:
            key, (deadline, held) = next(iter(self._held.items()))
            if deadline > now and len(self._held) <= 256:
                break
            del self._held[key]
            out.append(held)
        return out

    def _fill(self, det: Detection, key: tuple[Any, str]) -> Detection:
        writer, when, guessed = self._writes[key]
        if writer is not None:
            det.context["modifyingProcess"] = writer
        det.context["modifiedAt"] = det.facts["modifiedAt"] = iso_time(when)
        if guessed:
            det.context["modifyingProcessGuessed"] = True
        return det


class SuspiciousShellDetector(Detector):
    name = "suspicious_shell"
    types = (SHELL_CREATED,)
    kinds = ("process.exec", "net.listen", "net.accept")
    RECHECK = 30.0  # seconds a shell stays re-checkable when a listen/accept shows up late

    def __init__(self, ctx: DetectorContext) -> None:
        super().__init__(ctx)
        self._facing: OrderedDict[str, str] = OrderedDict()  # uuid -> why (listens on .. / accepted from ..)
        self._recent: deque[tuple[float, ProcessInfo, ProcessInfo]] = deque(maxlen=256)  # (time, shell, anchor)
        self._reported: set[str] = set()

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        p = event.process
        if p is None:
            return ()
        data = event.data or {}
        if event.kind == "process.exec":
            return self._on_exec(p, event.time)
        if data.get("protocol") not in (None, "tcp", "TCP") and event.kind == "net.listen":
            return ()
        why = (
            f"listens on {data.get('localIp')}:{data.get('localPort')}"
            if event.kind == "net.listen"
            else f"accepted {data.get('remoteIp')}:{data.get('remotePort')} on port {data.get('localPort')}"
        )
        self._facing.setdefault(p.uuid, why)
        while len(self._facing) > 4096:
            self._facing.popitem(last=False)
        out = []
        for when, shell, anchor in list(self._recent):
            if event.time - when <= self.RECHECK and shell.uuid not in self._reported:
                det = self._check(shell, anchor, when)
                if det is not None:
                    out.append(det)
        return out

    def _on_exec(self, p: ProcessInfo, when: float) -> Iterable[Detection]:
        if not is_shell(p):
            return ()
        mode = shell_mode(p)
        if mode != "stdin" and not is_interactive_flag(p):
            return ()
        parent = self.ctx.parent(p)
        if parent is not None and is_shell(parent) and shell_mode(parent) == "command":
            return ()  # a stage of `sh -c "a | sh"`: one-shot command, the commands family judges its text
        anchor = parent
        hops = 0
        while anchor is not None and is_shell(anchor) and hops < 8:
            anchor = self.ctx.parent(anchor)
            hops += 1
        if anchor is None:
            return ()
        self._recent.append((when, p, anchor))
        det = self._check(p, anchor, when)
        return (det,) if det is not None else ()

    def _network_facing(self, anchor: ProcessInfo) -> tuple[ProcessInfo, str] | None:
        cur: ProcessInfo | None = anchor
        for _ in range(4):
            if cur is None or cur.executable_path != anchor.executable_path:
                return None
            why = self._facing.get(cur.uuid)
            if why is not None:
                return cur, why
            cur = self.ctx.parent(cur)
        return None

    def _check(self, shell: ProcessInfo, anchor: ProcessInfo, when: float) -> Detection | None:
        names = {anchor.name or "", os.path.basename(anchor.executable_path or "")}
        if names & LOGIN_SERVERS:
            return None
        hit = self._network_facing(anchor)
        if hit is None:
            return None
        server, why = hit
        self._reported.add(shell.uuid)
        if len(self._reported) > 4096:
            self._reported.clear()
        return Detection(
            SHELL_CREATED,
            shell,
            context={
                "commandLineExample": example(shell),
                "parentProcess": process_details(anchor),
                "networkFacing": f"{server.name} (pid {server.pid}) {why}",
            },
            key=(anchor.executable_path,),
            facts={"parentProcess": f"{anchor.name} ({anchor.executable_path})"},
            time=when,
        )


class ElevationToRootDetector(Detector):
    name = "elevation_to_root"
    types = (ELEVATION,)
    kinds = ("proc.uid_change",)

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        p = event.process
        d = event.data or {}
        if p is None:
            return ()
        try:
            old_uid, old_euid = int(d["oldUid"]), int(d["oldEuid"])
            new_uid, new_euid = int(d["newUid"]), int(d["newEuid"])
        except (KeyError, TypeError, ValueError):
            return ()
        if old_uid == 0 or old_euid == 0 or (new_uid != 0 and new_euid != 0):
            return ()
        setuid_exe = bool(d.get("setuidExe"))
        if not setuid_exe:
            if d.get("inferred"):
                return ()  # root we saw no cause for in this image: inherited, or a setuid exec of an ancestor
            parent = self.ctx.parent(p)
            if parent is not None and parent.euid == 0 and parent.uid != 0:
                return ()  # inherited from an elevated parent, which is the finding
        if self._normal(p):
            return ()
        return (
            Detection(
                ELEVATION,
                p,
                context={
                    "commandLineExample": example(p),
                    "oldUid": old_uid,
                    "oldEuid": old_euid,
                    "newUid": new_uid,
                    "newEuid": new_euid,
                    "setuidExecutable": setuid_exe,
                },
                key=(),
                facts={"oldUid": old_uid, "oldEuid": old_euid, "newUid": new_uid, "newEuid": new_euid},
                time=event.time,
            ),
        )

    def _normal(self, p: ProcessInfo) -> bool:
        exe = p.executable_path or ""
        base = os.path.basename(exe)
        if base not in NORMAL_SETUID or not exe.startswith(SYSTEM_DIRS + HELPER_DIRS) or p.executable_deleted:
            return False
        if p.container is not None:
            started = self.ctx.container_start(p)
            changed = max(p.exe_ctime_ns or 0, p.exe_mtime_ns or 0) / 1e9
            if started is not None and changed > started + START_SLACK:
                return False  # a "sudo" put there after the container started
        return True


class SetuidFileDetector(Detector):
    """PrivilegeEscalation:Runtime/SuspiciousCommand, pattern ``setuid_file_created``: an executable in a binary or
    temp directory becomes setuid root at run time, whatever made it so (``install -m 4755``, ``os.chmod``,
    ``cp -p`` of a setuid file): the file watch reports its creation or mode change, the mode says the rest.
    (``chmod u+s`` typed in a shell is also the commands family's ``setuid_bit_set``: another key.)"""

    name = "setuid_file"
    types = (SETUID_TYPE,)
    kinds = ("file.modify",)

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        data = event.data or {}
        if data.get("category") != "binary_dir" or data.get("fileOperation") not in ("create", "attribute", "write"):
            return ()
        path = data.get("filePath")
        if not isinstance(path, str) or not path.startswith("/"):
            return ()
        # a live process of the container to look through (the writer may be gone already)
        anchor = self._anchor(data.get("containerMntNs")) or event.process
        if anchor is None or anchor.container is None:
            return ()
        try:
            st = os.lstat(f"/proc/{anchor.pid}/root{path}")
        except (OSError, ValueError):
            return ()
        if not (st.st_mode & stat.S_ISUID and st.st_uid == 0 and stat.S_ISREG(st.st_mode)):
            return ()
        writer = event.process
        context: dict[str, Any] = {
            "patternName": "setuid_file_created",
            "mitreTechniqueId": "T1548.001",
            "filePath": path,
            "fileMode": oct(stat.S_IMODE(st.st_mode)),
        }
        if writer is not None and not data.get("modifyingProcessGuessed"):
            context["commandLineExample"] = example(writer)
        return (
            Detection(
                SETUID_TYPE,
                writer if writer is not None and not data.get("modifyingProcessGuessed") else None,
                context=context,
                key=("setuid_file_created", path),
                facts={"pattern": "a setuid-root file created at run time", "commandLine": path},
                time=event.time,
                container=anchor.container,
            ),
        )

    def _anchor(self, mnt_ns: Any) -> ProcessInfo | None:
        if mnt_ns is None:
            return None
        return next((i for i in self.ctx.table.live() if i.mnt_ns == mnt_ns and i.exited_at is None), None)


DETECTORS = (NewBinaryDetector, SuspiciousShellDetector, ElevationToRootDetector, SetuidFileDetector)

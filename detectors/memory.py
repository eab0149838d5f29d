"""Code that runs from memory or inside another process: fileless execution, injection, userfaultfd, libraries.

All of these read the kernel-traces source (collectors/kernel_traces.py), which reports each fact once per
process image; the detectors decide which facts are findings.

* ``DefenseEvasion:Runtime/FilelessExecution`` (``proc.fileless``): a process whose executable is a memfd or
  a deleted file. Not a finding:

  - runc's own copy of itself, ``/memfd:runc_cloned:/proc/self/exe``, run by a process named ``runc`` or
    ``runc:[N:INIT]``: the runtime re-executes itself from a sealed memfd (the CVE-2019-5736 fix), and its
    ``runc init`` lives briefly in the container's namespaces (for as long as a ``created`` container
    waits), so this is excluded on the host and in containers alike. A payload would have to copy both the
    comm and the memfd name to hide there; the kernel-traces source's new-process delay already skips the
    usual short-lived init.
  - on the host (local mode) only: a deleted executable whose path holds a file again. That is a package
    upgrade replacing a running daemon's binary (every ``apt upgrade`` does it to sshd, cron...). In a
    container the same shape is still a finding: images are not upgraded in place, and a dropper that
    deletes itself and leaves a decoy behind looks exactly like it (``replacedOnDisk`` says so in the
    context).

  Context (ours, GuardDuty has no field for it; ``executablePath`` is in the process): ``memfd``,
  ``deleted``, ``replacedOnDisk``.
* ``DefenseEvasion:Runtime/ProcessInjection.Proc`` (``proc.mem_write``): a process holding another's
  ``/proc/<pid>/mem`` open for writing (the source already drops read-only opens and a process's own
  memory). Context ``targetProcess`` (GuardDuty's), ``path`` and ``accessMode`` (ours). ``memoryRegions`` is
  not known: an fd does not say where it writes.
* ``DefenseEvasion:Runtime/ProcessInjection.Ptrace`` (``proc.ptrace``, not TRACEME): the finding's process
  is the *tracer*, ``targetProcess`` the tracee. An operator's ``strace -p`` or ``gdb -p`` is an attach too,
  and is reported like GuardDuty does for any attach: in a production container nobody should be attaching,
  and a team that does it on purpose silences it with an exception for that executable.
* ``DefenseEvasion:Runtime/PtraceAntiDebugging`` (``proc.ptrace`` with ``traceMe``): a process that asked its
  parent to trace it, so that no debugger can attach. Not a finding when that parent is a debugger
  (``strace ./prog``, ``gdb ./prog`` start their child that way: that is debugging, not evading it).
* ``PrivilegeEscalation:Runtime/UserfaultfdUsage`` (``proc.userfaultfd``): any userfaultfd in a container
  (CRIU and QEMU post-copy migration use it, container workloads do not). Context ``fd`` (ours).
* ``Execution:Runtime/NewLibraryLoaded`` (``proc.library``): a library created or modified after the
  container started (``new_file``), deleted after it was mapped (``deleted_file``) or mapped from a memfd
  (``memfd``): always. ``LD_PRELOAD`` (``ld_preload``) only when the preloaded file is new, or an absolute
  path that is not in the container's files (deleted since, or never there): an image that preloads its own
  jemalloc, tcmalloc or libfaketime is configured that way, not attacked. On the host (local mode), a
  ``new_file`` under the system library directories is a package upgrade and not a finding.
  Context ``libraryPath``, ``ldPreloadValue`` (GuardDuty's), ``reason`` and ``fileTime`` (ours).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from collectors.events import ContainerRef, ProcessInfo, RuntimeEvent
from collectors.process_table import ProcessTable
from detectors.base import Detection, Detector, process_details, process_names

FILELESS = "DefenseEvasion:Runtime/FilelessExecution"
INJECTION_PROC = "DefenseEvasion:Runtime/ProcessInjection.Proc"
INJECTION_PTRACE = "DefenseEvasion:Runtime/ProcessInjection.Ptrace"
ANTI_DEBUGGING = "DefenseEvasion:Runtime/PtraceAntiDebugging"
USERFAULTFD = "PrivilegeEscalation:Runtime/UserfaultfdUsage"
NEW_LIBRARY = "Execution:Runtime/NewLibraryLoaded"

# runc re-executes itself from a memfd of this name (libcontainer/nsenter/cloned_binary.c; runc 1.2: dmz).
RUNC_MEMFD_PREFIX = "/memfd:runc_cloned"
# Programs that start their child traced (fork, PTRACE_TRACEME, exec): the child is being debugged.
DEBUGGERS = frozenset({"gdb", "strace", "ltrace", "lldb", "lldb-server", "gdbserver", "rr", "dlv"})
# Where a host's package manager puts libraries: replaced by every upgrade.
SYSTEM_LIBRARY_DIRS = ("/usr/lib/", "/lib/", "/usr/lib64/", "/lib64/", "/usr/lib32/", "/lib32/", "/usr/libexec/")


def _start_time(value: Any) -> float:
    if not isinstance(value, str):
        return 0.0
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return 0.0


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def process_from_json(ctx_table: ProcessTable, js: Any) -> ProcessInfo | None:
    """The ProcessInfo of a process an event names by its JSON (a tracer, a /proc/<pid>/mem target).

    The table's own entry when it still knows that image (by uuid, else by pid when the uuid agrees), else
    one rebuilt from the JSON: the process may be gone, what it was is still worth showing."""
    if not isinstance(js, dict):
        return None
    uuid = _str(js.get("uuid"))
    pid = _int(js.get("pid"))
    if uuid:
        found = ctx_table.by_uuid(uuid)
        if found is not None:
            return found
    if pid > 0:
        live = ctx_table.get(pid)
        if live is not None and (uuid is None or live.uuid == uuid):
            return live
    if pid <= 0:
        return None
    name, cid = _str(js.get("containerName")), _str(js.get("containerId"))
    container = ContainerRef(name, cid, _str(js.get("containerImage"))) if (name or cid) else None
    return ProcessInfo(
        pid=pid,
        nspid=_int(js.get("namespacePid"), pid),
        ppid=_int(js.get("ppid")),
        name=_str(js.get("name")) or "",
        executable_path=_str(js.get("executablePath")),
        executable_deleted=bool(js.get("executableDeleted")),
        executable_sha256=_str(js.get("executableSha256")),
        command_line=_str(js.get("commandLine")),
        cwd=_str(js.get("pwd")),
        uid=_int(js.get("uid")),
        euid=_int(js.get("euid")),
        gid=_int(js.get("gid")),
        egid=_int(js.get("egid")),
        user=_str(js.get("user")),
        euser=_str(js.get("euser")),
        start_ticks=0,
        start_time=_start_time(js.get("startTime")),
        uuid=uuid or f"pid-{pid}",
        parent_uuid=_str(js.get("parentUuid")),
        ld_preload=_str(js.get("ldPreload")),
        ld_library_path=_str(js.get("ldLibraryPath")),
        container=container,
        mnt_ns=None,
        complete=False,
    )


def _replaced_on_disk(p: ProcessInfo, path: str) -> bool:
    """Does the deleted executable's path hold a file again (seen through the process's root)?"""
    try:
        st = os.stat(f"/proc/{p.pid}/root{path}")
    except (OSError, ValueError):
        return False
    return st.st_ino != p.exe_ino or (p.exe_dev is not None and st.st_dev != p.exe_dev)


class FilelessDetector(Detector):
    name = "fileless"
    types = (FILELESS,)
    kinds = ("proc.fileless",)

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.skipped: Counter[str] = Counter()

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        p = event.process
        data = event.data or {}
        if p is None:
            return ()
        exe = _str(data.get("exePath")) or p.executable_path or ""
        memfd = bool(data.get("memfd")) or exe.startswith("/memfd:")
        deleted = bool(data.get("deleted"))
        if memfd and exe.startswith(RUNC_MEMFD_PREFIX) and any(n.startswith("runc") for n in process_names(p)):
            self.skipped["runc_clone"] += 1
            return ()
        replaced = False
        if deleted and not memfd and exe.startswith("/"):
            replaced = _replaced_on_disk(p, exe)
            if replaced and p.container is None:
                self.skipped["host_upgrade"] += 1
                return ()
        context: dict[str, Any] = {"memfd": memfd, "deleted": deleted}
        if replaced:
            context["replacedOnDisk"] = True
        return (Detection(FILELESS, p, context=context, key=(exe,), time=event.time),)

    def snapshot(self) -> dict[str, Any]:
        return dict(self.skipped)


class MemWriteDetector(Detector):
    name = "proc_mem_write"
    types = (INJECTION_PROC,)
    kinds = ("proc.mem_write",)

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        p = event.process
        data = event.data or {}
        if p is None:
            return ()
        target = process_from_json(self.ctx.table, data.get("target"))
        context: dict[str, Any] = {}
        if target is not None:
            context["targetProcess"] = process_details(target)
        else:
            context["targetProcess"] = {"pid": _int(data.get("targetPid")) or None}
        for k in ("path", "accessMode"):
            if data.get(k) is not None:
                context[k] = data[k]
        target_exe = target.executable_path if target is not None else None
        return (
            Detection(
                INJECTION_PROC,
                p,
                context=context,
                key=(target_exe,),
                facts={"path": data.get("path")},
                time=event.time,
            ),
        )


class PtraceDetector(Detector):
    name = "ptrace"
    types = (INJECTION_PTRACE, ANTI_DEBUGGING)
    kinds = ("proc.ptrace",)

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.skipped: Counter[str] = Counter()

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        tracee = event.process
        data = event.data or {}
        if tracee is None:
            return ()
        tracer = process_from_json(self.ctx.table, data.get("tracer"))
        if tracer is not None and tracer.pid in self.ctx.self_pids:
            return ()
        if data.get("traceMe"):
            if tracer is not None and any(n in DEBUGGERS for n in process_names(tracer)):
                self.skipped["started_by_debugger"] += 1
                return ()
            context: dict[str, Any] = {"tracerPid": _int(data.get("tracerPid")) or None}
            if tracer is not None:
                context["tracerProcess"] = process_details(tracer)
            return (Detection(ANTI_DEBUGGING, tracee, context=context, time=event.time),)
        context = {"targetProcess": process_details(tracee)}
        if tracer is None:
            # the tracer is gone and unknown: the finding is still the tracee's container's
            context["tracerPid"] = _int(data.get("tracerPid")) or None
            return (
                Detection(
                    INJECTION_PTRACE,
                    None,
                    context=context,
                    key=(tracee.executable_path,),
                    time=event.time,
                    container=tracee.container,
                ),
            )
        return (Detection(INJECTION_PTRACE, tracer, context=context, key=(tracee.executable_path,), time=event.time),)

    def snapshot(self) -> dict[str, Any]:
        return dict(self.skipped)


class UserfaultfdDetector(Detector):
    name = "userfaultfd"
    types = (USERFAULTFD,)
    kinds = ("proc.userfaultfd",)

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        p = event.process
        if p is None:
            return ()
        fd = (event.data or {}).get("fd")
        return (Detection(USERFAULTFD, p, context={"fd": fd} if fd is not None else {}, time=event.time),)


class LibraryDetector(Detector):
    name = "new_library"
    types = (NEW_LIBRARY,)
    kinds = ("proc.library",)

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.skipped: Counter[str] = Counter()

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        p = event.process
        data = event.data or {}
        if p is None:
            return ()
        path = _str(data.get("libraryPath"))
        reason = _str(data.get("reason"))
        if not path or reason not in ("ld_preload", "new_file", "deleted_file", "memfd"):
            return ()
        if reason == "ld_preload":
            new_file = data.get("newFile")
            # A bare name is searched for by the loader: what it finds is mapped, and dated by the maps scan.
            missing = new_file is None and path.startswith("/") and not self._exists(p, path)
            if new_file is not True and not missing:
                self.skipped["image_preload"] += 1
                return ()
            if missing:
                reason = "ld_preload_missing"
        elif reason == "new_file" and p.container is None:
            # A host's software changes all the time (package upgrades, pip, builds): as for NewBinaryExecuted,
            # "created after start" means after its container started, and a host process has none. LD_PRELOAD,
            # memfd and deleted libraries are still judged for host processes.
            self.skipped["host_package_upgrade" if path.startswith(SYSTEM_LIBRARY_DIRS) else "host_new_file"] += 1
            return ()
        context: dict[str, Any] = {"libraryPath": path, "ldPreloadValue": _str(data.get("ldPreloadValue"))}
        context["reason"] = reason
        if data.get("fileTime"):
            context["fileTime"] = data["fileTime"]
        return (Detection(NEW_LIBRARY, p, context=context, key=(path,), facts={"reason": reason}, time=event.time),)

    @staticmethod
    def _exists(p: ProcessInfo, path: str) -> bool:
        with contextlib.suppress(OSError, ValueError):
            os.stat(f"/proc/{p.pid}/root{path}")
            return True
        # unreadable root (the process is gone): not a reason to call it missing
        return not os.path.exists(f"/proc/{p.pid}/root/")

    def snapshot(self) -> dict[str, Any]:
        return dict(self.skipped)


DETECTORS: tuple[type[Detector], ...] = (
    FilelessDetector,
    MemWriteDetector,
    PtraceDetector,
    UserfaultfdDetector,
    LibraryDetector,
)

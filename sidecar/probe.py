"""The capability probe: which event sources work here, and why not the others.

`runtime-sidecar probe` prints it; `run` uses the same answers to pick sources
and logs the choice, and every heartbeat will carry it.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from collectors import capabilities, proc_connector, procfs
from sidecar import __version__
from sidecar.sources import NAMES, probe_all


def _probe_proc_poll() -> dict[str, Any]:
    details: dict[str, Any] = {}
    try:
        reader = procfs.LastPidReader()
        details["lastPid"] = reader.read()
        reader.close()
    except (OSError, ValueError) as exc:
        return {"available": False, "reason": f"/proc/loadavg unreadable: {exc}", "details": details}
    try:
        pids = procfs.list_pids()
    except OSError as exc:
        return {"available": False, "reason": f"cannot list /proc: {exc}", "details": details}
    details["visibleProcesses"] = len(pids)
    # ptrace access mode: exe/cwd/environ of processes of other containers need
    # SYS_PTRACE when their capabilities are not a subset of ours.
    me = os.getpid()
    readable = denied = 0
    for pid in pids[:512]:
        if pid == me:
            continue
        try:
            os.readlink(f"/proc/{pid}/exe")
            readable += 1
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                denied += 1
    details["exeReadable"] = readable
    details["exeDenied"] = denied
    details["pidfd"] = hasattr(os, "pidfd_open")
    try:
        from inotify_simple import INotify

        INotify().close()
        details["inotifyWakeups"] = True
    except OSError as exc:
        details["inotifyWakeups"] = False
        details["inotifyError"] = str(exc)
    caps = capabilities.effective_caps()
    if denied and "SYS_PTRACE" not in caps:
        return {
            "available": True,
            "degraded": True,
            "reason": f"{denied} processes' details are unreadable: missing capability SYS_PTRACE "
            "(add it to the sidecar container's linuxParameters.capabilities)",
            "details": details,
        }
    reason = "reads /proc; new pids found via /proc/loadavg"
    if details["inotifyWakeups"]:
        reason += ", woken by inotify on exec"
    if denied:
        reason += f"; {denied} processes unreadable (ptrace rules: e.g. a more privileged process)"
    return {"available": True, "reason": reason, "details": details}


def run_probe(connector_timeout: float = 1.0) -> dict[str, Any]:
    try:
        caps = sorted(capabilities.effective_caps())
    except OSError:
        caps = []
    pid_ns = capabilities.namespace_inode("pid")
    sources = {
        "proc_connector": proc_connector.probe(connector_timeout),
        "proc_poll": _probe_proc_poll(),
        **probe_all(),
    }
    selected = choose_process_source(sources, "auto")
    return {
        "version": __version__,
        "pid": os.getpid(),
        "uid": os.getuid(),
        "capabilities": caps,
        "pidNamespace": {"inode": pid_ns, "initial": pid_ns == capabilities.INIT_PID_NS},
        "userNamespaceInitial": capabilities.in_initial_user_namespace(),
        "ecsMetadataUri": bool(os.environ.get("ECS_CONTAINER_METADATA_URI_V4")),
        "sources": sources,
        "selected": {"process": selected, "events": [n for n in NAMES if sources[n].get("available")]},
    }


def choose_process_source(sources: dict[str, dict[str, Any]], wanted: str) -> str | None:
    if wanted != "auto":
        return wanted if sources.get(wanted, {}).get("available") else None
    for name in ("proc_connector", "proc_poll"):
        if sources.get(name, {}).get("available"):
            return name
    return None

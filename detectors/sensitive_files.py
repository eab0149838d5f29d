"""*/SensitiveFileModified: the file source's ``file.modify`` events, by category, into GuardDuty's three types.

========================================  ===============================================================
type                                      categories (collectors/files.py)
========================================  ===============================================================
Persistence:Runtime/SensitiveFileModified  ssh_keys (authorized_keys, host keys), passwd (passwd, group),
                                           shadow, cron, systemd, init, ssh_config: any operation
PrivilegeEscalation:Runtime/...            sudoers, pam: any operation
DefenseEvasion:Runtime/...                 log: truncated, deleted, renamed or linked (appends are what
                                           logs are for; the source reports only these and chmods, and
                                           a chmod is not tampering with content); audit, ld_preload,
                                           ld_so_conf: any operation; shell_history: truncated, deleted,
                                           renamed or linked (``ln -sf /dev/null ~/.bash_history``), not a
                                           write that grows it (a shell appends its history at exit) nor
                                           its creation
========================================  ===============================================================

Not findings (besides reading, which the file source never reports, and ssh clients writing known_hosts,
which it ignores):

* an ``.ssh`` directory created, deleted or chmodded (ssh makes ``~/.ssh`` to write known_hosts; a key put in
  it is an event of its own; a whole directory moved into place is still a rename, and a finding).
* log rotation. By ``logrotate`` (the process, or its parent, runs ``logrotate`` from a system binary
  directory: a payload named logrotate in /tmp does not count): renames, deletions and copytruncate are its
  job. By the application itself (Python's RotatingFileHandler, logback, ...): a log renamed to a rotated
  name of itself in the same directory (``app.log`` -> ``app.log.1``, ``app.log-20250101``) and the deletion
  or truncation of a rotated copy (``app.log.5``, ``app.log.2.gz``) are housekeeping, and so is the new log
  written at the rotated path within a minute (the file source remembers sizes by path, so the new, small file
  reads as a truncation of the old one). Deleting, moving
  elsewhere or truncating the live log is still a finding.

Context: ``filePath``, ``fileOperation``, ``modifyingProcess`` (GuardDuty's; the writer's process details,
only when the source found the process that holds the file: when it had to guess, the finding has no process
and the guess is in ``suspectedProcess``, ours), ``shellHistoryFilePath`` for history files, and ours:
``category``, ``oldPath``/``newPath`` of a rename, ``truncated``, ``count``. Key: (filePath, fileOperation).
"""

from __future__ import annotations

import os
import re
from collections import Counter, OrderedDict
from collections.abc import Iterable
from typing import Any

from collectors.events import ProcessInfo, RuntimeEvent
from detectors.base import Detection, Detector, process_details
from detectors.escape import file_container

PERSISTENCE = "Persistence:Runtime/SensitiveFileModified"
PRIVILEGE_ESCALATION = "PrivilegeEscalation:Runtime/SensitiveFileModified"
DEFENSE_EVASION = "DefenseEvasion:Runtime/SensitiveFileModified"

TYPE_OF_CATEGORY = {
    "ssh_keys": PERSISTENCE,
    "passwd": PERSISTENCE,
    "shadow": PERSISTENCE,
    "cron": PERSISTENCE,
    "systemd": PERSISTENCE,
    "init": PERSISTENCE,
    "ssh_config": PERSISTENCE,
    "sudoers": PRIVILEGE_ESCALATION,
    "pam": PRIVILEGE_ESCALATION,
    "log": DEFENSE_EVASION,
    "audit": DEFENSE_EVASION,
    "shell_history": DEFENSE_EVASION,
    "ld_preload": DEFENSE_EVASION,
    "ld_so_conf": DEFENSE_EVASION,
}
# logs and history: what counts as tampering (a write counts only when it shrank the file)
TAMPERING_OPS = frozenset({"delete", "rename", "link"})
ROTATED_MEMORY_SECONDS = 60.0
MAX_ROTATED = 1024
LOGROTATE_DIRS = ("/usr/sbin/", "/usr/bin/", "/sbin/", "/bin/", "/usr/local/sbin/", "/usr/local/bin/")
# app.log.1, app.log.2.gz, app.log-20250101, app.log.2025-01-01, app.log.1.bz2
_ROTATED_SUFFIX = re.compile(r"^[.-](?:\d+|\d{4}-?\d{2}-?\d{2}(?:[-_T]?\d{2,6})?)(?:\.(?:gz|bz2|xz|zst|lz4|zip))?$")
_ROTATED_NAME = re.compile(
    r"(?:[.-](?:\d+|\d{4}-?\d{2}-?\d{2}(?:[-_T]?\d{2,6})?)(?:\.log)?(?:\.(?:gz|bz2|xz|zst|lz4|zip))?"
    r"|\.(?:gz|bz2|xz|zst|lz4|zip)|\.old)$"
)


def is_rotated_name(path: str) -> bool:
    """A rotated copy of a log: app.log.1, app.log.2.gz, app.log-20250101, syslog.3.gz, app.1.log."""
    return bool(_ROTATED_NAME.search(os.path.basename(path)))


def is_rotation_rename(old: str, new: str) -> bool:
    """app.log -> app.log.1 (or -20250101, .1.gz), or a rotated copy shifted (app.log.1 -> app.log.2), in the
    same directory."""
    if os.path.dirname(old) != os.path.dirname(new):
        return False
    if new.startswith(old) and _ROTATED_SUFFIX.match(new[len(old) :]):
        return True
    return is_rotated_name(old) and is_rotated_name(new)


def _is_logrotate(info: ProcessInfo | None) -> bool:
    if info is None:
        return False
    exe = info.executable_path or ""
    return os.path.basename(exe) == "logrotate" and exe.startswith(LOGROTATE_DIRS)


class SensitiveFileDetector(Detector):
    name = "sensitive_files"
    types = (PERSISTENCE, PRIVILEGE_ESCALATION, DEFENSE_EVASION)
    kinds = ("file.modify",)

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.skipped: Counter[str] = Counter()
        # (containerMntNs, log path) -> when it was rotated away: the file made next at that path is a new log
        self._rotated: OrderedDict[tuple[Any, str], float] = OrderedDict()

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        data = event.data or {}
        category = data.get("category")
        ftype = TYPE_OF_CATEGORY.get(category) if isinstance(category, str) else None
        path = data.get("filePath")
        op = data.get("fileOperation")
        if ftype is None or not isinstance(path, str) or not isinstance(op, str):
            return ()
        if category == "ssh_keys" and os.path.basename(path) == ".ssh" and op in ("create", "delete", "attribute"):
            self.skipped["ssh_dir"] += 1  # ssh makes ~/.ssh for known_hosts; keys put in it are events of their own
            return ()
        guessed = bool(data.get("modifyingProcessGuessed"))
        if category in ("log", "shell_history"):
            if not (op in TAMPERING_OPS or (op == "write" and data.get("truncated") is True)):
                return ()
            if category == "log" and self._rotation(event, path, op):
                return ()
        writer = None if guessed else event.process
        context: dict[str, Any] = {"filePath": path, "fileOperation": op, "category": category}
        if writer is not None:
            context["modifyingProcess"] = process_details(writer, self.ctx.lineage(writer))
        elif event.process is not None:
            context["modifyingProcessGuessed"] = True
            context["suspectedProcess"] = process_details(event.process)
        if category == "shell_history":
            context["shellHistoryFilePath"] = path
        for k in ("oldPath", "newPath", "truncated", "count"):
            if data.get(k) is not None:
                context[k] = data[k]
        return (
            Detection(
                ftype,
                writer,
                context=context,
                key=(path, op),
                time=event.time,
                container=file_container(data) or (event.process.container if event.process else None),
            ),
        )

    def _rotation(self, event: RuntimeEvent, path: str, op: str) -> bool:
        data = event.data or {}
        p = event.process
        ns = data.get("containerMntNs")
        old, new = data.get("oldPath"), data.get("newPath")
        if _is_logrotate(p) or (p is not None and _is_logrotate(self.ctx.parent(p))):
            self.skipped["logrotate"] += 1
            if op == "rename" and isinstance(old, str):
                self._remember_rotated(ns, old, event.time)
            return True
        if op == "rename" and isinstance(old, str) and isinstance(new, str) and is_rotation_rename(old, new):
            self.skipped["app_rotation"] += 1
            self._remember_rotated(ns, old, event.time)
            return True
        when = self._rotated.get((ns, path)) if op == "write" else None
        if when is not None and 0 <= event.time - when <= ROTATED_MEMORY_SECONDS:
            # The file source keeps the size of the path, not of the file: the new, small log made after a
            # rotation reads as a truncation of the old one.
            self.skipped["new_log_after_rotation"] += 1
            return True
        if op in ("delete", "write") and is_rotated_name(path):
            self.skipped["rotated_copy"] += 1
            return True
        return False

    def _remember_rotated(self, ns: Any, path: str, when: float) -> None:
        self._rotated[(ns, path)] = when
        self._rotated.move_to_end((ns, path))
        while len(self._rotated) > MAX_ROTATED:
            self._rotated.popitem(last=False)

    def snapshot(self) -> dict[str, Any]:
        return dict(self.skipped)


DETECTORS: tuple[type[Detector], ...] = (SensitiveFileDetector,)

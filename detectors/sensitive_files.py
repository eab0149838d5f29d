"""*/SensitiveFileModified: the file source's ``file.modify`` events, by category, into GuardDuty's three types.

========================================  ===============================================================
type                                      categories (collectors/files.py)
========================================  ===============================================================
Persistence:Runtime/SensitiveFileModified  ssh_keys (authorized_keys, host keys), passwd (passwd, group),
                                           shadow, cron, systemd, init, ssh_config, shell_profile
                                           (~/.bashrc, ~/.profile, /etc/profile, /etc/profile.d/, ...):
                                           any operation
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
which it ignores; a login shell sourcing its profile is reading):

* an ``.ssh`` directory created, deleted or chmodded (ssh makes ``~/.ssh`` to write known_hosts; a key put in
  it is an event of its own; a whole directory moved into place is still a rename, and a finding); the same
  for cron's spool directory (``/var/spool/cron/crontabs``): the crontabs put in it are events of their own.
* log rotation. By ``logrotate`` (the process, or its parent, runs ``logrotate`` from a system binary
  directory: a payload named logrotate in /tmp does not count): renames, deletions and copytruncate are its
  job. By the application itself (Python's RotatingFileHandler, logback, ...): a log renamed to a rotated
  name of itself in the same directory (``app.log`` -> ``app.log.1``, ``app.log-20250101``) and the deletion
  or truncation of a rotated copy (``app.log.5``, ``app.log.2.gz``) are housekeeping, and so is the new log
  written at the rotated path within a minute (the file source remembers sizes by path, so the new, small file
  reads as a truncation of the old one). Deleting, moving
  elsewhere or truncating the live log is still a finding.
* an entry point creating its service user: the account files (/etc/passwd, group, shadow, gshadow) changed by
  ``useradd``/``adduser``/``groupadd``/``addgroup``/``usermod`` (from a system binary directory, or busybox
  run as that applet) whose command line asks for a system account (``-r``, ``--system``, ``-S``) and neither
  uid 0 (``-u 0``), a duplicate uid (``-o``), gid 0 nor a privileged supplementary group (root, sudo, wheel,
  adm). The writer is the process the source found holding the file; when it had to guess, the guess counts
  only if it is such a tool itself (the tool was running in the container right then: it writes the four files
  and renames each into place, and is gone a moment later).

Aggregation: one finding per file (key: filePath): a file created, written and chmodded is one finding whose
``count`` grows. The account database files are one finding per writer (key: ("accounts", writer executable)):
``useradd`` writes and renames four of them; the finding names the first in ``filePath`` and the others in
``filePaths`` (ours). To gather them it is held back ``ACCOUNT_HOLD_SECONDS`` after the first change (the
source reports a burst of writes after its one-second coalescing window already).

Context: ``filePath``, ``fileOperation``, ``modifyingProcess`` (GuardDuty's; the writer's process details,
only when the source found the process that holds the file: when it had to guess, the finding has no process
and the guess is in ``suspectedProcess``, ours), ``shellHistoryFilePath`` for history files, and ours:
``category``, ``oldPath``/``newPath`` of a rename, ``truncated``, ``count``, ``filePaths``.
"""

from __future__ import annotations

import os
import re
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from collectors.events import ProcessInfo, RuntimeEvent
from detectors.base import Detection, Detector, process_details, process_names
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
    "shell_profile": PERSISTENCE,
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
SYSTEM_BIN_DIRS = LOGROTATE_DIRS
HOME_DIRS = ("/home/", "/root/")
CRON_SPOOL_DIRS = frozenset({"crontabs", "tabs"})  # /var/spool/cron/crontabs: a directory, not a crontab
# The account database: one account added changes several of them, one finding per writer.
ACCOUNT_FILES = frozenset({"/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow"})
ACCOUNT_HOLD_SECONDS = 2.0
BURST_MEMORY_SECONDS = 30.0
MAX_HELD = 256
ACCOUNT_TOOLS = frozenset({"useradd", "adduser", "groupadd", "addgroup", "usermod"})
SYSTEM_FLAGS = frozenset({"-r", "--system", "-S"})
NON_UNIQUE_FLAGS = frozenset({"-o", "--non-unique"})
PRIVILEGED_GROUPS = frozenset({"0", "root", "sudo", "wheel", "adm", "admin", "shadow", "docker", "disk"})
_UID_OPTS = frozenset({"-u", "--uid"})
_GID_OPTS = frozenset({"-g", "--gid", "--ingroup", "-G", "--groups"})
_SHORT_BUNDLE = re.compile(r"^-[A-Za-z]{2,}$")
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


def _account_tool(info: ProcessInfo) -> tuple[str, list[str]] | None:
    """useradd & co. from a system binary directory (or busybox run as the applet, or Debian's adduser, a perl
    script): which one, and its arguments."""
    exe = info.executable_path or ""
    if not exe.startswith(SYSTEM_BIN_DIRS):
        return None
    argv = (info.command_line or "").split()
    _, base = process_names(info)
    if base in ACCOUNT_TOOLS:
        return base, argv[1:]
    if base == "busybox" and argv and os.path.basename(argv[0]) in ACCOUNT_TOOLS:
        return os.path.basename(argv[0]), argv[1:]
    if base.startswith("perl") and len(argv) > 1 and argv[1].startswith(SYSTEM_BIN_DIRS):
        script = os.path.basename(argv[1])
        return (script, argv[2:]) if script in ACCOUNT_TOOLS else None
    return None


def creates_system_account(info: ProcessInfo | None) -> bool:
    """An account tool asked for a system account, not a root one: ``useradd -r -s /usr/sbin/nologin app``,
    ``adduser --system app``, ``adduser -S -D app`` (busybox); not with ``-u 0``, ``-o``, gid 0 or a
    privileged group."""
    if info is None:
        return False
    found = _account_tool(info)
    if found is None:
        return False
    tool, args = found
    system = False
    i = 0
    while i < len(args):
        a = args[i]
        value: str | None = None
        opt = a
        if a.startswith("--") and "=" in a:
            opt, value = a.split("=", 1)
        elif len(a) > 2 and a[:2] in ("-u", "-g", "-G") and not a.startswith("--"):
            opt, value = a[:2], a[2:]
        if opt in _UID_OPTS | _GID_OPTS and value is None:
            value = args[i + 1] if i + 1 < len(args) else ""
            i += 1
        i += 1
        if opt in NON_UNIQUE_FLAGS:
            return False
        if opt in _UID_OPTS and value is not None and value.strip() in ("0", "root"):
            return False
        if opt in _GID_OPTS and value is not None and PRIVILEGED_GROUPS & set(value.split(",")):
            return False
        if opt in SYSTEM_FLAGS:
            system = True
        elif value is None and _SHORT_BUNDLE.match(opt):
            letters = opt[1:]
            if "o" in letters and tool not in {"adduser", "addgroup"}:
                return False
            system = system or "r" in letters or "S" in letters
    return system


@dataclass(slots=True)
class _HeldAccounts:
    due: float
    first: Detection
    paths: list[str]
    more: list[Detection] = field(default_factory=list)


class SensitiveFileDetector(Detector):
    name = "sensitive_files"
    types = (PERSISTENCE, PRIVILEGE_ESCALATION, DEFENSE_EVASION)
    kinds = ("file.modify",)

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.skipped: Counter[str] = Counter()
        # (containerMntNs, log path) -> when it was rotated away: the file made next at that path is a new log
        self._rotated: OrderedDict[tuple[Any, str], float] = OrderedDict()
        # (container, writer executable) -> account file changes held back to be one finding
        self._held: OrderedDict[tuple[Any, ...], _HeldAccounts] = OrderedDict()
        # (container, account file) -> (key of the burst it was last part of, when): late events join that finding
        # (container, path) -> the key, time and writer of the finding its last change counted in
        self._bursts: OrderedDict[tuple[Any, str], tuple[tuple[Any, ...], float, ProcessInfo | None]] = OrderedDict()

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
        if category == "cron" and os.path.basename(path) in CRON_SPOOL_DIRS and op in ("create", "delete", "attribute"):
            self.skipped["cron_spool_dir"] += 1  # the spool directory made (cron's install, ``crontab -e``)
            return ()
        guessed = bool(data.get("modifyingProcessGuessed"))
        if category in ("log", "shell_history"):
            if not (op in TAMPERING_OPS or (op == "write" and data.get("truncated") is True)):
                return ()
            if category == "log" and self._rotation(event, path, op):
                return ()
        if (
            category == "shell_profile"
            and op in ("create", "write", "attribute")
            and path.startswith(HOME_DIRS)
            and event.process is not None
            and _account_tool(event.process) is not None
        ):
            # useradd -m / adduser copying /etc/skel into a new home: the account itself is judged (account files,
            # commands), its starter .bashrc/.profile are not persistence
            self.skipped["skeleton_profile"] += 1
            return ()
        writer = None if guessed else event.process
        accounts = path in ACCOUNT_FILES
        if accounts and creates_system_account(event.process):
            # the found writer, or a guess that is the account tool itself (see the module docstring)
            self.skipped["system_account"] += 1
            return ()
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
        container = file_container(data) or (event.process.container if event.process else None)
        exe = writer.executable_path if writer is not None else None
        detection = Detection(
            ftype,
            writer,
            context=context,
            key=("accounts", exe) if accounts else (path,),
            time=event.time,
            container=container,
        )
        if not accounts:
            return self._single(detection, path, event.time)
        return self._hold(detection, path, event.time)

    def _single(self, d: Detection, path: str, when: float) -> Iterable[Detection]:
        """A file that is its own finding: a change whose writer was only guessed, shortly after a change of the
        same file by a known writer (its close, reported after it exited), counts in that finding."""
        where = d.where
        container = (where.id or where.name) if where is not None else None
        recent = self._bursts.get((container, path))
        if d.process is None and recent is not None and 0 <= when - recent[1] <= BURST_MEMORY_SECONDS:
            d.key, d.process = recent[0], recent[2]
        else:
            self._remember_burst(container, path, d, when)
        return (d,)

    def _hold(self, d: Detection, path: str, when: float) -> Iterable[Detection]:
        where = d.where
        group = ((where.id or where.name) if where is not None else None, *d.key)
        held = self._held.get(group)
        if held is not None:
            d.key = held.first.key  # a repeat of the group's first change
            self._remember_burst(group[0], path, held.first, when)
            held.more.append(d)
            if path not in held.paths:
                held.paths.append(path)
            return ()
        if d.key[-1] is None:
            # The writer was not found (only guessed): group by burst, not forever. useradd's eight changes land
            # within the hold; a later, unrelated change (sed -i on shadow) is a finding of its own; a late event
            # of a file already in a recent burst or change (the file watch coalesces; a writer that held the
            # file open reports its close after it exited, unattributed) is a repeat of that finding.
            recent = self._bursts.get((group[0], path))
            if recent is not None and 0 <= when - recent[1] <= BURST_MEMORY_SECONDS:
                # counted in that finding: its key and its writer make the engine's aggregation key
                d.key, d.process = recent[0], recent[2]
                still_held = self._held.get((group[0], *recent[0][:2]))
                if still_held is not None and still_held.first.key == d.key:
                    still_held.more.append(d)  # after the first, whose writer is known
                    return ()
                return (d,)
            d.key = (*d.key, f"burst@{when:.3f}")
        else:
            # The writer is known: if the same file's change was just held under a guess (the close of a file the
            # writer had open can come first, after it exited), that guess is this change: it joins behind it.
            recent = self._bursts.get((group[0], path))
            guess_group: tuple[Any, ...] = (group[0], *recent[0][:2]) if recent is not None else ()
            guessed = self._held.get(guess_group) if recent is not None and recent[0][1] is None else None
            if (
                guessed is not None
                and recent is not None
                and guessed.paths == [path]
                and guessed.first.key == recent[0]
            ):
                del self._held[guess_group]
                self._held[group] = _HeldAccounts(when + ACCOUNT_HOLD_SECONDS, d, [path])
                self._held[group].more.extend((guessed.first, *guessed.more))
                self._remember_burst(group[0], path, d, when)
                return ()
        self._remember_burst(group[0], path, d, when)
        self._held[group] = _HeldAccounts(when + ACCOUNT_HOLD_SECONDS, d, [path])
        out: list[Detection] = []
        while len(self._held) > MAX_HELD:
            _, oldest = self._held.popitem(last=False)
            out.extend(self._release(oldest))
        return out

    def _remember_burst(self, container: Any, path: str, finding: Detection, when: float) -> None:
        self._bursts[(container, path)] = (finding.key, when, finding.process)
        self._bursts.move_to_end((container, path))
        while len(self._bursts) > MAX_HELD * 4:
            self._bursts.popitem(last=False)

    def tick(self, now: float) -> Iterable[Detection]:
        out: list[Detection] = []
        for group in [g for g, h in self._held.items() if h.due <= now]:
            out.extend(self._release(self._held.pop(group)))
        return out

    @staticmethod
    def _release(held: _HeldAccounts) -> list[Detection]:
        """The first change, naming the other files; the others after it, to count as repeats of it (same key
        and writer: what the engine aggregates on)."""
        if len(held.paths) > 1:
            held.first.context["filePaths"] = held.paths[1:]
        for more in held.more:
            more.key, more.process = held.first.key, held.first.process
        return [held.first, *held.more]

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
        return {**self.skipped, "held_account_changes": len(self._held)}


DETECTORS: tuple[type[Detector], ...] = (SensitiveFileDetector,)

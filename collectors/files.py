"""File modification events from inotify, watched through each container's root.

Inside a Fargate task the other containers' files are reachable only through
``/proc/<pid>/root`` of one of their processes (SYS_PTRACE), and there is no
fanotify (it needs SYS_ADMIN). So for every mount namespace in the process
table, one live process of it is the *anchor*, and inotify watches are set on
the sensitive directories of its root (the table below). A watch sits on the
inode, not on the path: it keeps working when the anchor exits; only new
watches (a ``.ssh`` directory appearing, a cgroup hierarchy mounted) need an
anchor, and another process of the namespace takes over when it exits.

What is watched, and why (container paths; directories non-recursively):

============================  =================  ==============================================
path                          category           note
============================  =================  ==============================================
/etc (passwd, group)          passwd             the directory, for these names: editors and
/etc (shadow, gshadow)        shadow             ``sed -i``/``vipw`` replace the file by a rename
/etc (sudoers), sudoers.d/    sudoers
/etc/pam.d/, /etc/security/   pam
/etc/ssh/                     ssh_config         host keys (``ssh_host_*``) are ssh_keys
/root, /home/*                shell_history      history files; ``.ssh`` appearing is watched at once
/root, /home/* (.bashrc,      shell_profile      .bash_profile, .profile, .bash_login, .bash_logout,
  ...)                                           .zshrc, .zprofile, .zshenv, .zlogin: run by every shell
/etc/profile, profile.d/,     shell_profile      also /etc/bash.bashrc, /etc/environment, /etc/zsh/
  ...                                            (zshrc, zprofile, zshenv, zlogin)
/root/.ssh/, /home/*/.ssh/    ssh_keys           everything but known_hosts (ssh clients write it)
/etc/crontab, cron.d/, ...    cron               also cron.{hourly,daily,weekly,monthly}, /var/spool/cron
systemd unit dirs             systemd            /etc/systemd/system and its ``*.wants`` subdirs
/etc/init.d/, /etc/rc.local   init
/etc/ld.so.preload            ld_preload
/etc/ld.so.conf(.d/)          ld_so_conf
/var/log/ (+ subdirs)         log                truncation, deletion, rename, chmod: not appends
/etc/audit/ (+ rules.d/)      audit
/run, /var/run (docker.sock)  docker_socket      creation, deletion, chmod (connect() is invisible
                                                 to inotify: the socket source sees that)
binary and library dirs       binary_dir         only executables (an x bit) and shared objects
cgroup v1 release_agent       release_agent      from mountinfo, re-read at each rescan
============================  =================  ==============================================

A directory of the table that does not exist yet (slim images have no /var/spool/cron, no
/etc/systemd/system, no /etc/profile.d) is watched for when it appears: its nearest existing ancestor is
watched for created directories only (``APPEARING``), each missing component is watched the same way when it
is made, and the directory itself with its rule; what was written into it before its watch existed
(``mkdir -p`` and a write a microsecond apart) is reported from a scan of it. At most one such ancestor watch
per missing directory of the table, and they go with the namespace.

Each event names the modifying process when it can be found: a process of the
container that holds the file open for writing (a scan of ``/proc/<pid>/fd``,
done once per burst and rate-limited), else the newest process of the container,
flagged as a guess. Bursts (an editor writes many times) are coalesced into one
event per (path, operation) per window, with a count.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import stat as stat_mod
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from inotify_simple import INotify, parse_events
from inotify_simple import flags as in_flags

from collectors import capabilities, procfs
from collectors.events import ProcessInfo, RuntimeEvent
from collectors.proc_poll import _resolve_in_root
from collectors.process_table import ProcessTable

log = logging.getLogger(__name__)

Emit = Callable[[RuntimeEvent], None]
Capture = Callable[[int], ProcessInfo | None]

EVENT_KIND = "file.modify"

IN_CREATE = int(in_flags.CREATE)
IN_DELETE = int(in_flags.DELETE)
IN_MOVED_FROM = int(in_flags.MOVED_FROM)
IN_MOVED_TO = int(in_flags.MOVED_TO)
IN_CLOSE_WRITE = int(in_flags.CLOSE_WRITE)
IN_MODIFY = int(in_flags.MODIFY)
IN_ATTRIB = int(in_flags.ATTRIB)
IN_ISDIR = int(in_flags.ISDIR)
IN_IGNORED = int(in_flags.IGNORED)
IN_UNMOUNT = int(in_flags.UNMOUNT)
IN_Q_OVERFLOW = int(in_flags.Q_OVERFLOW)
IN_ONLYDIR = int(in_flags.ONLYDIR)
IN_MASK_ADD = int(in_flags.MASK_ADD)
IN_EXCL_UNLINK = int(in_flags.EXCL_UNLINK)

# MODIFY as well as CLOSE_WRITE: the modifying process is looked for while it
# still holds the file, which is at its first write, not at its close.
SENSITIVE_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_CLOSE_WRITE | IN_MODIFY | IN_ATTRIB
# No MODIFY (a download is thousands of writes; CLOSE_WRITE says it is done),
# no DELETE (temp dirs delete all day long).
BINARY_MASK = IN_CREATE | IN_MOVED_FROM | IN_MOVED_TO | IN_CLOSE_WRITE | IN_ATTRIB
# MODIFY is needed to see a truncation (truncate(2) sends only that); CREATE
# only to start watching new log subdirectories.
LOG_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_MODIFY | IN_ATTRIB
NAMED_ENTRY_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ATTRIB
FILE_MASK = IN_MODIFY | IN_CLOSE_WRITE | IN_ATTRIB
DIR_ONLY_MASK = IN_CREATE | IN_MOVED_TO  # a parent watched only to see children appear

OPERATIONS = ("write", "create", "delete", "rename", "link", "attribute")
HISTORY_FILES = (
    ".bash_history", ".zsh_history", ".ash_history", ".sh_history", ".ksh_history", ".history", ".histfile",
)  # fmt: skip
# Run by a user's shells at start or exit: a line added to one runs with every login (persistence).
PROFILE_FILES = (
    ".bashrc", ".bash_profile", ".bash_login", ".bash_logout", ".profile", ".zshrc", ".zprofile", ".zshenv",
    ".zlogin",
)  # fmt: skip
ZSH_FILES = ("zshrc", "zprofile", "zshenv", "zlogin", "zlogout")
_SHARED_OBJECT = re.compile(r"\.so(\.\d+)*$")


@dataclass(frozen=True, slots=True)
class WatchRule:
    """What the entries of one watched directory (or one watched file) mean."""

    mask: int
    # Every entry is of this category, unless named in `names` or excluded...
    category: str | None = None
    # ...or only these entries (name -> category) are reported.
    names: Mapping[str, str] = field(default_factory=dict)
    prefixes: tuple[tuple[str, str], ...] = ()  # (name prefix, category), checked after names
    exclude_prefixes: tuple[str, ...] = ()
    # "sensitive": every change is reported; "binary": only executables and
    # shared objects; "log": only truncations, deletions, renames and chmods;
    # "file": the watch is on the file itself (release_agent).
    kind: str = "sensitive"
    # Subdirectories watched as well, when they exist or appear.
    children: Mapping[str, WatchRule] = field(default_factory=dict)
    any_child: WatchRule | None = None

    def classify(self, name: str) -> str | None:
        if self.kind == "file":
            return self.category
        if not name:
            return None  # an event on the watched directory itself
        if any(name.startswith(p) for p in self.exclude_prefixes):
            return None
        category = self.names.get(name)
        if category is not None:
            return category
        for prefix, cat in self.prefixes:
            if name.startswith(prefix):
                return cat
        return self.category

    def child_rule(self, name: str) -> WatchRule | None:
        return self.children.get(name) or self.any_child


def _all(category: str, **kw: Any) -> WatchRule:
    return WatchRule(SENSITIVE_MASK, category=category, **kw)


SSH_KEYS = _all("ssh_keys", exclude_prefixes=("known_hosts",))
HOME = WatchRule(
    SENSITIVE_MASK,
    names={
        **dict.fromkeys(HISTORY_FILES, "shell_history"),
        **dict.fromkeys(PROFILE_FILES, "shell_profile"),
        ".ssh": "ssh_keys",
    },
    children={".ssh": SSH_KEYS},
)
SYSTEMD_WANTS = _all("systemd")
LOG_SUBDIR = WatchRule(LOG_MASK, category="log", kind="log")
BINARY = WatchRule(BINARY_MASK, category="binary_dir", kind="binary")
DOCKER_SOCKET = WatchRule(NAMED_ENTRY_MASK, names={"docker.sock": "docker_socket"})
RELEASE_AGENT = WatchRule(FILE_MASK, category="release_agent", kind="file")
CRON = _all("cron")
# An ancestor of a watched directory that does not exist yet: only directories appearing in it matter.
APPEARING = WatchRule(DIR_ONLY_MASK)

ETC_NAMES = {
    "passwd": "passwd",
    "group": "passwd",
    "shadow": "shadow",
    "gshadow": "shadow",
    "sudoers": "sudoers",
    "crontab": "cron",
    "ld.so.preload": "ld_preload",
    "ld.so.conf": "ld_so_conf",
    "rc.local": "init",
    "profile": "shell_profile",
    "bash.bashrc": "shell_profile",
    "environment": "shell_profile",
}

# Container paths to watch, in order: where two paths are the same directory
# (merged /usr: /bin is /usr/bin; /var/run is /run), the first one names it.
WATCHED: tuple[tuple[str, WatchRule], ...] = (
    ("/etc", WatchRule(SENSITIVE_MASK, names=ETC_NAMES)),
    ("/etc/sudoers.d", _all("sudoers")),
    ("/etc/pam.d", _all("pam")),
    ("/etc/security", _all("pam")),
    ("/etc/ssh", _all("ssh_config", prefixes=(("ssh_host_", "ssh_keys"),))),
    ("/etc/ssh/sshd_config.d", _all("ssh_config")),
    ("/root", HOME),
    ("/root/.ssh", SSH_KEYS),
    ("/home", WatchRule(DIR_ONLY_MASK, any_child=HOME)),
    ("/etc/cron.d", CRON),
    ("/etc/cron.hourly", CRON),
    ("/etc/cron.daily", CRON),
    ("/etc/cron.weekly", CRON),
    ("/etc/cron.monthly", CRON),
    ("/var/spool/cron", _all("cron", children={"crontabs": CRON, "tabs": CRON})),
    ("/var/spool/cron/crontabs", CRON),
    ("/etc/systemd/system", _all("systemd", any_child=SYSTEMD_WANTS)),
    ("/usr/lib/systemd/system", _all("systemd")),
    ("/lib/systemd/system", _all("systemd")),
    ("/etc/init.d", _all("init")),
    ("/etc/ld.so.conf.d", _all("ld_so_conf")),
    ("/etc/profile.d", _all("shell_profile")),
    ("/etc/zsh", WatchRule(SENSITIVE_MASK, names=dict.fromkeys(ZSH_FILES, "shell_profile"))),
    ("/var/log", WatchRule(LOG_MASK, category="log", kind="log", any_child=LOG_SUBDIR)),
    ("/etc/audit", _all("audit", children={"rules.d": _all("audit")})),
    ("/run", DOCKER_SOCKET),
    ("/var/run", DOCKER_SOCKET),
    ("/usr/local/bin", BINARY),
    ("/usr/local/sbin", BINARY),
    ("/usr/bin", BINARY),
    ("/usr/sbin", BINARY),
    ("/bin", BINARY),
    ("/sbin", BINARY),
    ("/usr/local/lib", BINARY),
    ("/usr/lib", BINARY),
    ("/lib", BINARY),
    ("/usr/lib64", BINARY),
    ("/lib64", BINARY),
    ("/usr/lib/x86_64-linux-gnu", BINARY),
    ("/lib/x86_64-linux-gnu", BINARY),
    ("/usr/lib/aarch64-linux-gnu", BINARY),
    ("/lib/aarch64-linux-gnu", BINARY),
    ("/tmp", BINARY),
    ("/var/tmp", BINARY),
    ("/dev/shm", BINARY),
)
STATIC_RULES: dict[str, WatchRule] = dict(WATCHED)
# Directories of the table watched for when they do not exist yet (all but the binary and library dirs: an
# image has those or not, nobody makes /usr/lib64 at run time), and every ancestor of theirs.
APPEAR_TARGETS: tuple[str, ...] = tuple(p for p, rule in WATCHED if rule.kind != "binary")


def _ancestors(path: str) -> list[str]:
    """/var/spool/cron -> ["/var/spool", "/var", "/"]: nearest first."""
    out = []
    while path != "/":
        path = os.path.dirname(path)
        out.append(path)
    return out


APPEAR_ANCESTORS: frozenset[str] = frozenset(a for p in APPEAR_TARGETS for a in _ancestors(p)) - set(STATIC_RULES)


def rule_for_new_dir(path: str, parent: WatchRule, name: str) -> WatchRule | None:
    """How to watch a directory that appeared at `path` (named `name`) in a directory watched with `parent`."""
    rule = STATIC_RULES.get(path) or parent.child_rule(name)
    if rule is None and path in APPEAR_ANCESTORS:
        return APPEARING
    return rule


# Bounds: a namespace cannot make us hold more than this.
MAX_CHILD_DIRS = 64  # per directory with watched subdirectories (homes, *.wants, log subdirs)
MAX_DYNAMIC_PER_NS = 512
MAX_KNOWN_SIZES = 4096  # last seen sizes of logs (to see truncations); non-executables of binary dirs
MAX_COOKIES = 1024
RENAME_PAIR_WAIT = 0.25  # a MOVED_FROM without its MOVED_TO after this is a move out of sight
LOG_RECHECK = 0.05  # seconds between size checks of a log being written to

# Watch-limit hits of every collector of this process, for probe().
_limit_hits_total = 0


@dataclass(slots=True)
class _Watch:
    wd: int
    ns: int
    path: str  # container path
    rule: WatchRule


@dataclass(slots=True)
class _Namespace:
    mnt_ns: int
    anchor: ProcessInfo
    root_key: tuple[int, int]  # (st_dev, st_ino) of the anchor's root: tells a reused ns inode number apart
    watches: dict[str, _Watch] = field(default_factory=dict)
    aliases: set[str] = field(default_factory=set)  # paths that turned out to be an already watched dir
    release_agents: set[str] = field(default_factory=set)
    mountinfo: bytes | None = None
    dynamic: int = 0
    last_resync: float = 0.0


@dataclass(slots=True)
class _Pending:
    """One (namespace, path, operation) being coalesced."""

    first_wall: float
    due: float
    count: int
    category: str
    data: dict[str, Any]
    process: ProcessInfo | None
    emit: bool  # False while a log write has not been shown to be a truncation
    size: int | None = None  # log/history: size at the first write of the window
    checked: float = 0.0  # log: when its size was last looked at


@dataclass(slots=True)
class _MovedFrom:
    due: float
    wall: float
    ns: int
    path: str
    category: str | None
    watches: list[_Watch]


def _safe(path: str) -> str:
    """A path for JSON: names with undecodable bytes come as surrogates, which orjson refuses."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _join(directory: str, name: str) -> str:
    if not name:
        return directory
    return directory.rstrip("/") + "/" + name


def _own_mnt_ns() -> int | None:
    return capabilities.namespace_inode("mnt")


def _mnt_ns_of(pid: int) -> int | None:
    return capabilities.namespace_inode("mnt", pid)


_MOUNTINFO_ESCAPE = re.compile(r"\\([0-7]{3})")


def cgroup_v1_roots(mountinfo: bytes) -> set[str]:
    """Mount points of cgroup v1 hierarchy roots in a mountinfo (paths relative to the reader's root).

    Only a hierarchy's root directory has a release_agent, so bind mounts of a
    subtree (field 4 not "/") are left out.
    """
    out: set[str] = set()
    for line in mountinfo.decode("utf-8", "surrogateescape").splitlines():
        head, sep, tail = line.partition(" - ")
        if not sep or not tail.startswith("cgroup "):
            continue
        fields = head.split(" ")
        if len(fields) < 5 or fields[3] != "/":
            continue
        out.add(_MOUNTINFO_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4]))
    return out


def _write_holders(pid: int, path: str, budget: list[int]) -> bool:
    """Does pid hold `path` open for writing? `budget` (a one-item list) bounds the readlinks of one search.

    The fd links of a process in another mount namespace read as that
    namespace's paths, which is what `path` is.
    """
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    deleted = path + " (deleted)"
    for fd in fds:
        if budget[0] <= 0:
            return False
        budget[0] -= 1
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link not in (path, deleted):
            continue
        try:
            info = procfs.read_small(f"/proc/{pid}/fdinfo/{fd}", size=4096)
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith(b"flags:"):
                if int(line.split()[1], 8) & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                    return True
                break
    return False


def _stat_ppid_ticks(pid: int) -> tuple[int, int] | None:
    try:
        data = procfs.read_small(f"/proc/{pid}/stat")
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[1]), int(fields[19])


class FileWatchCollector:
    name = "file_watch"

    def __init__(
        self,
        emit: Emit,
        table: ProcessTable,
        *,
        rescan_interval: float = 2.0,
        coalesce_window: float = 1.0,
        resync_interval: float = 30.0,
        max_watches: int = 8192,
        max_pending: int = 1024,
        max_writer_scans_per_s: float = 50.0,
        max_fd_links_per_scan: int = 8192,
        max_unknown_pids: int = 512,
        accept: Callable[[ProcessInfo], bool] | None = None,
        skip_own_namespace: bool = True,
        capture: Capture | None = None,
    ) -> None:
        """`accept`: which processes' mount namespaces to watch (default: all but our own: the sidecar's
        container is our image). `capture`: how to read a process the table does not know yet (the process
        collector's ``capture``), used when the process holding a changed file is younger than the table's
        last look; without it such a writer is named by pid only."""
        self.emit = emit
        self.table = table
        self.rescan_interval = rescan_interval
        self.coalesce_window = coalesce_window
        self.resync_interval = resync_interval
        self.max_watches = max_watches
        self.max_pending = max_pending
        self.max_fd_links_per_scan = max_fd_links_per_scan
        self.max_unknown_pids = max_unknown_pids
        self.accept = accept
        self.capture = capture
        self.stats: Counter[str] = Counter()
        self.events_by_category: Counter[str] = Counter()
        self._own_ns = _own_mnt_ns() if skip_own_namespace else None
        self._inotify: INotify | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = asyncio.Event()
        self._ns: dict[int, _Namespace] = {}
        self._wd_owners: dict[int, list[_Watch]] = {}
        self._pending: OrderedDict[tuple[int, str, str], _Pending] = OrderedDict()
        self._cookies: OrderedDict[int, _MovedFrom] = OrderedDict()
        self._sizes: OrderedDict[tuple[int, str], int] = OrderedDict()
        # Files of binary dirs last seen without an x bit: a write (CLOSE_WRITE)
        # cannot change a mode, so a temp file rewritten in a loop costs no stat.
        self._not_executable: OrderedDict[tuple[int, str], None] = OrderedDict()
        self._timer: asyncio.TimerHandle | None = None
        # After ENOSPC no watch is added until some are freed: each further try
        # would fail the same way, and the count says how many were wanted.
        self._limit_at: int | None = None
        # Token bucket on /proc/<pid>/fd scans: a storm of changed files must
        # not turn into a storm of scans (each is one readlink per open fd).
        self._scan_rate = max_writer_scans_per_s
        self._scan_tokens = max_writer_scans_per_s
        self._scan_last = time.monotonic()
        self._resync_all = False
        self._last_rescan_cpu = 0.0

    # -- lifecycle ----------------------------------------------------------------
    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self._inotify = INotify(nonblocking=True)
        except OSError as exc:
            self.stats["inotify_unavailable"] += 1
            log.warning("inotify unavailable, no file events", extra={"error": str(exc)})
            await self._stopped.wait()
            return
        self._loop.add_reader(self._inotify.fd, self._on_readable)
        try:
            while not self._stopped.is_set():
                self.rescan()
                try:
                    await asyncio.wait_for(self._stopped.wait(), self.rescan_interval)
                except TimeoutError:
                    pass
        finally:
            self._teardown()

    def stop(self) -> None:
        self._stopped.set()

    def _teardown(self) -> None:
        if self._inotify is not None:
            # What was read but not emitted yet is emitted now (SIGTERM flushes).
            self._drain()
            self._flush(force=True)
            if self._loop is not None:
                self._loop.remove_reader(self._inotify.fd)
            self._inotify.close()  # the kernel drops every watch of the instance with it
            self._inotify = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._ns.clear()
        self._wd_owners.clear()
        self._cookies.clear()
        self._sizes.clear()
        self._not_executable.clear()

    # -- namespaces -----------------------------------------------------------------
    def _wanted(self, info: ProcessInfo) -> bool:
        if info.mnt_ns is None or info.mnt_ns == self._own_ns:
            return False
        return self.accept is None or self.accept(info)

    def on_process(self, info: ProcessInfo) -> None:
        """A new process: if it is the first of its mount namespace, watch that container now, not at the
        next rescan (what a freshly started container does first is what matters)."""
        if self._inotify is None or info.mnt_ns is None or info.mnt_ns in self._ns or not self._wanted(info):
            return
        self._setup(info.mnt_ns, [info])

    def rescan(self) -> None:
        """New namespaces, dead anchors, namespaces with no process left, new cgroup mounts."""
        if self._inotify is None:
            return
        cpu0 = time.thread_time()  # this thread only: the loop's, not an executor's
        self.stats["rescans"] += 1
        if self._resync_all:
            # After an overflow: directories created meanwhile were not seen appear.
            self._resync_all = False
            for ns in self._ns.values():
                ns.last_resync = 0.0
        groups: dict[int, list[ProcessInfo]] = {}
        for info in self.table.live():
            if self._wanted(info):
                assert info.mnt_ns is not None
                groups.setdefault(info.mnt_ns, []).append(info)
        for mnt_ns in [n for n in self._ns if n not in groups]:
            self._drop(mnt_ns)
        now = time.monotonic()
        for mnt_ns, procs in groups.items():
            known = self._ns.get(mnt_ns)
            if known is None:
                self._setup(mnt_ns, procs)
                continue
            if not self._anchor_alive(known) and not self._reanchor(known, procs):
                continue
            self._check_mounts(known)
            if now - known.last_resync >= self.resync_interval:
                self._sync(known, initial=False)
        self._expire_cookies(force=False)
        self._last_rescan_cpu = time.thread_time() - cpu0

    def _anchor_alive(self, ns: _Namespace) -> bool:
        info = self.table.get(ns.anchor.pid)
        if info is None or info.start_ticks != ns.anchor.start_ticks:
            return False
        # The table may lag behind an exit; the namespace link answers for the process itself.
        return _mnt_ns_of(ns.anchor.pid) == ns.mnt_ns

    @staticmethod
    def _root_key(pid: int) -> tuple[int, int] | None:
        try:
            st = os.stat(f"/proc/{pid}/root/")
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _pick_anchor(
        self, mnt_ns: int, procs: Iterable[ProcessInfo], root_key: tuple[int, int] | None
    ) -> tuple[ProcessInfo, tuple[int, int]] | None:
        # The oldest first: a container's init outlives its children.
        for info in sorted(procs, key=lambda p: p.start_ticks):
            if _mnt_ns_of(info.pid) != mnt_ns:
                continue
            key = self._root_key(info.pid)
            if key is None:
                self.stats["roots_unreachable"] += 1
                continue
            if root_key is None or key == root_key:
                return info, key
        return None

    def _setup(self, mnt_ns: int, procs: list[ProcessInfo]) -> None:
        picked = self._pick_anchor(mnt_ns, procs, None)
        if picked is None:
            return
        ns = _Namespace(mnt_ns, picked[0], picked[1])
        self._ns[mnt_ns] = ns
        self.stats["namespaces_added"] += 1
        self._sync(ns, initial=True)
        self._check_mounts(ns)

    def _reanchor(self, ns: _Namespace, procs: list[ProcessInfo]) -> bool:
        """Another process of the namespace as its anchor; False if the namespace was set up afresh."""
        others = [p for p in procs if p.pid != ns.anchor.pid]
        picked = self._pick_anchor(ns.mnt_ns, others, ns.root_key)
        if picked is not None:
            ns.anchor = picked[0]
            self.stats["reanchored"] += 1
            return True
        # No process of it left with the same root: either the namespace is
        # gone and the kernel gave its inode number to a new one (it reuses
        # them at once), or what is left cannot be read. Start afresh.
        self._drop(ns.mnt_ns)
        self._setup(ns.mnt_ns, procs)
        return False

    def _drop(self, mnt_ns: int) -> None:
        ns = self._ns.pop(mnt_ns, None)
        if ns is None:
            return
        self.stats["namespaces_dropped"] += 1
        for watch in list(ns.watches.values()):
            self._unwatch(watch)
        ns.watches.clear()
        for key in [k for k in self._sizes if k[0] == mnt_ns]:
            del self._sizes[key]
        for key in [k for k in self._not_executable if k[0] == mnt_ns]:
            del self._not_executable[key]
        for cookie in [c for c, m in self._cookies.items() if m.ns == mnt_ns]:
            del self._cookies[cookie]

    # -- watches ------------------------------------------------------------------
    def _can_add(self) -> bool:
        if self._limit_at is not None:
            if len(self._wd_owners) >= self._limit_at:
                self.stats["watches_skipped_at_limit"] += 1
                return False
            self._limit_at = None  # watches were freed since: try again
        if len(self._wd_owners) >= self.max_watches:
            self.stats["watch_cap_hits"] += 1
            return False
        return True

    def _add_watch(self, ns: _Namespace, path: str, rule: WatchRule) -> _Watch | None:
        """Watch a container path of ns (a directory, or a file for a "file" rule). None if it is missing,
        already watched, or cannot be watched."""
        assert self._inotify is not None
        if path in ns.aliases:
            return None
        if rule.kind == "file":
            parent = _resolve_in_root(ns.anchor.pid, os.path.dirname(path))
            host = parent and parent + "/" + os.path.basename(path)
        else:
            host = _resolve_in_root(ns.anchor.pid, path)
        if host is None:
            return None
        prefix = f"/proc/{ns.anchor.pid}/root"
        resolved = host[len(prefix) :] or "/"
        existing = ns.watches.get(resolved)
        if existing is not None and resolved != path:
            ns.aliases.add(path)  # another name (a symlink) of a directory already watched
            return None
        if not self._can_add():
            return None
        mask = rule.mask | IN_MASK_ADD | (0 if rule.kind == "file" else IN_ONLYDIR)
        if rule.kind == "binary":
            mask |= IN_EXCL_UNLINK  # writes to an unlinked temp file are nobody's new binary
        try:
            wd = self._inotify.add_watch(host, mask)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                global _limit_hits_total
                _limit_hits_total += 1
                self.stats["watch_limit_hits"] += 1
                self._limit_at = len(self._wd_owners)
                log.warning(
                    "inotify watch limit reached: some files are not watched",
                    extra={"watches": len(self._wd_owners), "path": path},
                )
            elif exc.errno in (errno.EACCES, errno.EPERM):
                self.stats["watch_denied"] += 1
            return None
        if existing is not None:
            if existing.wd == wd:
                return None  # same directory as before
            self._unwatch(existing)  # the path is now another directory (a mount over it, a re-creation)
        owners = self._wd_owners.setdefault(wd, [])
        if any(w.ns == ns.mnt_ns for w in owners):
            # The same directory under another name in this container (merged
            # /usr, /var/run -> /run): events are reported under the first.
            ns.aliases.add(path)
            return None
        watch = _Watch(wd, ns.mnt_ns, resolved, rule)
        owners.append(watch)
        ns.watches[resolved] = watch
        self.stats["watches_added"] += 1
        return watch

    def _unwatch(self, watch: _Watch) -> None:
        ns = self._ns.get(watch.ns)
        if ns is not None and ns.watches.get(watch.path) is watch:
            del ns.watches[watch.path]
        owners = self._wd_owners.get(watch.wd)
        if owners is None:
            return
        if watch in owners:
            owners.remove(watch)
        if not owners:
            del self._wd_owners[watch.wd]
            if self._inotify is not None:
                try:
                    self._inotify.rm_watch(watch.wd)
                except OSError:
                    pass  # already gone with its file system (IN_IGNORED is on its way)
            self.stats["watches_removed"] += 1

    def _forget_wd(self, wd: int) -> None:
        """IN_IGNORED: the kernel dropped the watch (directory deleted, file system unmounted)."""
        owners = self._wd_owners.pop(wd, None)
        if owners is None:
            return
        self.stats["watches_lost"] += 1
        for watch in owners:
            ns = self._ns.get(watch.ns)
            if ns is None:
                continue
            if ns.watches.get(watch.path) is watch:
                del ns.watches[watch.path]
            if watch.rule is RELEASE_AGENT:
                ns.release_agents.discard(watch.path)

    def _sync(self, ns: _Namespace, *, initial: bool) -> None:
        """Watch what exists of the table, and the subdirectories that rules ask for."""
        ns.last_resync = time.monotonic()
        for path, rule in WATCHED:
            self._add_watch(ns, path, rule)
        for path in APPEAR_TARGETS:
            if path not in ns.watches and path not in ns.aliases:
                self._watch_nearest_ancestor(ns, path)
        for watch in list(ns.watches.values()):
            if watch.rule.children or watch.rule.any_child:
                self._add_children(ns, watch, depth=0)
        if initial:
            self._learn_sizes(ns)

    def _watch_nearest_ancestor(self, ns: _Namespace, path: str) -> None:
        """`path` does not exist (or cannot be watched): watch its nearest existing ancestor for directories
        appearing in it, unless that one is watched already (then its rule's CREATE does the same)."""
        for ancestor in _ancestors(path):
            if ancestor in ns.watches or ancestor in ns.aliases:
                return
            if _resolve_in_root(ns.anchor.pid, ancestor) is None:
                continue  # missing too: its parent, then
            rule = STATIC_RULES.get(ancestor, APPEARING)
            self._add_watch(ns, ancestor, rule)
            return

    def _add_children(self, ns: _Namespace, parent: _Watch, depth: int) -> None:
        host = f"/proc/{ns.anchor.pid}/root{parent.path}"
        try:
            entries = [e.name for e in os.scandir(host) if e.is_dir(follow_symlinks=False)]
        except OSError:
            return
        wanted = [n for n in entries if parent.rule.child_rule(n) is not None]
        for name in sorted(wanted)[:MAX_CHILD_DIRS]:
            rule = parent.rule.child_rule(name)
            assert rule is not None
            path = _join(parent.path, name)
            if path in ns.watches or path in ns.aliases:
                continue
            child = self._add_watch(ns, path, rule)
            if child is not None and depth < 2 and (rule.children or rule.any_child):
                self._add_children(ns, child, depth + 1)

    def _learn_sizes(self, ns: _Namespace) -> None:
        """Sizes of log and history files now, so that a later truncation shows as a shrink."""
        budget = 256
        for watch in list(ns.watches.values()):
            if watch.rule.kind != "log" and watch.rule is not HOME:
                continue
            try:
                entries = list(os.scandir(f"/proc/{ns.anchor.pid}/root{watch.path}"))
            except OSError:
                continue
            for entry in entries:
                if budget <= 0:
                    return
                if watch.rule is HOME and entry.name not in HISTORY_FILES:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat_mod.S_ISREG(st.st_mode):
                    budget -= 1
                    self._remember_size(ns.mnt_ns, _join(watch.path, entry.name), st.st_size)

    def _remember_size(self, mnt_ns: int, path: str, size: int) -> None:
        key = (mnt_ns, path)
        self._sizes[key] = size
        self._sizes.move_to_end(key)
        while len(self._sizes) > MAX_KNOWN_SIZES:
            self._sizes.popitem(last=False)

    def _check_mounts(self, ns: _Namespace) -> None:
        """Watch the release_agent of each cgroup v1 hierarchy mounted in the container.

        mountinfo is re-read at each rescan rather than polled on an open fd: an
        open /proc/<pid>/mountinfo holds a reference on the mount namespace and
        would keep a dead container's mounts alive.
        """
        try:
            data = procfs.read_all(f"/proc/{ns.anchor.pid}/mountinfo")
        except OSError:
            return
        if data == ns.mountinfo:
            return
        first = ns.mountinfo is None
        ns.mountinfo = data
        if not first:
            ns.last_resync = 0.0  # something was mounted or unmounted: watched paths may have moved
        mounts = cgroup_v1_roots(data)
        wanted = {_join(m, "release_agent") for m in mounts}
        for path in ns.release_agents - wanted:
            watch = ns.watches.get(path)
            if watch is not None:
                self._unwatch(watch)
        ns.release_agents &= wanted
        for path in sorted(wanted - ns.release_agents):
            watch = self._add_watch(ns, path, RELEASE_AGENT)
            if watch is None:
                continue
            ns.release_agents.add(path)
            if not first:
                self._check_release_agent_content(ns, path)

    def _check_release_agent_content(self, ns: _Namespace, path: str) -> None:
        # A hierarchy mounted since we last looked may have had its release_agent
        # set before our watch existed (mount and write are a millisecond apart
        # in the known escapes): a non-empty one is reported as found.
        try:
            content = procfs.read_small(f"/proc/{ns.anchor.pid}/root{path}", size=4096).strip()
        except OSError:
            return
        if content:
            self._record(ns, path, "write", "release_agent", RELEASE_AGENT, seen_by_scan=True)

    # -- inotify events ---------------------------------------------------------------
    def _on_readable(self) -> None:
        self._drain(max_reads=8)  # bounded per wake-up; the fd stays readable for the rest
        self._expire_cookies(force=False)
        self._schedule()

    def _drain(self, max_reads: int = 64) -> None:
        if self._inotify is None:
            return
        for _ in range(max_reads):
            try:
                data = os.read(self._inotify.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                self.stats["read_errors"] += 1
                return
            if not data:
                return
            for event in parse_events(data):
                try:
                    self._handle(event.wd, event.mask, event.cookie, event.name)
                except Exception:  # one odd event must not stop the source
                    self.stats["handle_errors"] += 1
                    log.exception("file event handling failed")

    def _handle(self, wd: int, mask: int, cookie: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            # Events were lost. Nothing tells which; directories created
            # meanwhile are found by a resync at the next rescan.
            self.stats["overflows"] += 1
            self._resync_all = True
            return
        if mask & IN_IGNORED:
            self._forget_wd(wd)
            return
        if mask & IN_UNMOUNT:
            self.stats["unmounts"] += 1  # IN_IGNORED follows
            return
        owners = self._wd_owners.get(wd)
        if not owners:
            return
        self.stats["raw_events"] += 1
        if mask & IN_MOVED_FROM:
            self._moved_from(owners, mask, cookie, name)
            return
        if mask & (IN_CREATE | IN_MOVED_TO) and mask & IN_ISDIR:
            for watch in owners:
                self._discover(watch, name)
        if mask & IN_MOVED_TO:
            self._moved_to(owners, mask, cookie, name)
            return
        if mask & IN_CREATE:
            op = "create"
        elif mask & IN_DELETE:
            op = "delete"
        elif mask & (IN_MODIFY | IN_CLOSE_WRITE):
            op = "write"
        elif mask & IN_ATTRIB:
            op = "attribute"
        else:
            return
        watches = [w for w in owners if w.rule.mask & mask and w.rule.classify(name) is not None]
        if not watches:
            return
        first = watches[0]
        ns = self._ns.get(first.ns)
        if ns is None:
            return
        path = _join(first.path, name)
        category = first.rule.classify(name)
        assert category is not None
        if op == "create" and not mask & IN_ISDIR and self._is_link(ns, path):
            op = "link"
        self._record(ns, path, op, category, first.rule, candidates=[w.ns for w in watches])

    def _moved_from(self, owners: list[_Watch], mask: int, cookie: int, name: str) -> None:
        watches = [w for w in owners if w.rule.mask & IN_MOVED_FROM]
        if not watches:
            return
        first = watches[0]
        # Kept whatever its name: `sed -i` renames an uninteresting temp file
        # onto /etc/shadow, and the pair is what says so.
        assert self._loop is not None
        self._cookies[cookie] = _MovedFrom(
            self._loop.time() + RENAME_PAIR_WAIT,
            time.time(),
            first.ns,
            _join(first.path, name),
            first.rule.classify(name),
            watches,
        )
        while len(self._cookies) > MAX_COOKIES:
            _, old = self._cookies.popitem(last=False)
            self._moved_out(old)

    def _moved_to(self, owners: list[_Watch], mask: int, cookie: int, name: str) -> None:
        src = self._cookies.pop(cookie, None) if cookie else None
        watches = [w for w in owners if w.rule.mask & IN_MOVED_TO]
        if not watches:
            if src is not None:
                self._moved_out(src)
            return
        first = watches[0]
        ns = self._ns.get(first.ns)
        if ns is None:
            return
        new_path = _join(first.path, name)
        category = first.rule.classify(name)
        rule = first.rule
        stat_path: str | None = new_path
        if (
            src is not None
            and src.category is not None
            and src.watches[0].rule.kind != "binary"
            and (category is None or rule.kind == "binary")
        ):
            # A sensitive file moved away (`mv /etc/shadow /tmp/x`): the one
            # that changed is the source, whatever the destination means.
            category, rule, file_path, stat_path = src.category, src.watches[0].rule, src.path, None
        elif category is None:
            return
        else:
            file_path = new_path
        self._record(
            ns,
            file_path,
            "rename",
            category,
            rule,
            candidates=[w.ns for w in watches],
            extra={"oldPath": _safe(src.path) if src else None, "newPath": _safe(new_path)},
            stat_path=stat_path,
        )

    def _moved_out(self, src: _MovedFrom) -> None:
        """A MOVED_FROM never paired: moved to a place we do not watch (or deleted in effect)."""
        if src.category is None:
            return
        ns = self._ns.get(src.ns)
        if ns is None or src.watches[0].rule.kind == "binary":
            return
        self._record(
            ns, src.path, "rename", src.category, src.watches[0].rule,
            extra={"oldPath": _safe(src.path), "newPath": None}, wall=src.wall,
        )  # fmt: skip

    def _expire_cookies(self, *, force: bool) -> None:
        if not self._cookies or self._loop is None:
            return
        now = self._loop.time()
        while self._cookies:
            cookie, first = next(iter(self._cookies.items()))
            if not force and first.due > now:
                break
            del self._cookies[cookie]
            self._moved_out(first)

    def _discover(self, parent: _Watch, name: str) -> None:
        """A directory appeared in a watched one: watch it if the rules say so, and report what is already
        in it (files written between its creation and our watch would otherwise go unseen)."""
        ns = self._ns.get(parent.ns)
        if ns is None:
            return
        path = _join(parent.path, name)
        rule = rule_for_new_dir(path, parent.rule, name)
        if rule is None or path in ns.watches or ns.dynamic >= MAX_DYNAMIC_PER_NS:
            return
        self._watch_new_dir(ns, path, rule, depth=0)

    def _watch_new_dir(self, ns: _Namespace, path: str, rule: WatchRule, depth: int) -> None:
        watch = self._add_watch(ns, path, rule)
        if watch is None:
            return
        ns.dynamic += 1
        self.stats["dirs_discovered"] += 1
        try:
            entries = list(os.scandir(f"/proc/{ns.anchor.pid}/root{watch.path}"))
        except OSError:
            return
        for entry in entries[:MAX_CHILD_DIRS]:
            is_dir = entry.is_dir(follow_symlinks=False)
            category = rule.classify(entry.name)
            child_path = _join(watch.path, entry.name)
            if category is not None and rule.kind != "log":
                self._record(ns, child_path, "create", category, rule, seen_by_scan=True)
            child_rule = rule_for_new_dir(child_path, rule, entry.name) if is_dir else None
            # A chain of missing directories made at once (`mkdir -p /var/spool/cron/crontabs`) is followed to
            # its end; other subdirectories two levels down.
            deep = child_path in APPEAR_ANCESTORS or child_path in STATIC_RULES
            if child_rule is not None and depth < (6 if deep else 2) and child_path not in ns.watches:
                self._watch_new_dir(ns, child_path, child_rule, depth + 1)

    @staticmethod
    def _is_link(ns: _Namespace, path: str) -> bool:
        """A symlink, or a second name of an existing file: both come as IN_CREATE."""
        try:
            st = os.lstat(f"/proc/{ns.anchor.pid}/root{path}")
        except OSError:
            return False
        return stat_mod.S_ISLNK(st.st_mode) or (stat_mod.S_ISREG(st.st_mode) and st.st_nlink > 1)

    # -- coalescing ---------------------------------------------------------------
    def _record(
        self,
        ns: _Namespace,
        path: str,
        op: str,
        category: str,
        rule: WatchRule,
        *,
        candidates: list[int] | None = None,
        extra: dict[str, Any] | None = None,
        seen_by_scan: bool = False,
        stat_path: str | None = None,
        wall: float | None = None,
    ) -> None:
        if op in ("create", "delete", "rename", "link"):
            # A new file at this path (or none): the size we knew was another file's. Without this, a log
            # an app rotates away and starts again small reads as "truncated".
            for p in (path, *((extra.get("oldPath"), extra.get("newPath")) if extra else ())):
                if p:
                    self._sizes.pop((ns.mnt_ns, p), None)
                    appending = self._pending.get((ns.mnt_ns, p, "write"))
                    if appending is not None and not appending.emit:
                        appending.size = None  # its writes went to the file that was there before
        key = (ns.mnt_ns, path, op)
        pending = self._pending.get(key)
        if pending is not None:
            pending.count += 1
            self.stats["coalesced"] += 1
            if not pending.emit:
                self._recheck_log(ns, path, pending)
            return
        data: dict[str, Any] = {
            "fileOperation": op,
            "filePath": _safe(path),
            "category": category,
            "containerMntNs": ns.mnt_ns,
        }
        if extra:
            data.update(extra)
        if seen_by_scan:
            data["seenByScan"] = True
        emit = True
        size: int | None = None
        if rule.kind == "binary":
            # Only what can run (an x bit) or be loaded (a shared object): temp
            # dirs see thousands of ordinary files.
            target = stat_path or path
            cache_key = (ns.mnt_ns, target)
            if op == "write" and cache_key in self._not_executable:
                self.stats["binary_dir_ignored"] += 1
                return
            try:
                st = os.lstat(f"/proc/{ns.anchor.pid}/root{target}")
            except OSError:
                self.stats["binary_vanished"] += 1
                return
            if not stat_mod.S_ISREG(st.st_mode):
                return
            executable = bool(st.st_mode & 0o111)
            shared_object = bool(_SHARED_OBJECT.search(target))
            if not executable and not shared_object:
                self.stats["binary_dir_ignored"] += 1
                self._not_executable[cache_key] = None
                self._not_executable.move_to_end(cache_key)
                while len(self._not_executable) > MAX_KNOWN_SIZES:
                    self._not_executable.popitem(last=False)
                return
            self._not_executable.pop(cache_key, None)
            data["isExecutable"] = executable
            data["isSharedObject"] = shared_object
        elif rule.kind == "log" and op == "create":
            return  # logs are created all day long; a log replaced by a link is still a "link"
        elif category in ("log", "shell_history") and op == "write":
            size, truncated = self._truncation(ns, path)
            data["truncated"] = truncated
            # Appending is what logs are for; only a shrink is news. History
            # files are reported on every write (who adds commands to one?).
            emit = truncated or category == "shell_history"
        assert self._loop is not None
        pending = _Pending(
            first_wall=time.time() if wall is None else wall,
            due=self._loop.time() + self.coalesce_window,
            count=1,
            category=category,
            data=data,
            process=None,
            emit=emit,
            size=size,
            checked=self._loop.time(),
        )
        if emit:
            self._attribute(ns, candidates or [ns.mnt_ns], path, pending)
        self._pending[key] = pending
        while len(self._pending) > self.max_pending:
            self.stats["early_flushes"] += 1
            old_key, old = self._pending.popitem(last=False)
            self._finish(old_key, old)
        self._schedule()

    def _recheck_log(self, ns: _Namespace, path: str, pending: _Pending) -> None:
        """A log being appended to: truncated meanwhile? Looked at every LOG_RECHECK seconds at most, so
        that a chatty log costs a few stats a second and a truncation is still seen while whoever did it
        may be running."""
        assert self._loop is not None
        now = self._loop.time()
        if now - pending.checked < LOG_RECHECK or pending.size is None:
            return
        pending.checked = now
        size, truncated = self._truncation(ns, path)
        if truncated or (size is not None and size < pending.size):
            self._mark_truncated(ns, path, pending)
        elif size is not None:
            pending.size = size

    def _mark_truncated(self, ns: _Namespace, path: str, pending: _Pending) -> None:
        pending.emit = True
        pending.first_wall = time.time()  # the event is the truncation, not the appends before it
        pending.data["truncated"] = True
        self._attribute(ns, [ns.mnt_ns], path, pending)

    def _truncation(self, ns: _Namespace, path: str) -> tuple[int | None, bool]:
        try:
            size = os.stat(f"/proc/{ns.anchor.pid}/root{path}").st_size
        except OSError:
            return None, False
        before = self._sizes.get((ns.mnt_ns, path))
        self._remember_size(ns.mnt_ns, path, size)
        return size, size == 0 or (before is not None and size < before)

    def _schedule(self) -> None:
        if self._loop is None:
            return
        dues = []
        if self._pending:
            dues.append(next(iter(self._pending.values())).due)
        if self._cookies:
            dues.append(next(iter(self._cookies.values())).due)
        if not dues:
            return
        due = min(dues)
        if self._timer is not None:
            if abs(self._timer.when() - due) < 0.001:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._expire_cookies(force=False)
        self._flush(force=False)
        self._schedule()

    def _flush(self, *, force: bool) -> None:
        if force:
            self._expire_cookies(force=True)
        now = self._loop.time() if self._loop is not None else 0.0
        while self._pending:
            key, pending = next(iter(self._pending.items()))
            if not force and pending.due > now:
                break
            del self._pending[key]
            self._finish(key, pending)

    def _finish(self, key: tuple[int, str, str], pending: _Pending) -> None:
        mnt_ns, path, _ = key
        if not pending.emit:
            # A log written to during the window: truncated since its first write?
            ns = self._ns.get(mnt_ns)
            if ns is None or pending.size is None:
                return
            size, truncated = self._truncation(ns, path)
            if not truncated and (size is None or size >= pending.size):
                return
            self._mark_truncated(ns, path, pending)
        pending.data["count"] = pending.count
        self.stats["events"] += 1
        self.events_by_category[pending.category] += 1
        self.emit(RuntimeEvent(EVENT_KIND, pending.process, time=pending.first_wall, data=pending.data))

    # -- who did it ---------------------------------------------------------------
    def _attribute(self, ns: _Namespace, candidates: list[int], path: str, pending: _Pending) -> None:
        """Name the modifying process: one holding the file open for writing, else the newest one of the
        container (flagged as a guess). "Newest" is by start time, then pid: start times are in clock
        ticks (10 ms), and a shell and its child often share one."""
        data = pending.data
        anchor = ns.anchor
        if anchor.container is not None:
            data["containerName"] = anchor.container.name
            data["containerId"] = anchor.container.id
        wanted = set(candidates) | {ns.mnt_ns}
        procs = [p for p in self.table.live() if p.mnt_ns in wanted]
        writer = self._find_writer(procs, wanted, path) if self._take_scan_token() else None
        if writer is not None:
            pid, info = writer
            pending.process = info
            data["modifyingPid"] = pid
            data["modifyingProcessGuessed"] = False
            if info is not None and info.mnt_ns is not None and info.mnt_ns != ns.mnt_ns:
                # A directory shared by containers (a volume): the event is the writer's container's.
                data["containerMntNs"] = info.mnt_ns
                if info.container is not None:
                    data["containerName"], data["containerId"] = info.container.name, info.container.id
            self.stats["writer_found"] += 1
            return
        newest = max(
            (p for p in procs if p.mnt_ns == ns.mnt_ns and p.pid != anchor.pid),
            key=lambda p: (p.start_ticks, p.pid),
            default=None,
        )
        pending.process = newest
        data["modifyingPid"] = newest.pid if newest is not None else None
        data["modifyingProcessGuessed"] = newest is not None
        self.stats["writer_guessed" if newest is not None else "writer_unknown"] += 1

    def _take_scan_token(self) -> bool:
        now = time.monotonic()
        self._scan_tokens = min(self._scan_rate, self._scan_tokens + (now - self._scan_last) * self._scan_rate)
        self._scan_last = now
        if self._scan_tokens < 1:
            self.stats["writer_scans_skipped"] += 1
            return False
        self._scan_tokens -= 1
        self.stats["writer_scans"] += 1
        return True

    def _find_writer(
        self, procs: list[ProcessInfo], namespaces: set[int], path: str
    ) -> tuple[int, ProcessInfo | None] | None:
        budget = [self.max_fd_links_per_scan]
        holders: dict[int, tuple[int, int, ProcessInfo | None]] = {}  # pid -> (ppid, start ticks, info)
        for info in procs:
            if _write_holders(info.pid, path, budget):
                holders[info.pid] = (info.ppid, info.start_ticks, info)
        if not holders:
            # A writer younger than the table's last look (a shell started a
            # millisecond ago): the pids the table does not know, if few.
            known = set(self.table.pids())
            try:
                unknown = [p for p in procfs.list_pids() if p not in known]
            except OSError:
                unknown = []
            for pid in unknown[-self.max_unknown_pids :]:
                if _mnt_ns_of(pid) not in namespaces or not _write_holders(pid, path, budget):
                    continue
                stat = _stat_ppid_ticks(pid)
                if stat is not None:
                    holders[pid] = (stat[0], stat[1], None)
        if not holders:
            if budget[0] <= 0:
                self.stats["writer_scan_truncated"] += 1
            return None
        # Of unrelated holders, the youngest: an app keeps its log open for
        # days, the process that just truncated it is new. A child inherits its
        # parent's descriptors, so from there up to the oldest ancestor holding
        # the same file: that one opened it.
        pid = max(holders, key=lambda p: (holders[p][1], p))
        pid = self._climb(pid, holders[pid][0], path, budget)
        writer = self.table.get(pid)
        if writer is None or writer.mnt_ns not in namespaces:
            # Unknown to the table, or known as it was before it joined the
            # container (a `docker exec`/nsenter caught between fork and setns):
            # read it again if we can.
            fresh = self.capture(pid) if self.capture is not None else None
            writer = fresh if fresh is not None and fresh.mnt_ns in namespaces else None
        return pid, writer

    def _climb(self, pid: int, ppid: int, path: str, budget: list[int]) -> int:
        """The oldest ancestor that holds the same file for writing: the table may not have had the parent
        in this container yet (seen before its setns), so its fds are looked at directly."""
        for _ in range(8):
            if ppid <= 1 or not _write_holders(ppid, path, budget):
                return pid
            pid = ppid
            known = self.table.get(pid)
            stat = (known.ppid, 0) if known is not None else _stat_ppid_ticks(pid)
            if stat is None:
                return pid
            ppid = stat[0]
        return pid

    # -- reporting ------------------------------------------------------------------
    def watch_count(self) -> int:
        return len(self._wd_owners)

    def kernel_watch_count(self) -> int | None:
        """Watches the kernel holds for our instance (fdinfo): what watch_count() must agree with."""
        if self._inotify is None:
            return None
        try:
            data = procfs.read_all(f"/proc/self/fdinfo/{self._inotify.fd}")
        except OSError:
            return None
        return data.count(b"inotify wd:")

    def snapshot(self) -> dict[str, Any]:
        return {
            "watches": len(self._wd_owners),
            "kernel_watches": self.kernel_watch_count(),
            "namespaces": len(self._ns),
            "watch_limit_reached": self._limit_at is not None,
            "pending": len(self._pending),
            "last_rescan_cpu_us": round(self._last_rescan_cpu * 1e6, 1),
            "per_namespace": {
                str(ns.mnt_ns): {
                    "anchor_pid": ns.anchor.pid,
                    "watches": len(ns.watches),
                    "release_agents": sorted(ns.release_agents),
                }
                for ns in self._ns.values()
            },
            "events_by_category": dict(self.events_by_category),
            "overflows": self.stats["overflows"],
            "watch_limit_hits": self.stats["watch_limit_hits"],
            **{k: v for k, v in self.stats.items() if k not in ("overflows", "watch_limit_hits")},
        }


def _read_int(path: str) -> int | None:
    try:
        return int(procfs.read_small(path, size=64))
    except (OSError, ValueError):
        return None


def probe() -> dict[str, Any]:
    """Can we watch the containers' files from here? inotify, the watch limit, and reach into their roots."""
    details: dict[str, Any] = {
        "maxUserWatches": _read_int("/proc/sys/fs/inotify/max_user_watches"),
        "maxUserInstances": _read_int("/proc/sys/fs/inotify/max_user_instances"),
        "maxQueuedEvents": _read_int("/proc/sys/fs/inotify/max_queued_events"),
        # Since Linux 5.11 the limit is per user namespace too, and the lower one wins.
        "userNamespaceMaxWatches": _read_int("/proc/sys/user/max_inotify_watches"),
        "watchLimitHits": _limit_hits_total,
    }
    try:
        inotify = INotify()
    except OSError as exc:
        return {"available": False, "reason": f"inotify_init1 failed: {exc}", "details": details}
    try:
        try:
            inotify.add_watch("/", IN_CREATE | IN_ONLYDIR)
            details["watchLimitReached"] = False
        except OSError as exc:
            details["watchLimitReached"] = exc.errno == errno.ENOSPC
            if exc.errno != errno.ENOSPC:
                return {"available": False, "reason": f"inotify_add_watch failed: {exc}", "details": details}
    finally:
        inotify.close()
    own = _own_mnt_ns()
    reachable = denied = 0
    seen: set[int | None] = {own}
    try:
        pids = procfs.list_pids()
    except OSError:
        pids = []
    # Every pid's namespace link (a probe runs once; newest containers have the highest pids), but a
    # bounded number of roots looked into.
    for pid in pids:
        mnt_ns = _mnt_ns_of(pid)
        if mnt_ns in seen:
            continue
        if len(seen) > 256:
            break
        seen.add(mnt_ns)
        try:
            os.stat(f"/proc/{pid}/root/")
            reachable += 1
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                denied += 1
    details["otherRootsReachable"] = reachable
    details["otherRootsDenied"] = denied
    if details["watchLimitReached"]:
        return {
            "available": True,
            "degraded": True,
            "reason": "inotify watch limit reached (fs.inotify.max_user_watches): new containers are not watched",
            "details": details,
        }
    if denied and not reachable:
        return {
            "available": True,
            "degraded": True,
            "reason": f"{denied} containers' roots unreadable: missing capability SYS_PTRACE",
            "details": details,
        }
    return {
        "available": True,
        "reason": "inotify through /proc/<pid>/root of each container",
        "details": details,
    }

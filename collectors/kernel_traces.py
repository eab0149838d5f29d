"""Kernel traces: what an attacker leaves in /proc, checked periodically.

Inside a Fargate task there is no eBPF and no audit: ptrace attaches, fileless
execution, writes to another process's memory, userfaultfd, mounts, injected
libraries, privilege changes and kernel modules can only be seen as the state
they leave behind in ``/proc``. This source looks at that state for every
process of the ProcessTable, every ``interval`` seconds, and at each new
process once shortly after it appears (``on_process``), and emits one event
per fact and process image:

=================  ======================================================================
kind               data
=================  ======================================================================
proc.ptrace        tracerPid, tracee, traceMe, tracer (the tracer's process JSON or None)
proc.fileless      exePath, memfd, deleted
proc.mem_write     targetPid, target, fd, path, flags, accessMode
proc.userfaultfd   fd
proc.runc_write    fd, path, accessMode (a file named runc, runc.* or docker-runc open for writing)
proc.library       libraryPath, reason (ld_preload | new_file | deleted_file | memfd),
                   ldPreloadValue, newFile, fileTime
proc.uid_change    oldUid, oldEuid, newUid, newEuid, setuidExe, inferred
mount.add/remove   mountId, parentId, mountPoint, root, fsType, source, options,
                   superOptions, device, mntNs, hostMount, mountKind
kernel.module      moduleName, op (load | unload), size, state, taints
=================  ======================================================================

Cost: per process and pass, one ``status`` read and one ``exe`` readlink
through a pinned ``/proc/<pid>`` dir fd, about 17 us (half of it syscalls;
measured on a 2-vCPU VM, kernel 6.18). A pass over 500 processes (300 idle
sleeps, 100 idle interpreters with 30 fds, 50 with 4 threads waking every
50 ms, 50 opening and closing files every 10 ms) took 17-38 ms (p50, load
dependent), against 77-125 ms when every process's fds and maps are read.
Everything else is re-read only when it can have changed:

* fds (``readdir`` + ``readlink`` of ``/proc/<pid>/fd``): a process's fd table
  only changes through syscalls of its own threads. A single-threaded process
  that is not running now, was not running at the last scan, and whose context
  switch counters (``status``) have not moved since has not run at all in
  between, so its fds cannot have changed: skipped, exactly. The counters are
  the leader thread's only, so for a multi-threaded process, on kernels that
  report the number of open fds as the size of the fd directory (6.2+), an
  unchanged count skips the scan until ``fd_rescan_interval`` has passed: a
  close+open swap keeps the count, so that is a bounded delay, not a proof.
  ``FDSize`` is the table's capacity, not its use, and says nothing. (Not
  covered: two processes sharing one fd table through clone(CLONE_FILES)
  without being threads of one process; a process opening an fd and closing
  it between two passes is never seen by any poller.)
* maps: only when ``VmExe + VmLib`` (executable mappings, in ``status``) moved.
* mountinfo: once per mount namespace, parsed only if its bytes changed.
* /proc/modules: parsed only if its bytes changed.

A pass that runs over ``max_pass_seconds`` stops and continues where it left
off at the next pass (round robin by pid), so a huge task spreads its work.

Raw formats parsed here (status subset, mountinfo, maps, fdinfo, modules,
partitions) follow procfs.py's conventions: reads through a directory fd that
pins the process, typed errors (ProcessGone, AccessDenied), and a process may
vanish between any two reads.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import re
import statistics
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from collectors import capabilities, procfs
from collectors.events import ProcessInfo, RuntimeEvent, iso_time
from collectors.process_table import ProcessTable

log = logging.getLogger(__name__)

Emit = Callable[[RuntimeEvent], None]
Lookup = Callable[[int], ProcessInfo | None]


class _Report(Protocol):
    """Emits a fact about the process being inspected, once per image."""

    def __call__(self, fact: str, kind: str, data: dict[str, Any]) -> None: ...


_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH})
_DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM})
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

# Bounds on per-process state: facts reported per image, executable mappings
# remembered per image; and global caches.
MAX_FACTS_PER_IMAGE = 256
MAX_MAPPINGS_PER_IMAGE = 4096
MAX_FILE_CACHE = 8192
FILE_CACHE_TTL = 60.0
MAX_PENDING = 65536


def _typed(exc: OSError, what: str) -> procfs.ProcfsError:
    if exc.errno in _GONE_ERRNOS:
        return procfs.ProcessGone(what)
    if exc.errno in _DENIED_ERRNOS:
        return procfs.AccessDenied(what)
    return procfs.ProcfsError(f"{what}: {exc}")


def _read(name: str, dfd: int, limit: int = 1 << 20) -> bytes:
    try:
        return procfs.read_all(name, dfd, limit)
    except OSError as exc:
        raise _typed(exc, name) from None


# -- raw parsers -------------------------------------------------------------------------------------------------------
# The kernel prints these lines in this order (fs/proc/array.c: task_state, task_mem, task_sig,
# task_context_switch_counts) and has for over a decade: one search, left to right, costs about half a
# findall of each key (measured: 4.5 vs 8 us on a 1.5 kB status), and status is read for every process
# on every pass. A status that does not match (no mm: zombie, kernel thread; a future layout) takes the
# slow path.
_STATUS_FAST_RE = re.compile(
    rb"\nState:\t(.)[^\n]*\nTgid:\t(\d+)\n(?:[^\n]*\n)*?TracerPid:\t(\d+)\nUid:\t(\d+)\t(\d+)\t"
    rb"(?:[^\n]*\n)*?VmExe:\s+(\d+) kB\nVmLib:\s+(\d+) kB\n(?:[^\n]*\n)*?Threads:\t(\d+)\n"
    rb"(?:[^\n]*\n)*?voluntary_ctxt_switches:\t(\d+)\nnonvoluntary_ctxt_switches:\t(\d+)"
)
_STATUS_RE = re.compile(
    rb"\n(State|Tgid|TracerPid|Uid|VmExe|VmLib|Threads|voluntary_ctxt_switches|nonvoluntary_ctxt_switches):"
    rb"[ \t]*([^\n]*)"
)


@dataclass(slots=True)
class TaskStatus:
    """The lines of /proc/<pid>/status this source uses."""

    tgid: int
    state: str
    tracer_pid: int
    uid: int
    euid: int
    threads: int
    # VmExe + VmLib in kB: the size of executable file mappings; moves when a library is mapped.
    exec_kb: int
    # voluntary + nonvoluntary context switches of the thread-group leader.
    switches: int


def parse_status(data: bytes) -> TaskStatus:
    m = _STATUS_FAST_RE.search(data)
    if m is not None:
        g = m.groups()
        return TaskStatus(
            int(g[1]),
            g[0].decode("ascii", "replace"),
            int(g[2]),
            int(g[3]),
            int(g[4]),
            int(g[7]),
            int(g[5]) + int(g[6]),
            int(g[8]) + int(g[9]),
        )
    f = dict(_STATUS_RE.findall(data))
    uids = f.get(b"Uid", b"0 0").split()

    def num(key: bytes) -> int:
        value = f.get(key, b"").split()
        return int(value[0]) if value else 0

    state = f.get(b"State", b"?")
    return TaskStatus(
        tgid=num(b"Tgid"),
        state=state[:1].decode("ascii", "replace") if state else "?",
        tracer_pid=num(b"TracerPid"),
        uid=int(uids[0]),
        euid=int(uids[1]) if len(uids) > 1 else int(uids[0]),
        threads=num(b"Threads") or 1,
        exec_kb=num(b"VmExe") + num(b"VmLib"),
        switches=num(b"voluntary_ctxt_switches") + num(b"nonvoluntary_ctxt_switches"),
    )


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field_: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    if "\\" not in field_:
        return field_
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field_)


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of /proc/<pid>/mountinfo."""

    mount_id: int
    parent_id: int
    device: str  # "major:minor" of the filesystem (st_dev)
    root: str  # the path inside its filesystem that is mounted (a bind's source path)
    mount_point: str  # relative to the reading process's root
    options: str
    fs_type: str
    source: str
    super_options: str

    @property
    def content_key(self) -> tuple[str, str, str, str]:
        """What a mount is, without its id: a copied namespace has the same mounts under new ids."""
        return (self.mount_point, self.device, self.root, self.fs_type)


def parse_mountinfo(data: bytes) -> list[Mount]:
    out: list[Mount] = []
    for line in data.decode("utf-8", "surrogateescape").splitlines():
        parts = line.split(" ")
        try:
            sep = parts.index("-", 6)  # optional fields (shared:N, master:N) end at a lone "-"
            out.append(
                Mount(
                    mount_id=int(parts[0]),
                    parent_id=int(parts[1]),
                    device=parts[2],
                    root=_unescape(parts[3]),
                    mount_point=_unescape(parts[4]),
                    options=parts[5],
                    fs_type=parts[sep + 1],
                    source=_unescape(parts[sep + 2]),
                    super_options=parts[sep + 3] if len(parts) > sep + 3 else "",
                )
            )
        except (ValueError, IndexError):
            continue
    return out


def root_mount(mounts: Iterable[Mount]) -> Mount | None:
    """The mount seen at "/" (the last one: stacked mounts are listed in mount order)."""
    found = None
    for m in mounts:
        if m.mount_point == "/":
            found = m
    return found


# start-end perms offset dev inode path: executable (x) mappings of a file (inode != 0) only.
_EXEC_MAP_RE = re.compile(
    rb"^([0-9a-f]+-[0-9a-f]+) [r-][w-]x[ps] [0-9a-f]+ ([0-9a-f]+):([0-9a-f]+) ([1-9][0-9]*) +([^\n]+)$", re.M
)


@dataclass(frozen=True, slots=True)
class ExecMapping:
    range: str  # "start-end", the name of its /proc/<pid>/map_files entry
    dev: tuple[int, int]
    inode: int
    path: str
    deleted: bool


def parse_exec_mappings(data: bytes) -> list[ExecMapping]:
    out: list[ExecMapping] = []
    for m in _EXEC_MAP_RE.finditer(data):
        # maps escapes a newline in a path as \012 (seq_path); other bytes are raw
        path, deleted = procfs.split_deleted(m.group(5).decode("utf-8", "surrogateescape").replace("\\012", "\n"))
        out.append(
            ExecMapping(m.group(1).decode(), (int(m.group(2), 16), int(m.group(3), 16)), int(m.group(4)), path, deleted)
        )
    return out


def parse_fdinfo(data: bytes) -> tuple[int, int | None]:
    """(flags, mnt_id) of /proc/<pid>/fdinfo/<fd>; flags are octal in the file."""
    flags = 0
    mnt_id: int | None = None
    for line in data.splitlines():
        if line.startswith(b"flags:"):
            flags = int(line.split()[1], 8)
        elif line.startswith(b"mnt_id:"):
            mnt_id = int(line.split()[1])
    return flags, mnt_id


@dataclass(frozen=True, slots=True)
class Module:
    name: str
    size: int | None
    state: str
    taints: str


def parse_modules(data: bytes) -> dict[str, Module]:
    """/proc/modules: name size refcount deps state address [(taints)]."""
    out: dict[str, Module] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        parts = line.split()
        if not parts:
            continue
        size = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        state = parts[4] if len(parts) > 4 else ""
        taints = parts[6].strip("()") if len(parts) > 6 and parts[6].startswith("(") else ""
        out[parts[0]] = Module(parts[0], size, state, taints)
    return out


def read_block_devices(path: str = "/proc/partitions") -> frozenset[str]:
    """The machine's block devices as "major:minor". Not namespaced: inside a task, the host's (the microVM's)."""
    try:
        data = procfs.read_all(path)
    except OSError:
        return frozenset()
    out = set()
    for line in data.decode("ascii", "replace").splitlines()[1:]:
        parts = line.split()
        if len(parts) == 4 and parts[0].isdigit() and parts[1].isdigit():
            out.add(f"{parts[0]}:{parts[1]}")
    return frozenset(out)


def fd_count_supported() -> bool:
    """Does stat() of /proc/<pid>/fd give the number of open fds (Linux 6.2+)? We hold at least 3."""
    try:
        return os.stat("/proc/self/fd").st_size > 0
    except OSError:
        return False


def map_files_allowed() -> bool:
    """Following /proc/<pid>/map_files/* needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE (not in Fargate)."""
    try:
        first = procfs.read_small("/proc/self/maps", size=4096).split(b" ", 1)[0].decode()
        os.stat(f"/proc/self/map_files/{first}")
        return True
    except (OSError, ValueError):
        return False


# -- mount classification ----------------------------------------------------------------------------------------------
# Kernel filesystems that expose the host: mounting one in a container is a step of most container escapes
# (cgroup release_agent, /proc/sys, /sys/kernel, host devices...).
KERNEL_FS_KINDS = {
    "proc": "proc",
    "sysfs": "sysfs",
    "cgroup": "cgroup",
    "cgroup2": "cgroup",
    "devtmpfs": "devtmpfs",
    "debugfs": "debugfs",
    "tracefs": "tracefs",
    "securityfs": "securityfs",
    "bpf": "bpf",
    "configfs": "configfs",
    "efivarfs": "efivarfs",
}
# Filesystems that hold a host's files; btrfs and overlay use anonymous device numbers (0:N), so a host
# path on them is told by "not the namespace's own root filesystem" instead of by /proc/partitions.
DISK_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "overlay", "zfs", "f2fs"})


def classify_mount(m: Mount, ns_root_device: str | None, host_devices: frozenset[str]) -> tuple[bool, str | None]:
    """(hostMount, kind) of a mount.

    * kernel filesystems (proc, sysfs, cgroup, ...): host, kind = the filesystem;
    * a filesystem on one of the machine's block devices: host, kind "bind" when a directory of it is
      mounted (root is not "/"), "device" when the whole filesystem is;
    * a disk or overlay filesystem other than the namespace's own root filesystem, mounted from a
      directory: host, kind "bind" (another container's or the host's files);
    * anything else (tmpfs, a bind of the container's own files, mqueue, ...): not a host mount.
    """
    kind = KERNEL_FS_KINDS.get(m.fs_type)
    if kind is not None:
        return True, kind
    if m.device in host_devices:
        return True, "bind" if m.root != "/" else "device"
    if m.fs_type in DISK_FS and m.root != "/" and m.device != ns_root_device:
        return True, "bind"
    return False, None


# -- per-process and per-namespace state ------------------------------------------------------------------------------
@dataclass(slots=True)
class _ProcState:
    uuid: str
    pid: int
    start_ticks: int
    # (uid, euid) of this pid's previous image, if we saw it: an exec of a setuid binary changes them
    carried_uids: tuple[int, int] | None = None
    checked: bool = False
    facts: set[str] = field(default_factory=set)
    uids: tuple[int, int] | None = None
    mnt_ns: int | None = None
    # the activity gate, as of the last fd scan
    scan_switches: int = -1
    scan_threads: int = 0
    scan_running: bool = True
    fd_count: int = -1
    fd_scanned_at: float = -math.inf
    exec_kb: int = -1
    maps_at: float = -math.inf
    mappings_seen: set[tuple[tuple[int, int], int]] = field(default_factory=set)


@dataclass(slots=True)
class _NsState:
    ns: int
    first_seen: float
    initial: bool  # its processes predate us: its mounts are its baseline, not news
    rep_pid: int = 0
    rep_root_id: int | None = None
    raw: bytes | None = None
    mounts: dict[int, Mount] = field(default_factory=dict)


_MEM_LINK_RE = re.compile(r"^(?:.*)/(\d+)/(?:task/(\d+)/)?mem$")
_LD_PRELOAD_SPLIT = re.compile(r"[:\s]+")
# runc's binary by file name: runc, runc.amd64 (release assets), docker-runc (Docker before 18.09)
_RUNC_NAME_RE = re.compile(r"^(?:docker-)?runc(?:\..+)?$")
O_ACCMODE = 3
ACCESS_MODES = {os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}


class KernelTraceCollector:
    name = "kernel_traces"

    def __init__(
        self,
        emit: Emit,
        table: ProcessTable,
        *,
        interval: float = 1.0,
        new_process_delay: float = 0.1,
        max_pass_seconds: float = 0.05,
        fd_rescan_interval: float = 10.0,
        maps_min_interval: float = 2.0,
        ns_settle: float = 0.5,
        modules_path: str | None = "/proc/modules",
        partitions_path: str = "/proc/partitions",
        lookup: Lookup | None = None,
        map_files: bool | None = None,
        self_pid: int | None = None,
    ) -> None:
        """
        interval: seconds between passes over every process.
        new_process_delay: a process is first checked once this old (pid start time); an exec'ing
            process has mapped its libraries by then, and container runtimes' short-lived helpers (runc
            init runs from a memfd copy of runc) have exec'd the container's command.
        max_pass_seconds: past this, a pass stops and the next one continues where it stopped.
        fd_rescan_interval: a process whose fd count did not change is rescanned at least this often.
        maps_min_interval: maps of a process are re-read at most this often (JITs move VmLib a lot).
        ns_settle: a mount namespace that appears is read once it is this old, so that a container
            runtime's setup (mounts, pivot_root) is over and its mounts are the baseline.
        modules_path: /proc/modules, or a copy (tests), or None to skip kernel modules.
        lookup: reads a process that is not in the table (a tracer, a /proc/<pid>/mem target); the
            sidecar passes its ProcessCollector's capture.
        map_files: date mapped libraries through /proc/<pid>/map_files (the mapped file itself, even
            deleted or replaced); None: if this process may (CAP_SYS_ADMIN), else through /proc/<pid>/root.
        """
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.emit = emit
        self.table = table
        self.interval = interval
        self.new_process_delay = new_process_delay
        self.max_pass_seconds = max_pass_seconds
        self.fd_rescan_interval = fd_rescan_interval
        self.maps_min_interval = maps_min_interval
        self.ns_settle = ns_settle
        self.modules_path = modules_path
        self.partitions_path = partitions_path
        self.lookup = lookup
        self.self_pid = os.getpid() if self_pid is None else self_pid
        self.stats: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.passes = 0
        self._pass_ms: deque[float] = deque(maxlen=512)
        self._procs: dict[int, _ProcState] = {}
        self._ns: dict[int, _NsState] = {}
        self._pending: OrderedDict[int, tuple[float, ProcessInfo]] = OrderedDict()
        self._cursor = 0
        self._early_hold_until = 0.0
        self._stopped = False
        self._wake = asyncio.Event()
        self._fd_count_ok = fd_count_supported()
        self._map_files_ok = map_files_allowed() if map_files is None else map_files
        self._host_devices = read_block_devices(partitions_path)
        self._host_devices_at = time.monotonic()
        self._file_cache: OrderedDict[tuple[tuple[int, int], int], tuple[int, int, float]] = OrderedDict()
        self._modules_raw: bytes | None = None
        self._modules: dict[str, Module] | None = None
        self._starts: dict[int, float] | None = None  # mnt_ns -> its oldest process's start (container start)
        # When we started, in the unit of /proc/<pid>/stat's start time (clock ticks of CLOCK_BOOTTIME): exact,
        # unlike ProcessInfo.start_time, which inherits btime's truncation to whole seconds.
        self._started_ticks = int(time.clock_gettime(time.CLOCK_BOOTTIME) * procfs.CLOCK_TICKS)

    # -- lifecycle ------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        next_pass = time.monotonic()
        while not self._stopped:
            now = time.monotonic()
            if now >= next_pass:
                self._guarded(self.run_pass, now)
                # a slow pass must not make passes back to back: the interval is between passes
                next_pass = max(next_pass + self.interval, time.monotonic() + self.interval / 2)
            elif self._pending and next(iter(self._pending.values()))[0] <= now and now >= self._early_hold_until:
                self._guarded(self.check_new, now)
            self._wake.clear()
            wake_at = next_pass
            if self._pending:
                wake_at = min(wake_at, max(next(iter(self._pending.values()))[0], self._early_hold_until))
            timeout = max(0.0, wake_at - time.monotonic())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def _guarded(self, work: Callable[[float], object], now: float) -> None:
        try:
            work(now)
        except Exception:  # one bad read must never stop the source
            self.stats["pass_errors"] += 1
            log.exception("kernel traces pass failed")

    def on_process(self, info: ProcessInfo) -> None:
        """A new process image (process.exec): check it once it is new_process_delay old."""
        if info.pid == self.self_pid or info.executable_path is None:
            return
        self._pending.pop(info.pid, None)
        self._pending[info.pid] = (self._due(info, time.monotonic()), info)
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)  # the next pass checks them anyway
            self.stats["pending_dropped"] += 1
        self._wake.set()

    def _due(self, info: ProcessInfo, now: float) -> float:
        age = time.time() - info.start_time
        return now + max(0.0, self.new_process_delay - age)

    # -- passes -----------------------------------------------------------------------------------------------------
    def check_new(self, now: float | None = None) -> int:
        """Check the new processes whose delay is over. Returns how many were checked."""
        now = time.monotonic() if now is None else now
        deadline = time.perf_counter() + self.max_pass_seconds
        done = 0
        self._starts = None
        while self._pending:
            pid, (due, info) = next(iter(self._pending.items()))
            if due > now:
                break
            if time.perf_counter() > deadline:
                # A fork storm: the rest waits for the next pass (which has its own budget) instead of
                # keeping the loop busy with early checks.
                self._early_hold_until = now + self.interval
                self.stats["early_checks_deferred"] += 1
                break
            del self._pending[pid]
            if self.table.get(pid) is info:  # still its current image
                self._check_process(info, now)
                done += 1
        return done

    def run_pass(self, now: float | None = None) -> None:
        """One pass: modules, every process (within max_pass_seconds), every mount namespace."""
        t0 = time.perf_counter()
        now = time.monotonic() if now is None else now
        live = {i.pid: i for i in self.table.live() if i.pid != self.self_pid and i.executable_path is not None}
        for pid in [p for p, st in self._procs.items() if p not in live]:
            del self._procs[pid]
        self._starts = None
        if now - self._host_devices_at > 60:  # a volume attached to an EC2 host
            self._host_devices = read_block_devices(self.partitions_path)
            self._host_devices_at = now
        self._check_modules()
        pids = sorted(live)
        start = next((i for i, p in enumerate(pids) if p >= self._cursor), 0)
        deadline = t0 + self.max_pass_seconds
        self._cursor = 0
        for pid in pids[start:] + pids[:start]:
            if time.perf_counter() > deadline:
                self._cursor = pid
                self.stats["passes_truncated"] += 1
                break
            info = live[pid]
            st = self._procs.get(pid)
            if st is None or st.uuid != info.uuid:
                due = self._due(info, now)
                if due > now:  # too young: its early check comes first
                    if pid not in self._pending:
                        self._pending[pid] = (due, info)
                    continue
            self._pending.pop(pid, None)
            self._check_process(info, now)
        self._check_mounts(live, now)
        self.passes += 1
        self._pass_ms.append((time.perf_counter() - t0) * 1000)

    # -- one process --------------------------------------------------------------------------------------------------
    def _check_process(self, info: ProcessInfo, now: float) -> None:
        st = self._procs.get(info.pid)
        if st is None or st.uuid != info.uuid:
            carried = st.uids if st is not None and st.start_ticks == info.start_ticks else None
            st = _ProcState(info.uuid, info.pid, info.start_ticks, carried_uids=carried, mnt_ns=info.mnt_ns)
            self._procs[info.pid] = st
        try:
            dfd = procfs.open_pid_dir(info.pid)
        except procfs.ProcessGone:
            self.stats["vanished"] += 1
            return
        except procfs.ProcfsError:
            self.stats["read_errors"] += 1
            return
        try:
            self._inspect(info, st, dfd, now)
            st.checked = True
            self.stats["processes_checked"] += 1
        except procfs.ProcessGone:
            self.stats["vanished"] += 1
        except procfs.ProcfsError:
            self.stats["read_errors"] += 1
        except OSError:
            self.stats["read_errors"] += 1
        finally:
            os.close(dfd)

    def _inspect(self, info: ProcessInfo, st: _ProcState, dfd: int, now: float) -> None:
        first = not st.checked
        try:
            # one read(): status is under 2 kB, and a second read() just to see EOF costs a syscall per process
            status = parse_status(procfs.read_small("status", dfd, 16384))
        except OSError as exc:
            raise _typed(exc, "status") from None
        if status.tgid != info.pid:
            raise procfs.ProcessGone("not a thread-group leader (pid reused)")
        if status.state in ("Z", "X"):
            return
        try:
            link = os.readlink("exe", dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise procfs.ProcessGone("exe") from None
            return  # exiting (its mm is gone) or a kernel thread
        exe, deleted = procfs.split_deleted(link)
        if exe != info.executable_path:
            # An exec in place the process source has not reported yet: what we would read now belongs to
            # an image the table does not know. The source captures it, and we check that image then.
            self.stats["stale_images"] += 1
            return
        identity: list[bool] = []  # checked once, lazily, before the first event

        def report(fact: str, kind: str, data: dict[str, Any]) -> None:
            if fact in st.facts:
                return
            if len(st.facts) >= MAX_FACTS_PER_IMAGE:
                self.stats["facts_over_limit"] += 1
                return
            if not identity:
                identity.append(self._same_process(dfd, info))
            if not identity[0]:
                raise procfs.ProcessGone("pid reused")
            st.facts.add(fact)
            self.events[kind] += 1
            self.emit(RuntimeEvent(kind, info, data=data))

        # Fileless execution. A memfd exec reads "/memfd:<name> (deleted)": memfds never had a name in a
        # filesystem. A file deleted after its exec is seen whenever the deletion happens, hence every pass.
        memfd = exe.startswith("/memfd:")
        if memfd or deleted:
            report("fileless", "proc.fileless", {"exePath": exe, "memfd": memfd, "deleted": deleted})

        if status.tracer_pid:
            self._check_ptrace(info, st, status, report)

        self._check_uids(info, st, status, report)

        running = status.state == "R"
        idle = (
            not first
            and status.threads == 1
            and st.scan_threads == 1
            and not running
            and not st.scan_running
            and status.switches == st.scan_switches
        )
        if idle:
            self.stats["fd_scans_skipped_idle"] += 1
        else:
            self._refresh_ns(st, dfd)
            count = -1
            # The count is only a hint: a process that closed one fd and opened another between two passes
            # keeps it (a test caught a Python process doing exactly that: a module file closed, then
            # /proc/<n>/mem opened). So it is used only where the exact gate above cannot be, for
            # multi-threaded processes (a server's many sockets, rescanned at least every
            # fd_rescan_interval); a single-threaded process that ran is always rescanned.
            if self._fd_count_ok and status.threads > 1:
                try:
                    count = os.stat("fd", dir_fd=dfd).st_size
                except OSError as exc:
                    raise _typed(exc, "fd") from None
            if not first and count >= 0 and count == st.fd_count and now - st.fd_scanned_at < self.fd_rescan_interval:
                self.stats["fd_scans_skipped_count"] += 1
            else:
                self._scan_fds(info, dfd, report)
                st.fd_count = count
                st.fd_scanned_at = now
            st.scan_switches = status.switches
            st.scan_threads = status.threads
            st.scan_running = running

        if first and info.ld_preload:
            # before the maps: a preloaded library is mapped too, and "ld_preload" is the more telling reason
            self._check_ld_preload(info, st, dfd, report)

        if first or (status.exec_kb != st.exec_kb and now - st.maps_at >= self.maps_min_interval):
            st.exec_kb = status.exec_kb  # as read before the maps: a library mapped meanwhile moves it again
            st.maps_at = now
            self._scan_maps(info, st, dfd, link, report)
        else:
            self.stats["maps_skipped"] += 1

    def _same_process(self, dfd: int, info: ProcessInfo) -> bool:
        try:
            data = procfs.read_small("stat", dfd)
            return int(data[data.rindex(b")") + 2 :].split()[19]) == info.start_ticks
        except (OSError, ValueError, IndexError):
            return False

    def _refresh_ns(self, st: _ProcState, dfd: int) -> None:
        # unshare(CLONE_NEWNS) without an exec leaves the table's mnt_ns stale; only a process that ran can move
        try:
            link = os.readlink("ns/mnt", dir_fd=dfd)
            st.mnt_ns = int(link[5:-1])
        except (OSError, ValueError):
            pass

    def _resolve(self, pid: int) -> ProcessInfo | None:
        info = self.table.get(pid)
        if info is None and self.lookup is not None:
            try:
                info = self.lookup(pid)
            except Exception:
                self.stats["lookup_errors"] += 1
                info = None
        return info

    @staticmethod
    def _tgid(pid: int) -> int:
        """The process a thread id belongs to (/proc/<tid> exists for threads, unlisted)."""
        try:
            return parse_status(procfs.read_small(f"{procfs.PROC}/{pid}/status")).tgid or pid
        except OSError:
            return pid

    def _check_ptrace(self, info: ProcessInfo, st: _ProcState, status: TaskStatus, report: _Report) -> None:
        fact = f"ptrace:{status.tracer_pid}"
        if fact in st.facts:
            return
        # TracerPid names the tracing thread; the table knows processes
        tracer = self.table.get(status.tracer_pid)
        tracer_pid = tracer.pid if tracer is not None else self._tgid(status.tracer_pid)
        if tracer is None:
            tracer = self._resolve(tracer_pid)
        # PTRACE_TRACEME: the child asks its parent to trace it, before it execs, so it is traced by its
        # parent from the very first look at it. A parent attaching later (a debugger) is an attach.
        trace_me = tracer_pid == info.ppid and info.tracer_pid == status.tracer_pid
        data: dict[str, Any] = {
            "tracerPid": tracer_pid,
            "tracee": info.pid,
            "traceMe": trace_me,
            "tracer": tracer.to_json() if tracer is not None else None,
        }
        if tracer_pid != status.tracer_pid:
            data["tracerTid"] = status.tracer_pid
        report(fact, "proc.ptrace", data)

    def _check_uids(self, info: ProcessInfo, st: _ProcState, status: TaskStatus, report: _Report) -> None:
        new = (status.uid, status.euid)
        if st.uids is None:
            # First look at this image: compare with what the previous image of this pid ran as, else
            # with what this image was captured as.
            old = st.carried_uids if st.carried_uids is not None else (info.uid, info.euid)
            inferred = False
            if old == new and st.carried_uids is None and status.euid == 0 and status.uid != 0:
                # Root through a setuid exec we did not see happen: before it, the process ran as its
                # real uid (setuid changes only the effective and saved ids).
                old = (status.uid, status.uid)
                inferred = True
        else:
            old = st.uids
            inferred = False
        st.uids = new
        if old == new:
            return
        report(
            f"uid:{new[0]}:{new[1]}",
            "proc.uid_change",
            {
                "oldUid": old[0],
                "oldEuid": old[1],
                "newUid": new[0],
                "newEuid": new[1],
                "setuidExe": info.exe_setuid,
                "inferred": inferred,
            },
        )

    # -- fds --------------------------------------------------------------------------------------------------------
    def _scan_fds(self, info: ProcessInfo, dfd: int, report: _Report) -> None:
        try:
            fdd = os.open("fd", _DIR_FLAGS, dir_fd=dfd)
        except OSError as exc:
            raise _typed(exc, "fd") from None
        self.stats["fd_scans"] += 1
        try:
            names = os.listdir(fdd)
            self.stats["fd_links_read"] += len(names)
            for name in names:
                try:
                    link = os.readlink(name, dir_fd=fdd)
                except OSError as exc:
                    if exc.errno == errno.ESRCH:
                        raise procfs.ProcessGone("fd") from None
                    continue  # closed meanwhile
                if link.endswith("/mem"):
                    self._check_mem_fd(info, dfd, name, link, report)
                elif link == "anon_inode:[userfaultfd]":
                    report("userfaultfd", "proc.userfaultfd", {"fd": int(name)})
                elif "runc" in link:
                    self._check_runc_fd(dfd, name, link, report)
        finally:
            os.close(fdd)

    def _check_mem_fd(self, info: ProcessInfo, dfd: int, name: str, link: str, report: _Report) -> None:
        m = _MEM_LINK_RE.match(link)
        if m is None:
            return
        try:
            flags, mnt_id = parse_fdinfo(procfs.read_small(f"fdinfo/{name}", dfd))
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise procfs.ProcessGone("fdinfo") from None
            return
        access = flags & O_ACCMODE
        if access not in ACCESS_MODES:
            return  # read-only: debuggers and profilers read memory, injection writes it
        if mnt_id is not None and self._mount_fs_type(dfd, mnt_id) not in (None, "proc"):
            return  # a file that merely ends in /<n>/mem
        target_pid = self._mem_target(info, int(m.group(1)))
        if target_pid == info.pid:
            return  # its own memory (/proc/self/mem): JITs and runtimes do that
        target = self._resolve(target_pid)
        report(
            f"mem:{target_pid}",
            "proc.mem_write",
            {
                "targetPid": target_pid,
                "target": target.to_json() if target is not None else None,
                "fd": int(name),
                "path": link,
                "flags": f"0{flags:o}",
                "accessMode": ACCESS_MODES[access],
            },
        )

    @staticmethod
    def _check_runc_fd(dfd: int, name: str, link: str, report: _Report) -> None:
        """CVE-2019-5736: the runc binary (through its path or /proc/<runc pid>/exe) opened for writing."""
        path = procfs.split_deleted(link)[0]
        if not path.startswith("/") or _RUNC_NAME_RE.match(os.path.basename(path)) is None:
            return
        try:
            flags, _ = parse_fdinfo(procfs.read_small(f"fdinfo/{name}", dfd))
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise procfs.ProcessGone("fdinfo") from None
            return
        access = flags & O_ACCMODE
        if access not in ACCESS_MODES:
            return  # reading runc (a scanner, a copy) changes nothing
        report(f"runc:{path}", "proc.runc_write", {"fd": int(name), "path": path, "accessMode": ACCESS_MODES[access]})

    @staticmethod
    def _mount_fs_type(dfd: int, mnt_id: int) -> str | None:
        try:
            data = procfs.read_all("mountinfo", dfd)
        except OSError:
            return None
        prefix = f"{mnt_id} ".encode()
        for line in data.splitlines():
            if line.startswith(prefix):
                found = parse_mountinfo(line)
                return found[0].fs_type if found else None
        return None

    def _mem_target(self, opener: ProcessInfo, n: int) -> int:
        """The pid (in our numbering) of /proc/<n>/mem as the opener named it.

        The number is in the PID namespace of the proc mount the opener used: its own namespace. In a task
        (one shared namespace) that is ours; on a host, a container's process names its own pids.
        """
        if opener.nspid == opener.pid:
            pid = n
        else:
            pid = n
            try:
                own = os.readlink(f"{procfs.PROC}/{opener.pid}/ns/pid")
                for cand in self.table.live():
                    if (
                        cand.nspid == n
                        and cand.pid != cand.nspid
                        and os.readlink(f"{procfs.PROC}/{cand.pid}/ns/pid") == own
                    ):
                        pid = cand.pid
                        break
            except OSError:
                pass
        return pid if pid in self.table else self._tgid(pid)

    # -- libraries ----------------------------------------------------------------------------------------------------
    def _container_start_ns(self, ns: int | None) -> int:
        """When the process's container started: its mount namespace's oldest process's start."""
        if self._starts is None:
            starts: dict[int, float] = {}
            for i in self.table.live():
                key = self._procs[i.pid].mnt_ns if i.pid in self._procs else i.mnt_ns
                if key is not None and (key not in starts or i.start_time < starts[key]):
                    starts[key] = i.start_time
            self._starts = starts
        start = self._starts.get(ns) if ns is not None else None
        return int((start if start is not None else procfs.boot_time()) * 1e9)

    def _file_times(self, dfd: int, mapping: ExecMapping) -> tuple[int, int] | None:
        key = (mapping.dev, mapping.inode)
        cached = self._file_cache.get(key)
        now = time.monotonic()
        if cached is not None and now - cached[2] < FILE_CACHE_TTL:
            self._file_cache.move_to_end(key)
            return cached[0], cached[1]
        st = None
        if self._map_files_ok:
            # the mapped file itself, even if deleted or replaced since
            try:
                st = os.stat(f"map_files/{mapping.range}", dir_fd=dfd)
            except OSError as exc:
                if exc.errno in _DENIED_ERRNOS:
                    self._map_files_ok = False
        if st is None and not mapping.deleted:
            # through the process's root: its container's file at that path
            try:
                st = os.stat(f"root{mapping.path}", dir_fd=dfd)
            except OSError:
                return None
        if st is None:
            return None
        self._file_cache[key] = (st.st_mtime_ns, st.st_ctime_ns, now)
        while len(self._file_cache) > MAX_FILE_CACHE:
            self._file_cache.popitem(last=False)
        return st.st_mtime_ns, st.st_ctime_ns

    def _scan_maps(self, info: ProcessInfo, st: _ProcState, dfd: int, exe_link: str, report: _Report) -> None:
        data = _read("maps", dfd, 16 << 20)
        self.stats["maps_reads"] += 1
        exe = procfs.split_deleted(exe_link)[0]
        start_ns: int | None = None
        for mapping in parse_exec_mappings(data):
            key = (mapping.dev, mapping.inode)
            if key in st.mappings_seen:
                continue
            if len(st.mappings_seen) < MAX_MAPPINGS_PER_IMAGE:
                st.mappings_seen.add(key)
            # The main executable is NewBinaryExecuted's business. Any other executable file mapping is a
            # library, .so or not: a loader does not need the name.
            if mapping.path == exe or f"lib:{mapping.path}" in st.facts:
                continue
            file_time: int | None = None
            if mapping.path.startswith("/memfd:"):
                reason = "memfd"
            else:
                times = self._file_times(dfd, mapping)
                if times is None:
                    if not mapping.deleted:
                        self.stats["library_stat_failed"] += 1
                        continue
                    reason = "deleted_file"  # loaded, then deleted: nothing left to date
                else:
                    if start_ns is None:
                        start_ns = self._container_start_ns(st.mnt_ns)
                    file_time = max(times)
                    if file_time <= start_ns:
                        continue
                    reason = "new_file"
            report(
                f"lib:{mapping.path}",
                "proc.library",
                {
                    "libraryPath": mapping.path,
                    "reason": reason,
                    "ldPreloadValue": info.ld_preload,
                    "newFile": True if reason == "new_file" else None,
                    "fileTime": iso_time(file_time / 1e9) if file_time is not None else None,
                },
            )

    def _check_ld_preload(self, info: ProcessInfo, st: _ProcState, dfd: int, report: _Report) -> None:
        value = info.ld_preload or ""
        for entry in _LD_PRELOAD_SPLIT.split(value):
            if not entry:
                continue
            new_file: bool | None = None
            file_time: int | None = None
            if entry.startswith("/"):
                try:
                    s = os.stat(f"root{entry}", dir_fd=dfd)
                    file_time = max(s.st_mtime_ns, s.st_ctime_ns)
                    new_file = file_time > self._container_start_ns(st.mnt_ns)
                except OSError:
                    pass
            report(
                f"lib:{entry}",
                "proc.library",
                {
                    "libraryPath": entry,
                    "reason": "ld_preload",
                    "ldPreloadValue": value,
                    "newFile": new_file,
                    "fileTime": iso_time(file_time / 1e9) if file_time is not None else None,
                },
            )

    # -- mounts -------------------------------------------------------------------------------------------------------
    def _check_mounts(self, live: dict[int, ProcessInfo], now: float) -> None:
        groups: dict[int, list[ProcessInfo]] = {}
        for pid, info in live.items():
            st = self._procs.get(pid)
            ns = st.mnt_ns if st is not None and st.mnt_ns is not None else info.mnt_ns
            if ns is not None:
                groups.setdefault(ns, []).append(info)
        for ns in [n for n in self._ns if n not in groups]:
            del self._ns[ns]  # no process left in it: the namespace is gone (or no longer ours to watch)
        for ns, infos in groups.items():
            nst = self._ns.get(ns)
            if nst is None:
                # Not "seen in our first pass": the process source may not have filled the table by then.
                oldest = min(i.start_ticks for i in infos)
                nst = self._ns[ns] = _NsState(ns, now, initial=oldest < self._started_ticks)
            if nst.raw is None and not nst.initial and now - nst.first_seen < self.ns_settle:
                continue
            try:
                self._read_namespace(nst, infos)
            except Exception:
                self.stats["mount_errors"] += 1
                log.exception("mount namespace check failed")

    def _read_namespace(self, nst: _NsState, infos: list[ProcessInfo]) -> None:
        # keep reading through the same process: mountinfo is relative to the reader's root, and a chrooted
        # member of the namespace would show a different table
        ordered = sorted(infos, key=lambda i: (i.pid != nst.rep_pid, i.start_ticks))
        data = None
        rep = ordered[0]
        for rep in ordered[:4]:
            data = self._mountinfo_of(rep.pid, nst.ns)
            if data is not None:
                break
        if data is None:
            return
        self.stats["mountinfo_reads"] += 1
        if data == nst.raw and rep.pid == nst.rep_pid:
            return
        mounts = parse_mountinfo(data)
        root = root_mount(mounts)
        root_id = root.mount_id if root is not None else None
        current = {m.mount_id: m for m in mounts}
        baseline = nst.raw is None
        if not baseline and root_id != nst.rep_root_id:
            # pivot_root, or a reader with another root (chroot): a different view, not a change to report
            self.stats["mount_namespaces_rebased"] += 1
            baseline = True
        nst.raw, nst.rep_pid, nst.rep_root_id = data, rep.pid, root_id
        old = nst.mounts
        nst.mounts = current
        if baseline:
            if nst.initial:
                return
            # A namespace that appeared while we watch. A container's is built by its runtime and
            # pivoted into its own root: its mounts are its baseline. One made by unshare(CLONE_NEWNS) /
            # clone starts as a copy of its creator's, same root: what it has beyond that copy was mounted
            # by its processes, which is what we are here to see.
            origin = self._origin_mounts(rep, nst.ns)
            if origin is None or root is None:
                return
            origin_root = root_mount(origin)
            if origin_root is None or origin_root.content_key[1:] != root.content_key[1:]:
                return
            remaining = Counter(m.content_key for m in origin)
            for m in mounts:
                if remaining[m.content_key] > 0:
                    remaining[m.content_key] -= 1
                else:
                    self._emit_mount("mount.add", m, rep, nst, root)
            return
        for mount_id, m in current.items():
            if mount_id not in old:
                self._emit_mount("mount.add", m, rep, nst, root)
        for mount_id, m in old.items():
            if mount_id not in current:
                self._emit_mount("mount.remove", m, rep, nst, root)

    def _mountinfo_of(self, pid: int, ns: int) -> bytes | None:
        """pid's mountinfo if pid is (still) in namespace ns: a reused pid, or a process that unshare()d since
        the table saw it, would show another namespace's table, and a diff against it would be all noise."""
        try:
            dfd = procfs.open_pid_dir(pid)
        except procfs.ProcfsError:
            return None
        try:
            data = procfs.read_all("mountinfo", dfd, limit=16 << 20)
            if os.readlink("ns/mnt", dir_fd=dfd) != f"mnt:[{ns}]":
                self.stats["mount_reader_moved"] += 1
                return None
            return data
        except OSError as exc:
            if exc.errno not in _GONE_ERRNOS:
                self.stats["read_errors"] += 1
            return None
        finally:
            os.close(dfd)

    def _origin_mounts(self, info: ProcessInfo, ns: int) -> list[Mount] | None:
        """The mount table of the nearest ancestor in another mount namespace (the one this was copied from)."""
        cur: ProcessInfo | None = info
        for _ in range(64):
            assert cur is not None
            cur = self.table.parent_of(cur)
            if cur is None:
                return None
            st = self._procs.get(cur.pid)
            pns = st.mnt_ns if st is not None and st.uuid == cur.uuid and st.mnt_ns is not None else cur.mnt_ns
            if pns is None or pns == ns:
                continue
            known = self._ns.get(pns)
            if known is not None and known.raw is not None:
                return list(known.mounts.values())
            data = self._mountinfo_of(cur.pid, pns)
            return parse_mountinfo(data) if data is not None else None
        return None

    def _emit_mount(self, kind: str, m: Mount, rep: ProcessInfo, nst: _NsState, root: Mount | None) -> None:
        host, what = classify_mount(m, root.device if root is not None else None, self._host_devices)
        self.events[kind] += 1
        self.emit(
            RuntimeEvent(
                kind,
                rep,
                data={
                    "mountId": m.mount_id,
                    "parentId": m.parent_id,
                    "mountPoint": m.mount_point,
                    "root": m.root,
                    "fsType": m.fs_type,
                    "source": m.source,
                    "options": m.options,
                    "superOptions": m.super_options,
                    "device": m.device,
                    "mntNs": nst.ns,
                    "hostMount": host,
                    # not "kind": event data is merged into the event's top level, where "kind" is the event's
                    "mountKind": what,
                },
            )
        )

    # -- kernel modules -----------------------------------------------------------------------------------------------
    def _check_modules(self) -> None:
        if self.modules_path is None:
            return
        try:
            data = procfs.read_all(self.modules_path, limit=4 << 20)
        except FileNotFoundError:
            if self._modules is None:
                self.modules_path = None  # a kernel without module support: nothing to watch
                self.stats["modules_unavailable"] += 1
            return
        except OSError:
            self.stats["read_errors"] += 1
            return
        if data == self._modules_raw:
            return
        self._modules_raw = data
        modules = parse_modules(data)
        previous, self._modules = self._modules, modules
        if previous is None:
            return  # the first read is the baseline
        for name in modules.keys() - previous.keys():
            self._emit_module(modules[name], "load")
        for name in previous.keys() - modules.keys():
            self._emit_module(previous[name], "unload")

    def _emit_module(self, mod: Module, op: str) -> None:
        self.events["kernel.module"] += 1
        self.emit(
            RuntimeEvent(
                "kernel.module",
                None,
                data={"moduleName": mod.name, "op": op, "size": mod.size, "state": mod.state, "taints": mod.taints},
            )
        )

    # -- reporting ----------------------------------------------------------------------------------------------------
    def mounts(self, mnt_ns: int) -> list[Mount] | None:
        """The mount table of a namespace as last read (None until it has been read), in mountinfo order."""
        nst = self._ns.get(mnt_ns)
        return None if nst is None or nst.raw is None else list(nst.mounts.values())

    def snapshot(self) -> dict[str, Any]:
        costs = list(self._pass_ms)
        return {
            "interval_s": self.interval,
            "passes": self.passes,
            "pass_ms_p50": round(statistics.median(costs), 3) if costs else None,
            "pass_ms_max": round(max(costs), 3) if costs else None,
            "processes_tracked": len(self._procs),
            "namespaces_tracked": len(self._ns),
            "pending": len(self._pending),
            "fd_count_in_stat": self._fd_count_ok,
            "map_files": self._map_files_ok,
            "kernel_modules": self.modules_path is not None,
            "events": dict(self.events),
            "read_errors": self.stats["read_errors"],
            **{k: v for k, v in self.stats.items() if k != "read_errors"},
        }


def probe() -> dict[str, Any]:
    """Which checks work here, and why not the others."""
    details: dict[str, Any] = {}
    try:
        status = procfs.read_small(f"{procfs.PROC}/self/status")
    except OSError as exc:
        return {"available": False, "reason": f"/proc/self/status unreadable: {exc}"}
    if b"TracerPid:" not in status:
        return {"available": False, "reason": "/proc/<pid>/status has no TracerPid line"}
    try:
        procfs.read_all(f"{procfs.PROC}/self/mountinfo")
        details["mountinfo"] = True
    except OSError as exc:
        details["mountinfo"] = False
        details["mountinfoError"] = str(exc)
    try:
        details["kernelModules"] = len(parse_modules(procfs.read_all(f"{procfs.PROC}/modules")))
    except OSError as exc:
        details["kernelModules"] = None
        details["kernelModulesError"] = (
            "kernel without module support" if exc.errno == errno.ENOENT else f"/proc/modules: {exc}"
        )
    details["hostBlockDevices"] = sorted(read_block_devices())
    details["fdCountInStat"] = fd_count_supported()
    details["mapFiles"] = map_files_allowed()
    try:
        caps = capabilities.effective_caps()
    except OSError:
        caps = set()
    details["sysPtrace"] = "SYS_PTRACE" in caps
    me = os.getpid()
    readable = denied = 0
    try:
        pids = procfs.list_pids()
    except OSError as exc:
        return {"available": False, "reason": f"cannot list /proc: {exc}", "details": details}
    for pid in pids[:512]:
        if pid == me:
            continue
        try:
            os.stat(f"{procfs.PROC}/{pid}/fd")
            readable += 1
        except OSError as exc:
            if exc.errno in _DENIED_ERRNOS:
                denied += 1
    details["fdReadable"] = readable
    details["fdDenied"] = denied
    reason = "periodic /proc checks: status (TracerPid, Uid), exe, fd links, maps, mountinfo"
    reason += ", /proc/modules" if details["kernelModules"] is not None else " (no /proc/modules here)"
    if not details["mapFiles"]:
        reason += "; library dates read through /proc/<pid>/root (map_files needs CAP_SYS_ADMIN)"
    if denied and not details["sysPtrace"]:
        return {
            "available": True,
            "degraded": True,
            "reason": f"{denied} processes' fds and maps are unreadable: missing capability SYS_PTRACE "
            "(add it to the sidecar container's linuxParameters.capabilities)",
            "details": details,
        }
    return {"available": True, "reason": reason, "details": details}

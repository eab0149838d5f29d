"""Raw parsing of ``/proc/<pid>``: the only module that knows its file formats.

Every read expects the process to vanish at any moment (psutil's lesson): a
process that is gone raises :class:`ProcessGone`, a field we may not read
raises :class:`AccessDenied` inside the reader and is left ``None`` in the
result instead of failing the whole read.

Reads go through a directory fd on ``/proc/<pid>``: once opened, it pins that
very process, so if the pid exits and is reused mid-read the remaining reads
fail with ESRCH instead of silently describing the newcomer.
"""

from __future__ import annotations

import errno
import os
import re
import stat as stat_mod
from dataclasses import dataclass

PROC = "/proc"

_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH})
_DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM})
# The environment variables we keep. The rest of a process's environment holds
# secrets (ECS injects them there) and is never read into memory beyond this.
KEPT_ENV = (b"LD_PRELOAD=", b"LD_LIBRARY_PATH=")


class ProcfsError(Exception):
    """Base class of the typed errors of this module."""


class ProcessGone(ProcfsError):
    """The process exited (or its pid was reused) before or during the read."""


class AccessDenied(ProcfsError):
    """The kernel refused the read (ptrace access mode, hidepid, ...)."""


class NotAProcess(ProcfsError):
    """The id names a thread, not a thread-group leader."""


def _classify(exc: OSError, what: str) -> ProcfsError:
    if exc.errno in _GONE_ERRNOS:
        return ProcessGone(what)
    if exc.errno in _DENIED_ERRNOS:
        return AccessDenied(what)
    return ProcfsError(f"{what}: {exc}")


def read_small(path: str, dir_fd: int | None = None, size: int = 65536) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def read_all(path: str, dir_fd: int | None = None, limit: int = 1 << 20) -> bytes:
    """Read a whole proc file of unknown size (cmdline, environ), up to ``limit``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        chunks = []
        total = 0
        while total < limit:
            chunk = os.read(fd, min(65536, limit - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


_boot_time: float | None = None


def boot_time() -> float:
    """Wall-clock time of boot (``btime`` of /proc/stat), in seconds."""
    global _boot_time
    if _boot_time is None:
        for line in read_all(f"{PROC}/stat").splitlines():
            if line.startswith(b"btime "):
                _boot_time = float(line.split()[1])
                break
        else:  # pragma: no cover - every Linux has btime
            _boot_time = 0.0
    return _boot_time


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def boot_id() -> str:
    try:
        return read_small("/proc/sys/kernel/random/boot_id").decode().strip()
    except OSError:
        return "unknown-boot"


@dataclass(slots=True)
class ExeFile:
    """What identifies an executable file's content, from fstat of /proc/pid/exe."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    mode: int

    @property
    def setuid(self) -> bool:
        return bool(self.mode & stat_mod.S_ISUID)


@dataclass(slots=True)
class RawProcess:
    """Everything read from /proc/<pid> for one process, unparsed by policy."""

    pid: int
    tgid: int
    nspid: int
    ppid: int
    name: str
    start_ticks: int
    state: str
    uid: int
    euid: int
    suid: int
    gid: int
    egid: int
    tracer_pid: int
    argv: list[str] | None
    exe: str | None
    exe_deleted: bool
    cwd: str | None
    cgroup: str | None
    mnt_ns: int | None
    ld_preload: str | None
    ld_library_path: str | None
    exe_file: ExeFile | None
    # An fd on the executable (via /proc/pid/exe), open only when the caller
    # asked for it: content stays hashable after the process exits or the file
    # is deleted. The caller owns it.
    exe_fd: int | None = None


def parse_stat(data: bytes) -> tuple[str, str, int, int]:
    """Return (comm, state, ppid, starttime) from /proc/pid/stat.

    comm may contain spaces and parentheses: split at the *last* ')'.
    """
    lpar = data.index(b"(")
    rpar = data.rindex(b")")
    comm = data[lpar + 1 : rpar].decode("utf-8", "replace")
    fields = data[rpar + 2 :].split()
    # fields[0] is field 3 (state); starttime is field 22 -> index 19
    return comm, fields[0].decode(), int(fields[1]), int(fields[19])


_STATUS_KEYS = re.compile(rb"^(Tgid|Uid|Gid|NSpid|TracerPid):\s*(.*)$", re.M)


def parse_status(data: bytes) -> dict[bytes, bytes]:
    """The few status lines we use (a full parse of ~60 lines costs 5x more)."""
    return dict(_STATUS_KEYS.findall(data))


def _readlink(name: str, dfd: int) -> str | None:
    """A link of a process we hold a dir fd on; None if it has none.

    ENOENT is not "gone" here: a kernel thread, or a process past the point
    in exit where its memory is released, has no exe. Only ESRCH (the pinned
    task is reaped) means gone.
    """
    try:
        return os.readlink(name, dir_fd=dfd)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise ProcessGone(name) from None
        return None


def split_deleted(path: str) -> tuple[str, bool]:
    if path.endswith(" (deleted)"):
        return path[: -len(" (deleted)")], True
    return path, False


def open_pid_dir(pid: int) -> int:
    try:
        return os.open(f"{PROC}/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _classify(exc, f"/proc/{pid}") from None


def _read_once(pid: int, dfd: int, want_exe_fd: bool, want_env: bool) -> RawProcess:
    exe_fd: int | None = None
    try:
        # exe and cmdline first: they are what a process loses first when it
        # exits (a zombie has neither), and what an investigation needs most.
        # exe before cmdline: an exec between the two then shows as a changed
        # exe at the end (see read_process), never as new exe + old arguments.
        exe_link = _readlink("exe", dfd)
        argv: list[str] | None
        try:
            raw = read_all("cmdline", dfd)
            argv = [a.decode("utf-8", "surrogateescape") for a in raw.rstrip(b"\0").split(b"\0")] if raw else []
        except OSError as exc:
            err = _classify(exc, "cmdline")
            if isinstance(err, ProcessGone):
                raise err from None
            argv = None
        exe, deleted = split_deleted(exe_link) if exe_link else (None, False)
        exe_file = None
        if exe is not None:
            try:
                exe_fd = os.open("exe", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
                st = os.fstat(exe_fd)
                exe_file = ExeFile(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)
            except OSError:
                pass
            if exe_fd is not None and not want_exe_fd:
                os.close(exe_fd)
                exe_fd = None
        try:
            status = parse_status(read_small("status", dfd))
        except OSError as exc:
            raise _classify(exc, "status") from None
        tgid = int(status.get(b"Tgid", b"0") or 0)
        if tgid != pid:
            raise NotAProcess(pid)
        try:
            comm, state, ppid, start_ticks = parse_stat(read_small("stat", dfd))
        except OSError as exc:
            raise _classify(exc, "stat") from None
        uids = status.get(b"Uid", b"0 0 0 0").split()
        gids = status.get(b"Gid", b"0 0 0 0").split()
        nspids = status.get(b"NSpid", str(pid).encode()).split()
        cwd = _readlink("cwd", dfd)
        mnt = _readlink("ns/mnt", dfd)
        mnt_ns = int(mnt[5:-1]) if mnt and mnt.startswith("mnt:[") else None
        try:
            cgroup: str | None = read_small("cgroup", dfd).decode("utf-8", "replace")
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise ProcessGone("cgroup") from None
            cgroup = None
        ld_preload = ld_library_path = None
        if want_env and exe is not None:  # kernel threads have no environment
            try:
                env = read_all("environ", dfd)
            except OSError as exc:
                if exc.errno == errno.ESRCH:
                    raise ProcessGone("environ") from None
                env = b""
            if b"LD_" in env:
                for item in env.split(b"\0"):
                    if item.startswith(KEPT_ENV[0]):
                        ld_preload = item[len(KEPT_ENV[0]) :].decode("utf-8", "replace")
                    elif item.startswith(KEPT_ENV[1]):
                        ld_library_path = item[len(KEPT_ENV[1]) :].decode("utf-8", "replace")
            del env
        return RawProcess(
            pid=pid,
            tgid=tgid,
            nspid=int(nspids[-1]),
            ppid=ppid,
            name=comm,
            start_ticks=start_ticks,
            state=state,
            uid=int(uids[0]),
            euid=int(uids[1]),
            suid=int(uids[2]),
            gid=int(gids[0]),
            egid=int(gids[1]),
            tracer_pid=int(status.get(b"TracerPid", b"0") or 0),
            argv=argv,
            exe=exe,
            exe_deleted=deleted,
            cwd=cwd,
            cgroup=cgroup,
            mnt_ns=mnt_ns,
            ld_preload=ld_preload,
            ld_library_path=ld_library_path,
            exe_file=exe_file,
            exe_fd=exe_fd,
        )
    except BaseException:
        if exe_fd is not None:
            os.close(exe_fd)
        raise


def read_process(pid: int, *, want_exe_fd: bool = False, want_env: bool = True) -> RawProcess:
    """Read one process. Raises ProcessGone, NotAProcess; never AccessDenied.

    An exec can land between two of the reads (a child caught right after its
    fork). The exe link is read again at the end; if it moved, the process is
    read again, so fields never mix two images.
    """
    dfd = open_pid_dir(pid)
    try:
        for _ in range(3):
            raw = _read_once(pid, dfd, want_exe_fd, want_env)
            try:
                now = os.readlink("exe", dir_fd=dfd)
            except OSError:
                return raw  # exiting or a kernel thread: what we read is all there is
            if split_deleted(now)[0] == raw.exe:
                return raw
            if raw.exe_fd is not None:
                os.close(raw.exe_fd)
        return raw
    finally:
        os.close(dfd)


def read_start_ticks(pid: int) -> int:
    """Start time of a pid in clock ticks since boot (its identity with the pid)."""
    try:
        return parse_stat(read_small(f"{PROC}/{pid}/stat"))[3]
    except OSError as exc:
        raise _classify(exc, "stat") from None


def read_fd_links(pid: int, start_ticks: int, fds: tuple[int, ...] = (0, 1, 2)) -> dict[int, str | None] | None:
    """What fds of a process point to (``pipe:[N]``, ``socket:[N]``, ``/dev/pts/3``...), or None when the pid is
    gone or now another process (its start ticks differ). Read through a dir fd that pins the process."""
    try:
        dfd = open_pid_dir(pid)
    except ProcfsError:
        return None
    try:
        if parse_stat(read_small("stat", dfd))[3] != start_ticks:
            return None
        return {fd: _readlink(f"fd/{fd}", dfd) for fd in fds}
    except (OSError, ProcfsError, ValueError):
        return None
    finally:
        os.close(dfd)


def read_fd_targets(pid: int, start_ticks: int, limit: int = 4096) -> set[str] | None:
    """What every fd of a process points to (at most ``limit`` fds), or None when gone or reused."""
    try:
        dfd = open_pid_dir(pid)
    except ProcfsError:
        return None
    try:
        if parse_stat(read_small("stat", dfd))[3] != start_ticks:
            return None
        fdd = os.open("fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
        try:
            out = set()
            for name in os.listdir(fdd)[:limit]:
                try:
                    out.add(os.readlink(name, dir_fd=fdd))
                except OSError:
                    continue  # closed meanwhile
            return out
        finally:
            os.close(fdd)
    except (OSError, ProcfsError, ValueError):
        return None
    finally:
        os.close(dfd)


def read_start_stack(pid: int, start_ticks: int) -> int | None:
    """The process's stack start address (stat field 28), or None when gone, reused or hidden (needs ptrace
    access). With address space randomization, a fork keeps its parent's value and an exec draws a new one:
    it tells a subshell (``( ... )``, ``while read`` in a pipeline) from a shell that was exec'd."""
    try:
        fields = read_small(f"{PROC}/{pid}/stat").rsplit(b")", 1)[1].split()
        if int(fields[19]) != start_ticks:
            return None
        value = int(fields[25])
    except (OSError, IndexError, ValueError):
        return None
    return value or None


def forked_from(child: tuple[int, int], parent: tuple[int, int]) -> bool | None:
    """Whether ``child`` (pid, start ticks) still runs the address space it was forked with from ``parent``
    (no exec since): True, False, or None when either cannot be read."""
    mine, theirs = read_start_stack(*child), read_start_stack(*parent)
    if mine is None or theirs is None:
        return None
    return mine == theirs


def read_exe_link(pid: int) -> str | None:
    try:
        return os.readlink(f"{PROC}/{pid}/exe")
    except OSError as exc:
        if exc.errno in _GONE_ERRNOS:
            raise ProcessGone("exe") from None
        return None


def read_zombie(pid: int) -> tuple[str, int] | None:
    """(comm, exit status) of a process that has exited but is not reaped yet.

    comm survives in the zombie and names the image it last exec'd, which is
    all that is left to say about a process that exec'd and exited unseen.
    None if the pid is not (or no longer) a zombie.
    """
    try:
        data = read_small(f"{PROC}/{pid}/stat")
    except OSError:
        return None
    comm, state, _, _ = parse_stat(data)
    fields = data[data.rindex(b")") + 2 :].split()
    if len(fields) < 50 or state not in ("Z", "X"):
        return None
    status = int(fields[49])
    if status & 0x7F:
        return comm, -(status & 0x7F)  # killed by a signal, negative like subprocess
    return comm, (status >> 8) & 0xFF


def read_exit_code(pid: int) -> int | None:
    """Exit status of a zombie (field 52 of stat), None if unreadable or reaped."""
    z = read_zombie(pid)
    return None if z is None else z[1]


def list_pids() -> list[int]:
    return [int(name) for name in os.listdir(PROC) if name.isdigit()]


class LastPidReader:
    """The namespace's last allocated pid, from the 5th field of /proc/loadavg.

    The field is per PID namespace, and a pread on a kept-open fd costs well
    under a microsecond: it is the cheap "did anything fork?" test that lets
    the poller sleep instead of listing /proc.
    """

    def __init__(self, path: str = f"{PROC}/loadavg") -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self) -> int:
        data = os.pread(self._fd, 128, 0)
        return int(data[data.rindex(b" ") + 1 :])

    def close(self) -> None:
        os.close(self._fd)


def pid_max() -> int:
    try:
        return int(read_small("/proc/sys/kernel/pid_max"))
    except OSError:
        return 32768

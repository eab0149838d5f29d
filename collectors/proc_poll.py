"""Process source for Fargate: /proc polling woken by cheap change detection.

Inside a task the proc connector is silent, so new processes are found by
looking, and looking is made cheap and prompt:

* ``/proc/loadavg``'s last field is the namespace's last allocated pid. A pread
  of it says whether anything forked since the last look; only the new pids
  are then read, never a listing of /proc.
* An exec opens the binary and, for a dynamic binary, the loader and libc. An
  inotify watch for IN_OPEN on each container's binary and library directories
  (through ``/proc/<pid>/root``) wakes us within microseconds of an exec, so a
  process living a millisecond is usually read before it exits.
* Between wake-ups a timer polls: fast (``fast_interval``) for a while after
  activity, backing off to ``idle_interval`` when nothing happens, so an idle
  task costs a few wake-ups a second.
* A pidfd per process (``pidfd_open``) becomes readable when it exits: exits
  are events, not diffs of listings.
* A full sweep every ``sweep_interval`` reconciles anything the above missed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import select
import time
from collections import Counter
from typing import Any

from inotify_simple import INotify
from inotify_simple import flags as in_flags

from collectors import procfs
from collectors.budget import CpuBudget
from collectors.events import ProcessInfo
from collectors.process import ProcessCollector

log = logging.getLogger(__name__)

# Directories whose files are opened by (nearly) every exec: the binary itself,
# the ELF interpreter and libc. Temp dirs too: dropped payloads run from there.
WAKE_DIRS = (
    "/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin",
    "/lib", "/lib64", "/usr/lib", "/usr/lib64", "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/local/lib",
    "/tmp", "/var/tmp", "/dev/shm",
)  # fmt: skip
# More pids than this allocated between two looks: list /proc instead of
# probing each pid (cheaper, and the right call in a fork storm).
STORM_PIDS = 4096
# Sweeps triggered by an exec wake-up that new pids do not explain: at most
# one per this many seconds (a sweep of a task's few dozen processes costs
# well under a millisecond).
SWEEP_ON_WAKE_GAP = 0.1
# Directories learnt from running executables, over all containers.
MAX_EXTRA_DIRS = 1024


class PollingProcessSource:
    name = "proc_poll"

    def __init__(
        self,
        collector: ProcessCollector,
        *,
        fast_interval: float = 0.002,
        idle_interval: float = 0.05,
        burst: float = 0.5,
        sweep_interval: float = 2.0,
        max_wakeups_per_s: float = 1000.0,
        max_pidfds: int = 16384,
        use_inotify: bool = True,
        budget: CpuBudget | None = None,
    ) -> None:
        self.collector = collector
        self.budget = budget or CpuBudget(1.0)
        self.fast_interval = fast_interval
        self.idle_interval = idle_interval
        self.burst = burst
        self.sweep_interval = sweep_interval
        # Token bucket on inotify-driven ticks: an app opening library files in
        # a loop must not make us spin, but a lone exec is handled at once.
        self._wake_rate = max_wakeups_per_s
        self._wake_tokens = max_wakeups_per_s / 10
        self.stats: Counter[str] = Counter()
        self._lastpid = procfs.LastPidReader()
        self._pid_max = procfs.pid_max()
        self._last = self._lastpid.read()
        self._interval = idle_interval
        self._burst_until = 0.0
        self._last_tick = 0.0
        self._last_sweep = 0.0
        self._last_wake_sweep = 0.0
        self._sweep_wanted = False
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = asyncio.Event()
        self._inotify: INotify | None = None
        self._watched_ns: set[int | None] = set()
        self._watched_dirs: set[tuple[int | None, str]] = set()
        self._use_inotify = use_inotify
        self._pidfds: dict[int, tuple[int, int]] = {}  # pid -> (pidfd, start_ticks)
        self._max_pidfds = self._raise_fd_limit(max_pidfds)
        self._pidfd_ok = hasattr(os, "pidfd_open")

    @staticmethod
    def _raise_fd_limit(wanted: int) -> int:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else soft + wanted + 256
        if soft < target:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
        return max(0, min(wanted, soft - 256))

    # -- lifecycle ----------------------------------------------------------------
    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._use_inotify:
            try:
                self._inotify = INotify(nonblocking=True)
                self._loop.add_reader(self._inotify.fd, self._on_inotify)
            except OSError as exc:
                self.stats["inotify_unavailable"] += 1
                log.warning("inotify wake-ups unavailable, polling only", extra={"error": str(exc)})
                self._inotify = None
        self._sweep(time.monotonic())
        self._schedule(time.monotonic())
        try:
            await self._stopped.wait()
        finally:
            self._teardown()

    def stop(self) -> None:
        self._stopped.set()

    def _teardown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = self._loop
        # Exits that happened but whose callbacks have not run yet: report them
        # now, so a stop right after a process ends does not lose its exit.
        ready = select.poll()
        for fd, _ in self._pidfds.values():
            ready.register(fd, select.POLLIN)
        exited = {fd for fd, _ in ready.poll(0)}
        for pid, (fd, start_ticks) in list(self._pidfds.items()):
            if loop is not None:
                loop.remove_reader(fd)
            os.close(fd)
            info = self.collector.table.get(pid)
            if fd in exited and info is not None and info.start_ticks == start_ticks:
                self.collector.exited(pid, None)
        self._pidfds.clear()
        if self._inotify is not None:
            if loop is not None:
                loop.remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None
        self._lastpid.close()

    # -- wake-ups -----------------------------------------------------------------
    def _on_inotify(self) -> None:
        assert self._inotify is not None
        try:
            while os.read(self._inotify.fd, 65536):
                pass
        except BlockingIOError:
            pass
        except OSError:
            pass
        self.stats["inotify_wakeups"] += 1
        now = time.monotonic()
        self._wake_tokens = min(self._wake_rate / 10, self._wake_tokens + (now - self._last_tick) * self._wake_rate)
        if self._wake_tokens < 1:
            self.stats["inotify_wakeups_deferred"] += 1
            self._schedule(now, soon=1 / self._wake_rate)
            return
        self._wake_tokens -= 1
        self._tick(now, inotify=True)

    def _on_timer(self) -> None:
        self._timer = None
        self._tick(time.monotonic(), inotify=False)

    def _schedule(self, now: float, soon: float | None = None) -> None:
        assert self._loop is not None
        delay = self._interval if soon is None else soon
        if self._sweep_wanted:
            delay = min(delay, max(self._last_wake_sweep + SWEEP_ON_WAKE_GAP - now, 0.0005))
        nxt = self.collector.next_recheck_in(now)
        if nxt is not None:
            delay = min(delay, max(nxt, 0.0005))
        due = now + delay
        if self._timer is not None:
            if self._timer.when() <= due + 0.0002:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(due, self._on_timer)

    def _tick(self, now: float, *, inotify: bool) -> None:
        self._last_tick = now
        self.stats["ticks"] += 1
        try:
            new = self._scan_new_pids(now)
            if inotify:
                self.collector.recheck_tentative(now)
            self.collector.recheck_young(now)
            if now - self._last_sweep >= self.sweep_interval:
                self._sweep(now)
            else:
                if inotify and not new:
                    # Something opened a binary or a library but the last pid
                    # did not move: an exec in place (``exec`` in a shell), or
                    # new pids that brought the counter back to the value we
                    # last read (a wrap, or ns_last_pid rewound). Only a sweep
                    # tells; at most one per SWEEP_ON_WAKE_GAP.
                    self._sweep_wanted = True
                if self._sweep_wanted and now - self._last_wake_sweep >= SWEEP_ON_WAKE_GAP:
                    self._sweep_wanted = False
                    self._last_wake_sweep = now
                    self.stats["wake_sweeps"] += 1
                    self._sweep(now)
        except Exception:  # never let one bad read stop the source
            self.stats["tick_errors"] += 1
            log.exception("process polling tick failed")
            new = 0
        if new or inotify:
            self._interval = self.fast_interval
            self._burst_until = now + self.burst
        elif now > self._burst_until:
            self._interval = min(self._interval * 2, self.idle_interval)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._schedule(now)

    # -- work ---------------------------------------------------------------------
    def _scan_new_pids(self, now: float) -> int:
        last = self._lastpid.read()
        prev = self._last
        if last == prev:
            return 0
        self._last = last
        if last > prev:
            count = last - prev
            ranges = [range(prev + 1, last + 1)]
        else:  # the pid counter wrapped around pid_max
            self.stats["pid_wraps"] += 1
            count = (self._pid_max - prev) + last
            ranges = [range(prev + 1, self._pid_max), range(2, last + 1)]
        self.stats["pids_allocated"] += count
        if not self.budget.allow():
            # Over the CPU budget: leave these pids to the next sweep (the
            # long-lived ones will still be there) and count them.
            self.stats["pids_skipped_over_budget"] += count
            return 0
        if count > STORM_PIDS:
            self.stats["storm_sweeps"] += 1
            new, _ = self._sweep(now)
            return new
        found = 0
        table = self.collector.table
        for rng in ranges:
            for pid in rng:
                if found & 31 == 31 and not self.budget.allow():
                    self.stats["pids_skipped_over_budget"] += 1
                    continue
                known = table.get(pid)
                info = self.collector.capture(pid, now=now)
                if info is not None and info is not known:
                    found += 1
                    self._track_exit(info.pid, info.start_ticks)
                    self._watch_for(info)
        return found

    def _sweep(self, now: float) -> tuple[int, int]:
        self._last_sweep = now
        self.stats["sweeps"] += 1
        new, exited = self.collector.sweep()
        for info in self.collector.table.live():
            if info.pid not in self._pidfds:
                self._track_exit(info.pid, info.start_ticks)
            self._watch_for(info)
        return new, exited

    def _track_exit(self, pid: int, start_ticks: int) -> None:
        if not self._pidfd_ok or self._loop is None:
            return
        cur = self._pidfds.get(pid)
        if cur is not None:
            if cur[1] == start_ticks:
                return
            self._drop_pidfd(pid)
        if len(self._pidfds) >= self._max_pidfds:
            self.stats["pidfd_limit"] += 1
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError as exc:
            if exc.errno == errno.ENOSYS:
                self._pidfd_ok = False
            elif exc.errno == errno.ESRCH:
                self.collector.exited(pid, None)
            return
        self._pidfds[pid] = (fd, start_ticks)
        self._loop.add_reader(fd, self._on_exit, pid, fd)

    def _drop_pidfd(self, pid: int) -> None:
        entry = self._pidfds.pop(pid, None)
        if entry is not None and self._loop is not None:
            self._loop.remove_reader(entry[0])
            os.close(entry[0])

    def _on_exit(self, pid: int, fd: int) -> None:
        entry = self._pidfds.get(pid)
        if entry is None or entry[0] != fd:
            return
        zombie = procfs.read_zombie(pid)
        self._drop_pidfd(pid)
        info = self.collector.table.get(pid)
        if info is not None and info.start_ticks == entry[1]:
            if zombie is None:
                self.collector.exited(pid, None)
            else:
                self.collector.exited(pid, zombie[1], comm=zombie[0])

    # -- watches ------------------------------------------------------------------
    def _watch_for(self, info: ProcessInfo) -> None:
        if info.mnt_ns not in self._watched_ns:
            self.watch_root(info.pid, info.mnt_ns)
        path = info.executable_path
        if path and path.startswith("/") and not info.executable_deleted:
            self.watch_dir(info.pid, info.mnt_ns, os.path.dirname(path))

    def watch_dir(self, pid: int, mnt_ns: int | None, directory: str) -> bool:
        """Also wake on execs from a directory a process of this container ran from.

        The fixed list covers the system's bin and lib dirs; an app's own
        (/app/bin, /opt/x) is learnt from what runs. A static binary run from
        an unwatched directory is found by the timer only.
        """
        key = (mnt_ns, directory)
        if self._inotify is None or key in self._watched_dirs or len(self._watched_dirs) >= MAX_EXTRA_DIRS:
            return False
        self._watched_dirs.add(key)
        path = _resolve_in_root(pid, directory)
        if path is None:
            return False
        try:
            self._inotify.add_watch(path, in_flags.OPEN | in_flags.ONLYDIR)
        except OSError:
            return False
        self.stats["wake_watches"] += 1
        return True

    def watch_root(self, pid: int, mnt_ns: int | None) -> int:
        """Add exec wake-up watches for the filesystem of pid's mount namespace."""
        if self._inotify is None or mnt_ns in self._watched_ns:
            return 0
        self._watched_ns.add(mnt_ns)
        added = 0
        for d in WAKE_DIRS:
            path = _resolve_in_root(pid, d)
            if path is None:
                continue
            try:
                self._inotify.add_watch(path, in_flags.OPEN | in_flags.ONLYDIR)
                added += 1
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    self.stats["watch_limit"] += 1
                    break
        self.stats["wake_watches"] += added
        return added

    def snapshot(self) -> dict[str, Any]:
        return {
            "interval_ms": round(self._interval * 1000, 2),
            "pidfds": len(self._pidfds),
            "watched_namespaces": len(self._watched_ns),
            **self.stats,
        }


def _resolve_in_root(pid: int, path: str, depth: int = 0) -> str | None:
    """Path of ``path`` inside pid's root, following symlinks inside that root.

    Absolute symlinks must be re-anchored at /proc/<pid>/root by hand: the
    kernel would resolve them against *our* root, not the container's.
    """
    root = f"/proc/{pid}/root"
    full = root + path
    try:
        target = os.readlink(full)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # not a symlink
            return full if os.path.isdir(full) else None
        return None
    if depth > 4:
        return None
    if not target.startswith("/"):
        target = os.path.normpath(os.path.join(os.path.dirname(path), target))
    return _resolve_in_root(pid, target, depth + 1)

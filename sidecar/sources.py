"""The event sources beside the process source: sockets, packets, files, kernel traces.

Each lives in its own collectors/ module with the same shape: a module-level
``probe()`` and a class taking ``(emit, table)`` with ``run()``, ``stop()``,
``snapshot()`` and optionally ``on_process(info)``. They are imported lazily
and run independently: one that cannot load, is not permitted here, or fails
while running is switched off and reported, and the others go on (the sidecar
degrades to fewer sources, it does not exit).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from collectors.events import ProcessInfo, RuntimeEvent
from collectors.process_table import ProcessTable

log = logging.getLogger("sidecar.sources")


@dataclass(frozen=True)
class SourceSpec:
    name: str
    module: str
    cls: str
    what: str


SPECS = (
    SourceSpec("sock_diag", "collectors.sockets", "SockDiagCollector", "TCP/UDP/unix sockets via netlink sock_diag"),
    SourceSpec("packet", "collectors.packets", "PacketCollector", "DNS and TCP SYNs via AF_PACKET + BPF"),
    SourceSpec("file_watch", "collectors.files", "FileWatchCollector", "sensitive files via inotify"),
    SourceSpec(
        "kernel_traces", "collectors.kernel_traces", "KernelTraceCollector", "ptrace, memfd, mounts... via /proc"
    ),
)
NAMES = tuple(s.name for s in SPECS)


class EventSource(Protocol):
    name: str

    async def run(self) -> None: ...
    def stop(self) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...


def probe_all() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for spec in SPECS:
        try:
            mod = importlib.import_module(spec.module)
            report = dict(mod.probe())
        except Exception as exc:  # a source that cannot even load is reported, not fatal
            report = {"available": False, "reason": f"cannot load {spec.module}: {exc!r}"}
        report.setdefault("reason", "")
        report["what"] = spec.what
        out[spec.name] = report
    return out


class SourceSet:
    """Runs the enabled sources as tasks; tells them about new processes."""

    def __init__(self, emit: Callable[[RuntimeEvent], None], table: ProcessTable) -> None:
        self.emit = emit
        self.table = table
        self.sources: dict[str, EventSource] = {}
        self.failed: dict[str, str] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._on_process: list[Callable[[ProcessInfo], None]] = []

    def start(self, names: list[str], options: dict[str, dict[str, Any]] | None = None) -> None:
        loop = asyncio.get_running_loop()
        for spec in SPECS:
            if spec.name not in names:
                continue
            try:
                cls = getattr(importlib.import_module(spec.module), spec.cls)
                source: EventSource = cls(self.emit, self.table, **(options or {}).get(spec.name, {}))
            except Exception as exc:
                self.failed[spec.name] = f"cannot start: {exc!r}"
                log.error("event source cannot start", extra={"source": spec.name, "error": repr(exc)})
                continue
            self.sources[spec.name] = source
            hook = getattr(source, "on_process", None)
            if callable(hook):
                self._on_process.append(hook)
            task = loop.create_task(source.run(), name=f"source:{spec.name}")
            task.add_done_callback(functools.partial(self._ended, spec.name))
            self._tasks[spec.name] = task

    def _ended(self, name: str, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.failed[name] = f"failed: {exc!r}"
            source = self.sources.pop(name, None)
            hook = getattr(source, "on_process", None)
            if hook in self._on_process:
                self._on_process.remove(hook)
            log.error("event source failed and is now off", extra={"source": name, "error": repr(exc)})

    def on_process(self, info: ProcessInfo) -> None:
        for hook in self._on_process:
            try:
                hook(info)
            except Exception:
                log.exception("on_process hook failed")

    async def stop(self, grace: float) -> None:
        for source in self.sources.values():
            source.stop()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks.values(), timeout=grace)
            for task in pending:
                task.cancel()

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: s.snapshot() for name, s in self.sources.items()}
        out.update({name: {"off": reason} for name, reason in self.failed.items()})
        return out

"""The agent's event loop: probe, identity, process source, outputs, signals.

One asyncio process. The process source runs as a task; if it fails, the
sidecar falls back to the next source the probe allows (degrades) instead of
exiting, because a dead sidecar protects nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import time
from typing import Any, Protocol

import orjson

from collectors.budget import CpuBudget
from collectors.events import RuntimeEvent
from collectors.exe_hash import ExeHasher
from collectors.proc_connector import ConnectorProcessSource
from collectors.proc_poll import PollingProcessSource
from collectors.process import ProcessCollector
from collectors.process_table import ProcessTable
from detectors.engine import DetectorEngine
from detectors.policy import Policy
from sidecar import __version__, ecs
from sidecar.config import Settings
from sidecar.detection import build_engine, load_policy
from sidecar.outputs import JsonLinesOutput
from sidecar.probe import choose_process_source, run_probe
from sidecar.sources import NAMES, SourceSet

log = logging.getLogger("sidecar")

STOP_TIMEOUT = 5.0


class Source(Protocol):
    name: str

    async def run(self) -> None: ...
    def stop(self) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...


class Sidecar:
    def __init__(self, settings: Settings, policy: Policy | None = None) -> None:
        self.settings = settings
        self.policy = policy if policy is not None else load_policy(settings)
        self.engine: DetectorEngine | None = None
        self.findings_emitted = 0
        self.outputs: list[JsonLinesOutput] = []
        self.events_out: JsonLinesOutput | None = None
        self.findings_out: JsonLinesOutput | None = None
        self.collector: ProcessCollector | None = None
        self.source: Source | None = None
        self.probe: dict[str, Any] = {}
        self.identity: ecs.TaskIdentity | None = None
        self.refresher: ecs.MetadataRefresher
        self.aux: SourceSet | None = None
        self.events_seen = 0
        self._stop = asyncio.Event()
        self._started = time.monotonic()

    # -- events -------------------------------------------------------------------
    def on_event(self, event: RuntimeEvent) -> None:
        self.events_seen += 1
        if self.events_out is not None:
            self.events_out.write_raw(event.to_bytes())
        if event.kind == "process.exec" and event.process is not None and self.aux is not None:
            self.aux.on_process(event.process)
        if self.engine is not None:
            self.engine.on_event(event)

    def on_finding(self, finding: dict[str, Any]) -> None:
        """A new finding, or an update of an aggregated one (same id, higher count)."""
        self.findings_emitted += 1
        # serialized now: the aggregator keeps updating the same dict
        line = orjson.dumps(finding)
        if self.findings_out is not None:
            self.findings_out.write_raw(line)

    # -- lifecycle ----------------------------------------------------------------
    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stop requested, flushing")
        self._stop.set()

    def _open_outputs(self) -> None:
        s = self.settings
        if s.events_out:
            self.events_out = JsonLinesOutput(s.events_out, max_queue=s.output_queue_max)
            self.outputs.append(self.events_out)
        if s.findings_out:
            self.findings_out = JsonLinesOutput(s.findings_out, max_queue=s.output_queue_max)
            self.outputs.append(self.findings_out)
        for out in self.outputs:
            out.start()

    def _make_source(self, name: str) -> Source:
        assert self.collector is not None
        s = self.settings
        # A host daemon may spend more than a sidecar living in someone's task.
        pct = s.cpu_budget_pct if s.cpu_budget_pct is not None else (50.0 if name == "proc_connector" else 20.0)
        budget = CpuBudget(pct / 100)
        if name == "proc_connector":
            sweep = max(s.poll_sweep_interval_s, 10.0)
            return ConnectorProcessSource(self.collector, sweep_interval=sweep, budget=budget)
        return PollingProcessSource(
            self.collector,
            fast_interval=s.poll_fast_interval_ms / 1000,
            idle_interval=s.poll_idle_interval_ms / 1000,
            sweep_interval=s.poll_sweep_interval_s,
            use_inotify=s.poll_inotify_wakeups,
            budget=budget,
        )

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        s = self.settings
        if s.nice:
            # Below the task's own processes: on a contended CPU the app wins.
            os.nice(s.nice)
        self.probe = await loop.run_in_executor(None, run_probe)
        wanted = choose_process_source(self.probe["sources"], s.process_source)
        candidates = [wanted] if wanted else []
        if s.process_source == "auto" or not wanted:
            candidates += [
                n for n in ("proc_connector", "proc_poll") if n != wanted and self.probe["sources"][n]["available"]
            ]
        log.info(
            "sources chosen",
            extra={
                "version": __version__,
                "processSource": wanted,
                "sources": {
                    k: {"available": v["available"], "reason": v["reason"]} for k, v in self.probe["sources"].items()
                },
                "capabilities": self.probe["capabilities"],
            },
        )
        self.identity = await ecs.load_identity(s.metadata_uri, account_id=s.account_id, region=s.region)
        log.info("identity", extra={"identity": self.identity.summary()})
        self._open_outputs()
        resolver = ecs.ContainerResolver(self.identity)
        # Containers that start after us appear in /task later: re-read it when
        # the resolver meets an id it does not know.
        self.refresher = ecs.MetadataRefresher(resolver)
        table = ProcessTable(max_live=s.max_processes, max_exited=s.max_exited_processes)
        self.engine = build_engine(s, self.identity, table, self.on_finding, self.policy)
        self.collector = ProcessCollector(
            self.on_event,
            resolve_container=resolver,
            table=table,
            hasher=ExeHasher(size_limit=s.hash_max_bytes),
            hash_executables=s.hash_executables,
        )
        self.aux = SourceSet(self.on_event, self.collector.table)
        # Sources that meet a process the table does not know yet (a tracer, a
        # file's writer) read it through the process collector, so it gets its
        # uuid, container and exec event like any other.
        capture = self.collector.capture
        self.aux.start(
            self._event_sources(), {"kernel_traces": {"lookup": capture}, "file_watch": {"capture": capture}}
        )
        stats_task = loop.create_task(self._stats_loop())
        flush_task = loop.create_task(self._flush_loop())
        try:
            await self._run_sources(candidates)
        finally:
            stats_task.cancel()
            flush_task.cancel()
            self.refresher.close()
            await self.aux.stop(STOP_TIMEOUT)
            if self.engine is not None:
                self.engine.flush(force=True)
            await self._shutdown()
        return 0

    def _event_sources(self) -> list[str]:
        """The non-process sources to run: those asked for that the probe allows."""
        s = self.settings.sources
        wanted = NAMES if s == "auto" else () if s == "none" else tuple(s.split(","))
        chosen = [n for n in wanted if self.probe["sources"].get(n, {}).get("available")]
        for n in wanted:
            if n not in chosen:
                reason = self.probe["sources"].get(n, {}).get("reason", "unknown source")
                log.warning("event source off", extra={"source": n, "reason": reason})
        return chosen

    async def _run_sources(self, candidates: list[str]) -> None:
        if not candidates:
            log.error("no process source works here; see `runtime-sidecar probe`")
            await self._stop.wait()
            return
        for name in candidates:
            self.source = self._make_source(name)
            task = asyncio.get_running_loop().create_task(self.source.run(), name=f"source:{name}")
            stopper = asyncio.get_running_loop().create_task(self._stop.wait())
            done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                self.source.stop()
                try:
                    await asyncio.wait_for(task, STOP_TIMEOUT)
                except (TimeoutError, Exception):
                    log.warning("process source did not stop cleanly", extra={"source": name})
                return
            stopper.cancel()
            exc = task.exception() if not task.cancelled() else None
            log.error("process source failed, falling back", extra={"source": name, "error": repr(exc)})
        log.error("every process source failed; idling until stopped")
        await self._stop.wait()

    async def _shutdown(self) -> None:
        self.log_stats("final")
        for out in self.outputs:
            await out.close()
        if self.collector is not None:
            self.collector.hasher.shutdown()

    async def _flush_loop(self) -> None:
        """Aggregated findings whose count grew are re-emitted when their update interval has passed."""
        while True:
            await asyncio.sleep(1.0)
            if self.engine is not None:
                self.engine.flush()

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.stats_interval_s)
            self.log_stats("periodic")

    def stats(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out: dict[str, Any] = {
            "uptimeSeconds": round(time.monotonic() - self._started, 1),
            "cpuSeconds": round(usage.ru_utime + usage.ru_stime, 3),
            "maxRssKb": usage.ru_maxrss,
            "events": self.events_seen,
        }
        if self.collector is not None:
            out["processes"] = {**self.collector.stats, "live": len(self.collector.table)}
        if self.source is not None:
            out["source"] = {"name": self.source.name, **self.source.snapshot()}
        if self.aux is not None:
            out["eventSources"] = self.aux.snapshot()
        if self.engine is not None:
            out["detection"] = {**self.engine.snapshot(), "findingsEmitted": self.findings_emitted}
        out["outputs"] = {o.path: o.snapshot() for o in self.outputs}
        return out

    def log_stats(self, why: str) -> None:
        log.info("stats", extra={"why": why, "stats": self.stats()})


def run(settings: Settings, policy: Policy | None = None) -> int:
    return asyncio.run(Sidecar(settings, policy).run())

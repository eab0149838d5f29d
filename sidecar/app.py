"""The agent's event loop: probe, identity, process source, outputs, delivery, signals.

One asyncio process. The process source runs as a task; if it fails, the
sidecar falls back to the next source the probe allows (degrades) instead of
exiting, because a dead sidecar protects nothing.

With a collector URL, every finding goes into the spool (sidecar/spool.py) as
it is emitted, and three tasks talk to the backend: the shipper
(sidecar/shipper.py), heartbeats (sidecar/heartbeat.py) and the remote
configuration (sidecar/remote_config.py), which swaps the detection engine when
a new policy arrives. At SIGTERM the sources stop, the engine is flushed, the
shipper gets ``stop_flush_timeout_s`` to send what is spooled, a last heartbeat
says ``stopping``, and what could not be sent stays spooled for the next start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import orjson
from yarl import URL

from collectors.budget import CpuBudget
from collectors.events import RuntimeEvent
from collectors.exe_hash import ExeHasher
from collectors.proc_connector import ConnectorProcessSource
from collectors.proc_poll import PollingProcessSource
from collectors.process import ProcessCollector
from collectors.process_table import ProcessTable
from detectors.engine import DetectorEngine
from detectors.policy import Policy
from sidecar import __version__, ecs, health
from sidecar.config import Settings
from sidecar.detection import build_engine, load_policy, scope_of
from sidecar.event_shipper import EventShipper
from sidecar.heartbeat import Heartbeater, ResourceSampler, build_heartbeat, delivery_of, task_of
from sidecar.outputs import JsonLinesOutput
from sidecar.probe import choose_process_source, run_probe
from sidecar.remote_config import RemoteConfig
from sidecar.shipper import CollectorClient, Shipper
from sidecar.sources import NAMES, SourceSet
from sidecar.spool import Spool

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
        self.table: ProcessTable | None = None
        self.events_seen = 0
        self.events_by_kind: Counter[str] = Counter()
        # delivery to the collector (only with collector_url)
        self.spool: Spool | None = None
        self.client: CollectorClient | None = None
        self.shipper: Shipper | None = None
        self.heartbeater: Heartbeater | None = None
        self.event_shipper: EventShipper | None = None
        self.remote_config: RemoteConfig | None = None
        self.agent_id = "local"
        self.spool_errors = 0
        self.engine_swaps = 0
        self._resources = ResourceSampler()
        self._delivery_tasks: dict[str, asyncio.Task[None]] = {}
        self._delivery_runs: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {}
        self._stop = asyncio.Event()
        self._started = time.monotonic()

    # -- events -------------------------------------------------------------------
    def on_event(self, event: RuntimeEvent) -> None:
        self.events_seen += 1
        self.events_by_kind[event.kind] += 1
        raw = None
        if self.events_out is not None:
            raw = event.to_bytes()
            self.events_out.write_raw(raw)
        if self.event_shipper is not None and self.event_shipper.admit():
            self.event_shipper.push(raw if raw is not None else event.to_bytes())
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
        if self.spool is not None:
            # spooled before anything is sent: a crash from here on loses nothing
            try:
                self.spool.put(str(finding["id"]), float(finding.get("severity") or 0.0), line)
            except Exception:  # the detection path must never fail because of delivery
                self.spool_errors += 1
                if self.spool_errors == 1:
                    log.exception("cannot spool a finding")

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
        self.table = table
        self.engine = build_engine(s, self.identity, table, self.on_finding, self.policy)
        if s.collector_url:
            self._start_delivery(s.collector_url)
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
        # the container health check (`runtime-sidecar health`) reads what this writes every few seconds
        health_task = loop.create_task(health.HealthFile(s.state_dir).run(self.running_sources))
        try:
            await self._run_sources(candidates)
        finally:
            stats_task.cancel()
            flush_task.cancel()
            health_task.cancel()
            await asyncio.gather(health_task, return_exceptions=True)
            self.refresher.close()
            await self.aux.stop(STOP_TIMEOUT)
            if self.engine is not None:
                self.engine.flush(force=True)
            await self._stop_delivery()
            await self._shutdown()
        return 0

    # -- delivery to the collector ---------------------------------------------------------------------------------
    def _start_delivery(self, url: str) -> None:
        s = self.settings
        assert self.identity is not None
        self.agent_id = scope_of(self.identity).agent_id
        self.spool = Spool(
            s.spool_dir or os.path.join(s.state_dir, "spool"),
            max_bytes=s.spool_max_bytes,
            max_findings=s.spool_max_findings,
            memory_max_bytes=s.spool_memory_max_bytes,
        )
        token = s.token.get_secret_value() if s.token is not None else None
        if not token:
            log.warning("no agent token (RUNTIME_SIDECAR_TOKEN): the collector will refuse our findings")
        self.client = CollectorClient(url, token, ca_bundle=s.ca_bundle, user_agent=f"runtime-sidecar/{__version__}")
        self.shipper = Shipper(
            self.client,
            self.spool,
            self.agent_id,
            batch_max_findings=s.batch_max_findings,
            batch_max_age_s=s.batch_max_age_s,
        )
        if s.remote_config:
            self.remote_config = RemoteConfig(
                self.client,
                base_policy=self.policy,
                state_dir=s.state_dir,
                apply=self.apply_policy,
                interval_s=s.config_poll_interval_s,
            )
        self.heartbeater = Heartbeater(
            self.client,
            self._heartbeat,
            interval_s=s.heartbeat_interval_s,
            on_config_etag=self.remote_config.poke if self.remote_config is not None else None,
            on_accepted=self._heartbeat_accepted,
        )
        self._delivery_runs = {"shipper": self.shipper.run, "heartbeat": self.heartbeater.run}
        if s.ship_events:
            self.event_shipper = EventShipper(
                self.client, self.agent_id, task_of(self.identity), max_per_s=s.events_max_per_s
            )
            self._delivery_runs["events"] = self.event_shipper.run
        if self.remote_config is not None:
            self._delivery_runs["config"] = self.remote_config.run
        for name in self._delivery_runs:
            self._run_delivery_task(name)
        shown = str(URL(url).with_user(None))  # credentials in the URL are not for the logs
        extra = {"collector": shown, "agentId": self.agent_id, "spool": self.spool.snapshot()}
        log.info("delivering findings", extra=extra)

    def _run_delivery_task(self, name: str) -> None:
        if self._stop.is_set():
            return
        task = asyncio.get_running_loop().create_task(self._delivery_runs[name](), name=name)
        task.add_done_callback(self._delivery_task_ended)
        self._delivery_tasks[name] = task

    def _delivery_task_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # a bug in delivery must not end delivery for the rest of the task's life: log it, start again
        log.error(
            "delivery task failed, restarting it", extra={"task": task.get_name(), "error": repr(task.exception())}
        )
        asyncio.get_running_loop().call_later(5.0, self._run_delivery_task, task.get_name())

    def _heartbeat_accepted(self) -> None:
        # The token works again (rotated, or re-registered on the backend): findings refused with 401 need not
        # wait out the slow permanent-error retry.
        if self.shipper is not None and (self.shipper.permanent_error or "").startswith("HTTP 401"):
            self.shipper.wake()

    def _heartbeat(self, stopping: bool, interval_s: float) -> dict[str, Any]:
        assert self.identity is not None and self.spool is not None and self.shipper is not None
        rc = self.remote_config
        return build_heartbeat(
            agent_id=self.agent_id,
            agent_version=__version__,
            interval_s=interval_s,
            stopping=stopping,
            identity=self.identity,
            probe=self.probe,
            stats=self.stats(),
            delivery=delivery_of(self.findings_emitted, self.spool, self.shipper),
            resources=self._resources.sample(),
            config_etag=rc.etag if rc is not None else None,
            config_error=rc.error if rc is not None else None,
        )

    async def apply_policy(self, policy: Policy) -> None:
        """Swap the detection engine for one built with ``policy`` (a new remote configuration)."""
        assert self.identity is not None and self.table is not None
        loop = asyncio.get_running_loop()
        # reading and compiling threat lists can take a while: not on the loop
        new = await loop.run_in_executor(
            None, build_engine, self.settings, self.identity, self.table, self.on_finding, policy
        )
        if self.engine is not None:
            new.adopt(self.engine)
        self.engine = new
        self.engine_swaps += 1
        log.info("detection engine rebuilt", extra={"policy": policy.snapshot(), "swaps": self.engine_swaps})

    async def _stop_delivery(self) -> None:
        """SIGTERM: send what is spooled within stop_flush_timeout_s, then a last heartbeat; the rest stays
        spooled for the next start."""
        if self.shipper is None or self.spool is None or self.client is None:
            return
        budget = self.settings.stop_flush_timeout_s
        started = time.monotonic()
        for name in ("heartbeat", "config", "events"):
            task = self._delivery_tasks.get(name)
            if task is not None:
                task.cancel()
        sent_all = await self.shipper.drain(budget * 0.8)
        shipper_task = self._delivery_tasks.get("shipper")
        if shipper_task is not None:
            shipper_task.cancel()
        await asyncio.gather(*self._delivery_tasks.values(), return_exceptions=True)
        if self.heartbeater is not None:
            remaining = max(budget - (time.monotonic() - started), 0.2)
            await self.heartbeater.send(stopping=True, timeout_s=min(remaining, 3.0))
        await self.client.close()
        left = len(self.spool)
        self.spool.close()
        log.info(
            "delivery stopped",
            extra={"sentAll": sent_all, "leftInSpool": left, "shipper": self.shipper.snapshot()},
        )

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

    def running_sources(self) -> list[str]:
        names = list(self.aux.sources) if self.aux is not None else []
        return names + ([self.source.name] if self.source is not None else [])

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
            self.source = None  # a failed source is not running: the health check must not count it
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
        out["eventsByKind"] = dict(self.events_by_kind)
        out["outputs"] = {o.path: o.snapshot() for o in self.outputs}
        if self.spool is not None:
            out["delivery"] = self.delivery_stats()
        return out

    def delivery_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.spool is not None:
            out["spool"] = self.spool.snapshot()
        if self.shipper is not None:
            out["shipper"] = self.shipper.snapshot()
        if self.heartbeater is not None:
            out["heartbeat"] = self.heartbeater.snapshot()
        if self.remote_config is not None:
            out["config"] = self.remote_config.snapshot()
        if self.event_shipper is not None:
            out["events"] = self.event_shipper.snapshot()
        out["engineSwaps"] = self.engine_swaps
        if self.spool_errors:
            out["spoolErrors"] = self.spool_errors
        return out

    def log_stats(self, why: str) -> None:
        log.info("stats", extra={"why": why, "stats": self.stats()})


def run(settings: Settings, policy: Policy | None = None) -> int:
    return asyncio.run(Sidecar(settings, policy).run())

"""Heartbeats: the backend's view of each agent (coverage, health, what it could not see).

``POST /agent/v1/heartbeat`` every ``heartbeat_interval_s`` (60 s), the first
right at start, the last with ``stopping: true`` at task stop::

    {"agentId", "agentVersion", "sentAt", "intervalS", "stopping",
     "task": {"accountId", "region", "clusterName", "clusterArn", "taskArn", "taskDefinitionArn", "family",
              "launchType", "availabilityZone", "hostMode"},
     "sources": {"<source>": {"enabled", "detail"}},       # the probe's answers and what actually runs
     "counters": {"<name>": int},                          # events per kind, processes missed, kernel drops...
     "delivery": {"findingsEmitted", "findingsSent", "spooled", "spoolBytes", "dropped", "droppedBySeverity",
                  "lastError", "lastErrorAt", "permanentError"},
     "resources": {"cpuPercent", "rssBytes"},
     "configEtag", "configError"}                          # configError: ours, a refused remote config

The answer ``{"configEtag", "heartbeatIntervalS"}`` tells whether the remote
configuration changed (the config poller is then asked to look at once) and
may lengthen the interval (a loaded backend asks for fewer heartbeats; it
cannot ask for more than the configured rate, nor for less than one an hour).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from sidecar.ecs import TaskIdentity
from sidecar.shipper import CollectorClient, Shipper, TransportError, iso_now
from sidecar.spool import Spool

log = logging.getLogger("sidecar.heartbeat")

HEARTBEAT_PATH = "/agent/v1/heartbeat"
MAX_COUNTERS = 300
_PAGE = os.sysconf("SC_PAGE_SIZE")


class ResourceSampler:
    """CPU percent of one core since the previous sample (since start for the first) and current RSS."""

    def __init__(self) -> None:
        self._cpu = 0.0
        self._wall = time.monotonic() - _uptime()

    def sample(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = usage.ru_utime + usage.ru_stime
        wall = time.monotonic()
        elapsed = wall - self._wall
        pct = 100.0 * (cpu - self._cpu) / elapsed if elapsed > 0 else 0.0
        self._cpu, self._wall = cpu, wall
        return {"cpuPercent": round(max(pct, 0.0), 2), "rssBytes": rss_bytes()}


def _uptime() -> float:
    """Seconds this process has run (from /proc/self/stat), so the first sample covers the start-up."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/uptime", "rb") as f:
            system_up = float(f.read().split()[0])
        return max(system_up - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 0.001)
    except (OSError, ValueError, IndexError):
        return 0.001


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def task_of(identity: TaskIdentity) -> dict[str, Any]:
    definition = None
    if identity.family and identity.revision:
        definition = (
            f"arn:{identity.partition}:ecs:{identity.region}:{identity.account_id}:"
            f"task-definition/{identity.family}:{identity.revision}"
        )
    launch = (identity.launch_type or "").upper()
    return {
        "accountId": identity.account_id,
        "region": identity.region,
        "clusterName": identity.cluster_name,
        "clusterArn": identity.cluster_arn or None,
        "taskArn": identity.task_arn,
        "taskDefinitionArn": definition,
        "family": identity.family,
        "launchType": launch if launch in ("FARGATE", "EC2") else None,
        "availabilityZone": identity.availability_zone,
        "hostMode": identity.is_local,
    }


def sources_of(probe: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each source of the probe: whether it runs now, and the probe's reason (or why it stopped)."""
    running_process = (stats.get("source") or {}).get("name")
    event_sources = stats.get("eventSources") or {}
    out: dict[str, dict[str, Any]] = {}
    for name, report in (probe.get("sources") or {}).items():
        detail = report.get("reason") or None
        if name in ("proc_connector", "proc_poll"):
            enabled = name == running_process
        else:
            state = event_sources.get(name)
            enabled = state is not None and "off" not in state
            if state is not None and "off" in state:
                detail = str(state["off"])
        out[name] = {"enabled": bool(enabled), "detail": detail}
    return out


def counters_of(stats: Mapping[str, Any]) -> dict[str, int]:
    """The integer counters of the sidecar's stats, flattened to dotted names, with the ones operators look
    for first under plain names."""
    out: dict[str, int] = {}

    def walk(prefix: str, value: Any) -> None:
        if len(out) >= MAX_COUNTERS:
            return
        if isinstance(value, bool):
            return
        if isinstance(value, int):
            out[prefix] = value
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    processes = stats.get("processes") or {}
    packet = (stats.get("eventSources") or {}).get("packet") or {}
    out["events"] = int(stats.get("events") or 0)
    out["processesMissed"] = int(processes.get("processes_missed") or 0)
    out["packetsDroppedByKernel"] = int(packet.get("kernel_drops") or 0)
    for key in ("eventsByKind", "processes", "source", "eventSources"):
        walk(key, stats.get(key))
    detection = stats.get("detection") or {}
    walk("detection", {k: v for k, v in detection.items() if k in ("events", "aggregator", "suppressed", "errors")})
    return out


def delivery_of(findings_emitted: int, spool: Spool, shipper: Shipper) -> dict[str, Any]:
    s = spool.snapshot()
    return {
        "findingsEmitted": findings_emitted,
        "findingsSent": shipper.counters["findingsSent"],
        "spooled": s["spooled"],
        "spoolBytes": s["spoolBytes"],
        "dropped": s["dropped"],
        "droppedBySeverity": dict(s["droppedBySeverity"]),
        "lastError": shipper.last_error,
        "lastErrorAt": shipper.last_error_at,
        "permanentError": shipper.permanent_error,
    }


def build_heartbeat(
    *,
    agent_id: str,
    agent_version: str,
    interval_s: float,
    stopping: bool,
    identity: TaskIdentity,
    probe: Mapping[str, Any],
    stats: Mapping[str, Any],
    delivery: dict[str, Any],
    resources: dict[str, Any],
    config_etag: str | None,
    config_error: str | None,
) -> dict[str, Any]:
    return {
        "agentId": agent_id,
        "agentVersion": agent_version,
        "sentAt": iso_now(),
        "intervalS": interval_s,
        "stopping": stopping,
        "task": task_of(identity),
        "sources": sources_of(probe, stats),
        "counters": counters_of(stats),
        "delivery": delivery,
        "resources": resources,
        "configEtag": config_etag,
        "configError": config_error,
    }


class Heartbeater:
    """Sends the heartbeat ``payload(stopping, interval_s)`` builds, at start and every interval."""

    def __init__(
        self,
        client: CollectorClient,
        payload: Callable[[bool, float], dict[str, Any]],
        *,
        interval_s: float = 60.0,
        on_config_etag: Callable[[str], None] | None = None,
        on_accepted: Callable[[], None] | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.client = client
        self.payload = payload
        self.interval_s = interval_s
        self.configured_interval_s = interval_s
        self.on_config_etag = on_config_etag
        self.on_accepted = on_accepted
        self.timeout_s = timeout_s
        self.sent = 0
        self.failed = 0
        self.last_error: str | None = None
        self._logged: set[str] = set()

    async def run(self) -> None:
        while True:
            await self.send()
            await asyncio.sleep(self.interval_s)

    async def send(self, *, stopping: bool = False, timeout_s: float | None = None) -> bool:
        body = orjson.dumps(self.payload(stopping, self.interval_s))
        try:
            reply = await self.client.request(
                "POST",
                HEARTBEAT_PATH,
                body=body,
                headers={"Content-Type": "application/json"},
                timeout_s=timeout_s if timeout_s is not None else self.timeout_s,
            )
        except TransportError as exc:
            return self._failed(str(exc), logging.WARNING)
        if reply.status != 200:
            level = logging.ERROR if reply.status in (400, 401, 403) else logging.WARNING
            return self._failed(f"HTTP {reply.status}: {self.client.redact(reply.message())}", level)
        self.sent += 1
        self.last_error = None
        if self.on_accepted is not None:
            self.on_accepted()
        answer = reply.json()
        if isinstance(answer, dict):
            interval = answer.get("heartbeatIntervalS")
            if isinstance(interval, int | float) and not isinstance(interval, bool):
                # the backend may ask for fewer heartbeats (load), never for more than the operator configured
                self.interval_s = max(self.configured_interval_s, min(float(interval), 3600.0))
            etag = answer.get("configEtag")
            if isinstance(etag, str) and self.on_config_etag is not None:
                self.on_config_etag(etag)
        return True

    def _failed(self, error: str, level: int) -> bool:
        self.failed += 1
        self.last_error = error
        if error not in self._logged:
            if len(self._logged) > 100:
                self._logged.clear()
            self._logged.add(error)
            log.log(level, "heartbeat not delivered", extra={"error": error})
        return False

    def snapshot(self) -> dict[str, Any]:
        return {"sent": self.sent, "failed": self.failed, "intervalS": self.interval_s, "lastError": self.last_error}

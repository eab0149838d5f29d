"""Runtime events to the backend, for the investigation timeline of a task (the console's finding detail).

Findings must arrive; events are context: best effort, bounded, never in the way. Each event's JSON (as
``--events-out`` writes it) goes into a bounded buffer through a token bucket (``events_max_per_s``, bursts of
one second's worth); what does not fit is counted as dropped and the count travels with the next batch. Every
``interval_s`` up to ``MAX_BATCH`` events are posted to ``/agent/v1/events`` (gzip). A transient failure keeps
the batch for the next round (once); a permanent one (400/401/403) drops it and counts it: the shipper of
findings, not this, reports delivery problems loudly.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from sidecar.shipper import CollectorClient, TransportError

log = logging.getLogger("sidecar.events")

EVENTS_PATH = "/agent/v1/events"
MAX_BATCH = 2000
# what the backend's timeline holds per task: more events than this in a batch would only be pruned there
MAX_BUFFER = 10_000


class EventShipper:
    def __init__(
        self,
        client: CollectorClient,
        agent_id: str,
        task: dict[str, Any],
        *,
        max_per_s: float = 200.0,
        interval_s: float = 2.0,
        max_buffer: int = MAX_BUFFER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.agent_id = agent_id
        self.task = task
        self.max_per_s = max_per_s
        self.interval_s = interval_s
        self.clock = clock
        self._buffer: deque[bytes] = deque(maxlen=max_buffer)
        self._tokens = max_per_s
        self._last = clock()
        self._retry: list[bytes] | None = None
        self._dropped_unsent = 0  # not yet told to the backend
        self.counters = {"eventsQueued": 0, "eventsSent": 0, "eventsDropped": 0, "batches": 0, "failures": 0}

    def admit(self) -> bool:
        """Whether the next event may be queued (it then must be, with push); a refusal is counted as a drop.

        Asked before the event is serialized: under a storm most events are refused, and serializing them would
        be the task's CPU spent for nothing."""
        now = self.clock()
        self._tokens = min(self.max_per_s, self._tokens + (now - self._last) * self.max_per_s)
        self._last = now
        if self._tokens < 1 or len(self._buffer) == self._buffer.maxlen:
            self._drop(1)
            return False
        self._tokens -= 1
        return True

    def push(self, event_json: bytes) -> None:
        self._buffer.append(event_json)
        self.counters["eventsQueued"] += 1

    def offer(self, event_json: bytes) -> None:
        """admit + push, for an event already serialized: O(1), never raises, never blocks."""
        if self.admit():
            self.push(event_json)

    def _drop(self, n: int) -> None:
        self.counters["eventsDropped"] += n
        self._dropped_unsent += n

    def _body(self, events: list[bytes]) -> bytes:
        head = orjson.dumps({"agentId": self.agent_id, "task": self.task, "dropped": self._dropped_unsent})
        return gzip.compress(head[:-1] + b',"events":[' + b",".join(events) + b"]}", compresslevel=5, mtime=0)

    async def send_once(self) -> None:
        batch = self._retry
        self._retry = None
        retrying = batch is not None
        if batch is None:
            batch = [self._buffer.popleft() for _ in range(min(MAX_BATCH, len(self._buffer)))]
        if not batch:
            return
        dropped_told = self._dropped_unsent
        body = await asyncio.get_running_loop().run_in_executor(None, self._body, batch)
        try:
            reply = await self.client.request(
                "POST", EVENTS_PATH, body=body,
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}, timeout_s=30,
            )  # fmt: skip
            status = reply.status
        except TransportError:
            status = 0
        if status == 200:
            self.counters["eventsSent"] += len(batch)
            self.counters["batches"] += 1
            self._dropped_unsent -= dropped_told
            return
        self.counters["failures"] += 1
        if (status == 0 or status >= 500 or status == 429) and not retrying:
            self._retry = batch  # one more try, next round
        else:
            self._drop(len(batch))
            if status not in (0, 429) and status < 500:
                log.debug("events refused", extra={"status": status})

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.send_once()

    def snapshot(self) -> dict[str, Any]:
        return {**self.counters, "buffered": len(self._buffer)}

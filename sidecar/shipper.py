"""Delivery of spooled findings to the backend: the collector client and the Shipper.

The agent API (version 1; the backend implements the server side)::

    POST /agent/v1/findings   Authorization: Bearer <RUNTIME_SIDECAR_TOKEN>, Content-Encoding: gzip
      {"batchId": "<uuid4 hex, stable across retries>", "agentId": "...", "findings": [<finding>...]}
      200 {"accepted", "new", "updated", "unchanged"}   stored (the same batch twice stores nothing twice)
      400 / 401 / 403 {"error": ...}                     permanent: malformed / bad token / other account
      413 {"error", "maxBytes", "maxFindings"}           too large: split the batch in halves
      429 / 503 + Retry-After                            transient: retry after that delay
      other 5xx, connection errors, timeouts             transient

How the Shipper behaves:

- Findings are spooled first (:class:`~sidecar.spool.Spool`), and sent from the
  spool: a crash loses nothing, and only the latest version of an aggregated
  finding is sent.
- A batch closes at ``batch_max_findings`` findings or when its oldest finding
  has waited ``batch_max_age_s``. Its content and ``batchId`` are frozen until
  the backend answers for it, so a retry is the same batch (the backend
  dedupes it); an update that arrives meanwhile goes in a later batch.
- Transient failures back off exponentially with full jitter (0.5 s doubling
  up to 60 s); 429/503 wait what ``Retry-After`` says. 413 splits the batch in
  halves; a single finding too large even alone is dropped and counted.
- Permanent failures (400/401/403, and other 4xx: a wrong URL) are logged once
  per distinct error with the server's message (never the token), keep the
  findings in the spool (up to its bound), and are retried every
  ``permanent_retry_s`` (5 min) or when :meth:`Shipper.wake` is called: never
  a hot loop. Detection goes on meanwhile. Except a 400 that names one finding
  (``"field": "findings[3]..."``): that finding is set aside in
  ``<spool dir>/rejected/<id>.json`` with the reason, counted as rejected, and
  the rest of the batch goes at once: one bad finding does not block a task.
- Compression runs in the default executor for large batches, sending is
  async: nothing of it runs on the detection path.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gzip
import logging
import os
import random
import re
import ssl
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from sidecar.spool import Spool, SpoolItem

log = logging.getLogger("sidecar.shipper")

FINDINGS_PATH = "/agent/v1/findings"
# Uncompressed JSON per batch: well under the backend's 4 MiB as sent and 32 MiB decompressed.
BATCH_MAX_BYTES = 2 << 20
# Compressing more than this on the event loop would hold up event processing for milliseconds.
INLINE_GZIP_BYTES = 64 << 10
# Answers are small JSON; anything bigger is not the collector talking.
MAX_REPLY_BYTES = 1 << 20
MAX_RETRY_AFTER_S = 600.0


def iso_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class TransportError(Exception):
    """No HTTP answer: connection refused or reset, TLS failure, timeout."""


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return orjson.loads(self.body) if self.body else None
        except orjson.JSONDecodeError:
            return None

    def message(self) -> str:
        """The server's error message, or a bit of the body."""
        data = self.json()
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            msg = str(data["error"])
            if isinstance(data.get("field"), str):
                msg += f" (field {data['field']})"
            return msg[:500]
        return self.body[:200].decode("utf-8", "replace") or f"HTTP {self.status}"


class CollectorClient:
    """One aiohttp session to the backend's collector API, shared by the shipper, heartbeats and remote config.

    The bearer token goes only into the Authorization header; :meth:`redact` removes it from any text
    (a server message) before it is logged.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        ca_bundle: str | None = None,
        user_agent: str = "runtime-sidecar",
        connection_limit: int = 2,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token or None
        self._ca_bundle = ca_bundle
        self._user_agent = user_agent
        self._limit = connection_limit
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0

    @property
    def has_token(self) -> bool:
        return self._token is not None

    def redact(self, text: str) -> str:
        return text.replace(self._token, "<token>") if self._token else text

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.base_url.startswith("https://"):
            return False
        # Verification stays on; a private CA is added, never a way to turn checks off.
        return ssl.create_default_context(cafile=self._ca_bundle)

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._limit, ssl=self._ssl(), enable_cleanup_closed=True)
            headers = {"User-Agent": self._user_agent, "Accept": "application/json"}
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            # trust_env off: an HTTP(S)_PROXY meant for the app container must not reroute findings
            self._session = aiohttp.ClientSession(connector=connector, headers=headers, raise_for_status=False)
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
    ) -> Reply:
        self.requests += 1
        try:
            session = self._open()  # a CA bundle that went missing fails here, like any TLS problem
            async with session.request(
                method,
                self.base_url + path,
                data=body,
                headers=dict(headers or {}),
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,
            ) as resp:
                data = await resp.content.read(MAX_REPLY_BYTES)
                return Reply(resp.status, dict(resp.headers), data)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            text = str(exc) or type(exc).__name__
            raise TransportError(self.redact(f"{type(exc).__name__}: {text}")) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _fsync_quietly(fd: int) -> None:
    # a segment deleted meanwhile (EBADF) has nothing left worth syncing
    with contextlib.suppress(OSError):
        os.fsync(fd)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), bounded."""
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


MAX_REJECTED_KEPT = 100
_FINDING_FIELD = re.compile(r"^findings\[(\d+)\]")


def _rejected_index(reply: Reply, batch_len: int) -> int | None:
    """The batch position of the one finding a 400 names (``"field": "findings[3].severity"``), if it names one."""
    data = reply.json()
    field_name = data.get("field") if isinstance(data, dict) else None
    m = _FINDING_FIELD.match(field_name) if isinstance(field_name, str) else None
    if m is None or int(m.group(1)) >= batch_len:
        return None
    return int(m.group(1))


@dataclass(slots=True)
class Batch:
    items: list[SpoolItem]
    batch_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    attempts: int = 0
    body: bytes | None = None  # gzip-compressed, built once: retries send the same bytes


class Shipper:
    def __init__(
        self,
        client: CollectorClient,
        spool: Spool,
        agent_id: str,
        *,
        batch_max_findings: int = 100,
        batch_max_age_s: float = 2.0,
        batch_max_bytes: int = BATCH_MAX_BYTES,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 60.0,
        permanent_retry_s: float = 300.0,
        request_timeout_s: float = 30.0,
        sync_interval_s: float = 1.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.client = client
        self.spool = spool
        self.agent_id = agent_id
        self.batch_max_findings = batch_max_findings
        self.batch_max_age_s = batch_max_age_s
        self.batch_max_bytes = batch_max_bytes
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.permanent_retry_s = permanent_retry_s
        self.request_timeout_s = request_timeout_s
        self.sync_interval_s = sync_interval_s
        self.jitter = jitter
        self._pending: deque[Batch] = deque()
        self._wakeup = asyncio.Event()
        self._retry_now = asyncio.Event()
        self._flushing = False
        self._failures = 0  # consecutive transient failures
        self._logged: set[str] = set()
        self.counters: dict[str, int] = {
            "findingsSent": 0,
            "batchesSent": 0,
            "requests": 0,
            "retries": 0,
            "splits": 0,
            "transientErrors": 0,
            "permanentErrors": 0,
        }
        self.last_error: str | None = None
        self.last_error_at: str | None = None
        self.permanent_error: str | None = None
        self.state = "idle"
        spool.on_put = self._on_put

    # -- wake-ups -----------------------------------------------------------------------------------------------
    def _on_put(self) -> None:
        n = len(self.spool)
        if n == 1 or n >= self.batch_max_findings or self._flushing:
            self._wakeup.set()

    def wake(self) -> None:
        """Retry now, even after a permanent error (a new token or configuration may have fixed it)."""
        self._retry_now.set()
        self._wakeup.set()

    # -- the loop -----------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Send until cancelled."""
        sync_task = asyncio.get_running_loop().create_task(self._sync_loop(), name="spool-sync")
        try:
            while True:
                batch = await self._next_batch()
                await self._deliver(batch)
        finally:
            sync_task.cancel()

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.sync_interval_s)
            fd = self.spool.take_dirty_fd()
            if fd is not None:
                await loop.run_in_executor(None, _fsync_quietly, fd)

    async def _next_batch(self) -> Batch:
        while True:
            if self._pending:
                return self._pending[0]
            n = len(self.spool)
            timeout: float | None = None
            if n:
                age = self.spool.oldest_age() or 0.0
                if n >= self.batch_max_findings or age >= self.batch_max_age_s or self._flushing:
                    items = self.spool.peek(self.batch_max_findings, self.batch_max_bytes)
                    if items:
                        batch = Batch(items)
                        self._pending.append(batch)
                        return batch
                    continue
                timeout = self.batch_max_age_s - age
            self.state = "idle"
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    def _body(self, batch: Batch) -> bytes:
        head = b'{"batchId":"' + batch.batch_id.encode() + b'","agentId":' + orjson.dumps(self.agent_id)
        return head + b',"findings":[' + b",".join(item.data for item in batch.items) + b"]}"

    async def _compressed(self, batch: Batch) -> bytes:
        if batch.body is None:
            raw = self._body(batch)
            if len(raw) <= INLINE_GZIP_BYTES:
                batch.body = gzip.compress(raw, compresslevel=5, mtime=0)
            else:
                loop = asyncio.get_running_loop()
                batch.body = await loop.run_in_executor(None, lambda: gzip.compress(raw, compresslevel=5, mtime=0))
        return batch.body

    async def _deliver(self, batch: Batch) -> None:
        self._retry_now.clear()  # a wake() from now on cuts the wait after this attempt short
        body = await self._compressed(batch)
        if batch.attempts:
            self.counters["retries"] += 1
        batch.attempts += 1
        self.counters["requests"] += 1
        self.state = "sending"
        try:
            reply = await self.client.request(
                "POST",
                FINDINGS_PATH,
                body=body,
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
                timeout_s=self.request_timeout_s,
            )
        except TransportError as exc:
            await self._transient(str(exc), None)
            return
        status = reply.status
        if status == 200:
            self._delivered(batch)
        elif status == 413:
            self._split(batch, reply)
        elif status == 400 and (index := _rejected_index(reply, len(batch.items))) is not None:
            self._reject_one(batch, index, self.client.redact(reply.message()))
        elif status in (429, 503) or status >= 500 or status == 408:
            await self._transient(f"HTTP {status}: {self.client.redact(reply.message())}", retry_after(reply.headers))
        else:
            await self._permanent(status, self.client.redact(reply.message()))

    def _delivered(self, batch: Batch) -> None:
        self._pending.popleft()
        self.spool.ack([item.seq for item in batch.items])
        self.counters["findingsSent"] += len(batch.items)
        self.counters["batchesSent"] += 1
        if self._failures or self.permanent_error:
            log.info(
                "findings delivered again",
                extra={"after": self.last_error, "failedAttempts": self._failures, "spooled": len(self.spool)},
            )
        self._failures = 0
        self.permanent_error = None
        self.state = "ok"

    def _split(self, batch: Batch, reply: Reply) -> None:
        self._pending.popleft()
        if len(batch.items) == 1:
            self.spool.discard(batch.items[0].seq, f"HTTP 413 even alone: {self.client.redact(reply.message())}")
            return
        half = len(batch.items) // 2
        self._pending.extendleft([Batch(batch.items[half:]), Batch(batch.items[:half])])
        self.counters["splits"] += 1
        log.info("batch too large for the backend, split in halves", extra={"findings": len(batch.items)})

    def _reject_one(self, batch: Batch, index: int, message: str) -> None:
        """The backend named one finding it cannot read: set it aside for inspection and send the others now.

        One malformed finding (a bug of ours, or a schema the backend does not know yet) must not hold every
        other finding of the task back until someone fixes it.
        """
        self._pending.popleft()
        item = batch.items[index]
        self._keep_rejected(item, message)
        self.spool.discard(item.seq, f"HTTP 400: {message}")
        rest = [it for i, it in enumerate(batch.items) if i != index]
        if rest:
            self._pending.appendleft(Batch(rest))
        self._note_error(f"HTTP 400: {message}")

    def _keep_rejected(self, item: SpoolItem, message: str) -> None:
        """``<spool dir>/rejected/<id>.json``: the finding and why, at most MAX_REJECTED_KEPT files."""
        directory = self.spool.directory
        if directory is None or self.spool.memory_only:
            return
        where = directory / "rejected"
        try:
            where.mkdir(exist_ok=True)
            if sum(1 for _ in where.iterdir()) >= MAX_REJECTED_KEPT:
                return
            name = "".join(c for c in item.fid if c.isalnum() or c in "-_")[:64] or "finding"
            (where / f"{name}.json").write_bytes(
                orjson.dumps({"error": message, "finding": orjson.loads(item.data)}, option=orjson.OPT_INDENT_2)
            )
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning("cannot keep a rejected finding for inspection", extra={"error": str(exc)})

    def _note_error(self, error: str) -> None:
        self.last_error = error
        self.last_error_at = iso_now()

    async def _transient(self, error: str, delay: float | None) -> None:
        self._note_error(error)
        self.counters["transientErrors"] += 1
        self._failures += 1
        self.state = "retrying"
        if self._failures == 1:
            log.warning("cannot deliver findings, retrying", extra={"error": error, "spooled": len(self.spool)})
        honour = delay is not None
        if delay is None:
            # full jitter: concurrent sidecars coming back from one outage do not retry in step
            delay = self.jitter() * min(self.backoff_cap_s, self.backoff_base_s * 2 ** min(self._failures - 1, 30))
        await self._sleep(delay, interruptible=not honour)

    async def _permanent(self, status: int, message: str) -> None:
        error = f"HTTP {status}: {message}"
        self._note_error(error)
        self.permanent_error = error
        self.counters["permanentErrors"] += 1
        self.state = "refused"
        if error not in self._logged:
            if len(self._logged) > 100:
                self._logged.clear()
            self._logged.add(error)
            log.error(
                "the backend refuses our findings; they stay spooled and detection goes on",
                extra={
                    "status": status,
                    "error": message,
                    "retryInS": self.permanent_retry_s,
                    "spooled": len(self.spool),
                    "hint": "check RUNTIME_SIDECAR_TOKEN and the collector URL"
                    if status in (401, 403, 404)
                    else "the backend could not read a finding: report it",
                },
            )
        await self._sleep(self.permanent_retry_s, interruptible=True)

    async def _sleep(self, delay: float, *, interruptible: bool) -> None:
        if delay <= 0:
            return
        if not interruptible:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._retry_now.wait(), delay)

    # -- stopping -------------------------------------------------------------------------------------------------
    async def drain(self, budget_s: float) -> bool:
        """At task stop: close batches at once and send what is spooled for up to ``budget_s`` seconds.
        True if nothing is left. The caller then cancels :meth:`run` (what is left stays spooled)."""
        self._flushing = True
        self.wake()
        deadline = time.monotonic() + budget_s
        requests_before = self.counters["requests"]
        while (len(self.spool) or self._pending) and time.monotonic() < deadline:
            if self.permanent_error is not None and self.counters["requests"] > requests_before:
                break  # refused again: waiting out the budget would only delay the exit
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return not len(self.spool) and not self._pending

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.counters,
            "state": self.state,
            "pendingBatches": len(self._pending),
            "lastError": self.last_error,
            "lastErrorAt": self.last_error_at,
            "permanentError": self.permanent_error,
        }

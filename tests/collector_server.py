"""A small real collector for the shipper's protocol tests: the agent API (version 1) on 127.0.0.1.

It runs an aiohttp server in a thread of its own (usable from sync tests driving the real sidecar process and
from async tests driving a Shipper), answers as the contract says, and records what it got:

    with CollectorServer(token="t0k") as server:
        ... point the shipper at server.url ...
        server.wait_until(lambda s: len(s.stored) == 3)
        assert set(server.stored.values()) == {1}       # every finding id stored exactly once

Knobs (set them any time, they apply to the next requests): ``fail_next`` (503 + Retry-After),
``throttle_next`` (429 + Retry-After), ``reject_status`` (400/401/403 for every findings request),
``max_findings`` (413 above it), ``drop_after_store_next`` / ``drop_before_store_next`` (the connection is
closed without an answer, after or before the batch was stored), ``delay_s`` (slow answers). ``stop()`` and
``start()`` again take it down and bring it back on the same port.

A batch id seen before is answered from the first answer and stores nothing (the contract's idempotency), so
``stored[id]`` counts deliveries that reached storage; ``batch_ids`` counts every arrival of each batch id.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from detectors.finding import Finding


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HeartbeatTask(_Strict):
    accountId: str
    region: str
    clusterName: str
    clusterArn: str | None
    taskArn: str
    taskDefinitionArn: str | None
    family: str | None
    launchType: Literal["FARGATE", "EC2"] | None
    availabilityZone: str | None
    hostMode: bool


class HeartbeatSource(_Strict):
    enabled: bool
    detail: str | None


class HeartbeatDelivery(_Strict):
    findingsEmitted: int
    findingsSent: int
    spooled: int
    spoolBytes: int
    dropped: int
    droppedBySeverity: dict[Literal["LOW", "MEDIUM", "HIGH", "CRITICAL"], int]
    lastError: str | None
    lastErrorAt: str | None
    permanentError: str | None


class HeartbeatResources(_Strict):
    cpuPercent: float
    rssBytes: int


class Heartbeat(_Strict):
    """POST /agent/v1/heartbeat as the contract (tmp brief agent_api.md) has it, plus ``configError``."""

    agentId: str
    agentVersion: str
    sentAt: str
    intervalS: float
    stopping: bool
    task: HeartbeatTask
    sources: dict[str, HeartbeatSource]
    counters: dict[str, int]
    delivery: HeartbeatDelivery
    resources: HeartbeatResources
    configEtag: str | None
    configError: str | None = None


@dataclass
class RequestRecord:
    method: str
    path: str
    status: int  # 0: the connection was closed without an answer
    at: float
    batch_id: str | None = None
    findings: int = 0
    gzip: bool = False
    authorization: str | None = None
    if_none_match: str | None = None


class CollectorServer:
    def __init__(
        self, token: str = "test-token", *, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None
    ) -> None:
        self.token = token
        self.tls = tls
        self.host = host
        self.port = port
        self.lock = threading.RLock()
        # knobs
        self.fail_next = 0
        self.throttle_next = 0
        self.retry_after = "1"
        self.reject_status: int | None = None
        self.reject_message = "rejected by the test"
        self.max_findings: int | None = None
        self.drop_after_store_next = 0
        self.drop_before_store_next = 0
        self.delay_s = 0.0
        self.heartbeat_interval_s = 60
        # records
        self.requests: list[RequestRecord] = []
        self.stored: Counter[str] = Counter()  # finding id -> times stored
        self.counts: dict[str, list[int]] = {}  # finding id -> service.count of each stored version
        self.findings: dict[str, dict[str, Any]] = {}  # latest stored version
        self.batch_ids: Counter[str] = Counter()
        self.batch_answers: dict[str, dict[str, int]] = {}
        self.heartbeats: list[dict[str, Any]] = []
        self.heartbeat_errors: list[str] = []
        self.config: dict[str, Any] | None = None
        self.config_etag: str | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None

    # -- life cycle -------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def __enter__(self) -> CollectorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> CollectorServer:
        ready = threading.Event()
        problem: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start_site())
            except BaseException as exc:  # reported to start()'s caller
                problem.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            assert self._runner is not None
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="collector-server", daemon=True)
        self._thread.start()
        if not ready.wait(10) or problem:
            raise RuntimeError(f"collector server did not start: {problem}")
        return self

    async def _start_site(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/agent/v1/findings", self._findings)
        app.router.add_post("/agent/v1/heartbeat", self._heartbeat)
        app.router.add_get("/agent/v1/config", self._config)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True, ssl_context=self.tls)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        """Down: the port refuses connections until start() again."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = None
        self._thread = None

    # -- configuration served -------------------------------------------------------------------------------------
    def set_config(
        self,
        policy: dict[str, Any] | None = None,
        threat_lists: list[dict[str, Any]] | None = None,
        trusted_lists: list[dict[str, Any]] | None = None,
        *,
        raw: dict[str, Any] | None = None,
    ) -> str:
        """Serve this configuration from now on; returns its etag. ``raw`` serves a body as given."""
        body = raw if raw is not None else {"policy": policy or {}, "threatLists": threat_lists or [],
                                            "trustedLists": trusted_lists or []}  # fmt: skip
        etag = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
        with self.lock:
            self.config = {"etag": etag, **body} if raw is None else body
            self.config_etag = etag
        return etag

    # -- reading the records (from any thread) -----------------------------------------------------------------
    def findings_requests(self) -> list[RequestRecord]:
        with self.lock:
            return [r for r in self.requests if r.path == "/agent/v1/findings"]

    def wait_until(self, predicate: Callable[[CollectorServer], object], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if predicate(self):
                    return
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"collector: condition not met in {timeout}s; stored={dict(self.stored)} "
                    f"requests={[(r.path, r.status) for r in self.requests][-20:]}"
                )
            time.sleep(0.02)

    async def await_until(self, predicate: Callable[[CollectorServer], object], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if predicate(self):
                    return
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"collector: condition not met in {timeout}s; stored={dict(self.stored)} "
                    f"requests={[(r.path, r.status) for r in self.requests][-20:]}"
                )
            await asyncio.sleep(0.02)

    # -- handlers ---------------------------------------------------------------------------------------------------
    def _record(self, request: web.Request, status: int, **extra: Any) -> RequestRecord:
        rec = RequestRecord(
            request.method,
            request.path,
            status,
            time.monotonic(),
            authorization=request.headers.get("Authorization"),
            if_none_match=request.headers.get("If-None-Match"),
            gzip=request.headers.get("Content-Encoding") == "gzip",
            **extra,
        )
        with self.lock:
            self.requests.append(rec)
        return rec

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    @staticmethod
    def _error(status: int, message: str, **extra: Any) -> web.Response:
        return web.json_response({"error": message, **extra}, status=status, dumps=lambda o: orjson.dumps(o).decode())

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        # aiohttp's parser already inflates a gzip Content-Encoding; a body still gzipped was compressed twice
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return orjson.loads(raw)

    @staticmethod
    def _abort(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.abort()
        return web.Response(status=500)  # never reaches the client

    async def _findings(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            self._record(request, 401)
            return self._error(401, "unknown agent token")
        try:
            body = await self._body(request)
            batch_id = body["batchId"]
            findings = body["findings"]
            assert isinstance(batch_id, str) and isinstance(findings, list) and isinstance(body["agentId"], str)
        except (ValueError, KeyError, AssertionError, OSError) as exc:
            self._record(request, 400)
            return self._error(400, f"malformed batch: {exc!r}")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)  # a slow backend: the batch is stored even if the client gave up
        with self.lock:
            self.batch_ids[batch_id] += 1
            drop_before = self.drop_before_store_next > 0
            if drop_before:
                self.drop_before_store_next -= 1
            fail = self.fail_next > 0
            if fail and not drop_before:
                self.fail_next -= 1
            throttle = self.throttle_next > 0 and not fail and not drop_before
            if throttle:
                self.throttle_next -= 1
        n = len(findings)
        if drop_before:
            self._record(request, 0, batch_id=batch_id, findings=n)
            return self._abort(request)
        if fail or throttle:
            status = 503 if fail else 429
            self._record(request, status, batch_id=batch_id, findings=n)
            resp = self._error(status, "try again later")
            resp.headers["Retry-After"] = self.retry_after
            return resp
        if self.reject_status is not None:
            self._record(request, self.reject_status, batch_id=batch_id, findings=n)
            return self._error(self.reject_status, self.reject_message)
        if self.max_findings is not None and n > self.max_findings:
            self._record(request, 413, batch_id=batch_id, findings=n)
            return self._error(413, "batch too large", maxBytes=4 << 20, maxFindings=self.max_findings)
        for i, f in enumerate(findings):
            try:
                Finding.parse(f)
            except ValidationError as exc:
                self._record(request, 400, batch_id=batch_id, findings=n)
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                return self._error(400, err["msg"], field=f"findings[{i}].{where}")
        with self.lock:
            answer = self.batch_answers.get(batch_id)
            if answer is None:
                new = updated = unchanged = 0
                for f in findings:
                    fid = f["id"]
                    count = f["service"]["count"]
                    seen = self.counts.setdefault(fid, [])
                    if seen and seen[-1] >= count:
                        unchanged += 1
                    else:
                        new += not seen
                        updated += bool(seen)
                    seen.append(count)
                    self.stored[fid] += 1
                    self.findings[fid] = f
                answer = {"accepted": n, "new": new, "updated": updated, "unchanged": unchanged}
                self.batch_answers[batch_id] = answer
            else:
                answer = {"accepted": n, "new": 0, "updated": 0, "unchanged": n}
            drop_after = self.drop_after_store_next > 0
            if drop_after:
                self.drop_after_store_next -= 1
        if drop_after:
            self._record(request, 0, batch_id=batch_id, findings=n)
            return self._abort(request)
        self._record(request, 200, batch_id=batch_id, findings=n)
        return web.json_response(answer)

    async def _heartbeat(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            self._record(request, 401)
            return self._error(401, "unknown agent token")
        try:
            body = await self._body(request)
        except (ValueError, OSError) as exc:
            self._record(request, 400)
            return self._error(400, f"malformed heartbeat: {exc!r}")
        with self.lock:
            self.heartbeats.append(body)
        try:
            Heartbeat.model_validate(body)
        except ValidationError as exc:
            with self.lock:
                self.heartbeat_errors.append(str(exc))
            self._record(request, 400)
            return self._error(400, str(exc)[:300])
        self._record(request, 200)
        with self.lock:
            etag = self.config_etag
        return web.json_response({"configEtag": etag, "heartbeatIntervalS": self.heartbeat_interval_s})

    async def _config(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            self._record(request, 401)
            return self._error(401, "unknown agent token")
        with self.lock:
            config, etag = self.config, self.config_etag
        if config is None or etag is None:
            self._record(request, 404)
            return self._error(404, "no configuration")
        if f'"{etag}"' in {t.strip() for t in request.headers.get("If-None-Match", "").split(",")}:
            self._record(request, 304)
            return web.Response(status=304)
        self._record(request, 200)
        return web.Response(body=orjson.dumps(config), content_type="application/json", headers={"ETag": f'"{etag}"'})

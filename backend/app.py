"""The backend's aiohttp application: the agent API, the GuardDuty-compatible API, health.

``create_app(settings, db)`` builds it (tests run it on an ephemeral port); ``serve(settings)`` opens the
database (migrating it), listens, and runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from backend import api, console, control_plane, events, exports, ingest
from backend.config import BackendSettings
from backend.db import Database, open_database
from backend.findings import UpsertResult
from backend.sigv4 import SigV4Verifier
from backend.tenancy import TokenIdentity, lookup_access_key

log = logging.getLogger("backend")

DB = web.AppKey("db", Database)
SETTINGS = web.AppKey("settings", BackendSettings)
VERIFIER = web.AppKey("verifier", SigV4Verifier)
# Called after each stored batch (exporters subscribe here): must not raise, must not block ingest.
FindingsListener = Callable[[web.Application, TokenIdentity, UpsertResult], Awaitable[None]]
LISTENERS = web.AppKey("listeners", list[FindingsListener])


async def on_findings_stored(app: web.Application, ident: TokenIdentity, result: UpsertResult) -> None:
    for listener in app[LISTENERS]:
        try:
            await listener(app, ident, result)
        except Exception:
            log.exception("findings listener failed", extra={"listener": getattr(listener, "__name__", "?")})


def create_app(settings: BackendSettings, db: Database) -> web.Application:
    # The largest agent body is bounded by ingest itself; aiohttp's own cap must not cut it first.
    app = web.Application(client_max_size=max(settings.max_body_bytes, settings.max_api_body_bytes) + 1024)
    app[DB] = db
    app[SETTINGS] = settings

    async def lookup(key_id: str) -> tuple[str, str] | None:
        async with db.sessions() as session:
            return await lookup_access_key(session, key_id)

    app[VERIFIER] = SigV4Verifier(lookup, service="guardduty", max_skew_s=settings.signature_max_skew_s)
    listeners: list[FindingsListener] = [count_stored]
    app[LISTENERS] = listeners
    app.cleanup_ctx.append(_intel_refresher)
    app.cleanup_ctx.append(_sqlite_statistics)
    app.router.add_get("/healthz", health)
    ingest.add_routes(app)
    events.add_routes(app)
    api.add_routes(app)
    for part in (console, exports, control_plane):
        part.setup(app)
    return app


async def _intel_refresher(app: web.Application) -> AsyncIterator[None]:
    """Threat feeds change: re-fetch active lists periodically (each replica does; the result is the same)."""
    from backend.intel_sets import FetchLimits, refresh_sets

    settings = app[SETTINGS]

    async def loop() -> None:
        while True:
            await asyncio.sleep(settings.intel_refresh_interval_s)
            try:
                done = await refresh_sets(app[DB].sessions, FetchLimits.from_settings(settings))
                log.info("threat lists refreshed", extra={"sets": len(done)})
            except Exception:
                log.exception("threat list refresh failed")

    task = asyncio.create_task(loop()) if settings.intel_refresh_interval_s > 0 else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# SQLite plans from statistics that only ANALYZE writes: without them it picked the severity index and sorted
# every match for a (severity, cluster) criterion (37 ms at 200k findings; 0.4 ms after ANALYZE). analysis_limit
# samples each index, so a run costs milliseconds at any size. PostgreSQL's autovacuum analyzes by itself.
ANALYZE_EVERY_FINDINGS = 20_000
ANALYZE_EVERY_S = 600.0
STORED = web.AppKey("stored_since_analyze", list[int])


async def refresh_statistics(db: Database) -> None:
    """SQLite: sample every index's statistics for the planner (the backend does it as findings accumulate)."""
    from sqlalchemy import text

    if db.dialect == "sqlite":
        async with db.engine.begin() as conn:
            await conn.execute(text("PRAGMA analysis_limit=1000"))
            await conn.execute(text("ANALYZE"))


async def _sqlite_statistics(app: web.Application) -> AsyncIterator[None]:
    db = app[DB]
    app[STORED] = [0]

    async def loop() -> None:
        last = 0.0
        while True:
            await asyncio.sleep(5)
            now = time.monotonic()
            if app[STORED][0] >= ANALYZE_EVERY_FINDINGS or (now - last > ANALYZE_EVERY_S and app[STORED][0]):
                app[STORED][0] = 0
                last = now
                try:
                    await refresh_statistics(db)
                except Exception:
                    log.exception("ANALYZE failed")

    task = asyncio.create_task(loop()) if db.dialect == "sqlite" else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def count_stored(app: web.Application, ident: TokenIdentity, result: UpsertResult) -> None:
    if STORED in app:
        app[STORED][0] += result.new + result.updated


async def health(request: web.Request) -> web.Response:
    from sqlalchemy import text

    try:
        async with request.app[DB].engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as exc:
        return web.json_response({"status": "unhealthy", "database": str(exc)[:200]}, status=503)
    return web.json_response({"status": "ok"})


def ssl_context(settings: BackendSettings) -> ssl.SSLContext | None:
    if not settings.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    return ctx


class Server:
    """The backend listening on a port: used by ``serve`` and by ``runtime-backend local``."""

    def __init__(self, settings: BackendSettings) -> None:
        self.settings = settings
        self.db: Database | None = None
        self.runner: web.AppRunner | None = None
        self.port = settings.port

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.tls_cert else "http"
        host = self.settings.host if self.settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> None:
        self.db = await open_database(self.settings.database_url)
        app = create_app(self.settings, self.db)
        # auto_decompress off: ingest inflates gzip bodies itself, bounded (aiohttp would inflate a bomb whole)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, auto_decompress=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.settings.host, self.settings.port, ssl_context=ssl_context(self.settings))
        await site.start()
        server: Any = site._server
        if server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        log.info("backend listening", extra={"url": self.url})

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.db is not None:
            await self.db.close()


async def serve(settings: BackendSettings, ready: Callable[[Server], None] | None = None) -> int:
    server = Server(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready(server)
    try:
        await stop.wait()
    finally:
        log.info("backend stopping")
        await server.stop()
    return 0

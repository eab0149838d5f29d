"""Exports: findings where security teams look (EventBridge, Security Hub, S3, a webhook; OCSF for data lakes).

Configured by a file (``RUNTIME_BACKEND_EXPORTS_FILE``, see backend/exports/config.py); without one, nothing is
exported. ``setup(app)`` subscribes to stored agent batches (``LISTENERS``) and runs one pipeline per exporter
(backend/exports/base.py) for the app's lifetime. ``health(app)`` is what the console shows per exporter.

When people archive or unarchive findings through the API, exporters that send archive changes (Security Hub)
must hear of it: the API calls :func:`archive_changed` inside its transaction; the exporters look at the findings
once that transaction has committed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.exports.base import Exporter, ExportPipeline, Kind
from backend.exports.config import (
    AnyExporterConfig,
    AwsExporterConfig,
    EventBridgeConfig,
    ExportsConfigError,
    ExportsFile,
    S3Config,
    SecurityHubConfig,
    WebhookConfig,
    load_exports,
)
from backend.findings import UpsertResult
from backend.tenancy import TokenIdentity

log = logging.getLogger("backend.exports")

__all__ = [
    "EXPORTS",
    "ExportService",
    "ExportsConfigError",
    "archive_changed",
    "build_exporter",
    "health",
    "setup",
]


def build_exporter(config: AnyExporterConfig, executor: ThreadPoolExecutor | None = None) -> Exporter:
    from backend.exports.eventbridge import EventBridgeExporter
    from backend.exports.s3 import S3Exporter
    from backend.exports.securityhub import SecurityHubExporter
    from backend.exports.webhook import WebhookExporter

    if isinstance(config, EventBridgeConfig):
        return EventBridgeExporter(config, executor)
    if isinstance(config, SecurityHubConfig):
        return SecurityHubExporter(config, executor)
    if isinstance(config, S3Config):
        return S3Exporter(config, executor)
    if isinstance(config, WebhookConfig):
        return WebhookExporter(config)
    raise AssertionError(config)


class ExportService:
    """Every configured exporter's pipeline, and the one thread pool their boto3 calls block in."""

    def __init__(
        self, config: ExportsFile, sessions: async_sessionmaker[AsyncSession], *, heartbeat_misses: int = 3
    ) -> None:
        enabled = config.enabled()
        aws = sum(1 for c in enabled if isinstance(c, AwsExporterConfig))
        # one worker per exporter makes one blocking call at a time: one thread each is enough
        self.executor = ThreadPoolExecutor(max_workers=max(1, aws), thread_name_prefix="exports")
        self.pipelines = [
            ExportPipeline(build_exporter(c, self.executor), sessions, heartbeat_misses=heartbeat_misses)
            for c in enabled
        ]

    def by_name(self, name: str) -> ExportPipeline | None:
        return next((p for p in self.pipelines if p.name == name), None)

    def offer(self, kind: Kind, detector_id: str, finding_ids: Sequence[str]) -> None:
        for p in self.pipelines:
            p.offer(kind, detector_id, finding_ids)

    async def start(self) -> None:
        for p in self.pipelines:
            await p.start()

    async def stop(self) -> None:
        for p in self.pipelines:
            try:
                await p.stop()
            except Exception:
                log.exception("exporter did not stop cleanly", extra={"exporter": p.name})
        self.executor.shutdown(wait=False, cancel_futures=True)

    def health(self) -> list[dict[str, Any]]:
        return [p.health() for p in self.pipelines]


EXPORTS = web.AppKey("exports", ExportService)


async def _on_findings_stored(app: web.Application, ident: TokenIdentity, result: UpsertResult) -> None:
    service = app.get(EXPORTS)
    if service is None:
        return
    # references only: the workers read the findings, ingest never waits for an exporter
    if result.new_ids:
        service.offer("new", ident.detector_id, result.new_ids)
    if result.updated_ids:
        service.offer("update", ident.detector_id, result.updated_ids)


def archive_changed(session: AsyncSession, app: web.Application, detector_id: str, finding_ids: Sequence[str]) -> None:
    """Call from ArchiveFindings/UnarchiveFindings after the UPDATE, inside the request's transaction: once it
    commits, exporters look at these findings again (a rollback sends nothing)."""
    service = app.get(EXPORTS)
    if service is None or not finding_ids:
        return
    ids = list(finding_ids)

    def committed(_session: Any) -> None:
        service.offer("state", detector_id, ids)

    # the async session commits on the event loop's thread (greenlet), where the queues live
    event.listen(session.sync_session, "after_commit", committed, once=True)


def setup(app: web.Application) -> None:
    from backend.app import DB, LISTENERS, SETTINGS

    path = getattr(app[SETTINGS], "exports_file", None)
    if not path:
        return
    config = load_exports(path)  # a broken file stops the backend at start, with the file's problems
    if not config.enabled():
        log.info("no exporter enabled", extra={"file": path})
        return
    app[EXPORTS] = ExportService(config, app[DB].sessions, heartbeat_misses=app[SETTINGS].heartbeat_misses)
    app[LISTENERS].append(_on_findings_stored)

    async def run(app: web.Application) -> AsyncIterator[None]:
        service = app[EXPORTS]
        await service.start()
        log.info("exporters running", extra={"exporters": [p.name for p in service.pipelines]})
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await service.stop()

    app.cleanup_ctx.append(run)


def health(app: web.Application) -> list[dict[str, Any]]:
    """Per exporter: status, queue depth and capacity, sent, failed attempts, retries, dead-lettered, last error
    and its time, last success. Empty when nothing is exported."""
    service = app.get(EXPORTS)
    return service.health() if service is not None else []

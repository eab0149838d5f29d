"""EventBridge: ``PutEvents`` in GuardDuty's own envelope, so that rules written for GuardDuty match unchanged.

Findings (EventBridge reference, "Amazon GuardDuty events"; GuardDuty User Guide, "Creating custom responses to
GuardDuty findings with Amazon EventBridge"): ``source`` "aws.guardduty", ``detail-type`` "GuardDuty Finding"
(both configurable), ``detail`` the finding exactly as GetFindings returns it (camelCase), ``resources`` empty,
``time`` the finding's ``updatedAt``. A rule like
``{"source": ["aws.guardduty"], "detail": {"type": ["Execution:Runtime/ReverseShell"]}}`` matches.

"aws." sources belong to AWS services: EventBridge may refuse them from PutEvents (per-entry error
NotAuthorizedForSourceException, dead-lettered with a hint). Then set ``source`` to one of your own (say
"runtime.guardduty") and match it in the rules; everything else in the event stays GuardDuty's.

Limits: at most 10 entries per call and 256 KiB per request, counted as EventBridge counts (``Time`` 14 bytes,
then the UTF-8 bytes of Source, DetailType, Detail and each resource). An entry alone over the limit is
dead-lettered at once (a retry cannot shrink it). Each entry of a partly failed call is judged on its own
``ErrorCode``: throttling and internal errors are retried, the others dead-lettered.

Coverage changes (GuardDuty User Guide, "Runtime coverage and troubleshooting for Amazon ECS clusters", "Coverage
status change with EventBridge notifications"): GuardDuty sends "GuardDuty Runtime Protection Unhealthy" and
"GuardDuty Runtime Protection Healthy" with this ``detail``::

    {"schemaVersion": "1.0", "resourceAccountId": "...", "currentStatus": "UNHEALTHY", "previousStatus": "HEALTHY",
     "resourceDetails": {"resourceType": "ECS", "ecsClusterDetails": {"clusterName": "...",
         "fargateDetails": {"issues": [...], "managementType": "..."}}},
     "issue": "...", "lastUpdatedAt": "..."}

GuardDuty judges ECS coverage per cluster; this backend knows each task's agent, so it sends one event per *task*
whose status changes, in that same shape (rules on ``resourceDetails.resourceType`` and ``clusterName`` match),
plus ``ecsClusterDetails.taskDetails`` (taskArn, taskId, definitionArn, family, launchType) saying which task.
``fargateDetails.issues`` holds that task's issue, ``managementType`` the cluster's (ListCoverage's: "MANUAL"
unless runtime-manager adds the sidecar). Tasks are those ListCoverage counts: agents' heartbeats merged with
runtime-manager's view of ECS. A task first seen unhealthy sends Unhealthy with ``previousStatus`` null; a task
first seen healthy sends nothing. The last status sent per task is kept in ExportPublished (finding_id
"cov-" + SHA-256 of the task ARN), so a restart or a second replica does not repeat a change.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from backend.coverage import UNHEALTHY, ClusterCoverage, TaskCoverage, cluster_coverage, task_id_of
from backend.exports.base import AwsExporter, ExportPipeline, Failure, Item, aws_error, published_insert
from backend.exports.config import EventBridgeConfig
from backend.findings import family_of, iso_ms, parse_time_ms
from backend.models import ControlPlaneTask, CoverageRow, ExportPublished
from backend.tenancy import now_ms

log = logging.getLogger("backend.exports")

MAX_ENTRIES = 10
MAX_REQUEST_BYTES = 256 * 1024
RETRYABLE_ENTRY_CODES = frozenset({"ThrottlingException", "InternalFailure", "InternalException", "ServiceUnavailable"})
COVERAGE_KEY_PREFIX = "cov-"


def entry_size(entry: dict[str, Any]) -> int:
    """An entry's size as EventBridge counts it against the 256 KiB of a PutEvents request."""
    size = 14 if entry.get("Time") else 0
    size += len(entry["Source"].encode()) + len(entry["DetailType"].encode())
    size += len(_detail(entry).encode())
    size += sum(len(r.encode()) for r in entry.get("Resources") or [])
    return size


def _detail(entry: dict[str, Any]) -> str:
    detail = entry["Detail"]
    return detail if isinstance(detail, str) else orjson.dumps(detail).decode()


def coverage_key(task_arn: str) -> str:
    """ExportPublished.finding_id of a task's coverage status (64 characters, as the column)."""
    return COVERAGE_KEY_PREFIX + hashlib.sha256(task_arn.encode()).hexdigest()[:60]


class EventBridgeExporter(AwsExporter):
    type = "eventbridge"
    service = "events"
    config: EventBridgeConfig

    def _entry(self, detail_type: str, detail: dict[str, Any], time_ms: int | None) -> dict[str, Any]:
        # JSON all the way (dead letters keep it): Time as ISO text, Detail as an object, both converted at send
        entry: dict[str, Any] = {
            "Source": self.config.source,
            "DetailType": detail_type,
            "Detail": detail,
            "Resources": [],
            "EventBusName": self.config.event_bus_name,
        }
        if time_ms is not None:
            entry["Time"] = iso_ms(time_ms)
        return entry

    def format(self, finding: dict[str, Any]) -> dict[str, Any]:
        return self._entry(self.config.detail_type, finding, parse_time_ms(finding.get("updatedAt")))

    def coverage_entry(
        self, cluster: ClusterCoverage, task: TaskCoverage, previous: str | None, now: int
    ) -> dict[str, Any]:
        row, plane = task.row, task.plane
        definition = (row.task_definition_arn if row is not None else None) or (
            plane.task_definition_arn if plane is not None else None
        )
        detail = {
            "schemaVersion": "1.0",
            "resourceAccountId": cluster.account_id,
            "currentStatus": task.status,
            "previousStatus": previous,
            "resourceDetails": {
                "resourceType": "ECS",
                "ecsClusterDetails": {
                    "clusterName": cluster.name,
                    "clusterArn": cluster.arn,
                    "fargateDetails": {
                        "issues": [task.issue] if task.issue else [],
                        "managementType": cluster.management_type,
                    },
                    "taskDetails": {
                        "taskArn": task.task_arn,
                        "taskId": task_id_of(task.task_arn),
                        "definitionArn": definition,
                        "family": (row.family if row is not None else None) or family_of(definition),
                        "launchType": task.launch_type,
                    },
                },
            },
            "issue": task.issue or "",
            "lastUpdatedAt": iso_ms(task.updated_at_ms),
        }
        kind = self.config.unhealthy_detail_type if task.status == UNHEALTHY else self.config.healthy_detail_type
        return self._entry(kind, detail, now)

    @staticmethod
    def _wire(entry: dict[str, Any]) -> dict[str, Any]:
        out = dict(entry)
        out["Detail"] = _detail(entry)
        if isinstance(out.get("Time"), str):
            out["Time"] = datetime.fromisoformat(out["Time"].replace("Z", "+00:00"))
        return out

    def _chunks(self, items: Sequence[Item]) -> tuple[list[list[Item]], list[Failure]]:
        chunks: list[list[Item]] = []
        too_big: list[Failure] = []
        current: list[Item] = []
        size = 0
        for item in items:
            n = entry_size(item.body)
            if n > MAX_REQUEST_BYTES:
                too_big.append(Failure(item, f"entry of {n} bytes exceeds EventBridge's 256 KiB", False))
                continue
            if current and (len(current) >= MAX_ENTRIES or size + n > MAX_REQUEST_BYTES):
                chunks.append(current)
                current, size = [], 0
            current.append(item)
            size += n
        if current:
            chunks.append(current)
        return chunks, too_big

    async def export(self, items: Sequence[Item]) -> list[Failure]:
        chunks, failures = self._chunks(items)
        for chunk in chunks:
            try:
                resp = await self.call("put_events", Entries=[self._wire(i.body) for i in chunk])
            except Exception as exc:
                msg, retryable = aws_error(exc)
                failures += [Failure(i, msg, retryable) for i in chunk]
                continue
            if not resp.get("FailedEntryCount"):
                continue
            # Entries answer the request's entries in order; a failed one carries ErrorCode instead of EventId
            for item, result in zip(chunk, resp.get("Entries") or [], strict=False):
                code = result.get("ErrorCode")
                if code:
                    msg = f"{code}: {result.get('ErrorMessage')}"
                    if code == "NotAuthorizedForSourceException":
                        msg += f" (set another `source` than {self.config.source!r} in the exports file)"
                    failures.append(Failure(item, msg, code in RETRYABLE_ENTRY_CODES))
        return failures

    # -- coverage changes -------------------------------------------------------------------------------------

    async def background(self, pipeline: ExportPipeline) -> None:
        if not self.config.coverage_events:
            return
        while True:
            try:
                await self.check_coverage(pipeline)
            except Exception:
                log.exception("coverage check failed", extra={"exporter": self.name})
            await asyncio.sleep(self.config.coverage_interval_s)

    async def check_coverage(self, pipeline: ExportPipeline) -> int:
        """Compare every task's coverage status with the last one sent; queue an event per change."""
        now = now_ms()
        entries: list[Item] = []
        async with pipeline.sessions() as session, session.begin():
            detectors: set[str] = set()
            # tasks are known from their agents' heartbeats and from runtime-manager's view of ECS
            for model in (CoverageRow, ControlPlaneTask):
                stmt = select(model.detector_id).distinct()
                if self.config.accounts is not None:
                    stmt = stmt.where(model.account_id.in_(self.config.accounts))
                detectors.update((await session.execute(stmt)).scalars())
            for did in sorted(detectors):
                entries += await self._changes(session, did, now, pipeline.heartbeat_misses)
        for item in entries:
            pipeline.offer_item(item)
        return len(entries)

    async def _changes(self, session: AsyncSession, detector_id: str, now: int, misses: int) -> list[Item]:
        known = {
            p.finding_id: p
            for p in (
                await session.execute(
                    select(ExportPublished).where(
                        ExportPublished.exporter == self.name,
                        ExportPublished.detector_id == detector_id,
                        ExportPublished.finding_id.like(COVERAGE_KEY_PREFIX + "%"),
                    )
                )
            ).scalars()
        }
        out: list[Item] = []
        seen: set[str] = set()
        for cluster in await cluster_coverage(session, detector_id, now, misses):
            for task in cluster.tasks:
                key = coverage_key(task.task_arn)
                seen.add(key)
                current = 1 if task.status == UNHEALTHY else 0
                prev = known.get(key)
                if prev is None:
                    inserted = (
                        await session.execute(
                            published_insert(session)
                            .values(
                                exporter=self.name,
                                detector_id=detector_id,
                                finding_id=key,
                                published_at=now,
                                count=current,
                            )
                            .on_conflict_do_nothing(index_elements=["exporter", "detector_id", "finding_id"])
                            .returning(ExportPublished.finding_id)
                        )
                    ).first()
                    if inserted is None or not current:
                        continue
                    previous = None
                elif prev.count != current:
                    res = await session.execute(
                        update(ExportPublished)
                        .where(
                            ExportPublished.exporter == self.name,
                            ExportPublished.detector_id == detector_id,
                            ExportPublished.finding_id == key,
                            ExportPublished.count == prev.count,
                        )
                        .values(count=current, published_at=now)
                        .execution_options(synchronize_session=False)
                    )
                    if not res.rowcount:  # type: ignore[attr-defined]
                        continue  # another replica saw the change first
                    previous = "UNHEALTHY" if prev.count else "HEALTHY"
                else:
                    continue
                entry = self.coverage_entry(cluster, task, previous, now)
                out.append(Item(entry, detector_id, None))
        gone = [k for k in known if k not in seen]
        if gone:
            # tasks that stopped or fell out of coverage: their last status is no longer news
            await session.execute(
                delete(ExportPublished)
                .where(
                    ExportPublished.exporter == self.name,
                    ExportPublished.detector_id == detector_id,
                    ExportPublished.finding_id.in_(gone),
                )
                .execution_options(synchronize_session=False)
            )
        return out

"""Runtime events agents send besides findings: the investigation timeline of a task (the console's detail view).

Agents send a bounded sample of what they see (process execs, connections, DNS, file changes) so that a finding
can be read with what its task did around it. Events are idempotent by content (an id is the hash of the event),
kept ``event_retention_hours`` and at most ``max_events_per_task`` per task (oldest dropped first).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from backend.coverage import HeartbeatTask, check_heartbeat_claims
from backend.findings import parse_time_ms
from backend.ingest import AgentError, agent_route, parse_json, read_body, validation_error
from backend.models import RuntimeEventRow
from backend.tenancy import TokenIdentity, now_ms

log = logging.getLogger("backend.events")

MAX_EVENTS_PER_BATCH = 5000
MAX_EVENT_BYTES = 64 << 10


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    agentId: str = Field(min_length=1, max_length=128)
    task: HeartbeatTask
    events: list[dict[str, Any]] = Field(max_length=MAX_EVENTS_PER_BATCH)
    # events the agent did not send (its sampling budget): shown next to the timeline
    dropped: int = Field(0, ge=0)


def _str(v: Any, n: int) -> str | None:
    return v[:n] if isinstance(v, str) else None


def event_row(detector_id: str, task_arn: str, index: int, event: dict[str, Any], received: int) -> dict[str, Any]:
    where = f"events[{index}]"
    kind = event.get("kind")
    if not isinstance(kind, str) or not 0 < len(kind) <= 64:
        raise AgentError(400, f"{where}.kind: a string of 1 to 64 characters", field=f"{where}.kind")
    t = parse_time_ms(event.get("time"))
    if t is None:
        raise AgentError(400, f"{where}.time: an ISO 8601 time", field=f"{where}.time")
    body = orjson.dumps(event, option=orjson.OPT_SORT_KEYS)
    if len(body) > MAX_EVENT_BYTES:
        raise AgentError(413, f"{where}: an event is at most {MAX_EVENT_BYTES} bytes", field=where)
    raw_proc = event.get("process")
    proc: dict[str, Any] = raw_proc if isinstance(raw_proc, dict) else {}
    return {
        "detector_id": detector_id,
        "id": hashlib.sha256(task_arn.encode() + b"\0" + body).hexdigest()[:32],
        "task_arn": task_arn,
        "time": t,
        "kind": kind,
        "container_name": _str(proc.get("containerName"), 255),
        "process_name": _str(proc.get("name"), 255),
        "executable_path": _str(proc.get("executablePath"), 4096),
        "received_at": received,
        "document": body.decode(),
    }


async def record_events(session: AsyncSession, ident: TokenIdentity, data: dict[str, Any]) -> tuple[int, int]:
    """Store a batch of events; (stored, already there)."""
    try:
        batch = EventBatch.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    check_heartbeat_claims(ident, batch.task)
    received = now_ms()
    rows = [event_row(ident.detector_id, batch.task.taskArn, i, e, received) for i, e in enumerate(batch.events)]
    unique = list({r["id"]: r for r in rows}.values())
    if not unique:
        return 0, 0
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    stored = 0
    for start in range(0, len(unique), 500):  # bound the statement's parameters
        stmt = (
            insert(RuntimeEventRow)
            .values(unique[start : start + 500])
            .on_conflict_do_nothing(index_elements=["detector_id", "id"])
            .returning(RuntimeEventRow.id)
        )
        stored += len(list((await session.execute(stmt)).scalars()))
    return stored, len(rows) - stored


async def prune_events(session: AsyncSession, older_than_ms: int, max_per_task: int) -> int:
    """Events past retention, then the oldest of tasks over their cap."""
    res = await session.execute(delete(RuntimeEventRow).where(RuntimeEventRow.received_at < older_than_ms))
    removed = int(res.rowcount or 0)  # type: ignore[attr-defined]
    crowded = (
        await session.execute(
            select(RuntimeEventRow.detector_id, RuntimeEventRow.task_arn, func.count())
            .group_by(RuntimeEventRow.detector_id, RuntimeEventRow.task_arn)
            .having(func.count() > max_per_task)
        )
    ).all()
    for detector_id, task_arn, n in crowded:
        cutoff = (
            await session.execute(
                select(RuntimeEventRow.time)
                .where(RuntimeEventRow.detector_id == detector_id, RuntimeEventRow.task_arn == task_arn)
                .order_by(RuntimeEventRow.time.desc())
                .offset(max_per_task)
                .limit(1)
            )
        ).scalar_one()
        res = await session.execute(
            delete(RuntimeEventRow).where(
                RuntimeEventRow.detector_id == detector_id,
                RuntimeEventRow.task_arn == task_arn,
                RuntimeEventRow.time <= cutoff,
            )
        )
        removed += int(res.rowcount or 0)  # type: ignore[attr-defined]
        log.info("events over the per-task cap pruned", extra={"task": task_arn, "had": n})
    return removed


@agent_route
async def post_events(request: web.Request, ident: TokenIdentity) -> web.StreamResponse:
    from backend.app import DB, SETTINGS

    data = parse_json(await read_body(request, request.app[SETTINGS]))
    async with request.app[DB].sessions() as session, session.begin():
        stored, duplicates = await record_events(session, ident, data)
    return web.Response(
        body=orjson.dumps({"stored": stored, "duplicates": duplicates}), content_type="application/json"
    )


async def _pruner(app: web.Application) -> AsyncIterator[None]:
    from backend.app import DB, SETTINGS

    settings = app[SETTINGS]

    async def loop() -> None:
        while True:
            await asyncio.sleep(settings.event_prune_interval_s)
            try:
                async with app[DB].sessions() as session, session.begin():
                    older = now_ms() - int(settings.event_retention_hours * 3_600_000)
                    n = await prune_events(session, older, settings.max_events_per_task)
                if n:
                    log.info("runtime events pruned", extra={"removed": n})
            except Exception:
                log.exception("pruning runtime events failed")

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def add_routes(app: web.Application) -> None:
    app.router.add_post("/agent/v1/events", post_events)
    app.cleanup_ctx.append(_pruner)

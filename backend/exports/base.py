"""The export pipeline every exporter shares: bounded queue, batching, retries, dead letters, publishing frequency.

An exporter (EventBridge, Security Hub, S3, webhook) is a backend behind one small interface, :class:`Exporter`:
``format(finding) -> payload`` and ``async export(items) -> failures``. Everything else is here, the same for all:

- Ingest only enqueues ``(detector, finding id)`` (``offer``): it never waits on an exporter and never reads a
  finding for one. A full queue does not block either: what does not fit is written to the dead letters
  (reason "queue full") by a background task.
- One worker per exporter takes up to ``batch_size`` references, waiting at most ``batch_max_wait_s`` after the
  first, reads the findings and decides, per finding, whether it goes out now (see ``_decide``): archived
  findings never do (a person or a suppression rule archived them); a new finding does at once; an aggregated
  finding whose count grew does at most once per publishing frequency, as GuardDuty publishes updates.
- Before sending, the worker *claims* each finding in ``ExportPublished`` (insert, or compare-and-set on what it
  read): two replicas, or a catch-up sweep racing the listener, send a finding once.
- Delivery is retried with exponential backoff and full jitter up to ``max_attempts``; what still fails, or
  fails for good (a 4xx, a malformed entry), becomes an ``ExportDeadLetter`` row with the exact payload, for
  ``runtime-backend exports replay``.
- At start, findings received within ``catch_up_s`` that this exporter never claimed are sent: they were in
  the queue when the backend stopped, or the exporter is new. Updates held back by the frequency are kept in
  memory and re-checked every ``sweep_interval_s`` (and found again from the tables after a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import orjson
from sqlalchemy import and_, delete, exists, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.exports.config import AnyExporterConfig, AwsExporterConfig
from backend.findings import document_of, iso_ms
from backend.models import Detector, ExportDeadLetter, ExportPublished, FindingRow
from backend.tenancy import now_ms

log = logging.getLogger("backend.exports")
T = TypeVar("T")

Kind = Literal["new", "update", "state"]
# when one batch holds several references to a finding, the strongest reason wins
_RANK = {"new": 0, "update": 1, "state": 2}
# how long a detector's findingPublishingFrequency is trusted before it is read again
_DETECTOR_CACHE_MS = 60_000
_DEAD_LETTER_PRUNE_MS = 60_000
MAX_ERROR_CHARS = 2000


@dataclass(slots=True)
class Item:
    """One payload for one target: the formatted finding (or event), and which finding it came from."""

    body: dict[str, Any]
    detector_id: str | None = None
    finding_id: str | None = None


@dataclass(slots=True)
class Failure:
    item: Item
    error: str
    retryable: bool = True


class PermanentError(Exception):
    """The target refused the whole batch in a way a retry cannot fix (a 4xx, a bad configuration)."""


class Exporter(ABC):
    """One export target. Subclasses say how a finding looks there and how a batch is sent."""

    type: ClassVar[str]

    def __init__(self, config: AnyExporterConfig) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    @abstractmethod
    def format(self, finding: dict[str, Any]) -> dict[str, Any]:
        """The payload of one finding (GetFindings' shape in, JSON-serialisable out: dead letters keep it)."""

    @abstractmethod
    async def export(self, items: Sequence[Item]) -> list[Failure]:
        """Send a batch. Per-item refusals come back as failures; an exception fails the whole batch
        (retried, unless it is a :class:`PermanentError`)."""

    async def background(self, pipeline: ExportPipeline) -> None:  # noqa: B027 - optional hook
        """Work of the exporter's own besides findings (EventBridge: coverage changes); runs until cancelled."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def item(self, finding: dict[str, Any], detector_id: str | None = None) -> Item:
        return Item(self.format(finding), detector_id, finding.get("id"))


class AwsExporter(Exporter):
    """An exporter calling an AWS API with boto3. boto3 blocks: calls run on the exports' one executor."""

    service: ClassVar[str]

    def __init__(self, config: AnyExporterConfig, executor: Executor | None = None) -> None:
        super().__init__(config)
        assert isinstance(config, AwsExporterConfig)
        import boto3
        from botocore.config import Config

        self.executor = executor
        # the pipeline retries with backoff and dead-letters; botocore retrying underneath would hide failures
        # from the exporter's health and multiply the wait
        self.client: Any = boto3.session.Session().client(
            self.service,
            region_name=config.region,
            endpoint_url=config.endpoint_url,
            config=Config(
                connect_timeout=config.timeout_s,
                read_timeout=config.timeout_s,
                retries={"total_max_attempts": 1, "mode": "standard"},
                user_agent_extra="ecs-runtime-monitor-exports",
            ),
        )

    async def call(self, method: str, **kwargs: Any) -> Any:
        fn = getattr(self.client, method)
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, **kwargs))

    async def close(self) -> None:
        self.client.close()


# botocore's error codes that say "try again later" rather than "this request is wrong"
RETRYABLE_AWS_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "SlowDown",
        "InternalFailure",
        "InternalError",
        "InternalException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
        "LimitExceededException",
    }
)


def aws_error(exc: BaseException) -> tuple[str, bool]:
    """(message, retryable) for an exception out of a boto3 call."""
    from botocore.exceptions import ClientError, ParamValidationError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = str(err.get("Code") or "")
        retryable = status >= 500 or status in (408, 429) or code in RETRYABLE_AWS_CODES
        return f"{code or status}: {err.get('Message') or exc}", retryable
    if isinstance(exc, ParamValidationError):
        return f"invalid request: {exc}", False
    # connection refused, timeouts, missing credentials: the network or the role, not the payload
    return f"{type(exc).__name__}: {exc}", True


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Full jitter (AWS's "Exponential Backoff And Jitter"): uniform over [0, min(max, base * 2^(n-1))]."""
    return random.uniform(0, min(max_s, base_s * 2 ** (attempt - 1)))


@dataclass
class ExporterStats:
    sent: int = 0
    failed_attempts: int = 0
    retries: int = 0
    dead_lettered: int = 0
    # payloads neither delivered nor dead-lettered (the database refused the dead letter)
    lost: int = 0
    last_error: str | None = None
    last_error_at: int | None = None
    last_success_at: int | None = None


@dataclass(frozen=True, slots=True)
class Pending:
    kind: Kind
    detector_id: str | None
    finding_id: str | None
    item: Item | None = None  # an event that is not a stored finding (coverage): sent as is


@dataclass
class _Claim:
    row: FindingRow
    pub: ExportPublished | None


def published_insert(session: AsyncSession) -> Any:
    name = session.get_bind().dialect.name
    return (postgresql.insert if name == "postgresql" else sqlite.insert)(ExportPublished)


class ExportPipeline:
    """One exporter's queue, worker and bookkeeping."""

    def __init__(
        self,
        exporter: Exporter,
        sessions: async_sessionmaker[AsyncSession],
        *,
        heartbeat_misses: int = 3,
        drain_timeout_s: float = 5.0,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.exporter = exporter
        self.config = exporter.config
        self.sessions = sessions
        self.heartbeat_misses = heartbeat_misses
        self.drain_timeout_s = drain_timeout_s
        self.clock = clock
        self.queue: asyncio.Queue[Pending] = asyncio.Queue(maxsize=self.config.queue_size)
        self.stats = ExporterStats()
        # (detector, finding) -> when (epoch ms) to look at it again: updates held back by the frequency
        self.deferred: dict[tuple[str, str], int] = {}
        self._detector_frequency: dict[str, tuple[str | None, int]] = {}
        self._stopping = asyncio.Event()
        self._busy = False
        self._worker_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._spills: set[asyncio.Task[None]] = set()
        self._last_prune = 0

    @property
    def name(self) -> str:
        return self.exporter.name

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._worker_task = asyncio.create_task(self._worker(), name=f"export-{self.name}")
        self._tasks = [
            asyncio.create_task(self._sweeper(), name=f"export-{self.name}-sweep"),
            asyncio.create_task(self._background(), name=f"export-{self.name}-background"),
        ]

    async def stop(self) -> None:
        """Deliver what is queued for up to drain_timeout_s, then stop. Unclaimed references are found again by
        the next start's catch-up; a claimed batch that could not be delivered is dead-lettered."""
        self._stopping.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._worker_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._worker_task), self.drain_timeout_s)
            except TimeoutError:
                self._worker_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._worker_task
        if self._spills:
            await asyncio.wait(set(self._spills), timeout=self.drain_timeout_s)
        await self.exporter.close()

    async def _background(self) -> None:
        await self._catch_up()
        await self.exporter.background(self)

    # -- the ingest side: never blocks -------------------------------------------------------------------------

    def offer(self, kind: Kind, detector_id: str, finding_ids: Sequence[str]) -> None:
        overflow: list[Pending] = []
        for fid in finding_ids:
            p = Pending(kind, detector_id, fid)
            try:
                self.queue.put_nowait(p)
            except asyncio.QueueFull:
                overflow.append(p)
        if overflow:
            self._spill(overflow)

    def offer_item(self, item: Item) -> None:
        try:
            self.queue.put_nowait(Pending("new", item.detector_id, item.finding_id, item))
        except asyncio.QueueFull:
            self._spill([Pending("new", item.detector_id, item.finding_id, item)])

    def _spill(self, pendings: list[Pending]) -> None:
        task = asyncio.create_task(self._spill_to_dead_letters(pendings))
        self._spills.add(task)
        task.add_done_callback(self._spills.discard)

    async def _spill_to_dead_letters(self, pendings: list[Pending]) -> None:
        try:
            # claimed like a delivery, so that neither the sweep nor a later listener sends them as well: the
            # dead letter is their delivery, replayable once the exporter keeps up again
            items = [p.item for p in pendings if p.item is not None]
            items += await self._resolve([p for p in pendings if p.item is None])
        except Exception as exc:
            log.exception("exporter queue overflow lost", extra={"exporter": self.name})
            self._note_error(f"queue full, and the dead letters could not be written: {exc}")
            self.stats.lost += len(pendings)
            return
        if items:
            log.warning("exporter queue full", extra={"exporter": self.name, "deadLettered": len(items)})
            self._note_error(f"queue full ({self.config.queue_size}): {len(items)} dead-lettered")
            await self._dead_letter([(i, "queue full") for i in items], attempts=0)

    # -- the worker --------------------------------------------------------------------------------------------

    async def _next(self, wait_s: float | None) -> Pending | None:
        """The next reference, or None when the wait timed out or the pipeline stops with an empty queue."""
        with contextlib.suppress(asyncio.QueueEmpty):
            return self.queue.get_nowait()
        if self._stopping.is_set() or (wait_s is not None and wait_s <= 0):
            return None
        get = asyncio.ensure_future(self.queue.get())
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            done, _ = await asyncio.wait({get, stop}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not get.done():
                get.cancel()
        return get.result() if get in done else None

    async def _gather(self) -> list[Pending] | None:
        first = await self._next(None)
        if first is None:
            return None
        batch = [first]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.batch_max_wait_s
        while len(batch) < self.config.batch_size:
            nxt = await self._next(deadline - loop.time())
            if nxt is None:
                break
            batch.append(nxt)
        return batch

    async def _worker(self) -> None:
        while True:
            batch = await self._gather()
            if batch is None:
                return
            self._busy = True
            try:
                await self._process(batch)
            except Exception as exc:  # never let one bad batch stop the exporter
                log.exception("export batch failed", extra={"exporter": self.name})
                self._note_error(f"{type(exc).__name__}: {exc}")
            finally:
                self._busy = False

    async def _process(self, batch: list[Pending]) -> None:
        items = [p.item for p in batch if p.item is not None]
        refs = [p for p in batch if p.item is None]
        if refs:
            try:
                items += await self._resolve(refs)
            except Exception as exc:
                # the database is unavailable: nothing was claimed, look again shortly
                retry_at = self.clock() + int(self.config.backoff_max_s * 1000)
                for p in refs:
                    assert p.detector_id is not None and p.finding_id is not None
                    self.deferred[(p.detector_id, p.finding_id)] = retry_at
                raise RuntimeError(f"reading findings to export: {exc}") from exc
        if items:
            await self.deliver(items)

    # -- deciding and claiming ------------------------------------------------------------------------------

    def _selected(self, row: FindingRow) -> bool:
        accounts = self.config.accounts
        return row.severity >= self.config.min_severity and (accounts is None or row.account_id in accounts)

    async def _frequency_ms(self, session: AsyncSession, detector_id: str) -> int:
        if self.config.publishing_frequency != "DETECTOR":
            return self.config.frequency_s(None) * 1000
        now = self.clock()
        cached = self._detector_frequency.get(detector_id)
        if cached is None or now - cached[1] > _DETECTOR_CACHE_MS:
            value = (
                await session.execute(select(Detector.finding_publishing_frequency).where(Detector.id == detector_id))
            ).scalar_one_or_none()
            cached = self._detector_frequency[detector_id] = (value, now)
        return self.config.frequency_s(cached[0]) * 1000

    def _decide(
        self, row: FindingRow, pub: ExportPublished | None, kind: Kind, now: int, frequency_ms: int
    ) -> Literal["send", "defer", "skip"]:
        if not self._selected(row):
            return "skip"
        if row.archived:
            # archived findings are never sent; a target told about a finding hears that it was archived
            # (Security Hub: RecordState ARCHIVED) when the exporter sends archive changes
            return "send" if kind == "state" and self.config.archive_updates and pub is not None else "skip"
        if pub is None:
            return "send"  # new, or unarchived before it was ever sent: a finding people must see
        if kind == "state" and self.config.archive_updates:
            return "send"
        if row.count > pub.count:
            return "send" if now - pub.published_at >= frequency_ms else "defer"
        return "skip"

    async def _resolve(self, refs: Sequence[Pending]) -> list[Item]:
        """Read the referenced findings, decide, claim what goes out now; return their payloads."""
        wanted: dict[tuple[str, str], Kind] = {}
        for p in refs:
            assert p.detector_id is not None and p.finding_id is not None
            key = (p.detector_id, p.finding_id)
            prev = wanted.get(key)
            if prev is None or _RANK[p.kind] > _RANK[prev]:
                wanted[key] = p.kind
        by_detector: dict[str, list[str]] = {}
        for did, fid in wanted:
            by_detector.setdefault(did, []).append(fid)
        claimed: list[FindingRow] = []
        now = self.clock()
        async with self.sessions() as session, session.begin():
            for did, ids in by_detector.items():
                frequency_ms = await self._frequency_ms(session, did)
                rows = (
                    await session.execute(
                        select(FindingRow).where(FindingRow.detector_id == did, FindingRow.id.in_(ids))
                    )
                ).scalars()
                pubs = {
                    p.finding_id: p
                    for p in (
                        await session.execute(
                            select(ExportPublished).where(
                                ExportPublished.exporter == self.name,
                                ExportPublished.detector_id == did,
                                ExportPublished.finding_id.in_(ids),
                            )
                        )
                    ).scalars()
                }
                for row in rows:
                    pub = pubs.get(row.id)
                    decision = self._decide(row, pub, wanted[(did, row.id)], now, frequency_ms)
                    if decision == "defer":
                        assert pub is not None
                        self.deferred[(did, row.id)] = pub.published_at + frequency_ms
                    elif decision == "send" and await self._claim(session, row, pub, now):
                        claimed.append(row)
                        self.deferred.pop((did, row.id), None)
        # formatted after the commit: on SQLite the claims hold the database's one write lock
        return [self.exporter.item(document_of(row), row.detector_id) for row in claimed]

    async def _claim(self, session: AsyncSession, row: FindingRow, pub: ExportPublished | None, now: int) -> bool:
        if pub is None:
            stmt = (
                published_insert(session)
                .values(
                    exporter=self.name,
                    detector_id=row.detector_id,
                    finding_id=row.id,
                    published_at=now,
                    count=row.count,
                )
                .on_conflict_do_nothing(index_elements=["exporter", "detector_id", "finding_id"])
                .returning(ExportPublished.finding_id)
            )
            return (await session.execute(stmt)).first() is not None
        res = await session.execute(
            update(ExportPublished)
            .where(
                ExportPublished.exporter == self.name,
                ExportPublished.detector_id == row.detector_id,
                ExportPublished.finding_id == row.id,
                ExportPublished.published_at == pub.published_at,
                ExportPublished.count == pub.count,
            )
            .values(published_at=now, count=row.count)
            .execution_options(synchronize_session=False)
        )
        return bool(res.rowcount)  # type: ignore[attr-defined]

    # -- delivery ----------------------------------------------------------------------------------------------

    def _note_error(self, error: str) -> None:
        self.stats.last_error = error[:MAX_ERROR_CHARS]
        self.stats.last_error_at = self.clock()

    async def deliver(self, items: list[Item]) -> None:
        """Send with retries; dead-letter what is refused for good or still fails after max_attempts."""
        pending = items
        attempt = 0
        while pending:
            attempt += 1
            try:
                failures = await self.exporter.export(pending)
            except PermanentError as exc:
                failures = [Failure(i, str(exc), False) for i in pending]
            except Exception as exc:
                msg = f"{type(exc).__name__}: {exc}"
                failures = [Failure(i, msg, True) for i in pending]
            delivered = len(pending) - len(failures)
            if delivered:
                self.stats.sent += delivered
                self.stats.last_success_at = self.clock()
            if not failures:
                return
            self.stats.failed_attempts += 1
            self._note_error(failures[0].error)
            give_up = [f for f in failures if not f.retryable]
            retry = [f for f in failures if f.retryable]
            if retry and (attempt >= self.config.max_attempts or self._stopping.is_set()):
                give_up += retry
                retry = []
            if give_up:
                log.warning(
                    "export failed, dead-lettered",
                    extra={"exporter": self.name, "items": len(give_up), "error": give_up[0].error[:300]},
                )
                await self._dead_letter([(f.item, f.error) for f in give_up], attempts=attempt)
            pending = [f.item for f in retry]
            if pending:
                self.stats.retries += 1
                delay = backoff_s(attempt, self.config.backoff_base_s, self.config.backoff_max_s)
                # a stopping backend does not sit out a backoff: the next round dead-letters at once
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)

    async def _dead_letter(self, entries: list[tuple[Item, str]], attempts: int) -> None:
        t = self.clock()
        rows = [
            ExportDeadLetter(
                exporter=self.name,
                detector_id=item.detector_id,
                finding_id=item.finding_id,
                payload=orjson.dumps(item.body).decode(),
                error=error[:MAX_ERROR_CHARS],
                attempts=attempts,
                created_at=t,
            )
            for item, error in entries
        ]
        try:
            async with self.sessions() as session, session.begin():
                session.add_all(rows)
        except Exception:
            log.exception("dead letters could not be written", extra={"exporter": self.name, "items": len(rows)})
            self.stats.lost += len(rows)
            return
        self.stats.dead_lettered += len(rows)

    # -- sweeps: held-back updates, catch-up at start, dead-letter cap -----------------------------------------

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                self.release_due()
                if self.clock() - self._last_prune >= _DEAD_LETTER_PRUNE_MS:
                    await self.prune_dead_letters()
            except Exception:
                log.exception("export sweep failed", extra={"exporter": self.name})

    def release_due(self) -> int:
        """Queue the held-back findings whose time has come, as far as the queue has room (never spilling)."""
        now = self.clock()
        released = 0
        for key, due in list(self.deferred.items()):
            if due > now:
                continue
            try:
                self.queue.put_nowait(Pending("update", *key))
            except asyncio.QueueFull:
                break
            del self.deferred[key]
            released += 1
        return released

    async def prune_dead_letters(self) -> int:
        self._last_prune = self.clock()
        async with self.sessions() as session, session.begin():
            cutoff = (
                await session.execute(
                    select(ExportDeadLetter.id)
                    .where(ExportDeadLetter.exporter == self.name)
                    .order_by(ExportDeadLetter.id.desc())
                    .offset(self.config.max_dead_letters)
                    .limit(1)
                )
            ).scalar_one_or_none()
            if cutoff is None:
                return 0
            res = await session.execute(
                delete(ExportDeadLetter)
                .where(ExportDeadLetter.exporter == self.name, ExportDeadLetter.id <= cutoff)
                .execution_options(synchronize_session=False)
            )
            return int(res.rowcount or 0)  # type: ignore[attr-defined]

    async def _catch_up(self) -> None:
        """Findings this exporter should have sent and has not: look at them again (through ``deferred``, which
        feeds the queue as it has room)."""
        try:
            now = self.clock()
            conditions = [FindingRow.archived.is_(False), FindingRow.severity >= self.config.min_severity]
            if self.config.accounts is not None:
                conditions.append(FindingRow.account_id.in_(self.config.accounts))
            async with self.sessions() as session:
                keys: list[tuple[str, str]] = []
                if self.config.catch_up_s > 0:
                    never = ~exists().where(
                        ExportPublished.exporter == self.name,
                        ExportPublished.detector_id == FindingRow.detector_id,
                        ExportPublished.finding_id == FindingRow.id,
                    )
                    since = now - int(self.config.catch_up_s * 1000)
                    rows = await session.execute(
                        select(FindingRow.detector_id, FindingRow.id)
                        .where(FindingRow.received_at >= since, never, *conditions)
                        .order_by(FindingRow.received_at)
                    )
                    keys += [(r.detector_id, r.id) for r in rows]
                grown = await session.execute(
                    select(FindingRow.detector_id, FindingRow.id)
                    .join(
                        ExportPublished,
                        and_(
                            ExportPublished.exporter == self.name,
                            ExportPublished.detector_id == FindingRow.detector_id,
                            ExportPublished.finding_id == FindingRow.id,
                        ),
                    )
                    .where(FindingRow.count > ExportPublished.count, *conditions)
                )
                keys += [(r.detector_id, r.id) for r in grown]
            for key in keys:
                self.deferred.setdefault(key, 0)
            if keys:
                log.info("exporter catching up", extra={"exporter": self.name, "findings": len(keys)})
            self.release_due()
        except Exception:
            log.exception("export catch-up failed", extra={"exporter": self.name})

    # -- what the console shows --------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        s = self.stats
        failing = s.last_error_at is not None and (s.last_success_at is None or s.last_error_at > s.last_success_at)
        return {
            "name": self.name,
            "type": self.exporter.type,
            "status": "FAILING" if failing else "OK",
            "queueDepth": self.queue.qsize(),
            "queueCapacity": self.config.queue_size,
            "heldBack": len(self.deferred),
            "sent": s.sent,
            "failedAttempts": s.failed_attempts,
            "retries": s.retries,
            "deadLettered": s.dead_lettered,
            "lost": s.lost,
            "lastError": s.last_error,
            "lastErrorAt": iso_ms(s.last_error_at) if s.last_error_at is not None else None,
            "lastSuccessAt": iso_ms(s.last_success_at) if s.last_success_at is not None else None,
        }


# -- dead letters: listing and replay (the CLI; the console may use them too) -----------------------------------


@dataclass
class ReplayResult:
    id: int
    exporter: str
    delivered: bool
    error: str | None = None
    attempts: int = 0


async def list_dead_letters(
    session: AsyncSession, exporter: str | None = None, limit: int = 100
) -> list[ExportDeadLetter]:
    stmt = select(ExportDeadLetter).order_by(ExportDeadLetter.id.desc()).limit(limit)
    if exporter is not None:
        stmt = stmt.where(ExportDeadLetter.exporter == exporter)
    return list((await session.execute(stmt)).scalars())


async def replay_dead_letter(
    sessions: async_sessionmaker[AsyncSession], exporters: dict[str, Exporter], dead_letter_id: int
) -> ReplayResult:
    """Send a dead letter's payload again as it was (retried like any delivery). Delivered: the dead letter is
    deleted. Not: it stays, with the new error and attempts added up."""
    async with sessions() as session:
        row = await session.get(ExportDeadLetter, dead_letter_id)
    if row is None:
        raise LookupError(f"no dead letter {dead_letter_id}")
    exporter = exporters.get(row.exporter)
    if exporter is None:
        raise LookupError(f"dead letter {dead_letter_id} belongs to exporter {row.exporter!r}, not configured here")
    item = Item(orjson.loads(row.payload), row.detector_id, row.finding_id)
    cfg = exporter.config
    error: str | None = None
    attempt = 0
    while attempt < cfg.max_attempts:
        attempt += 1
        try:
            failures = await exporter.export([item])
        except PermanentError as exc:
            failures = [Failure(item, str(exc), False)]
        except Exception as exc:
            failures = [Failure(item, f"{type(exc).__name__}: {exc}", True)]
        if not failures:
            error = None
            break
        error = failures[0].error
        if not failures[0].retryable:
            break
        if attempt < cfg.max_attempts:
            await asyncio.sleep(backoff_s(attempt, cfg.backoff_base_s, cfg.backoff_max_s))
    async with sessions() as session, session.begin():
        if error is None:
            await session.execute(delete(ExportDeadLetter).where(ExportDeadLetter.id == dead_letter_id))
        else:
            await session.execute(
                update(ExportDeadLetter)
                .where(ExportDeadLetter.id == dead_letter_id)
                .values(error=error[:MAX_ERROR_CHARS], attempts=ExportDeadLetter.attempts + attempt)
            )
    return ReplayResult(dead_letter_id, row.exporter, error is None, error, attempt)

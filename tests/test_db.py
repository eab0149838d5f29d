"""backend.db on both engines, against real databases (a SQLite file, the run's PostgreSQL cluster).

Migrations from empty give exactly the models' schema; running them again does nothing; replicas starting together
take turns; a schema from a newer release is refused with a message. SQLite runs in WAL mode and takes concurrent
writers (in this process and in another) in turn, without "database is locked".
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, event, func, select, text
from sqlalchemy.engine import make_url

from backend.db import (
    MIGRATION_LOCK_KEY,
    Database,
    SchemaTooNewError,
    create_engine,
    current_revision,
    head_revision,
    migrate,
    normalize_url,
    open_database,
    prepare_sqlite_file,
)
from backend.models import Base, Detector

REPO = Path(__file__).resolve().parent.parent


def detector(n: int) -> Detector:
    return Detector(id=f"det{n:04d}", account_id=f"{n:012d}", region="us-east-1", created_at=n, updated_at=n)


def schema_drift(sync: Connection) -> list[object]:
    context = MigrationContext.configure(sync, opts={"compare_type": True, "compare_server_default": True})
    return list(compare_metadata(context, Base.metadata))


def sqlite_path(url: str) -> str:
    path = make_url(normalize_url(url)).database
    assert path is not None
    return path


# -- URLs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///data/backend.db", "sqlite+aiosqlite:///data/backend.db"),
        ("sqlite:////var/lib/backend.db", "sqlite+aiosqlite:////var/lib/backend.db"),
        ("sqlite+aiosqlite:////var/lib/backend.db", "sqlite+aiosqlite:////var/lib/backend.db"),
        ("/var/lib/backend.db", "sqlite+aiosqlite:////var/lib/backend.db"),
        ("  /var/lib/backend.db\n", "sqlite+aiosqlite:////var/lib/backend.db"),
        (
            "postgresql://app:s3cret@db.internal:5432/findings",
            "postgresql+asyncpg://app:s3cret@db.internal:5432/findings",
        ),
        ("postgres://app:p%40ss@db.internal/findings", "postgresql+asyncpg://app:p%40ss@db.internal/findings"),
        ("postgresql+asyncpg://db.internal/findings", "postgresql+asyncpg://db.internal/findings"),
        ("postgresql://db.internal/findings?ssl=require", "postgresql+asyncpg://db.internal/findings?ssl=require"),
        (
            "postgresql://db.internal/findings?sslmode=verify-full",
            "postgresql+asyncpg://db.internal/findings?ssl=verify-full",
        ),
    ],
)
def test_normalize_url(given: str, expected: str) -> None:
    assert normalize_url(given) == expected


def test_a_bare_relative_path_becomes_absolute() -> None:
    assert normalize_url("backend.db") == f"sqlite+aiosqlite:///{Path.cwd() / 'backend.db'}"


@pytest.mark.parametrize(
    ("given", "complaint"),
    [
        ("", "empty database URL"),
        ("mysql://app:hunter2@db/findings", "unsupported database 'mysql'"),
        ("http://example.com/", "unsupported database 'http'"),
        ("sqlite://", "in-memory"),
        ("sqlite:///:memory:", "in-memory"),
        (":memory:", "in-memory"),
        ("sqlite+pysqlite:///x.db", "driver 'pysqlite'"),
        ("postgresql+psycopg2://app:hunter2@db/findings", "driver 'psycopg2'"),
    ],
)
def test_unsupported_urls_are_refused_with_a_reason(given: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint) as caught:
        normalize_url(given)
    assert "hunter2" not in str(caught.value)


async def test_a_libpq_sslmode_reaches_asyncpg(postgres_url: str) -> None:
    db = await open_database(f"{postgres_url}?sslmode=disable")
    try:
        assert db.dialect == "postgresql"
        async with db.sessions() as session:
            assert await session.scalar(text("SELECT current_setting('application_name')")) == "runtime-backend"
    finally:
        await db.close()


# -- migrations ------------------------------------------------------------------------------------------------


async def test_migrating_an_empty_database_gives_the_models_schema(database_url: str) -> None:
    db = await open_database(database_url)
    try:
        assert await current_revision(db.engine) == head_revision()
        async with db.engine.connect() as conn:
            assert await conn.run_sync(schema_drift) == []
            tables = await conn.run_sync(lambda sync: set(sync.dialect.get_table_names(sync)))
        assert tables == {*Base.metadata.tables, "alembic_version"}
    finally:
        await db.close()


async def test_migrating_again_changes_nothing(database_url: str) -> None:
    db = await open_database(database_url)
    async with db.sessions() as session, session.begin():
        session.add(detector(1))
    await db.close()

    db = await open_database(database_url, migrate=False)
    statements: list[str] = []
    event.listen(db.engine.sync_engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    try:
        assert await migrate(db.engine) == head_revision()
        writes = [s for s in statements if s.split()[0].upper() in {"CREATE", "ALTER", "DROP", "INSERT", "UPDATE"}]
        assert writes == []
        async with db.sessions() as session:
            assert [d.id for d in (await session.scalars(select(Detector))).all()] == ["det0001"]
    finally:
        await db.close()


async def test_open_without_migrate_leaves_the_database_alone(database_url: str) -> None:
    db = await open_database(database_url, migrate=False)
    try:
        assert await current_revision(db.engine) is None
        async with db.engine.connect() as conn:
            assert await conn.run_sync(lambda sync: sync.dialect.get_table_names(sync)) == []
    finally:
        await db.close()


async def test_replicas_starting_together_all_come_up(database_url: str) -> None:
    opened = await asyncio.gather(*(open_database(database_url) for _ in range(6)), return_exceptions=True)
    try:
        assert [type(db).__name__ for db in opened] == ["Database"] * 6
        db = opened[0]
        assert not isinstance(db, BaseException)
        async with db.engine.connect() as conn:
            versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
        assert versions == [head_revision()]
    finally:
        for db in opened:
            if not isinstance(db, BaseException):
                await db.close()


async def test_replicas_creating_a_new_sqlite_file_together_all_come_up(tmp_path: Path) -> None:
    """The first start on a new file switches it to WAL: SQLite fails concurrent switches at once, without waiting."""
    for attempt in range(10):
        url = f"sqlite:///{tmp_path / str(attempt) / 'backend.db'}"
        opened = await asyncio.gather(*(open_database(url) for _ in range(6)), return_exceptions=True)
        for db in opened:
            if not isinstance(db, BaseException):
                await db.close()
        assert [repr(db) for db in opened if isinstance(db, BaseException)] == []


def test_preparing_a_new_sqlite_file_from_many_connections_at_once(tmp_path: Path) -> None:
    failures: list[str] = []

    def start_replica(path: str, start: threading.Barrier) -> None:
        start.wait()
        try:
            prepare_sqlite_file(path)
            # then migrate, as open_database does: the switch to WAL collides with others' first writes
            conn = sqlite3.connect(path, timeout=5, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("CREATE TABLE IF NOT EXISTS migrated (n INTEGER)")
            conn.execute("COMMIT")
            conn.close()
        except Exception as exc:
            failures.append(repr(exc))

    # a collision is a matter of timing: enough rounds that the code without its retry fails nearly every run
    for attempt in range(60):
        path = str(tmp_path / str(attempt) / "backend.db")
        start = threading.Barrier(8)
        threads = [threading.Thread(target=start_replica, args=(path, start)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert failures == []


async def test_a_migration_waits_for_one_in_progress_elsewhere(database_url: str) -> None:
    """Another process migrating holds the lock (PostgreSQL: the advisory lock; SQLite: a write transaction)."""
    release = threading.Event()
    held = threading.Event()
    holder_engine = None
    if database_url.startswith("sqlite"):

        def hold_sqlite() -> None:
            path = sqlite_path(database_url)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("PRAGMA journal_mode = WAL")
            other.execute("BEGIN IMMEDIATE")
            held.set()
            release.wait(10)
            other.execute("COMMIT")
            other.close()

        holder = threading.Thread(target=hold_sqlite)
        holder.start()
        assert held.wait(5)
    else:
        holder_engine = create_engine(normalize_url(database_url))
        lock_conn = await holder_engine.connect()
        await lock_conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
    try:
        opening = asyncio.create_task(open_database(database_url))
        await asyncio.sleep(0.5)
        assert not opening.done(), "the migration did not wait for the one in progress"
    finally:
        if holder_engine is None:
            release.set()
            holder.join()
        else:
            await lock_conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
            await lock_conn.close()
            await holder_engine.dispose()
    db = await asyncio.wait_for(opening, 10)
    try:
        assert await current_revision(db.engine) == head_revision()
    finally:
        await db.close()


async def test_a_schema_from_a_newer_release_is_refused(database_url: str) -> None:
    db = await open_database(database_url)
    async with db.engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    await db.close()

    with pytest.raises(
        SchemaTooNewError, match=r"schema revision 9999, .* does not know \(its newest is " + head_revision() + r"\)"
    ):
        await open_database(database_url)

    db = await open_database(database_url, migrate=False)
    try:
        assert await current_revision(db.engine) == "9999"  # refused, not "repaired"
    finally:
        await db.close()


def test_the_alembic_cli_for_developers_sees_no_drift(sqlite_url: str) -> None:
    """backend/alembic.ini and env.py's CLI path: upgrade, then `alembic check` finds nothing to generate."""
    alembic = [sys.executable, "-m", "alembic", "-c", str(REPO / "backend" / "alembic.ini"), "-x", f"url={sqlite_url}"]
    for args in (["upgrade", "head"], ["check"]):
        result = subprocess.run([*alembic, *args], capture_output=True, text=True, timeout=60, cwd="/")
        assert result.returncode == 0, result.stdout + result.stderr
    assert "No new upgrade operations detected" in result.stdout + result.stderr
    with sqlite3.connect(sqlite_path(sqlite_url)) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(head_revision(),)]


# -- sessions ----------------------------------------------------------------------------------------------------


async def test_sqlite_connection_settings(sqlite_url: str) -> None:
    db = await open_database(sqlite_url)
    try:
        assert db.dialect == "sqlite"
        assert Path(sqlite_path(sqlite_url)).is_file()
        async with db.sessions() as session:
            # the migration ran on this same connection (the pool has one) and must have put its settings back
            got = {
                pragma: (await session.execute(text(f"PRAGMA {pragma}"))).scalar_one()
                for pragma in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
        assert got == {"journal_mode": "wal", "synchronous": 1, "foreign_keys": 1, "busy_timeout": 5000}
    finally:
        await db.close()


async def test_concurrent_writers_all_land(database: Database) -> None:
    async def insert(n: int) -> None:
        async with database.sessions() as session, session.begin():
            session.add(detector(n))

    async def bump_tags() -> None:
        # read, yield to the others, write: lost updates if two sessions interleave here
        async with database.sessions() as session, session.begin():
            row = (await session.scalars(select(Detector).where(Detector.id == "det0000").with_for_update())).one()
            seen = int(row.tags)
            await asyncio.sleep(0)
            row.tags = str(seen + 1)

    counter = detector(0)
    counter.tags = "0"
    async with database.sessions() as session, session.begin():
        session.add(counter)
    await asyncio.gather(*(insert(n) for n in range(1, 51)))
    await asyncio.gather(*(bump_tags() for _ in range(50)))

    async with database.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(Detector)) == 51
        assert (await session.get_one(Detector, "det0000")).tags == "50"


async def test_sqlite_waits_for_another_process_writer_and_then_sees_its_rows(sqlite_url: str) -> None:
    """A session's transaction starts after the other writer commits, so what it reads is still true when it writes.

    (With the sqlite3 module's own handling, the read would run outside the transaction and miss the other row;
    with a plain deferred BEGIN, the write after the read would fail with "database is locked".)
    """
    db = await open_database(sqlite_url)
    held = threading.Event()

    def other_process_writer() -> None:
        other = sqlite3.connect(sqlite_path(sqlite_url), isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute(
            "INSERT INTO detectors (id, account_id, region, status, finding_publishing_frequency, tags, created_at,"
            " updated_at) VALUES ('other', '000000000000', 'us-east-1', 'ENABLED', 'SIX_HOURS', '{}', 0, 0)"
        )
        held.set()
        threading.Event().wait(0.4)
        other.execute("COMMIT")
        other.close()

    writer = threading.Thread(target=other_process_writer)
    writer.start()
    try:
        assert await asyncio.to_thread(held.wait, 5)
        async with db.sessions() as session, session.begin():
            seen = await session.scalar(select(func.count()).select_from(Detector))
            session.add(detector(1))
        assert seen == 1
        async with db.sessions() as session:
            assert await session.scalar(select(func.count()).select_from(Detector)) == 2
    finally:
        writer.join()
        await db.close()

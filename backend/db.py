"""The backend's database: one engine, its sessions, and the schema migrations every replica runs at start.

Two engines are supported, chosen by the URL:

- SQLite (the embedded default, nothing to install) through aiosqlite. The pool holds ONE connection, so every
  session in the process takes turns: SQLite lets one writer at a time anyway, and a single connection means a
  session's read-then-write can never interleave with another's (with several connections, two sessions that both
  read before writing fail with "database is locked" instead of waiting). Consequence for callers: never open a
  second session while holding one in the same task; it waits for the first and, after ``pool_timeout``, fails.
  Transactions start with ``BEGIN IMMEDIATE`` (the sqlite3 module's own transaction handling is switched off: it
  runs SELECTs outside any transaction), so another process on the same file (the CLI creating a token while the
  server runs) waits its turn for ``busy_timeout`` instead of failing half-way.
- PostgreSQL through asyncpg, for several replicas behind a load balancer: a pool per replica, pre-ping on
  checkout (connections die on failover), migrations serialised across replicas by an advisory lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
# pg_advisory_xact_lock key shared by every replica (and by `alembic upgrade` from a developer's shell).
MIGRATION_LOCK_KEY = int.from_bytes(b"ecsrtmig", "big")
SQLITE_BUSY_TIMEOUT_MS = 5000
# A migration may wait longer than a request for another process's transaction: giving up means not starting.
SQLITE_MIGRATION_BUSY_TIMEOUT_MS = 60_000
SQLITE_PRAGMAS = (
    # busy_timeout first, so that switching the journal mode waits for another process instead of failing
    f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}",
    "PRAGMA journal_mode = WAL",
    # in WAL mode NORMAL loses at most the last transactions on power loss, never consistency
    "PRAGMA synchronous = NORMAL",
    "PRAGMA foreign_keys = ON",
)
URL_HELP = "give sqlite:///PATH (or a file path) or postgresql://USER:PASSWORD@HOST:PORT/DBNAME"


class SchemaTooNewError(RuntimeError):
    """The database was migrated by a newer release: this code does not know its schema revision.

    Starting anyway would write rows the newer schema may not accept; retrying cannot help, so callers should stop
    with this message rather than restart.
    """


@dataclass(frozen=True)
class Database:
    """An open database: ``sessions()`` gives an ``AsyncSession`` (objects stay usable after commit)."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    dialect: str  # "sqlite" | "postgresql"
    url: str  # normalized, password hidden: for logs and messages

    async def close(self) -> None:
        await self.engine.dispose()


def normalize_url(url: str) -> str:
    """The async SQLAlchemy URL for a user's database setting.

    ``sqlite:///PATH`` or a bare file path -> ``sqlite+aiosqlite:///PATH`` (a bare path is made absolute);
    ``postgresql://`` or ``postgres://`` -> ``postgresql+asyncpg://`` (libpq's ``sslmode`` becomes asyncpg's
    ``ssl``). URLs already naming these drivers pass unchanged. Anything else, an in-memory SQLite database
    included, raises ValueError.
    """
    url = url.strip()
    if not url:
        raise ValueError(f"empty database URL: {URL_HELP}")
    if "://" not in url:
        if url == ":memory:":
            raise ValueError(_memory_message())
        path = Path(url).expanduser().absolute()
        return URL.create("sqlite+aiosqlite", database=str(path)).render_as_string(hide_password=False)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"not a database URL: {_redact(url)}: {URL_HELP}") from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "sqlite":
        if driver not in ("", "aiosqlite"):
            raise ValueError(f"SQLite driver {driver!r} is not supported (the backend is async): use sqlite:///PATH")
        if not parsed.database or parsed.database == ":memory:" or parsed.query.get("mode") == "memory":
            raise ValueError(_memory_message())
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "asyncpg"):
            raise ValueError(
                f"PostgreSQL driver {driver!r} is not supported (the backend uses asyncpg): use postgresql://..."
            )
        if "sslmode" in parsed.query:
            # libpq's sslmode (what RDS and most guides give) is asyncpg's ssl, with the same values
            query = dict(parsed.query)
            query["ssl"] = query.pop("sslmode")
            parsed = parsed.set(query=query)
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    raise ValueError(f"unsupported database {parsed.drivername!r} in {_redact(url)}: {URL_HELP}")


async def open_database(
    url: str,
    *,
    migrate: bool = True,
    pool_size: int = 5,
    max_overflow: int = 10,
    pool_timeout: float = 30.0,
    echo: bool = False,
) -> Database:
    """Open the database at ``url`` (see ``normalize_url``) and, with ``migrate``, bring its schema to head.

    ``pool_size`` and ``max_overflow`` size the PostgreSQL pool (SQLite always has one connection, see the module
    docstring); ``pool_timeout`` is how long a session waits for a connection. Raises ``SchemaTooNewError`` if a
    newer release has migrated the database, ValueError for a bad URL; the engine is closed on any failure.
    """
    normalized = normalize_url(url)
    parsed = make_url(normalized)
    if parsed.get_backend_name() == "sqlite":
        assert parsed.database is not None
        await asyncio.to_thread(prepare_sqlite_file, parsed.database)
    engine = create_engine(
        normalized, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=pool_timeout, echo=echo
    )
    db = Database(
        engine=engine,
        sessions=async_sessionmaker(engine, expire_on_commit=False),
        dialect=engine.dialect.name,
        url=_redact(normalized),
    )
    if migrate:
        try:
            await _upgrade(engine)
        except BaseException:
            await engine.dispose()
            raise
    return db


def prepare_sqlite_file(path: str) -> None:
    """Create the file's directory, and put the file in WAL mode (it stays so: the mode is kept in the file).

    Done once before the engine's connections open: two connections switching a new file to WAL at the same time
    get "database is locked" at once, without waiting for busy_timeout, so this one retries; once the file is in WAL
    mode, each connection's own "PRAGMA journal_mode = WAL" changes nothing and cannot fail that way.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        conn = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"SQLite keeps {path} in journal mode {mode!r}, not WAL (a network file system?)")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        finally:
            conn.close()
        time.sleep(0.02)


def create_engine(
    normalized_url: str,
    *,
    pool_size: int = 5,
    max_overflow: int = 10,
    pool_timeout: float = 30.0,
    echo: bool = False,
) -> AsyncEngine:
    """The engine for an already normalized URL, set up as the module docstring says (no migration)."""
    parsed = make_url(normalized_url)
    if parsed.get_backend_name() == "sqlite":
        assert parsed.database is not None
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            parsed,
            poolclass=AsyncAdaptedQueuePool,
            pool_size=1,
            max_overflow=0,
            pool_timeout=pool_timeout,
            echo=echo,
        )
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_on_begin)
        return engine
    return create_async_engine(
        parsed,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        echo=echo,
        # custom plans: asyncpg keeps prepared statements per connection, and PostgreSQL's generic plan for them
        # is made with the statistics of the day the statement was first used (an empty findings table: a
        # sequential scan, per-batch ingest then grew with the table, 12 ms -> 36 ms at 60k findings)
        connect_args={
            "server_settings": {"application_name": "runtime-backend", "plan_cache_mode": "force_custom_plan"}
        },
    )


async def migrate(engine: AsyncEngine) -> str:
    """``alembic upgrade head``, safe to run from several processes at once; returns the revision now in place.

    PostgreSQL: under ``pg_advisory_xact_lock(MIGRATION_LOCK_KEY)``, in one transaction with the migrations, so
    replicas starting together take turns and the later ones find nothing to do. SQLite: in one ``BEGIN
    IMMEDIATE`` transaction, which holds off every other writer of the file.
    """
    return await _upgrade(engine)


async def _upgrade(engine: AsyncEngine) -> str:
    async with engine.connect() as conn:
        return await conn.run_sync(_upgrade_sync)


async def current_revision(engine: AsyncEngine) -> str | None:
    """The schema revision the database is at (None: never migrated)."""
    async with engine.connect() as conn:
        return await conn.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())


def head_revision() -> str:
    """The newest schema revision this code knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "backend/migrations/versions holds no revision"
    return head


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built in code so that nothing depends on the working directory or an ini file.

    With ``connection``, migrations/env.py runs on it (inside the caller's transaction).
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["connection"] = connection
    return cfg


@contextlib.contextmanager
def migration_transaction(conn: Connection) -> Iterator[None]:
    """A transaction on ``conn`` to migrate in, committed at the end: no other process migrates meanwhile.

    PostgreSQL: ``pg_advisory_xact_lock(MIGRATION_LOCK_KEY)``, held until commit. SQLite: the transaction itself
    (BEGIN IMMEDIATE) is the lock; foreign keys are off inside it and checked before commit.
    """
    with _sqlite_migration_settings(conn), conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        yield
        if conn.dialect.name == "sqlite":
            violations = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if violations:
                raise RuntimeError(f"the migration left rows that break foreign keys: {violations[:10]}")


def _upgrade_sync(conn: Connection) -> str:
    cfg = alembic_config(conn)
    script = ScriptDirectory.from_config(cfg)
    head = script.get_current_head()
    assert head is not None, "backend/migrations/versions holds no revision"
    with migration_transaction(conn):
        current = MigrationContext.configure(conn).get_current_heads()
        known = {s.revision for s in script.walk_revisions()}
        unknown = [rev for rev in current if rev not in known]
        if unknown:
            raise SchemaTooNewError(
                f"the database {_redact(conn.engine.url.render_as_string(hide_password=False))} is at schema "
                f"revision {', '.join(unknown)}, which this release of runtime-backend does not know (its newest is "
                f"{head}): a newer release has migrated it. Run that release or a later one against this database; "
                "this one refuses to start rather than write rows the newer schema may not expect."
            )
        if tuple(current) != (head,):
            log.info("migrating database schema", extra={"from_revision": ",".join(current) or None, "to": head})
        command.upgrade(cfg, "head")
    return head


@contextlib.contextmanager
def _sqlite_migration_settings(conn: Connection) -> Iterator[None]:
    """SQLite's per-connection settings for a migration, restored after it (the connection goes back to the pool).

    Foreign keys off: a batch migration rebuilds a table by copy, drop and rename, and with enforcement on the drop
    would cascade or fail (migration_transaction checks them before commit instead); SQLite ignores this pragma
    inside a transaction, so it is set before BEGIN.
    """
    if conn.dialect.name != "sqlite":
        yield
        return
    raw = conn.connection.dbapi_connection
    assert raw is not None
    _sqlite_execute(raw, "PRAGMA foreign_keys = OFF", f"PRAGMA busy_timeout = {SQLITE_MIGRATION_BUSY_TIMEOUT_MS}")
    try:
        yield
    finally:
        _sqlite_execute(raw, "PRAGMA foreign_keys = ON", f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # None: the sqlite3 module stops issuing its own BEGIN (only before INSERT/UPDATE/DELETE, so SELECTs ran
    # outside the transaction); _sqlite_on_begin issues one for every transaction instead.
    dbapi_connection.isolation_level = None
    _sqlite_execute(dbapi_connection, *SQLITE_PRAGMAS)


def _sqlite_on_begin(conn: Connection) -> None:
    # IMMEDIATE takes the write lock now, waiting busy_timeout for another process's writer: a DEFERRED
    # transaction that read first would instead fail with SQLITE_BUSY when it came to write.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_execute(dbapi_connection: Any, *statements: str) -> None:
    cursor = dbapi_connection.cursor()
    try:
        for statement in statements:
            cursor.execute(statement)
    finally:
        cursor.close()


def _memory_message() -> str:
    return f"an in-memory SQLite database would vanish with its connection: {URL_HELP}"


def _redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"

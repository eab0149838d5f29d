"""Alembic's environment for the backend's schema.

Two ways in:
- ``backend.db.migrate`` (every backend start) passes its connection in ``config.attributes["connection"]``, already
  inside a transaction holding the migration lock; the migrations run in that transaction.
- The alembic CLI, for developers (see backend/alembic.ini): the URL comes from ``-x url=...``, else
  ``RUNTIME_BACKEND_DATABASE_URL``, else the ini's ``sqlalchemy.url``; the engine is the backend's own
  (``backend.db.create_engine``) and the migrations run in the same locked transaction
  (``backend.db.migration_transaction``).
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from backend.db import create_engine, migration_transaction, normalize_url
from backend.models import Base

config = context.config
target_metadata = Base.metadata


def configure(**options: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite alters a table by rebuilding it: autogenerate must write batch operations for it
        render_as_batch=True,
        # under backend.db's BEGIN (sqlite3's own transaction handling is off) SQLite's DDL is transactional too
        transactional_ddl=True,
        **options,  # type: ignore[arg-type]
    )


def run_on(connection: Connection) -> None:
    configure(connection=connection)
    # inside backend.db's transaction this is a no-op: alembic sees the transaction already begun
    with context.begin_transaction():
        context.run_migrations()


def run_locked(connection: Connection) -> None:
    with migration_transaction(connection):
        run_on(connection)


def cli_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get("RUNTIME_BACKEND_DATABASE_URL")
    url = url or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database: pass -x url=... or set RUNTIME_BACKEND_DATABASE_URL")
    return normalize_url(url)


async def run_cli_online() -> None:
    engine = create_engine(cli_url())
    try:
        async with engine.connect() as conn:
            await conn.run_sync(run_locked)
    finally:
        await engine.dispose()


given_connection = config.attributes.get("connection")
if given_connection is not None:
    run_on(given_connection)
else:
    if config.config_file_name is not None:
        fileConfig(config.config_file_name)
    if context.is_offline_mode():
        configure(url=cli_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
        with context.begin_transaction():
            context.run_migrations()
    else:
        asyncio.run(run_cli_online())

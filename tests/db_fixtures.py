"""Database fixtures, a pytest plugin (tests/conftest.py loads it): the backend's tests run on both engines.

- ``postgres_server`` (session): a throwaway PostgreSQL cluster, started the first time a test asks for it, so
  that a run without PostgreSQL tests never starts one.
- ``database_url`` (function, parametrized "sqlite" / "postgresql"): a fresh empty database, as a user's URL.
- ``sqlite_url``, ``postgres_url``: the same for one engine only.
- ``database``: an opened, migrated ``backend.db.Database`` over ``database_url``.

The cluster trades durability for speed (fsync, full-page writes and synchronous commit off): it lives for one
run. Its postmaster is a direct child of pytest that gets SIGQUIT (PostgreSQL's immediate shutdown) if pytest dies
without tearing down, so a killed CI run leaves no server behind.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from backend.db import Database, open_database

POSTGRES_ROOT = Path("/usr/lib/postgresql")
SERVER_START_TIMEOUT_S = 30.0
SUPERUSER = "postgres"


@dataclass
class PostgresServer:
    """A running cluster: superuser ``postgres``, trust authentication, on 127.0.0.1:``port``."""

    bindir: Path
    root: Path  # data/, the socket directory and the server log
    port: int
    process: subprocess.Popen[bytes]
    start_seconds: float  # initdb + start, for the record
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` as the superuser over the unix socket; its output, unaligned and without headers."""
        result = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                dbname,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql {sql!r} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    @contextmanager
    def fresh_database(self) -> Iterator[str]:
        """A new empty database for the duration, dropped after (with any connection a test left open)."""
        name = f"test_{next(self._names)}"
        self.psql(f"CREATE DATABASE {name}")
        try:
            yield self.url(name)
        finally:
            self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def find_postgres_bindir() -> Path:
    """The newest installed server's bin directory (Debian's layout: /usr/lib/postgresql/<major>/bin)."""
    candidates = []
    if POSTGRES_ROOT.is_dir():
        for entry in POSTGRES_ROOT.iterdir():
            bindir = entry / "bin"
            if entry.name.isdigit() and all((bindir / tool).is_file() for tool in ("initdb", "postgres", "pg_ctl")):
                candidates.append((int(entry.name), bindir))
    if not candidates:
        pytest.fail(
            f"no PostgreSQL server binaries under {POSTGRES_ROOT}/*/bin: the backend's tests run on PostgreSQL too; "
            "install the server with `apt-get install postgresql` (Debian/Ubuntu)",
            pytrace=False,
        )
    return max(candidates)[1]


def _server_user() -> str | None:
    """Who runs the server's programs (postgres, initdb and pg_ctl refuse root): None for pytest's own user."""
    if os.geteuid() != 0:
        return None
    for user in (SUPERUSER, "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return user
    pytest.fail("running as root, and no 'postgres' or 'nobody' user to run the PostgreSQL server as", pytrace=False)


def _setpriv(user: str | None, *options: str) -> list[str]:
    """The command prefix running a program as ``user``."""
    drop = [f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user else []
    return ["setpriv", *drop, *options, "--"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stdout}{result.stderr}")


def _start_postmaster(bindir: Path, root: Path, user: str | None, port: int) -> subprocess.Popen[bytes] | None:
    """The server on ``port``, accepting connections; None if the port was taken meanwhile (pick another)."""
    log_offset = (root / "server.log").stat().st_size if (root / "server.log").exists() else 0
    with (root / "server.log").open("ab") as log:
        # setpriv execs in place (runuser would stay in between as the parent), so the postmaster is our child and
        # --pdeathsig reaches it; SIGQUIT is PostgreSQL's immediate shutdown, which also ends its backends
        process = subprocess.Popen(
            [
                *_setpriv(user, "--pdeathsig=SIGQUIT"),
                str(bindir / "postgres"),
                "-D",
                str(root / "data"),
                "-p",
                str(port),
                "-k",
                str(root / "sock"),
                "-c",
                "listen_addresses=127.0.0.1",
                # a throwaway cluster: durability buys nothing, and commits would wait for the disk
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "synchronous_commit=off",
                # each test's engines hold pools of their own; tests open several engines at once
                "-c",
                "max_connections=300",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=root,
        )
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log_text = (root / "server.log").read_bytes()[log_offset:].decode(errors="replace")
            if "could not bind" in log_text or "Address already in use" in log_text:
                return None
            raise RuntimeError(f"the PostgreSQL server exited at start ({process.returncode}):\n{log_text}")
        ready = subprocess.run(
            [str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", SUPERUSER],
            capture_output=True,
        )
        if ready.returncode == 0:
            return process
        time.sleep(0.02)
    process.kill()
    process.wait()
    raise RuntimeError(f"the PostgreSQL server did not accept connections within {SERVER_START_TIMEOUT_S} s")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster for this test run (the newest installed version), removed at the end."""
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to run the PostgreSQL server: apt-get install util-linux")
    with running_postgres() as server:
        yield server


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster (the fixture's, and the backend benchmark's)."""
    bindir = find_postgres_bindir()
    user = _server_user()
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="pytest-postgres-"))
    process = None
    try:
        (root / "sock").mkdir()
        if user:
            owner = pwd.getpwnam(user)
            for path in (root, root / "sock"):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        _run(
            [
                *_setpriv(user),
                str(bindir / "initdb"),
                "-D",
                str(root / "data"),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            cwd=root,
        )
        for _ in range(5):
            port = _free_port()
            process = _start_postmaster(bindir, root, user, port)
            if process is not None:
                break
        else:
            raise RuntimeError("no free port for the PostgreSQL server after 5 tries")
        server = PostgresServer(
            bindir=bindir, root=root, port=port, process=process, start_seconds=time.monotonic() - started
        )
        yield server
    finally:
        if process is not None:
            if process.poll() is None:
                subprocess.run(
                    [*_setpriv(user), str(bindir / "pg_ctl"), "stop", "-D", str(root / "data"), "-m", "immediate"],
                    cwd=root,
                    capture_output=True,
                    timeout=60,
                )
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database that does not exist yet, in a directory that does not exist yet either."""
    return f"sqlite:///{tmp_path / 'db' / 'backend.sqlite3'}"


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A new empty PostgreSQL database, dropped after the test."""
    with postgres_server.fresh_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """A new empty database on each engine in turn: the test runs once per engine."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest_asyncio.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    """``database_url`` opened and migrated."""
    db = await open_database(database_url)
    try:
        yield db
    finally:
        await db.close()

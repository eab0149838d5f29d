"""`runtime-backend local` (`make run`): the backend on SQLite and a sidecar watching this host, wired together.

The state directory keeps the database, the sidecar's spool and the local credentials (an access key for the
GuardDuty API, an agent token, the console's password), so a second run finds the first run's findings and keys.
The sidecar is a child process talking to the backend over HTTP, exactly as in a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import orjson

from backend import tenancy
from backend.app import Server
from backend.config import BackendSettings
from backend.console.operators import create_operator, verify_password
from backend.models import Operator

log = logging.getLogger("backend.local")

# what the sidecar calls itself when it watches a host instead of a task (sidecar/config.py defaults)
LOCAL_ACCOUNT = "000000000000"
LOCAL_REGION = "local"
LOCAL_CLUSTER = "local"
LOCAL_OPERATOR = "local"


async def _credentials(server: Server, state: Path) -> dict[str, Any]:
    """The state dir's access key and token, created on first use (the token's secret exists only there)."""
    path = state / "credentials.json"
    creds: dict[str, Any] = {}
    if path.exists():
        with contextlib.suppress(ValueError, OSError):
            creds = orjson.loads(path.read_bytes())
    assert server.db is not None
    async with server.db.sessions() as session, session.begin():
        key = creds.get("accessKeyId")
        if not key or await tenancy.lookup_access_key(session, key) is None:
            kid, secret = await tenancy.create_access_key(session, LOCAL_ACCOUNT, LOCAL_REGION, "runtime-backend local")
            creds.update(accessKeyId=kid, secretAccessKey=secret)
        token = creds.get("token")
        if not token or await tenancy.authenticate_token(session, token) is None:
            _, token = await tenancy.create_token(session, LOCAL_ACCOUNT, LOCAL_REGION, LOCAL_CLUSTER, "local sidecar")
            creds["token"] = token
        # the console is never open without a sign-in, even here: an operator whose password only this file has
        row = await session.get(Operator, LOCAL_OPERATOR)
        password = creds.get("consolePassword")
        if (
            row is None
            or row.disabled_at is not None
            or not password
            or not verify_password(password, row.password_hash)
        ):
            password = secrets.token_urlsafe(12)
            await create_operator(session, LOCAL_OPERATOR, password, ["*"])
            creds["consolePassword"] = password
    os.makedirs(state, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(orjson.dumps(creds, option=orjson.OPT_INDENT_2))
    return creds


def banner(url: str, creds: dict[str, Any]) -> str:
    detector = tenancy.detector_id_for(LOCAL_ACCOUNT, LOCAL_REGION)
    return "\n".join(
        [
            "",
            f"runtime-backend: {url}   (GuardDuty API and agent collector)",
            f"console: {url}/console   user {LOCAL_OPERATOR}, password {creds['consolePassword']}",
            "query findings with the AWS CLI or boto3, exactly as GuardDuty:",
            f"  export AWS_ACCESS_KEY_ID={creds['accessKeyId']} AWS_SECRET_ACCESS_KEY={creds['secretAccessKey']}"
            f" AWS_DEFAULT_REGION={LOCAL_REGION}",
            f"  aws guardduty list-findings --endpoint-url {url} --detector-id {detector}",
            f"  aws guardduty get-findings --endpoint-url {url} --detector-id {detector} --finding-ids <id>",
            "",
        ]
    )


async def run_local(settings: BackendSettings, state_dir: Path, *, findings_out: str, with_sidecar: bool) -> int:
    state = state_dir  # absolute: resolved by the CLI
    os.makedirs(state, exist_ok=True)
    server = Server(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    child: asyncio.subprocess.Process | None = None
    try:
        creds = await _credentials(server, state)
        sys.stdout.write(banner(server.url, creds) + "\n")
        sys.stdout.flush()
        if with_sidecar:
            env = {
                **os.environ,
                "RUNTIME_SIDECAR_TOKEN": creds["token"],
                "RUNTIME_SIDECAR_SPOOL_DIR": str(state / "spool"),
                "RUNTIME_SIDECAR_ACCOUNT_ID": LOCAL_ACCOUNT,
                "RUNTIME_SIDECAR_REGION": LOCAL_REGION,
            }
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sidecar",
                "run",
                "--collector-url",
                server.url,
                "--findings-out",
                findings_out,
                env=env,
            )
            waiter = asyncio.ensure_future(child.wait())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if waiter in done:
                log.error("the sidecar exited", extra={"returncode": child.returncode})
                await stop.wait()
        else:
            await stop.wait()
    finally:
        if child is not None and child.returncode is None:
            child.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.wait(), 15)
            except TimeoutError:
                child.kill()
                await child.wait()
        await server.stop()
    return 0

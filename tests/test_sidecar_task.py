"""The real sidecar binary in an emulated Fargate task (pidMode: task, Fargate capabilities).

Everything here is observed through `--events-out`, as a user would: command
lines, lineage, containers, exits, and the awkward cases (zombies, deleted
executables, other users, forks caught before their exec).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from taskenv import SidecarHandle, TaskEnv


def start(task: TaskEnv, tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> SidecarHandle:
    events = tmp_path / "events.jsonl"
    sidecar = task.start_sidecar(["run", "--events-out", str(events), *extra], env=env)
    # ready once the initial sweep has written the task's existing processes
    sidecar.wait_for_event(lambda e: e["kind"] == "process.exec", timeout=20)
    return sidecar


def execs(sidecar: SidecarHandle) -> list[dict[str, Any]]:
    return [e["process"] for e in sidecar.events() if e["kind"] == "process.exec"]


def by_uuid(sidecar: SidecarHandle) -> dict[str, dict[str, Any]]:
    return {p["uuid"]: p for p in execs(sidecar)}


def lineage(sidecar: SidecarHandle, proc: dict[str, Any]) -> list[dict[str, Any]]:
    index = by_uuid(sidecar)
    out: list[dict[str, Any]] = []
    cur = index.get(proc.get("parentUuid") or "")
    while cur is not None and len(out) < 20:
        out.append(cur)
        cur = index.get(cur.get("parentUuid") or "")
    return out


def test_commands_lineage_and_containers(task_env: TaskEnv, tmp_path: Path) -> None:
    sidecar = start(task_env, tmp_path)
    app, worker = task_env.containers["app"], task_env.containers["worker"]
    rc, _ = task_env.run("app", ["sh", "-c", "ls /etc > /dev/null; sleep 0.21; exit 4"])
    assert rc == 4
    task_env.run("worker", ["sh", "-c", "sleep 0.15; cat /etc/hostname; sleep 0.15"])
    # processes living >= 5 ms are all seen; ~1 ms ones (ls) are a bench figure, not asserted
    ev = sidecar.wait_for_event(lambda e: e["kind"] == "process.exec" and e["process"]["commandLine"] == "sleep 0.21")
    p = ev["process"]
    assert p["executablePath"] in ("/bin/sleep", "/usr/bin/sleep")
    assert p["containerName"] == "app" and p["containerId"] == app.docker_id
    assert p["containerImage"] == app.image
    assert p["uid"] == 0 and p["user"] == "root" and p["pwd"] == "/"
    with open("/bin/sleep", "rb") as f:  # the container's /usr is the host's, read-only
        assert p["executableSha256"] == hashlib.sha256(f.read()).hexdigest()
    chain = lineage(sidecar, p)
    assert chain[0]["commandLine"] == "sh -c ls /etc > /dev/null; sleep 0.21; exit 4"
    assert chain[0]["containerName"] == "app"
    assert chain[1]["pid"] == app.pid  # the container's init
    assert chain[-1]["pid"] == 1  # the task's init (pause)
    w = sidecar.wait_for_event(lambda e: e["kind"] == "process.exec" and e["process"]["commandLine"] == "sleep 0.15")
    assert w["process"]["containerName"] == "worker" and w["process"]["containerId"] == worker.docker_id
    shell_exit = sidecar.wait_for_event(
        lambda e: e["kind"] == "process.exit" and e["process"]["uuid"] == chain[0]["uuid"]
    )
    assert shell_exit["exitCode"] in (4, None)  # None only if its parent reaped it before we read the zombie
    # pids are those of the task's namespace, not the host's
    assert p["pid"] < 10000 and p["namespacePid"] == p["pid"]
    assert sidecar.stop() == 0


def test_short_lived_processes_show_their_own_command_line(task_env: TaskEnv, tmp_path: Path) -> None:
    """Forks read before their exec must not be reported with the parent's command line."""
    sidecar = start(task_env, tmp_path)
    script = "for i in $(seq 1 40); do /bin/true marker-$i; done; for i in $(seq 1 10); do sleep 0.05; done"
    task_env.run("app", ["sh", "-c", script], timeout=30)
    sidecar.wait_for_event(lambda e: e["kind"] == "process.exit" and e["process"]["commandLine"] == "sleep 0.05")
    time.sleep(0.3)
    procs = execs(sidecar)
    trues = [p for p in procs if p["executablePath"] in ("/bin/true", "/usr/bin/true")]
    assert trues, "no short-lived process seen at all"
    for p in trues:  # a real image of true: its own arguments, or (read mid-exec) its path
        assert p["commandLine"].startswith("/bin/true marker-") or not p["complete"], p
    # the shell's own image is reported once, not once per fork (a fork whose exec we could not see before it
    # exited is reported as incomplete, under the name it exec'd, not as another run of the shell)
    shells = [p for p in procs if p["commandLine"] == f"sh -c {script}" and p["complete"]]
    assert len(shells) == 1
    sleeps = [p for p in procs if p["commandLine"] == "sleep 0.05"]
    assert len(sleeps) == 10  # every 50 ms process


def test_zombie_deleted_executable_and_other_user(task_env: TaskEnv, tmp_path: Path) -> None:
    # a binary dropped, run and deleted before the sidecar starts
    task_env.run("app", ["cp", "/bin/sleep", "/tmp/dropper"])
    dropper = task_env.spawn("app", ["/tmp/dropper", "30"])
    task_env.run("app", ["rm", "/tmp/dropper"])
    sidecar = start(task_env, tmp_path)
    d = sidecar.wait_for_event(lambda e: e["kind"] == "process.exec" and e["process"]["pid"] == dropper)["process"]
    assert d["executablePath"] == "/tmp/dropper" and d["executableDeleted"] is True
    with open("/bin/sleep", "rb") as f:
        assert d["executableSha256"] == hashlib.sha256(f.read()).hexdigest()
    assert d["containerName"] == "app"
    # a zombie: the backgrounded child exits, its parent (exec'd into sleep) never reaps it
    task_env.spawn("app", ["sh", "-c", "sleep 0.2 & exec sleep 3"])
    z = sidecar.wait_for_event(lambda e: e["kind"] == "process.exit" and e["process"]["commandLine"] == "sleep 0.2")
    assert z["exitCode"] == 0  # read from the zombie's stat
    # another uid: the name comes from the container's own /etc/passwd
    task_env.run("worker", ["sh", "-c", "sleep 0.2"], uid=65534)
    n = sidecar.wait_for_event(
        lambda e: e["kind"] == "process.exec" and e["process"]["commandLine"] == "sh -c sleep 0.2"
    )
    assert n["process"]["uid"] == 65534 and n["process"]["euid"] == 65534
    assert n["process"]["user"] == "nobody"
    task_env.kill(dropper)
    exit_d = sidecar.wait_for_event(lambda e: e["kind"] == "process.exit" and e["process"]["pid"] == dropper)
    assert exit_d["exitCode"] in (-9, None)
    assert sidecar.stop() == 0


def test_loader_variables_kept_secrets_never(task_env: TaskEnv, tmp_path: Path) -> None:
    sidecar = start(task_env, tmp_path)
    task_env.run("app", ["sh", "-c", "sleep 0.2"], env={"LD_PRELOAD": "/tmp/libhook.so", "API_KEY": "sk-live-123456"})
    ev = sidecar.wait_for_event(lambda e: e["kind"] == "process.exec" and e["process"]["commandLine"] == "sleep 0.2")
    assert ev["process"]["ldPreload"] == "/tmp/libhook.so"
    assert sidecar.stop() == 0
    raw = (tmp_path / "events.jsonl").read_text() + "\n".join(sidecar.stderr_lines())
    assert "sk-live-123456" not in raw
    for c in task_env.containers.values():
        if c.secret:
            assert c.secret not in raw


def test_probe_inside_the_task_chooses_polling_and_says_why(task_env: TaskEnv) -> None:
    handle = task_env.start_sidecar(["probe"])
    assert handle.wait(30) == 0
    report = json.loads(handle.stdout_text())
    assert report["pidNamespace"]["initial"] is False
    assert report["sources"]["proc_connector"]["available"] is False
    assert "initial PID namespace" in report["sources"]["proc_connector"]["reason"]
    assert report["sources"]["proc_poll"]["available"] is True
    assert report["selected"]["process"] == "proc_poll"
    assert "SYS_PTRACE" in report["capabilities"] and "SYS_ADMIN" not in report["capabilities"]
    assert "NET_ADMIN" not in report["capabilities"]
    # with SYS_PTRACE the other containers' processes are readable
    assert report["sources"]["proc_poll"]["details"]["exeDenied"] == 0
    assert report["sources"]["proc_poll"]["details"]["exeReadable"] >= 3


def test_without_net_raw_processes_are_still_seen(task_env_no_netraw: TaskEnv, tmp_path: Path) -> None:
    task = task_env_no_netraw
    sidecar = start(task, tmp_path)
    task.run("app", ["sh", "-c", "sleep 0.15; : no-net-raw"])
    ev = sidecar.wait_for_event(lambda e: e["kind"] == "process.exec" and "no-net-raw" in e["process"]["commandLine"])
    assert ev["process"]["containerName"] == "app"
    assert sidecar.stop() == 0


def test_sigterm_flushes_and_exits_zero_quickly(task_env: TaskEnv, tmp_path: Path) -> None:
    sidecar = start(task_env, tmp_path)
    task_env.run("app", ["sh", "-c", "sleep 0.12; : last-words"])
    t0 = time.monotonic()
    assert sidecar.stop(timeout=10) == 0
    assert time.monotonic() - t0 < 5
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert any("last-words" in line and '"process.exec"' in line for line in lines)
    assert any("last-words" in line and '"process.exit"' in line for line in lines)
    logs = sidecar.logs()
    final = [r for r in logs if r.get("msg") == "stats" and r.get("why") == "final"]
    assert final and final[0]["stats"]["source"]["name"] == "proc_poll"


def test_bad_configuration_stops_with_a_clear_error(task_env: TaskEnv) -> None:
    handle = task_env.start_sidecar(["run"], env={"RUNTIME_SIDECAR_MAX_PROCESSES": "lots"})
    assert handle.wait(30) == 2
    assert any("RUNTIME_SIDECAR_MAX_PROCESSES" in line for line in handle.stderr_lines())


def test_processes_started_before_the_sidecar_are_reported(task_env: TaskEnv, tmp_path: Path) -> None:
    pid = task_env.spawn("worker", ["sleep", "30"])
    sidecar = start(task_env, tmp_path)
    ev = sidecar.wait_for_event(lambda e: e["kind"] == "process.exec" and e["process"]["pid"] == pid)
    assert ev["process"]["commandLine"] == "sleep 30" and ev["process"]["containerName"] == "worker"
    task_env.kill(pid)
    sidecar.wait_for_event(lambda e: e["kind"] == "process.exit" and e["process"]["pid"] == pid)
    assert sidecar.stop() == 0

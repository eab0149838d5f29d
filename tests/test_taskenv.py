"""Tests of the emulated ECS task itself (tests/taskenv.py): that it is the Fargate task it claims to be, and that
it leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest
from taskenv import (
    DOCKER_DEFAULT_CAPS,
    FARGATE_SIDECAR_CAPS,
    INIT_SCRIPT,
    SIDECAR_PYTHON,
    ContainerSpec,
    SidecarHandle,
    TaskEnv,
    TaskEnvError,
    cap_mask,
    hierarchy_exists,
    release_cgroup_hierarchy,
    remove_stale_hierarchies,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the emulated ECS task needs root")

# Written out, not computed from taskenv's tables: what `grep Cap /proc/<pid>/status` shows in a Fargate
# container with Docker's default capabilities (0xa80425fb), plus SYS_PTRACE (bit 19), minus NET_RAW (bit 13).
DOCKER_DEFAULT_MASK = 0x00000000A80425FB
FARGATE_SIDECAR_MASK = 0x00000000A80C25FB
FARGATE_SIDECAR_NO_NETRAW_MASK = 0x00000000A80C05FB


def status_fields(text: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if v}


def ns_inode(host_pid: int | str, kind: str) -> int | None:
    try:
        link = os.readlink(f"/proc/{host_pid}/ns/{kind}")
    except OSError:
        return None
    return int(link[link.index("[") + 1 : -1])


def start_ticks(host_pid: int | str) -> int:
    """When the process started, in clock ticks since boot (0 if it is gone): with the pid, its identity."""
    try:
        return int(Path(f"/proc/{host_pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError):
        return 0


def host_processes_in(kind: str, inodes: Collection[int | None]) -> list[int]:
    """Host pids of every process in one of these namespaces."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and ns_inode(p, kind) in inodes]


def wait_for_output(handle: SidecarHandle, marker: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while marker not in (text := handle.stdout_text()):
        assert handle.poll() is None, f"exited with {handle.returncode}: {text!r} {handle.stderr_lines()}"
        assert time.monotonic() < deadline, f"no {marker!r} in {text!r}"
        time.sleep(0.02)
    return text


def test_capability_masks() -> None:
    assert cap_mask(DOCKER_DEFAULT_CAPS) == DOCKER_DEFAULT_MASK
    assert cap_mask(FARGATE_SIDECAR_CAPS) == FARGATE_SIDECAR_MASK
    assert cap_mask(FARGATE_SIDECAR_CAPS - {"NET_RAW"}) == FARGATE_SIDECAR_NO_NETRAW_MASK


# ---------------------------------------------------------------------------------------------------------------
# The task's processes, namespaces and cgroups


def test_task_layout(task_env: TaskEnv) -> None:
    task = task_env
    assert task.startup_seconds < 2, task.startup_seconds
    assert re.fullmatch(r"[0-9a-f]{32}", task.task_id)
    assert task.cgroup_enabled, task.cgroup_error
    assert [c.name for c in task.app_containers] == ["app", "worker"]
    assert task.sidecar.name == "runtime-sidecar" and task.sidecar.pid is None
    by_pid = {p["pid"]: p for p in task.processes()}
    # PID 1 (the task's init) and one container-init per application container, children of PID 1; nothing else.
    assert by_pid[1]["comm"] == "task-init"
    assert by_pid[1]["ppid"] == 0
    for c in task.app_containers:
        assert c.pid is not None
        assert by_pid[c.pid] == {"pid": c.pid, "ppid": 1, "comm": "container-init"}
    assert len(by_pid) == 1 + len(task.app_containers)
    # A PID namespace and mount namespaces of their own; the host sees them under other pids.
    init_host_pid = task.host_pid(1)
    assert ns_inode(init_host_pid, "pid") != ns_inode("self", "pid")
    assert ns_inode(init_host_pid, "mnt") != ns_inode("self", "mnt")
    app_host_pid = task.host_pid(task.containers["app"].pid or 0)
    assert ns_inode(app_host_pid, "pid") == ns_inode(init_host_pid, "pid")
    assert ns_inode(app_host_pid, "mnt") not in (ns_inode(init_host_pid, "mnt"), ns_inode("self", "mnt"))
    # The same network namespace as the host (awsvpc: one per task, here the host's).
    assert ns_inode(app_host_pid, "net") == ns_inode("self", "net")


def test_container_identity_environment_and_metadata(task_env: TaskEnv) -> None:
    task = task_env
    secrets = set()
    for c in task.app_containers:
        rc, out = task.run(c.name, ["sh", "-c", "cat /proc/self/cgroup; env"])
        assert rc == 0
        cgroup = f"name={task.cgroup_name}:/ecs/{task.task_id}/{c.docker_id}"
        assert re.search(rf"^\d+:{re.escape(cgroup)}$", out, re.M), out
        assert c.cgroup == f"/ecs/{task.task_id}/{c.docker_id}"
        env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line and ":" not in line.split("=")[0])
        assert env["ECS_CONTAINER_METADATA_URI_V4"] == task.metadata.container_uri(c.docker_id) == c.metadata_uri
        assert env["DB_PASSWORD"] == c.secret
        assert c.secret.startswith("hunter2-")
        assert env["AWS_EXECUTION_ENV"] == "AWS_ECS_FARGATE"
        secrets.add(c.secret)
        # The metadata endpoint answers from inside the task, with this container's identity.
        rc, body = task.run(c.name, ["sh", "-c", "curl -sf $ECS_CONTAINER_METADATA_URI_V4"])
        assert rc == 0, body
        assert json.loads(body)["DockerId"] == c.docker_id
        assert json.loads(body)["Name"] == c.name
        rc, body = task.run(c.name, ["sh", "-c", 'curl -sf "$ECS_CONTAINER_METADATA_URI_V4/task"'])
        assert json.loads(body)["TaskARN"].endswith(f"/{task.task_id}")
    assert len(secrets) == len(task.app_containers)
    assert any(r.endswith("/task") for r in task.metadata.requests)


def test_commands_are_children_of_the_container_init(task_env: TaskEnv) -> None:
    app = task_env.containers["app"]
    # `; true` keeps dash from exec'ing cat in place of itself: container-init -> sh -> cat.
    rc, out = task_env.run("app", ["sh", "-c", "echo $$ $PPID; cat /proc/self/stat; true"])
    assert rc == 0
    first, stat = out.splitlines()
    sh_pid, sh_ppid = map(int, first.split())
    assert sh_ppid == app.pid
    assert int(stat.rsplit(")", 1)[1].split()[1]) == sh_pid


def test_container_root_filesystem(task_env: TaskEnv) -> None:
    task = task_env
    app, worker = task.containers["app"], task.containers["worker"]
    assert task.run("app", ["cat", "/etc/hostname"]) == (0, app.hostname + "\n")
    assert task.run("worker", ["cat", "/etc/hostname"]) == (0, worker.hostname + "\n")
    # The host reaches a container's files the way the sidecar does: /proc/<pid>/root.
    assert task.path_in("app", "/etc/hostname").read_text() == app.hostname + "\n"
    # /etc is a private writable copy: a write stays in that container.
    assert task.run("app", ["sh", "-c", "echo x > /etc/taskenv-marker"])[0] == 0
    assert task.path_in("app", "/etc/taskenv-marker").exists()
    assert not task.path_in("worker", "/etc/taskenv-marker").exists()
    assert not Path("/etc/taskenv-marker").exists()
    # The host's binaries are there, read-only; the host's other files are not.
    rc, out = task.run("app", ["sh", "-c", "touch /usr/taskenv-probe 2>&1"])
    assert rc != 0 and "Read-only file system" in out
    assert task.run("app", ["sh", "-c", f"test -e {Path(__file__).parent} || echo absent"]) == (0, "absent\n")
    assert task.run("app", ["stat", "-c", "%a", "/tmp", "/var/tmp", "/root"]) == (0, "1777\n1777\n700\n")
    assert task.run("app", ["sh", "-c", "echo hi > /tmp/f && cat /tmp/f"]) == (0, "hi\n")
    rc, dev = task.run("app", ["ls", "/dev"])
    assert {"null", "zero", "urandom", "shm"} <= set(dev.split()) and "vda" not in dev
    assert task.run("app", ["sh", "-c", "head -c 4 /dev/urandom | wc -c"]) == (0, "4\n")
    # /proc is the task's: only the task's processes.
    rc, listing = task.run("app", ["ls", "/proc"])
    pids = {int(p) for p in listing.split() if p.isdigit()}
    assert {1, app.pid, worker.pid} <= pids
    assert len(pids) <= 6, pids  # init, 2 container-inits, ls (and nothing of the host)
    # Docker's default capabilities for a root process of an application container.
    rc, status = task.run("app", ["cat", "/proc/self/status"])
    fields = status_fields(status)
    assert int(fields["CapEff"], 16) == DOCKER_DEFAULT_MASK
    assert int(fields["CapBnd"], 16) == DOCKER_DEFAULT_MASK
    assert int(fields["CapInh"], 16) == 0


def test_run_options(task_env: TaskEnv) -> None:
    task = task_env
    assert task.run("app", ["id", "-u"], uid=1000) == (0, "1000\n")
    assert task.run("app", ["id", "-G"], uid=1000, gid=1001) == (0, "1001\n")
    assert task.run("app", ["pwd"], cwd="/tmp") == (0, "/tmp\n")
    assert task.run("app", ["sh", "-c", "echo $FOO"], env={"FOO": "bar"}) == (0, "bar\n")
    assert task.run("app", ["cat"], stdin="fed\n") == (0, "fed\n")
    assert task.run("app", ["sh", "-c", "exit 3"]) == (3, "")
    result = task.execute("app", ["sh", "-c", "echo out; echo err >&2"])
    assert (result.returncode, result.stdout, result.stderr) == (0, "out\n", "err\n")
    assert task.run("app", ["sleep", "5"], wait=False) == (0, "")
    with pytest.raises(TaskEnvError, match="no-such-binary"):
        task.run("app", ["no-such-binary"])
    with pytest.raises(KeyError):
        task.run("nope", ["true"])
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        task.run("app", ["sleep", "30"], timeout=0.3)
    assert time.monotonic() - t0 < 3


def test_concurrent_commands(task_env: TaskEnv) -> None:
    # Each command waits until all 8 have started: this finishes only if they really run at the same time.
    script = "touch /tmp/started.$0; until [ $(ls /tmp/started.* | wc -l) -ge 8 ]; do sleep 0.02; done; echo $0"
    results: dict[int, tuple[int, str]] = {}

    def one(n: int) -> None:
        results[n] = task_env.run("app", ["sh", "-c", script, str(n)], timeout=20)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {n: (0, f"{n}\n") for n in range(8)}


def test_spawn_kill_and_orphans(task_env: TaskEnv) -> None:
    task = task_env
    app = task.containers["app"]
    pid = task.spawn("app", ["sleep", "60"])
    assert task.alive(pid)
    assert {"pid": pid, "ppid": app.pid, "comm": "sleep"} in task.processes()
    assert task.kill(pid)
    task.wait_gone(pid)
    assert pid not in task.pids()  # reaped by its parent, the container-init
    assert not task.kill(pid)
    # An orphan is re-parented to PID 1, which reaps it when it dies, as ECS's init does.
    _, out = task.run("app", ["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"])
    orphan = int(out)
    assert {"pid": orphan, "ppid": 1, "comm": "sleep"} in task.processes()
    task.kill(orphan, signal.SIGTERM)
    assert task.wait_exit(orphan, 5) == -signal.SIGTERM
    assert orphan not in task.pids()
    # Spawned output goes to the container's log (docker logs).
    task.spawn("app", ["sh", "-c", "echo to-the-log"])
    deadline = time.monotonic() + 5
    assert app.log is not None
    while "to-the-log" not in app.log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------------------------
# The sidecar container


@pytest.mark.parametrize(
    ("fixture", "mask"),
    [("task_env", FARGATE_SIDECAR_MASK), ("task_env_no_netraw", FARGATE_SIDECAR_NO_NETRAW_MASK)],
    ids=["net_raw", "no_net_raw"],
)
def test_sidecar_container(fixture: str, mask: int, request: pytest.FixtureRequest) -> None:
    task: TaskEnv = request.getfixturevalue(fixture)
    app = task.containers["app"]
    script = f"""
        echo "ppid=$PPID"; echo ---
        ls /proc; echo ---
        cat /proc/self/cgroup; echo ---
        cat /proc/{app.pid}/root/etc/hostname; echo ---
        ls -A {task.private_dir} | wc -l; echo ---
        echo "uri=$ECS_CONTAINER_METADATA_URI_V4"; echo "secret=$DB_PASSWORD"; echo END
        exec sleep 60
    """
    handle = task.start_sidecar_command(["sh", "-c", textwrap.dedent(script)])
    out = wait_for_output(handle, "END")
    ppid, procs, cgroup, hostname, private, env = out.split("---\n")
    assert ppid == "ppid=1\n"  # a container's main process: a child of the task's init
    listed = {int(p) for p in procs.split() if p.isdigit()}  # the task's processes (and that `ls`), no others
    assert {1, app.pid, task.containers["worker"].pid, handle.pid} <= listed
    assert len(listed) == 5 and max(listed) <= handle.pid + 3, listed
    assert f"name={task.cgroup_name}:/ecs/{task.task_id}/{task.sidecar.docker_id}\n" in cgroup
    assert hostname == app.hostname + "\n"  # other containers' files: through /proc/<pid>/root only
    assert private == "0\n"  # the roots, sockets and logs of the task are not visible by path
    assert env == f"uri={task.sidecar.metadata_uri}\nsecret=\nEND\n"
    # Exactly Fargate's capability set, in every set, checked from the host.
    fields = status_fields(Path(f"/proc/{handle.host_pid}/status").read_text())
    assert fields["Name"] == "sleep"
    assert int(fields["CapEff"], 16) == mask
    assert int(fields["CapPrm"], 16) == mask
    assert int(fields["CapBnd"], 16) == mask
    assert int(fields["CapInh"], 16) == 0
    assert int(fields["CapAmb"], 16) == 0
    t0 = time.monotonic()
    assert handle.stop(timeout=5) == -signal.SIGTERM
    assert time.monotonic() - t0 < 2
    assert handle.poll() == -signal.SIGTERM


@pytest.mark.parametrize(
    ("fixture", "raw_ok"), [("task_env", True), ("task_env_no_netraw", False)], ids=["net_raw", "no_net_raw"]
)
def test_sidecar_python_and_raw_sockets(fixture: str, raw_ok: bool, request: pytest.FixtureRequest) -> None:
    task: TaskEnv = request.getfixturevalue(fixture)
    code = textwrap.dedent("""
        import json, os, socket, sys
        try:
            socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()
            raw = True
        except PermissionError:
            raw = False
        print(json.dumps({"prefix": sys.prefix, "raw": raw, "cwd": os.getcwd(), "pid": os.getpid()}))
    """)
    handle = task.start_sidecar_command([SIDECAR_PYTHON, "-c", code])
    assert handle.wait(10) == 0, handle.stderr_lines()
    result = json.loads(handle.stdout_text())
    assert result["prefix"] == str(Path(SIDECAR_PYTHON).parent.parent)  # the venv works
    assert result["raw"] is raw_ok
    assert result["pid"] == handle.pid


def test_sidecar_handle_reads_growing_files(task_env: TaskEnv) -> None:
    events = task_env.out_dir / "events.jsonl"
    code = textwrap.dedent(f"""
        import json, sys, time
        sys.stderr.write(json.dumps({{"level": "INFO", "msg": "started"}}) + "\\n")
        sys.stderr.write("not json\\n")
        sys.stderr.flush()
        with open({str(events)!r}, "a") as f:
            f.write(json.dumps({{"kind": "other"}}) + "\\n")
            line = json.dumps({{"kind": "process.exec", "process": {{"pid": 7}}}}) + "\\n"
            f.write(line[:10]); f.flush()  # half a line: not an event yet
            time.sleep(0.3)
            f.write(line[10:]); f.flush()
        time.sleep(60)
    """)
    handle = task_env.start_sidecar_command(
        [SIDECAR_PYTHON, "-c", code], env={"RUNTIME_SIDECAR_EVENTS_OUT": str(events)}
    )
    assert handle.events_path == events
    ev = handle.wait_for_event(lambda e: e["process"]["pid"] == 7, timeout=5)  # no KeyError on "other"
    assert ev["kind"] == "process.exec"
    assert [e["kind"] for e in handle.events()] == ["other", "process.exec"]
    assert handle.logs() == [{"level": "INFO", "msg": "started"}]
    assert handle.stderr_lines()[1] == "not json"
    with pytest.raises(AssertionError, match="no matching event among 2"):
        handle.wait_for_event(lambda e: e["kind"] == "never", timeout=0.2)
    with pytest.raises(TaskEnvError, match="already running"):
        task_env.start_sidecar_command(["true"])
    assert handle.stop(5) == -signal.SIGTERM
    with pytest.raises(TaskEnvError, match="findings-out"):
        handle.findings()


@pytest.mark.parametrize(
    ("fixture", "mask"),
    [("task_env", FARGATE_SIDECAR_MASK), ("task_env_no_netraw", FARGATE_SIDECAR_NO_NETRAW_MASK)],
    ids=["net_raw", "no_net_raw"],
)
def test_real_sidecar_sees_a_container_process(
    fixture: str, mask: int, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The fixture's purpose, end to end, with the real sidecar binary."""
    task: TaskEnv = request.getfixturevalue(fixture)
    events = tmp_path / "events.jsonl"
    sidecar = task.start_sidecar(["run", "--events-out", str(events)])
    fields = status_fields(Path(f"/proc/{sidecar.host_pid}/status").read_text())
    assert int(fields["CapEff"], 16) == mask
    app = task.containers["app"]
    # Long enough to be seen by /proc polling, distinctive enough to be found.
    marker = f"sleep 1.{os.getpid() % 1000:03d}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # wait until the sidecar's watch is up, then run the command
        task.run("app", ["sh", "-c", f"{marker}; true"])
        found = [
            e
            for e in sidecar.events()
            if e.get("kind") == "process.exec" and e.get("process", {}).get("commandLine") == marker
        ]
        if found or sidecar.poll() is not None:
            break
    ev = sidecar.wait_for_event(
        lambda e: e["kind"] == "process.exec" and e["process"]["commandLine"] == marker, timeout=1
    )
    proc = ev["process"]
    assert proc["executablePath"] == "/usr/bin/sleep"
    assert proc["containerName"] == "app"
    assert proc["containerId"] == app.docker_id
    assert sidecar.stop(timeout=10) == 0, sidecar.stderr_lines()[-20:]
    assert app.secret not in events.read_text()


# ---------------------------------------------------------------------------------------------------------------
# Variants


def test_custom_containers(tmp_path_factory: pytest.TempPathFactory) -> None:
    specs = [ContainerSpec("web", uid=1000, env={"FOO": "bar"}), ContainerSpec("admin", caps=None)]
    with TaskEnv(tmp_path_factory.mktemp("task"), specs, sidecar_name="guard") as task:
        assert task.run("web", ["sh", "-c", "id -u; echo $FOO; echo $HOME"]) == (0, "1000\nbar\n/\n")
        _, status = task.run("web", ["cat", "/proc/self/status"])
        assert int(status_fields(status)["CapEff"], 16) == 0
        with pytest.raises(TaskEnvError, match="PermissionError"):
            task.run("web", ["id"], uid=0)  # a non-root container cannot switch user
        _, status = task.run("admin", ["cat", "/proc/self/status"])
        assert int(status_fields(status)["CapEff"], 16) == int(
            status_fields(Path("/proc/self/status").read_text())["CapBnd"], 16
        )
        assert [c["Name"] for c in task.task_json["Containers"]] == ["web", "admin", "guard"]


def test_task_started_in_a_thread_outlives_it(tmp_path_factory: pytest.TempPathFactory) -> None:
    # (A parent-death signal would kill it when the thread that started it exits.)
    tasks: list[TaskEnv] = []
    starter = threading.Thread(target=lambda: tasks.append(TaskEnv(tmp_path_factory.mktemp("task")).start()))
    starter.start()
    starter.join()
    try:
        time.sleep(0.2)
        assert tasks[0].run("app", ["echo", "alive"]) == (0, "alive\n")
    finally:
        tasks[0].close()


def test_without_cgroups(tmp_path_factory: pytest.TempPathFactory) -> None:
    # A name the kernel refuses stands for a host where named v1 hierarchies cannot be mounted.
    with TaskEnv(tmp_path_factory.mktemp("task"), cgroup_name="bad,name") as task:
        assert not task.cgroup_enabled
        assert task.cgroup_error
        assert all(c.cgroup is None for c in task.containers.values())
        rc, out = task.run("app", ["cat", "/proc/self/cgroup"])
        assert rc == 0 and "/ecs/" not in out


# ---------------------------------------------------------------------------------------------------------------
# Speed and teardown


def test_startup_time(tmp_path_factory: pytest.TempPathFactory) -> None:
    times = []
    for _ in range(5):
        t0 = time.monotonic()
        with TaskEnv(tmp_path_factory.mktemp("task")) as task:
            times.append(task.startup_seconds)
        times.append(time.monotonic() - t0)
    starts, totals = times[0::2], times[1::2]
    print(f"task start: median {sorted(starts)[2]:.3f}s max {max(starts):.3f}s; start+close max {max(totals):.3f}s")
    assert max(starts) < 2.0


def _snapshot(task: TaskEnv, held: list[int]) -> dict[str, Any]:
    """What identifies the task's processes and namespaces from the host. The namespaces are held open (fds
    appended to `held`): the kernel reuses a freed namespace's inode number, which would make another task's
    processes look like survivors of this one."""
    host_pids = [task.host_pid(pid) for pid in task.pids()]
    inodes: dict[str, set[int]] = {"pid": set(), "mnt": set()}
    for kind, ns_set in inodes.items():
        for p in host_pids:
            fd = os.open(f"/proc/{p}/ns/{kind}", os.O_RDONLY)
            held.append(fd)
            ns_set.add(os.fstat(fd).st_ino)
    return {
        "host_pids": [(p, start_ticks(p)) for p in host_pids],
        "pid_ns": inodes["pid"],
        "mnt_ns": inodes["mnt"] - {ns_inode("self", "mnt")},
        "cgroup": task.cgroup_parent,
        "port": int(task.metadata_url.rsplit(":", 1)[1]),
    }


def cgroup_tree(name: str) -> list[str]:
    """The cgroups of a named hierarchy (mounted in a throwaway mount namespace)."""
    script = (
        f"d=$(mktemp -d); mount -t cgroup -o none,name={name} cgroup $d; (cd $d; find . -type d); umount $d; rmdir $d"
    )
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return [line[1:] for line in out.stdout.split() if line != "."]


def test_teardown_leaves_nothing(tmp_path_factory: pytest.TempPathFactory) -> None:
    tasks = [TaskEnv(tmp_path_factory.mktemp("task")).start() for _ in range(2)]
    snapshots = []
    held: list[int] = []
    try:
        for task in tasks:
            task.spawn("app", ["sleep", "60"])
            task.run("worker", ["sh", "-c", "sleep 60 >/dev/null 2>&1 &"])  # an orphan
            task.start_sidecar_command(["sleep", "60"])
            snap = _snapshot(task, held)
            assert len(snap["host_pids"]) == 6  # init, 2 container-inits, sleep, the orphan, the sidecar
            assert len(snap["pid_ns"]) == 1
            assert len(snap["mnt_ns"]) == 4  # the task's, 2 containers', the sidecar's
            assert f"{task.cgroup_parent}/{task.sidecar.docker_id}" in cgroup_tree(task.cgroup_name)
            snapshots.append(snap)
        for task in tasks:
            task.close()
            task.close()  # idempotent
        for snap in snapshots:
            assert host_processes_in("pid", snap["pid_ns"]) == []
            assert host_processes_in("mnt", snap["mnt_ns"]) == []
            assert [p for p, ticks in snap["host_pids"] if start_ticks(p) == ticks] == []
            assert not [path for path in cgroup_tree(tasks[0].cgroup_name) if path.startswith(snap["cgroup"])]
            with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", snap["port"]), 1):
                pass
    finally:
        for fd in held:
            os.close(fd)
    mounts = Path("/proc/self/mountinfo").read_text()
    for task in tasks:
        assert str(task.base_dir) not in mounts
        with pytest.raises(TaskEnvError):
            task.run("app", ["true"])
    # What the end of the test process does: the (shared) hierarchy goes too.
    assert release_cgroup_hierarchy()
    assert not hierarchy_exists(tasks[0].cgroup_name)


def test_killed_test_process_leaves_no_process(tmp_path: Path) -> None:
    """If the test process is SIGKILLed, the task dies with it (the launcher's lifeline pipe closes); the cgroups
    it leaves are removed by the next run (remove_stale_hierarchies)."""
    code = textwrap.dedent(f"""
        import json, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(INIT_SCRIPT.parent)!r})
        from taskenv import TaskEnv
        task = TaskEnv(Path({str(tmp_path)!r})).start()
        task.spawn("app", ["sleep", "60"])
        print(json.dumps({{"init": task.host_pid(1), "name": task.cgroup_name}}), flush=True)
        time.sleep(60)
    """)
    victim = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout is not None
        info = json.loads(victim.stdout.readline())
        held = os.open(f"/proc/{info['init']}/ns/pid", os.O_RDONLY)  # so that its inode is not reused
        pid_ns = {os.fstat(held).st_ino}
        assert len(host_processes_in("pid", pid_ns)) == 4
    finally:
        victim.kill()
        victim.wait()
    try:
        deadline = time.monotonic() + 5
        while host_processes_in("pid", pid_ns):
            assert time.monotonic() < deadline, "task processes survived their test process"
            time.sleep(0.02)
    finally:
        os.close(held)
    assert hierarchy_exists(info["name"])  # nobody removed its cgroups...
    assert cgroup_tree(info["name"])
    assert info["name"] in remove_stale_hierarchies()  # ...until now
    assert not hierarchy_exists(info["name"])

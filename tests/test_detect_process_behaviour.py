"""NewBinaryExecuted, SuspiciousShellCreated, ElevationToRoot staged for real in the emulated task.

The emulated containers' root file systems sit on a nosuid tmpfs (tests/taskenv_init.py), unlike a Fargate
container's overlay root, where an attacker's setuid copy in /tmp works. To stage the elevation the test mounts a
plain tmpfs at /opt/suid inside the app container's own mount namespace (nsenter from the test, which is root on
the host; nothing of the host changes) and drops the setuid copy there.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from findings import container_of, context_of, of_type
from taskenv import SidecarHandle, TaskEnv

from collectors.events import ContainerRef, ProcessInfo, RuntimeEvent
from collectors.process_table import ProcessTable
from detectors.base import DetectorContext
from detectors.finding import Finding
from detectors.process_behaviour import ElevationToRootDetector

NEW_BINARY = "Execution:Runtime/NewBinaryExecuted"
SHELL_CREATED = "Execution:Runtime/SuspiciousShellCreated"
ELEVATION = "PrivilegeEscalation:Runtime/ElevationToRoot"
PY = "/usr/bin/python3"


def proc(f: dict[str, Any]) -> dict[str, Any]:
    return dict(f["service"]["runtimeDetails"]["process"])


def exec_containing(text: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["kind"] == "process.exec" and text in (e["process"]["commandLine"] or "")


DROPPER = """
import os, time
fd = os.open("/tmp/dropped", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o755)
os.write(fd, open("/bin/sleep", "rb").read())
time.sleep(1.0)
os.close(fd)
"""


def uid_change_of(exe: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["kind"] == "proc.uid_change" and e["process"]["executablePath"] == exe and e["newEuid"] == 0


def _wait(sidecar: SidecarHandle, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> bool:
    try:
        sidecar.wait_for_event(predicate, timeout=timeout)
    except AssertionError:
        return False
    return True


def test_new_binary_and_elevation_to_root(task_env: TaskEnv, tmp_path: Path) -> None:
    host_pid = task_env.host_pid(task_env.container("app").pid or 0)
    mount = "mkdir -p /opt/suid && mount -t tmpfs -o mode=755,size=8m suid /opt/suid"
    done = subprocess.run(["nsenter", "-t", str(host_pid), "-m", "sh", "-c", mount], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"could not mount a suid-capable tmpfs in the app container: {done.stderr}")
    task_env.path_in("worker", "/tmp/job.py").write_text("import time\ntime.sleep(0.5)\n")
    task_env.path_in("worker", "/tmp/dropper.py").write_text(DROPPER)
    sidecar = task_env.start_detecting(tmp_path)
    run = task_env.run

    # a binary dropped after the container started (by a dropper that holds it open a moment), then run
    assert run("worker", [PY, "/tmp/dropper.py"])[0] == 0
    assert run("worker", ["/tmp/dropped", "1.5"])[0] == 0
    nb = sidecar.wait_for_finding(lambda f: f["type"] == NEW_BINARY and proc(f)["executablePath"] == "/tmp/dropped", 20)
    Finding.model_validate(nb)
    assert nb["severity"] == 5.0 and container_of(nb) == "worker"
    writer = context_of(nb)["modifyingProcess"]
    assert (writer["name"], writer["commandLine"]) == ("python3", f"{PY} /tmp/dropper.py")
    assert "modifyingProcessGuessed" not in context_of(nb)
    assert context_of(nb)["modifiedAt"].endswith("Z")

    # setuid copy of dash, run by an unprivileged user
    assert run("app", ["sh", "-c", "cp /bin/dash /opt/suid/x && chmod 4755 /opt/suid/x"])[0] == 0
    code, out = run("app", ["/opt/suid/x", "-p", "-c", "id; sleep 1"], uid=1000)
    assert code == 0 and "euid=0(root)" in out, out
    el = sidecar.wait_for_finding(lambda f: f["type"] == ELEVATION, timeout=20)
    Finding.model_validate(el)
    assert el["severity"] == 5.0 and container_of(el) == "app"
    assert proc(el)["executablePath"] == "/opt/suid/x" and proc(el)["userId"] == 1000 and proc(el)["euid"] == 0
    c = context_of(el)
    assert (c["oldUid"], c["oldEuid"], c["newUid"], c["newEuid"]) == (1000, 1000, 1000, 0)
    assert c["setuidExecutable"] is True

    # benign look-alikes: standard setuid programs used as a user, old binaries, a new script run by python, a
    # binary written and never run
    # the normal setuid family used normally: su asking a user for root's password (none given: it fails after
    # PAM's delay) runs as euid 0 meanwhile. (`passwd --help` is over before the uid poller's first look.)
    seen = uid_change_of("/usr/bin/su")
    for _ in range(3):
        run("app", ["/bin/su", "-c", "true", "root"], uid=1000, stdin="", timeout=15)
        if _wait(sidecar, seen, 5):
            break
    else:
        pytest.fail("the sidecar never saw su's uid change")
    run("worker", ["sh", "-c", "cp /bin/sleep /tmp/never-run; /bin/sleep 0.4"])
    run("worker", [PY, "/tmp/job.py"])
    for marker in ("sleep 0.4", "/tmp/job.py"):
        sidecar.wait_for_event(exec_containing(marker), timeout=15)
    time.sleep(1.5)
    assert [proc(f)["executablePath"] for f in of_type(sidecar, ELEVATION)] == ["/opt/suid/x"]
    new_exes = {proc(f)["executablePath"] for f in of_type(sidecar, NEW_BINARY)}
    assert new_exes == {"/tmp/dropped", "/opt/suid/x"}
    assert sidecar.stop() == 0


SERVER = """
import socket, subprocess, sys
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(1)
c, _ = s.accept()
c.recv(16)
subprocess.run(["sh", "-c", "echo handled; sleep 0.3"])  # what web apps do: one-shot commands
if sys.argv[2] == "shell":
    subprocess.run(["sh", "-i"], input=b"id\\nsleep 0.3\\n", stderr=subprocess.DEVNULL)
c.close()
"""


def listen_on(port: int) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["kind"] == "net.listen" and e.get("localPort") == port


def _connect(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"x")
                time.sleep(1.5)
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_shell_created_by_a_network_facing_process(task_env: TaskEnv, tmp_path: Path) -> None:
    for c in ("app", "worker"):
        task_env.path_in(c, "/tmp/server.py").write_text(SERVER)
    sidecar = task_env.start_detecting(tmp_path)
    bad, good = _free_port(), _free_port()
    task_env.spawn("app", [PY, "/tmp/server.py", str(bad), "shell"])
    task_env.spawn("worker", [PY, "/tmp/server.py", str(good), "oneshot"])
    for port in (bad, good):
        sidecar.wait_for_event(listen_on(port), timeout=15)
        _connect(port)
    f = sidecar.wait_for_finding(lambda f: f["type"] == SHELL_CREATED, timeout=20)
    Finding.model_validate(f)
    assert f["severity"] == 2.0 and container_of(f) == "app"
    assert proc(f)["executablePath"] == "/usr/bin/dash" and context_of(f)["commandLineExample"] == "sh -i"
    assert context_of(f)["parentProcess"]["executablePath"] == "/usr/bin/python3.11"
    assert f"127.0.0.1:{bad}" in context_of(f)["networkFacing"] or f"port {bad}" in context_of(f)["networkFacing"]

    # benign: the worker's server ran only `sh -c`; an interactive shell whose parent does not listen
    run_ok = task_env.run("worker", ["sh", "-i"], stdin="sleep 0.3\n")
    assert run_ok[0] == 0
    sidecar.wait_for_event(exec_containing("echo handled"), timeout=15)
    sidecar.wait_for_event(
        lambda e: (
            e["kind"] == "process.exec"
            and (e["process"]["commandLine"], e["process"]["containerName"]) == ("sh -i", "worker")
        ),
        timeout=15,
    )
    time.sleep(1.5)
    assert [container_of(x) for x in of_type(sidecar, SHELL_CREATED)] == ["app"]
    assert sidecar.stop() == 0


def _info(exe: str, uid: int, euid: int, *, container: bool = True, pid: int = 50) -> ProcessInfo:
    return ProcessInfo(
        pid=pid, nspid=pid, ppid=1, name=exe.rsplit("/", 1)[-1][:15], executable_path=exe, executable_deleted=False,
        executable_sha256=None, command_line=exe, cwd="/", uid=uid, euid=euid, gid=uid, egid=euid, user=None,
        euser=None, start_ticks=pid, start_time=time.time(), uuid=f"u{pid}", parent_uuid=None, ld_preload=None,
        ld_library_path=None, container=ContainerRef("app", "c1") if container else None, mnt_ns=7,
        exe_mtime_ns=1, exe_ctime_ns=1, exe_setuid=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("exe", "change", "fires"),
    [
        ("/opt/suid/x", ((1000, 1000), (1000, 0), True, True), True),  # setuid copy of a shell
        ("/usr/bin/find", ((1000, 1000), (1000, 0), True, True), True),  # find made setuid: not in the normal family
        ("/usr/bin/python3.11", ((1000, 1000), (0, 0), False, False), True),  # cap_setuid: setuid(0) by itself
        ("/usr/bin/sudo", ((1000, 1000), (1000, 0), True, True), False),  # the normal family at its place
        ("/tmp/sudo", ((1000, 1000), (1000, 0), True, True), True),  # ... not elsewhere
        ("/usr/bin/sleep", ((1000, 1000), (1000, 0), False, True), False),  # inherited from an elevated parent
        ("/usr/sbin/apache2", ((0, 33), (0, 0), False, False), False),  # a root process regaining its own euid
        ("/opt/suid/x", ((1000, 1000), (1000, 1000), True, False), False),  # not to root
    ],
)
def test_elevation_rules(exe: str, change: tuple[tuple[int, int], tuple[int, int], bool, bool], fires: bool) -> None:
    old, new, setuid, inferred = change
    det = ElevationToRootDetector(DetectorContext(table=ProcessTable()))
    data = {"oldUid": old[0], "oldEuid": old[1], "newUid": new[0], "newEuid": new[1]}
    event = RuntimeEvent("proc.uid_change", _info(exe, *new), data={**data, "setuidExe": setuid, "inferred": inferred})
    assert bool(list(det.on_event(event))) is fires
    # odd input never raises
    assert list(det.on_event(RuntimeEvent("proc.uid_change", _info(exe, *new), data={"oldUid": None}))) == []


def test_setuid_root_files_made_at_run_time(task_env: TaskEnv, tmp_path: Path) -> None:
    """`install -m 4755` and os.chmod(0o4755): no chmod command line to match, the file's mode says it. A setgid
    shared directory and an ordinary executable are not."""
    sidecar = task_env.start_detecting(tmp_path)
    task_env.run("app", ["install", "-m", "4755", "/bin/dash", "/var/tmp/.sh"])
    task_env.run(
        "worker",
        [PY, "-c", "import os, shutil; shutil.copy('/usr/bin/find', '/tmp/.f'); os.chmod('/tmp/.f', 0o4755)"],
    )
    # benign: a build artifact made executable, a setgid directory
    task_env.run("worker", ["sh", "-c", "cp /bin/true /tmp/tool && chmod 755 /tmp/tool && mkdir -m 2775 /tmp/shared"])

    def setuid_file(path: str) -> Callable[[dict[str, Any]], bool]:
        return lambda f: (
            f["type"] == "PrivilegeEscalation:Runtime/SuspiciousCommand" and context_of(f).get("filePath") == path
        )

    found = {path: sidecar.wait_for_finding(setuid_file(path), timeout=20) for path in ("/var/tmp/.sh", "/tmp/.f")}
    time.sleep(1.5)
    assert sidecar.stop() == 0
    for f in found.values():
        Finding.model_validate(f)
        assert f["severity"] == 5.0
        assert context_of(f)["patternName"] == "setuid_file_created" and context_of(f)["fileMode"] == "0o4755"
    assert container_of(found["/var/tmp/.sh"]) == "app" and container_of(found["/tmp/.f"]) == "worker"
    setuid = [f for f in sidecar.findings() if context_of(f).get("patternName") == "setuid_file_created"]
    assert {context_of(f)["filePath"] for f in setuid} == {"/var/tmp/.sh", "/tmp/.f"}

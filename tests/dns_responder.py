"""A small authoritative-for-everything DNS server on a loopback address, for tests that stage DNS activity.

    with DnsResponder("127.53.4.1", answers={"evil.test": "169.254.169.254"}, nxdomain={"nx.test"}):
        ...  # queries to 127.53.4.1:53 get A answers (default 10.11.12.13), NXDOMAIN for the nx names

Real UDP on loopback only. Each test module picks its own address so modules can run side by side.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterable, Mapping
from types import TracebackType

DEFAULT_ANSWER = "10.11.12.13"


def query_name(q: bytes) -> str:
    labels, i = [], 12
    while i < len(q) and q[i]:
        n = q[i]
        labels.append(q[i + 1 : i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    return ".".join(labels).lower()


class DnsResponder:
    def __init__(
        self,
        address: str,
        *,
        answers: Mapping[str, str] | None = None,
        nxdomain: Iterable[str] = (),
        default: str = DEFAULT_ANSWER,
    ) -> None:
        self.address = address
        self.answers = {k.lower(): v for k, v in (answers or {}).items()}
        self.nxdomain = {n.lower() for n in nxdomain}
        self.default = default
        self.queries: list[str] = []
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._thread = threading.Thread(target=self._serve, daemon=True, name=f"dns@{address}")

    def __enter__(self) -> DnsResponder:
        self._sock.bind((self.address, 53))  # raises at once if the address is taken
        self._sock.settimeout(0.2)
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                q, addr = self._sock.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(q) < 17:
                continue
            name = query_name(q)
            self.queries.append(name)
            end = 12 + len(q[12:].split(b"\0", 1)[0]) + 1 + 4
            question = q[12:end]
            qtype = struct.unpack(">H", question[-4:-2])[0]
            if name in self.nxdomain:
                self._sock.sendto(q[:2] + b"\x81\x83\x00\x01\x00\x00\x00\x00\x00\x00" + question, addr)
                continue
            if qtype != 1:  # only A records: an empty NOERROR answer for the rest (AAAA...)
                self._sock.sendto(q[:2] + b"\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00" + question, addr)
                continue
            ip = socket.inet_aton(self.answers.get(name, self.default))
            answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + ip
            self._sock.sendto(q[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + question + answer, addr)

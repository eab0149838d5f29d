"""Indexes of threat-list indicators: exact IPs, CIDR ranges, domains with their subdomains, file hashes.

Every lookup is O(1) or O(log n): exact addresses in a dict keyed by the
address as an integer (IPv4 and IPv6 apart), CIDR blocks flattened into
disjoint sorted integer intervals searched with bisect (the most specific
block wins where blocks nest), domains in a dict walked label suffix by label
suffix (``a.b.evil.com`` checks ``a.b.evil.com``, ``b.evil.com``, ``evil.com``,
``com``), SHA-256 hashes in a dict. A 250,000-entry list costs a few dict
probes per event, not a scan.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

# What each list category means, for addresses and for domains: (type for an IP hit, type for a domain hit).
# None: the category has no such type (the hit is still kept, for evidence, but raises nothing).
CATEGORY_TYPES: dict[str, tuple[str | None, str | None]] = {
    "c2": ("Backdoor:Runtime/C&CActivity.B", "Backdoor:Runtime/C&CActivity.B!DNS"),
    "mining": ("CryptoCurrency:Runtime/BitcoinTool.B", "CryptoCurrency:Runtime/BitcoinTool.B!DNS"),
    "tor": ("UnauthorizedAccess:Runtime/TorClient", None),
    "blackhole": ("Trojan:Runtime/BlackholeTraffic", "Trojan:Runtime/BlackholeTraffic!DNS"),
    "drop_point": ("Trojan:Runtime/DropPoint", "Trojan:Runtime/DropPoint!DNS"),
    "dga": (None, "Trojan:Runtime/DGADomainRequest.C!DNS"),
    "drive_by": (None, "Trojan:Runtime/DriveBySourceTraffic!DNS"),
    "phishing": (None, "Trojan:Runtime/PhishingDomainRequest!DNS"),
    "abused": (None, "Impact:Runtime/AbusedDomainRequest.Reputation"),
    "bitcoin_rep": (None, "Impact:Runtime/BitcoinDomainRequest.Reputation"),
    "malicious": ("Backdoor:Runtime/C&CActivity.B", "Impact:Runtime/MaliciousDomainRequest.Reputation"),
    "suspicious": (None, "Impact:Runtime/SuspiciousDomainRequest.Reputation"),
    "malware": (None, None),  # SHA-256 of files: Execution:Runtime/MaliciousFileExecuted
}
MALWARE_TYPE = "Execution:Runtime/MaliciousFileExecuted"
DEFAULT_CATEGORY = "malicious"
# When one indicator is on several lists: the most specific meaning first (a C&C server beats "malicious").
CATEGORY_ORDER = {c: i for i, c in enumerate(CATEGORY_TYPES)}

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


@dataclass(frozen=True, slots=True)
class Entry:
    """What a list says of the indicators it names: one object shared by all its lines with the same threat name
    (a 250,000-line list without names holds one Entry, not 250,000)."""

    list_name: str
    category: str
    threat_name: str | None = None


Hits = tuple[Entry, ...]


def _add(hits: Hits | None, entry: Entry, singles: dict[Entry, Hits]) -> Hits:
    if hits is None:
        # most indicators are on one list: they share one 1-tuple per Entry instead of one each
        single = singles.get(entry)
        if single is None:
            single = singles[entry] = (entry,)
        return single
    if any(h.list_name == entry.list_name and h.category == entry.category for h in hits):
        return hits  # the same list naming it twice
    return tuple(sorted((*hits, entry), key=lambda e: CATEGORY_ORDER.get(e.category, 99)))


_V4MAPPED_PREFIX = 0xFFFF << 32


def parse_ip(text: object) -> tuple[int, int] | None:
    """(version, integer) of an address; IPv4-mapped IPv6 (::ffff:a.b.c.d) is IPv4. None if not an address.

    inet_pton, not ipaddress: this runs for every connection and every list line (5x faster).
    """
    if not isinstance(text, str):
        return None
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, ValueError):
        pass
    t = text.strip().strip("[]").split("%", 1)[0]
    if ":" not in t:
        try:
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, t), "big")
        except (OSError, ValueError):
            return None
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, t), "big")
    except (OSError, ValueError):
        return None
    if value >> 32 == 0xFFFF:
        return 4, value & 0xFFFFFFFF
    return 6, value


def normalize_domain_indicator(text: str) -> str | None:
    """A domain as listed (``*.evil.com``, ``.evil.com``, ``Evil.COM.``) in lookup form, or None if not a name."""
    name = text.strip().lower().rstrip(".")
    if name.startswith("*."):
        name = name[2:]
    name = name.lstrip(".")
    if not name or len(name) > 253 or parse_ip(name) is not None:
        return None
    try:
        name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        return None
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels) or labels[-1].isdigit():
        return None  # no top-level domain is all digits: "300.1.2.3" is a broken address
    return name


def is_sha256(text: str) -> bool:
    return bool(_HEX64.match(text))


class IPIndex:
    """Exact addresses and CIDR blocks of one family set (IPv4 and IPv6 kept apart)."""

    def __init__(self, singles: dict[Entry, Hits] | None = None) -> None:
        self.singles: dict[Entry, Hits] = {} if singles is None else singles
        self._exact: dict[int, dict[int, Hits]] = {4: {}, 6: {}}
        # CIDR blocks as added: (version, first, last) -> hits; flattened by build()
        self._blocks: dict[tuple[int, int, int], Hits] = {}
        self._starts: dict[int, list[int]] = {4: [], 6: []}
        self._ends: dict[int, list[int]] = {4: [], 6: []}
        self._hits: dict[int, list[Hits]] = {4: [], 6: []}
        self._built = True

    def __len__(self) -> int:
        return self.exact_count + len(self._blocks)

    @property
    def exact_count(self) -> int:
        return len(self._exact[4]) + len(self._exact[6])

    @property
    def block_count(self) -> int:
        return len(self._blocks)

    def add_ip(self, version: int, value: int, entry: Entry) -> None:
        exact = self._exact[version]
        exact[value] = _add(exact.get(value), entry, self.singles)

    def add_network(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network, entry: Entry) -> None:
        if net.num_addresses == 1:
            self.add_ip(net.version, int(net.network_address), entry)
            return
        key = (net.version, int(net.network_address), int(net.broadcast_address))
        self._blocks[key] = _add(self._blocks.get(key), entry, self.singles)
        self._built = False

    def build(self) -> None:
        """Flatten the blocks into disjoint intervals; where blocks nest, the innermost one's hits win.

        CIDR blocks never overlap partially (two blocks are nested or apart), so one sweep with a stack of the
        blocks that contain the current address does it.
        """
        for version in (4, 6):
            blocks = sorted((first, -last, h) for (v, first, last), h in self._blocks.items() if v == version)
            self._starts[version], self._ends[version], self._hits[version] = _flatten(blocks)
        self._built = True

    def match(self, version: int, value: int) -> Hits:
        exact = self._exact[version].get(value)
        if exact is not None:
            return exact
        if not self._built:
            self.build()
        starts = self._starts[version]
        i = bisect.bisect_right(starts, value) - 1
        if i >= 0 and value <= self._ends[version][i]:
            return self._hits[version][i]
        return ()


def _flatten(blocks: list[tuple[int, int, Hits]]) -> tuple[list[int], list[int], list[Hits]]:
    """Disjoint intervals of nested blocks given as (first, -last, hits) sorted; the innermost block wins."""
    starts: list[int] = []
    ends: list[int] = []
    hits: list[Hits] = []

    def emit(lo: int, hi: int, h: Hits) -> None:
        if lo <= hi:
            starts.append(lo)
            ends.append(hi)
            hits.append(h)

    stack: list[tuple[int, int, Hits]] = []
    pos = 0
    for first, neg_last, h in blocks:
        last = -neg_last
        while stack and stack[-1][1] < first:
            _, top_last, top_h = stack.pop()
            emit(pos, top_last, top_h)
            pos = max(pos, top_last + 1)
        if stack:
            emit(pos, first - 1, stack[-1][2])
        pos = first
        stack.append((first, last, h))
    while stack:
        _, top_last, top_h = stack.pop()
        emit(pos, top_last, top_h)
        pos = max(pos, top_last + 1)
    return starts, ends, hits


class DomainIndex:
    """Domains; a listed domain covers its subdomains."""

    def __init__(self, singles: dict[Entry, Hits] | None = None) -> None:
        self.singles: dict[Entry, Hits] = {} if singles is None else singles
        self._names: dict[str, Hits] = {}

    def __len__(self) -> int:
        return len(self._names)

    def add(self, name: str, entry: Entry) -> None:
        self._names[name] = _add(self._names.get(name), entry, self.singles)

    def match(self, name: str) -> tuple[str, Hits] | None:
        """(the listed suffix, its hits) for the most specific listed suffix of ``name`` (normalized), or None."""
        names = self._names
        if not names:
            return None
        cur = name
        while True:
            hits = names.get(cur)
            if hits is not None:
                return cur, hits
            dot = cur.find(".")
            if dot < 0:
                return None
            cur = cur[dot + 1 :]


class HashIndex:
    def __init__(self, singles: dict[Entry, Hits] | None = None) -> None:
        self.singles: dict[Entry, Hits] = {} if singles is None else singles
        self._hashes: dict[str, Hits] = {}

    def __len__(self) -> int:
        return len(self._hashes)

    def add(self, sha256: str, entry: Entry) -> None:
        key = sha256.lower()
        self._hashes[key] = _add(self._hashes.get(key), entry, self.singles)

    def match(self, sha256: str) -> Hits:
        return self._hashes.get(sha256.lower(), ())


class IndicatorSet:
    """All the indicators of a side (threat or trusted): addresses, domains, hashes."""

    def __init__(self) -> None:
        singles: dict[Entry, Hits] = {}
        self.ips = IPIndex(singles)
        self.domains = DomainIndex(singles)
        self.hashes = HashIndex(singles)
        # entries per list name, for the stats line
        self.counts: dict[str, int] = {}

    def add(self, kind: str, value: object, entry: Entry) -> None:
        if kind == "ip":
            assert isinstance(value, tuple)
            self.ips.add_ip(value[0], value[1], entry)
        elif kind == "cidr":
            assert isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network)
            self.ips.add_network(value, entry)
        elif kind == "domain":
            assert isinstance(value, str)
            self.domains.add(value, entry)
        elif kind == "sha256":
            assert isinstance(value, str)
            self.hashes.add(value, entry)
        else:
            raise ValueError(f"unknown indicator kind {kind!r}")
        self.counts[entry.list_name] = self.counts.get(entry.list_name, 0) + 1

    def add_all(self, items: Iterable[tuple[str, object, Entry]]) -> None:
        for kind, value, entry in items:
            self.add(kind, value, entry)

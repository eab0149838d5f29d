"""Readers of threat-list files: plain text, STIX 2.1 bundles, OTX CSV exports.

Each reader turns a file into :class:`Indicator` values and reports what it
cannot read as a :class:`ListProblem` naming the file and the line; one bad
line never stops the rest of the file from loading.

- plain: one IP, CIDR, domain, URL (its host is taken) or SHA-256 a line; ``#`` starts a comment; text after
  `` #`` on an indicator's line names the threat (``185.13.39.197  # Tor fallback relay Neldoreth``).
- STIX 2.1: a bundle (or a single object, or a list) of ``indicator`` objects with ``pattern_type`` stix;
  comparisons ``ipv4-addr:value``, ``ipv6-addr:value`` (``=`` or ``ISSUBSET`` a CIDR), ``domain-name:value``,
  ``url:value`` (its host), ``file:hashes.'SHA-256'``; comparisons joined by ``OR`` each count. A pattern
  with ``AND`` or ``FOLLOWEDBY`` narrows the match to more than the address or name: it is reported, not
  widened into a bare indicator.
- OTX CSV: header ``Indicator type,Indicator,Description``; types IPv4, IPv6, CIDR, domain, hostname,
  FileHash-SHA256, URL (its host). Other types (MD5, email, ...) are counted and reported once.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from detectors.intel.lists import is_sha256, normalize_domain_indicator, parse_ip

MAX_PROBLEMS_PER_FILE = 50


@dataclass(frozen=True)
class ListProblem:
    """A line (or a whole file) of a list that could not be read."""

    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}" if self.line is not None else f"{self.path}: {self.message}"


@dataclass(frozen=True, slots=True)
class Indicator:
    kind: str  # ip | cidr | domain | sha256
    value: object  # (version, int) | ip_network | str
    text: str  # as listed
    threat_name: str | None = None
    line: int | None = None


def parse_indicator(text: str) -> tuple[str, object] | None:
    """(kind, value) of one indicator in any of the plain forms, or None."""
    t = text.strip()
    if not t:
        return None
    ip = parse_ip(t)
    if ip is not None:
        return "ip", ip
    if "/" in t and "://" not in t:
        try:
            net = ipaddress.ip_network(t, strict=False)
        except ValueError:
            return None
        if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
            return None  # ::ffff:0:0/96 forms: list the IPv4 block instead
        return "cidr", net
    if is_sha256(t):
        return "sha256", t.lower()
    if "://" in t:
        host = url_host(t)
        if host is None:
            return None
        return parse_indicator(host)
    name = normalize_domain_indicator(t)
    if name is not None and "." in name:
        return "domain", name
    return None


def url_host(url: str) -> str | None:
    try:
        host = urlsplit(url.strip()).hostname
    except ValueError:
        return None
    return host or None


# -- plain ------------------------------------------------------------------------------------------------------


def read_plain(path: str, text: str) -> Iterator[Indicator | ListProblem]:
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";", "//")):
            continue
        threat: str | None = None
        for sep in (" #", "\t#"):
            if sep in line:
                line, threat = line.split(sep, 1)
                line, threat = line.strip(), threat.strip() or None
                break
        # hosts-file form: "0.0.0.0 evil.com"
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("0.0.0.0", "127.0.0.1", "::", "::1"):
            line = parts[1]
        elif len(parts) > 1:
            yield ListProblem(path, lineno, f"more than one value on the line: {line[:80]!r}")
            continue
        parsed = parse_indicator(line)
        if parsed is None:
            yield ListProblem(path, lineno, f"not an IP address, CIDR block, domain or SHA-256: {line[:80]!r}")
            continue
        yield Indicator(parsed[0], parsed[1], line, threat, lineno)


# -- STIX 2.1 ---------------------------------------------------------------------------------------------------

_COMPARISON = re.compile(
    r"(?P<obj>[a-z0-9-]+):(?P<path>[A-Za-z0-9_.'\-]+)\s*(?P<op>=|ISSUBSET|LIKE|MATCHES|!=|IN)\s*"
    r"(?P<val>'(?:[^'\\]|\\.)*'|\([^)]*\))",
    re.I,
)
_SUPPORTED = {
    ("ipv4-addr", "value"),
    ("ipv6-addr", "value"),
    ("domain-name", "value"),
    ("url", "value"),
    ("file", "hashes.'sha-256'"),
    ("file", "hashes.sha256"),
    ("file", "hashes.'sha256'"),
}


def stix_pattern_indicators(pattern: str) -> tuple[list[tuple[str, object, str]], str | None]:
    """Indicators of a STIX pattern, or a reason why it cannot be taken."""
    if re.search(r"\b(?:AND|FOLLOWEDBY|NOT)\b", pattern):
        return [], "pattern narrows the match with AND/FOLLOWEDBY/NOT: not taken as a bare indicator"
    out: list[tuple[str, object, str]] = []
    found = list(_COMPARISON.finditer(pattern))
    if not found:
        return [], f"no comparison found in pattern {pattern[:120]!r}"
    for m in found:
        obj, path, op = m["obj"].lower(), m["path"].lower(), m["op"].upper()
        val = m["val"]
        if (obj, path) not in _SUPPORTED:
            return [], f"unsupported object path {obj}:{m['path']}"
        if op not in ("=", "ISSUBSET"):
            return [], f"unsupported operator {op} on {obj}:{m['path']}"
        if not val.startswith("'"):
            return [], f"unsupported value {val[:60]}"
        value = val[1:-1].replace("\\'", "'").replace("\\\\", "\\")
        if obj == "url":
            host = url_host(value)
            if host is None:
                return [], f"no host in URL {value[:80]!r}"
            value = host
        parsed = parse_indicator(value)
        if parsed is None:
            return [], f"cannot read {obj} value {value[:80]!r}"
        kind = parsed[0]
        expected = {"ipv4-addr": ("ip", "cidr"), "ipv6-addr": ("ip", "cidr"), "file": ("sha256",)}.get(obj)
        if expected is not None and kind not in expected:
            return [], f"{obj} value {value[:80]!r} is not of that kind"
        if obj == "domain-name" and kind != "domain":
            return [], f"domain-name value {value[:80]!r} is not a domain"
        out.append((kind, parsed[1], value))
    return out, None


def _line_of(text: str, needle: str) -> int | None:
    i = text.find(needle)
    return None if i < 0 else text.count("\n", 0, i) + 1


def read_stix(path: str, text: str) -> Iterator[Indicator | ListProblem]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        yield ListProblem(path, e.lineno, f"not JSON: {e.msg}")
        return
    objects: list[Any]
    if isinstance(doc, dict) and isinstance(doc.get("objects"), list):
        objects = doc["objects"]
    elif isinstance(doc, dict):
        objects = [doc]
    elif isinstance(doc, list):
        objects = doc
    else:
        yield ListProblem(path, 1, "not a STIX bundle, object or list of objects")
        return
    for i, obj in enumerate(objects):
        if not isinstance(obj, dict) or obj.get("type") != "indicator":
            continue
        oid = str(obj.get("id") or f"objects[{i}]")
        line = _line_of(text, oid) if obj.get("id") else None
        if obj.get("revoked") is True:
            continue
        ptype = obj.get("pattern_type", "stix")
        pattern = obj.get("pattern")
        if ptype != "stix" or not isinstance(pattern, str):
            yield ListProblem(path, line, f"{oid}: no STIX pattern (pattern_type {ptype!r})")
            continue
        found, why = stix_pattern_indicators(pattern)
        if why is not None:
            yield ListProblem(path, line, f"{oid}: {why}")
            continue
        threat = obj.get("name")
        if not isinstance(threat, str) or not threat:
            types = obj.get("indicator_types") or obj.get("labels")
            threat = ",".join(str(t) for t in types) if isinstance(types, list) and types else None
        for kind, value, as_listed in found:
            yield Indicator(kind, value, as_listed, threat, line)


# -- OTX CSV ----------------------------------------------------------------------------------------------------

OTX_TYPES = {
    "ipv4": "ip",
    "ipv6": "ip",
    "cidr": "cidr",
    "domain": "domain",
    "hostname": "domain",
    "filehash-sha256": "sha256",
    "url": "url",
    "uri": "url",
}


def read_otx(path: str, text: str) -> Iterator[Indicator | ListProblem]:
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    skipped: Counter[str] = Counter()
    for row in reader:
        lineno = reader.line_num
        if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        if header is None:
            header = [c.strip().lower() for c in row]
            if header[:2] != ["indicator type", "indicator"]:
                yield ListProblem(path, lineno, "OTX CSV must start with the header 'Indicator type,Indicator,...'")
                return
            continue
        if len(row) < 2:
            yield ListProblem(path, lineno, "fewer than two columns")
            continue
        itype, value = row[0].strip(), row[1].strip()
        kind = OTX_TYPES.get(itype.lower())
        if kind is None:
            skipped[itype] += 1
            continue
        desc = row[2].strip() if len(row) > 2 and row[2].strip() else None
        if kind == "url":
            host = url_host(value)
            parsed = parse_indicator(host) if host else None
        else:
            parsed = parse_indicator(value)
        if parsed is None or (kind != "url" and parsed[0] != kind and not (kind == "domain" and parsed[0] == "ip")):
            yield ListProblem(path, lineno, f"{itype} value {value[:80]!r} cannot be read as one")
            continue
        yield Indicator(parsed[0], parsed[1], value, desc, lineno)
    if header is None:
        yield ListProblem(path, None, "empty OTX CSV file")
    for itype, n in sorted(skipped.items()):
        yield ListProblem(path, None, f"{n} indicator(s) of type {itype!r} skipped (not matchable here)")


# -- format detection -------------------------------------------------------------------------------------------


def detect_format(path: str, text: str) -> str:
    low = path.lower()
    if low.endswith((".json", ".stix")):
        return "stix"
    if low.endswith(".csv"):
        return "otx"
    head = text.lstrip()[:200]
    if head.startswith(("{", "[")):
        return "stix"
    if head.lower().startswith("indicator type"):
        return "otx"
    return "plain"


READERS = {"plain": read_plain, "stix": read_stix, "otx": read_otx}


def read_list(path: str, text: str, fmt: str = "auto") -> Iterator[Indicator | ListProblem]:
    fmt = (fmt or "auto").lower()
    if fmt == "auto":
        fmt = detect_format(path, text)
    reader = READERS.get(fmt)
    if reader is None:
        yield ListProblem(path, None, f"unknown list format {fmt!r} (auto, plain, stix or otx)")
        return
    yield from reader(path, text)

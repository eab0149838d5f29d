"""Threat intelligence: bundled and user lists, trusted lists, O(1)/O(log n) lookups, a DGA score.

:meth:`ThreatIntel.load` reads the bundled lists (``data/``, sources and dates
in ``data/SOURCES.md``) and the user's threat and trusted lists (plain text,
STIX 2.1, OTX CSV; see :mod:`detectors.intel.loaders`). A bad file or line is
reported as a :class:`ListProblem` and skipped; loading never raises for one.

A trusted list wins over every threat list: a trusted address or domain (and
its subdomains) never matches. Lookups return the list entries that name the
indicator, most specific category first; the detectors in
:mod:`detectors.threat_intel` turn them into findings.
"""

from __future__ import annotations

import os
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from detectors.base import ListSpec, normalize_domain
from detectors.intel import dga
from detectors.intel.lists import (
    CATEGORY_TYPES,
    DEFAULT_CATEGORY,
    Entry,
    Hits,
    IndicatorSet,
    normalize_domain_indicator,
    parse_ip,
)
from detectors.intel.loaders import Indicator, ListProblem, parse_indicator, read_list

__all__ = ["DomainMatch", "Entry", "Indicator", "ListProblem", "ThreatIntel"]

MAX_LIST_BYTES = 256 * 1024 * 1024
BUNDLED_PREFIX = "bundled:"


@dataclass(frozen=True, slots=True)
class DomainMatch:
    """A domain hit: the listed name that covers the queried one, and the entries naming it."""

    listed: str
    entries: Hits


@dataclass(frozen=True, slots=True)
class MiningPool:
    domain: str
    ports: frozenset[int]
    coins: tuple[str, ...]


def _data_text(name: str) -> str:
    return (resources.files("detectors.intel") / "data" / name).read_text(encoding="utf-8")


class ThreatIntel:
    def __init__(self) -> None:
        self.threats = IndicatorSet()
        self.trusted = IndicatorSet()
        self.pools: dict[str, MiningPool] = {}
        self.stratum_ports: frozenset[int] = frozenset()
        self.lists: dict[str, dict[str, Any]] = {}
        self.load_seconds = 0.0

    # -- loading --------------------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        threat_lists: Sequence[ListSpec] = (),
        trusted_lists: Sequence[ListSpec] = (),
        *,
        bundled: bool = True,
    ) -> tuple[ThreatIntel, list[ListProblem]]:
        t0 = time.monotonic()
        intel = cls()
        problems: list[ListProblem] = []
        if bundled:
            problems.extend(intel._load_bundled())
        for spec in threat_lists:
            problems.extend(intel._load_spec(spec, trusted=False))
        for spec in trusted_lists:
            problems.extend(intel._load_spec(spec, trusted=True))
        intel.threats.ips.build()
        intel.trusted.ips.build()
        intel.load_seconds = time.monotonic() - t0
        return intel, problems

    def _load_spec(self, spec: ListSpec, *, trusted: bool) -> list[ListProblem]:
        path = spec.path
        name = spec.name or os.path.basename(path) or path
        category = (spec.category or ("trusted" if trusted else DEFAULT_CATEGORY)).lower()
        if not trusted and category not in CATEGORY_TYPES:
            known = ", ".join(CATEGORY_TYPES)
            return [ListProblem(path, None, f"unknown category {spec.category!r} (one of: {known})")]
        try:
            size = os.path.getsize(path)
            if size > MAX_LIST_BYTES:
                return [ListProblem(path, None, f"file of {size} bytes is over the {MAX_LIST_BYTES} byte limit")]
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            return [ListProblem(path, None, f"cannot read: {e.strerror or e}")]
        return self.add_text(path, text, fmt=spec.format, name=name, category=category, trusted=trusted)

    def add_text(
        self, path: str, text: str, *, fmt: str = "auto", name: str, category: str, trusted: bool = False
    ) -> list[ListProblem]:
        """Load one list's text (a file's content) under ``name``; returns its problems."""
        problems: list[ListProblem] = []
        target = self.trusted if trusted else self.threats
        entries: dict[str | None, Entry] = {}
        ip_type, dns_type = CATEGORY_TYPES.get(category, (None, None))
        silent: dict[str, int] = {}
        n = 0
        for item in read_list(path, text, fmt):
            if isinstance(item, ListProblem):
                if len(problems) < 50:
                    problems.append(item)
                elif len(problems) == 50:
                    problems.append(ListProblem(path, None, "more problems in this file not reported"))
                continue
            if category == "malware" and item.kind != "sha256":
                problems.append(ListProblem(path, item.line, f"a malware list holds SHA-256 hashes, not {item.text!r}"))
                continue
            if not trusted and category != "malware":
                side = ip_type if item.kind in ("ip", "cidr") else dns_type if item.kind == "domain" else "hash"
                if side is None:
                    silent[item.kind] = silent.get(item.kind, 0) + 1
            entry = entries.get(item.threat_name)
            if entry is None:
                entry = entries[item.threat_name] = Entry(name, category, item.threat_name)
            target.add(item.kind, item.value, entry)
            n += 1
        for kind, count in sorted(silent.items()):
            problems.append(
                ListProblem(
                    path, None, f"{count} {kind} indicator(s) raise no finding on a list of category {category}"
                )
            )
        self.lists[name] = {"entries": self.lists.get(name, {}).get("entries", 0) + n, "category": category,
                            "trusted": trusted, "path": path}  # fmt: skip
        return problems

    def _load_bundled(self) -> list[ListProblem]:
        problems: list[ListProblem] = []
        manifest = tomllib.loads(_data_text("lists.toml"))
        for spec in manifest.get("list", []):
            file, category, name = spec["file"], spec["category"], spec["name"]
            path = BUNDLED_PREFIX + file
            text = _data_text(file)
            if file.endswith(".toml"):
                problems.extend(self._load_bundled_toml(path, text, name, category))
            else:
                problems.extend(self.add_text(path, text, fmt="plain", name=name, category=category))
        return problems

    def _load_bundled_toml(self, path: str, text: str, name: str, category: str) -> list[ListProblem]:
        doc = tomllib.loads(text)
        problems: list[ListProblem] = []
        items: list[tuple[str, str, str | None]] = []  # (indicator, category, threat name)
        if "pool" in doc:
            self.stratum_ports = frozenset(int(p) for p in doc.get("stratum_ports", []))
            for pool in doc["pool"]:
                domain = normalize_domain_indicator(str(pool["domain"]))
                if domain is None:
                    problems.append(ListProblem(path, None, f"bad pool domain {pool['domain']!r}"))
                    continue
                coins = tuple(str(c) for c in pool.get("coins", []))
                self.pools[domain] = MiningPool(domain, frozenset(int(p) for p in pool.get("ports", [])), coins)
                items.append((domain, category, "mining pool" + (f" ({', '.join(coins)})" if coins else "")))
        else:
            for cat, names in doc.items():
                if cat not in CATEGORY_TYPES:
                    problems.append(ListProblem(path, None, f"unknown category {cat!r}"))
                    continue
                items.extend((str(n), cat, "GuardDuty tester domain") for n in names)
        n = 0
        for indicator, cat, threat in items:
            parsed = parse_indicator(indicator)
            if parsed is None:
                problems.append(ListProblem(path, None, f"bad indicator {indicator!r}"))
                continue
            self.threats.add(parsed[0], parsed[1], Entry(name, cat, threat))
            n += 1
        self.lists[name] = {"entries": n, "category": category, "trusted": False, "path": path}
        return problems

    # -- lookups --------------------------------------------------------------------------------------------------
    def is_trusted_ip(self, ip: str | None) -> bool:
        parsed = parse_ip(ip) if ip else None
        return parsed is not None and bool(self.trusted.ips.match(*parsed))

    def is_trusted_domain(self, domain: str | None) -> bool:
        name = normalize_domain(domain)
        return bool(name) and self.trusted.domains.match(name) is not None

    def match_ip(self, ip: str | None) -> Hits:
        """Threat-list entries naming ``ip`` (exactly or in a CIDR block); () if none or if it is trusted."""
        if not ip:
            return ()
        parsed = parse_ip(ip)
        if parsed is None:
            return ()
        hits = self.threats.ips.match(*parsed)
        if not hits or self.trusted.ips.match(*parsed):
            return ()
        return hits

    def match_domain(self, domain: str | None) -> DomainMatch | None:
        """The threat-list entries covering ``domain`` or a parent of it; None if none or if it is trusted."""
        name = normalize_domain(domain)
        if not name:
            return None
        found = self.threats.domains.match(name)
        if found is None or self.trusted.domains.match(name) is not None:
            return None
        return DomainMatch(found[0], found[1])

    def match_sha256(self, sha256: str | None) -> Hits:
        if not sha256 or len(sha256) != 64:
            return ()
        hits = self.threats.hashes.match(sha256)
        if not hits or self.trusted.hashes.match(sha256):
            return ()
        return hits

    def mining_pool(self, domain: str | None) -> MiningPool | None:
        """The bundled mining pool a name belongs to (subdomains included), unless the name is trusted."""
        name = normalize_domain(domain)
        if not name or self.is_trusted_domain(name):
            return None
        cur = name
        while True:
            pool = self.pools.get(cur)
            if pool is not None:
                return pool
            dot = cur.find(".")
            if dot < 0:
                return None
            cur = cur[dot + 1 :]

    def dga_score(self, domain: str | None) -> dga.Score:
        return dga.score(normalize_domain(domain))

    def snapshot(self) -> dict[str, Any]:
        threat: dict[str, int] = {}
        trusted: dict[str, int] = {}
        for name, info in self.lists.items():
            (trusted if info["trusted"] else threat)[name] = info["entries"]
        return {
            "threatLists": threat,
            "trustedLists": trusted,
            "ips": self.threats.ips.exact_count,
            "cidrs": self.threats.ips.block_count,
            "domains": len(self.threats.domains),
            "sha256": len(self.threats.hashes),
            "loadSeconds": round(self.load_seconds, 3),
        }


def categories_of(entries: Iterable[Entry]) -> list[str]:
    return sorted({e.category for e in entries})

"""Threat-intelligence findings: list hits on connections, DNS names, answers and executables; DNS rebinding
to the metadata service; Tor relays; stratum miners; DGA names.

- :class:`ThreatListDetector` — outbound connections (``net.connect``, ``net.syn``, ``net.udp``, short-lived
  sockets with no process too) whose remote address is on a threat list (C&C, Tor, black hole, drop point,
  mining); DNS queries whose name (or a parent) is listed; DNS answers whose CNAME target or address is
  listed; connections to an address a mining-pool name resolved to, on a stratum port; and DGA-looking
  names that do not exist (NXDOMAIN answers, see :mod:`detectors.intel.dga`).
- :class:`MetadataDNSRebindDetector` — a name other than the metadata service's own answered with
  169.254.169.254, fd00:ec2::254 (EC2 instance metadata) or 169.254.170.2 (ECS task metadata and credentials).
- :class:`TorRelayDetector` — a ``tor`` process listening on a non-loopback address, or started with an
  ``ORPort`` (on its command line or in its torrc).
- :class:`MinerCommandDetector` — a ``stratum+tcp://``/``stratum+ssl://``/``stratum2+tcp://`` URL on a
  command line.
- :class:`MaliciousFileDetector` — a process whose executable's SHA-256 is on a malware hash list.

Deliberate exclusions: trusted lists win over every threat list; inbound connections and listening sockets
are not list hits (a scanner from a listed address reaching a public service is not C&C); DNS queries the
task answers (a local server's inbound queries) are skipped; the names of the task's own ECS metadata,
credentials and collector endpoints are never flagged; DGA scores alone never fire on a name that resolves.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from collectors.events import ProcessInfo, RuntimeEvent
from detectors.base import (
    Detection,
    Detector,
    DetectorContext,
    ThreatEvidence,
    dns_action,
    network_action,
    normalize_domain,
)
from detectors.intel.lists import CATEGORY_TYPES, MALWARE_TYPE, Entry

C2 = "Backdoor:Runtime/C&CActivity.B"
MINING = "CryptoCurrency:Runtime/BitcoinTool.B"
MINING_DNS = "CryptoCurrency:Runtime/BitcoinTool.B!DNS"
DGA_TYPE = "Trojan:Runtime/DGADomainRequest.C!DNS"
REBIND = "UnauthorizedAccess:Runtime/MetadataDNSRebind"
TOR_RELAY = "UnauthorizedAccess:Runtime/TorRelay"

IP_TYPES = tuple(sorted({t for t, _ in CATEGORY_TYPES.values() if t}))
DNS_TYPES = tuple(sorted({t for _, t in CATEGORY_TYPES.values() if t}))

# EC2 instance metadata (IPv4 and the Nitro IPv6 endpoint) and the ECS task metadata/credentials endpoint.
METADATA_ADDRESSES = frozenset({"169.254.169.254", "fd00:ec2::254", "169.254.170.2"})
# The metadata service's own names: they answer with its address by design.
METADATA_NAMES = frozenset({"instance-data", "instance-data.ec2.internal", "metadata.ec2.internal"})
# Environment variables naming the task's own endpoints (ECS sets the first three; the sidecar reads the last).
ENDPOINT_ENV = (
    "ECS_CONTAINER_METADATA_URI_V4",
    "ECS_CONTAINER_METADATA_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "RUNTIME_SIDECAR_COLLECTOR_URL",
)
NXDOMAIN = "NXDOMAIN"
RESOLVED_TTL_MIN, RESOLVED_TTL_MAX = 300.0, 3600.0
MAX_RESOLVED = 8192
MAX_RECENT = 4096


def own_endpoint_names(environ: dict[str, str] | None = None) -> frozenset[str]:
    """Host names of the task's own metadata, credentials and collector endpoints (never findings)."""
    env = os.environ if environ is None else environ
    names = set(METADATA_NAMES)
    for var in ENDPOINT_ENV:
        url = env.get(var)
        if not url:
            continue
        try:
            host = urlsplit(url).hostname
        except ValueError:
            continue
        if host:
            names.add(normalize_domain(host))
    return frozenset(names)


def _evidence(entries: Iterable[Entry]) -> list[ThreatEvidence]:
    """One ThreatEvidence per list, with the threat names it gives (the category when it names none)."""
    per: dict[str, list[str]] = {}
    for e in entries:
        names = per.setdefault(e.list_name, [])
        name = e.threat_name or e.category
        if name not in names:
            names.append(name)
    return [ThreatEvidence(list_name, tuple(names)) for list_name, names in per.items()]


def _first_typed(entries: Iterable[Entry], dns: bool) -> tuple[str, list[Entry]] | None:
    """The finding type of the most specific category with a type of that side, and the entries of that type."""
    chosen: str | None = None
    same: list[Entry] = []
    for e in entries:
        ip_type, dns_type = CATEGORY_TYPES.get(e.category, (None, None))
        t = dns_type if dns else ip_type
        if t is None:
            continue
        if chosen is None:
            chosen = t
        if t == chosen:
            same.append(e)
    return (chosen, same) if chosen is not None else None


def _threat_text(evidence: list[ThreatEvidence]) -> str:
    return "; ".join(f"{ev.list_name}: {', '.join(ev.threat_names)}" for ev in evidence)


def _name(value: Any) -> str:
    """A DNS name from event data, normalized; "" for anything that is not a string."""
    return normalize_domain(value) if isinstance(value, str) else ""


def _is_outbound(data: dict[str, Any]) -> bool:
    return data.get("direction") not in ("INBOUND", "LISTEN")


class _Base(Detector):
    def __init__(self, ctx: DetectorContext) -> None:
        super().__init__(ctx)
        self.own_names = own_endpoint_names()
        self.counters: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return dict(self.counters)


class ThreatListDetector(_Base):
    name = "threat_lists"
    types = (*IP_TYPES, *DNS_TYPES)
    kinds = ("net.connect", "net.syn", "net.udp", "dns.query", "dns.response")

    def __init__(self, ctx: DetectorContext) -> None:
        super().__init__(ctx)
        # addresses that mining-pool names resolved to: ip -> (pool domain, queried name, expiry)
        self.pool_addresses: OrderedDict[str, tuple[str, str, float]] = OrderedDict()
        # connections already reported by another source (sock_diag and packets both see a connect)
        self.recent: OrderedDict[tuple[Any, ...], bool] = OrderedDict()

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        intel = self.ctx.intel
        if intel is None:
            return ()
        data = event.data or {}
        if event.kind == "dns.query":
            return self._query(event, data)
        if event.kind == "dns.response":
            return self._response(event, data)
        return self._connection(event, data)

    # -- connections ------------------------------------------------------------------------------------------
    def _connection(self, event: RuntimeEvent, data: dict[str, Any]) -> Iterable[Detection]:
        intel = self.ctx.intel
        assert intel is not None
        remote = data.get("remoteIp")
        if not isinstance(remote, str) or not remote or not _is_outbound(data):
            return ()
        out: list[Detection] = []
        hits = intel.match_ip(remote)
        typed = _first_typed(hits, dns=False) if hits else None
        if typed is not None:
            ftype, entries = typed
            evidence = _evidence(entries)
            if self._first_report(ftype, event, data):
                out.append(self._net_detection(event, data, ftype, evidence, evidence_text=_threat_text(evidence)))
        pool = self._pool_of(remote)
        if pool is not None and typed is None:
            pool_domain, queried, _ = pool
            port = data.get("remotePort")
            p = intel.pools.get(pool_domain)
            ports = (p.ports if p is not None else frozenset()) | intel.stratum_ports
            if isinstance(port, int) and port in ports and self._first_report(MINING, event, data):
                text = f"{remote}:{port}, an address of the mining pool {pool_domain} (resolved from {queried})"
                evidence = [ThreatEvidence("MiningPools", (f"mining pool {pool_domain}",))]
                out.append(self._net_detection(event, data, MINING, evidence, evidence_text=text))
        return out

    def _first_report(self, ftype: str, event: RuntimeEvent, data: dict[str, Any]) -> bool:
        """False for the second source's view of one connection (its packet SYN, then its socket)."""
        key = (ftype, data.get("localIp"), data.get("localPort"), data.get("remoteIp"), data.get("remotePort"))
        had_process = self.recent.get(key)
        has_process = event.process is not None
        if had_process is not None and (had_process or not has_process):
            self.count("duplicate_connection")
            return False
        self.recent[key] = has_process
        self.recent.move_to_end(key)
        while len(self.recent) > MAX_RECENT:
            self.recent.popitem(last=False)
        return True

    def _net_detection(
        self,
        event: RuntimeEvent,
        data: dict[str, Any],
        ftype: str,
        evidence: list[ThreatEvidence],
        *,
        evidence_text: str,
    ) -> Detection:
        remote = data.get("remoteIp")
        self.count(ftype)
        context = {k: data[k] for k in ("addressFamily", "ianaProtocolNumber") if data.get(k) is not None}
        if data.get("shortLived"):
            context["shortLived"] = True
        return Detection(
            ftype,
            event.process,
            context=context,
            key=(remote,),
            evidence=evidence,
            action=network_action(data),
            facts={
                "remoteIp": remote,
                "remotePort": data.get("remotePort"),
                "threatNames": ", ".join(n for ev in evidence for n in ev.threat_names),
                "evidence": evidence_text,
            },
            time=event.time,
        )

    # -- DNS --------------------------------------------------------------------------------------------------
    def _query(self, event: RuntimeEvent, data: dict[str, Any]) -> Iterable[Detection]:
        intel = self.ctx.intel
        assert intel is not None
        if data.get("direction") == "INBOUND":
            return ()
        domain = _name(data.get("queryName"))
        if not domain or domain in self.own_names:
            return ()
        m = intel.match_domain(domain)
        if m is None:
            return ()
        typed = _first_typed(m.entries, dns=True)
        if typed is None:
            return ()
        ftype, entries = typed
        evidence = _evidence(entries)
        return (
            self._dns_detection(
                event, data, ftype, domain, evidence=evidence, text=_threat_text(evidence), listed=m.listed
            ),
        )

    def _response(self, event: RuntimeEvent, data: dict[str, Any]) -> Iterable[Detection]:
        intel = self.ctx.intel
        assert intel is not None
        if data.get("direction") == "INBOUND":
            return ()
        domain = _name(data.get("queryName"))
        if not domain or domain in self.own_names or intel.is_trusted_domain(domain):
            return ()
        out: list[Detection] = []
        answers = [a for a in (data.get("answers") or []) if isinstance(a, dict)]
        self._remember_pool_addresses(domain, answers)
        for a in answers:
            rtype, value = a.get("type"), a.get("value")
            if not isinstance(value, str) or not value:
                continue
            if rtype == "CNAME":
                target = _name(value)
                m = intel.match_domain(target)
                typed = _first_typed(m.entries, dns=True) if m is not None else None
                if typed is not None:
                    ftype, entries = typed
                    evidence = _evidence(entries)
                    text = f"CNAME {target}; " + _threat_text(evidence)
                    out.append(
                        self._dns_detection(event, data, ftype, domain, evidence=evidence, text=text, via=target)
                    )
            elif rtype in ("A", "AAAA"):
                hits = intel.match_ip(value)
                typed = _first_typed(hits, dns=True) if hits else None
                if typed is not None:
                    ftype, entries = typed
                    evidence = _evidence(entries)
                    text = f"answer {value}; " + _threat_text(evidence)
                    out.append(self._dns_detection(event, data, ftype, domain, evidence=evidence, text=text, via=value))
        if not out and data.get("rcode") == NXDOMAIN and intel.match_domain(domain) is None:
            s = intel.dga_score(domain)
            if s.generated:
                evidence = [ThreatEvidence("DGAScore", (f"generated-looking name ({s.reason}), NXDOMAIN",))]
                out.append(self._dns_detection(event, data, DGA_TYPE, domain, evidence=evidence, text=s.reason))
        return out

    def _dns_detection(
        self,
        event: RuntimeEvent,
        data: dict[str, Any],
        ftype: str,
        domain: str,
        *,
        evidence: list[ThreatEvidence],
        text: str,
        listed: str | None = None,
        via: str | None = None,
    ) -> Detection:
        self.count(ftype)
        context: dict[str, Any] = {}
        if listed is not None and listed != domain:
            context["listedDomain"] = listed
        if via is not None:
            context["resolvedTo"] = via
        return Detection(
            ftype,
            event.process,
            context=context,
            key=(domain,),
            evidence=evidence,
            action=dns_action(domain, data),
            facts={
                "domain": domain,
                "evidence": text,
                "threatNames": ", ".join(n for ev in evidence for n in ev.threat_names),
            },
            time=event.time,
        )

    # -- mining pools: names resolved, then connections to their addresses ----------------------------------
    def _remember_pool_addresses(self, domain: str, answers: list[dict[str, Any]]) -> None:
        intel = self.ctx.intel
        assert intel is not None
        pool = intel.mining_pool(domain)
        if pool is None:
            for a in answers:  # a pool behind a CNAME
                if a.get("type") == "CNAME" and isinstance(a.get("value"), str):
                    pool = intel.mining_pool(a["value"])
                    if pool is not None:
                        break
        if pool is None:
            return
        now = self.ctx.clock()
        for a in answers:
            if a.get("type") in ("A", "AAAA") and isinstance(a.get("value"), str):
                ttl = a.get("ttl")
                seconds = float(ttl) if isinstance(ttl, int) else 0.0
                expiry = now + min(max(seconds, RESOLVED_TTL_MIN), RESOLVED_TTL_MAX)
                self.pool_addresses[a["value"]] = (pool.domain, domain, expiry)
                self.pool_addresses.move_to_end(a["value"])
        while len(self.pool_addresses) > MAX_RESOLVED:
            self.pool_addresses.popitem(last=False)

    def _pool_of(self, ip: str) -> tuple[str, str, float] | None:
        found = self.pool_addresses.get(ip)
        if found is None:
            return None
        if found[2] < self.ctx.clock():
            del self.pool_addresses[ip]
            return None
        return found


class MetadataDNSRebindDetector(_Base):
    name = "metadata_dns_rebind"
    types = (REBIND,)
    kinds = ("dns.response",)

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        data = event.data or {}
        if data.get("direction") == "INBOUND":
            return ()
        domain = _name(data.get("queryName"))
        if not domain or domain in self.own_names:
            return ()
        for a in data.get("answers") or []:
            if not isinstance(a, dict) or a.get("type") not in ("A", "AAAA"):
                continue
            value = a.get("value")
            if not isinstance(value, str):
                continue
            try:
                addr = str(ipaddress.ip_address(value))
            except ValueError:
                continue
            if addr not in METADATA_ADDRESSES:
                continue
            intel = self.ctx.intel
            if intel is not None and intel.is_trusted_domain(domain):
                return ()
            self.count("rebind")
            return (
                Detection(
                    REBIND,
                    event.process,
                    context={"metadataAddress": addr},
                    key=(domain,),
                    action=dns_action(domain, data),
                    facts={"domain": domain, "metadataAddress": addr},
                    time=event.time,
                ),
            )
        return ()


# -- Tor relays -------------------------------------------------------------------------------------------------

_ORPORT = re.compile(r"(?:^|\s)-{0,2}ORPort\s+(\S+)", re.I)
_TORRC_ORPORT = re.compile(r"^\s*ORPort\s+(\S+)", re.I | re.M)
_TORRC_FLAG = re.compile(r"(?:^|\s)-f\s+(\S+)|--defaults-torrc\s+(\S+)")
DEFAULT_TORRC = ("/etc/tor/torrc", "/usr/local/etc/tor/torrc")
MAX_TORRC_BYTES = 256 * 1024


def is_tor(p: ProcessInfo) -> bool:
    return p.name == "tor" or os.path.basename(p.executable_path or "") == "tor"


def _orport_set(value: str) -> bool:
    # "ORPort 0" turns relaying off; anything else (a port, addr:port, "auto") makes a relay
    return value.rsplit(":", maxsplit=1)[-1] not in ("0", "")


def _is_loopback(ip: str | None) -> bool:
    try:
        return ip is not None and ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


class TorRelayDetector(_Base):
    name = "tor_relay"
    types = (TOR_RELAY,)
    kinds = ("net.listen", "process.exec")

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        p = event.process
        if p is None or not is_tor(p):
            return ()
        data = event.data or {}
        if event.kind == "net.listen":
            local = data.get("localIp")
            if str(data.get("protocol", "tcp")).lower() != "tcp" or _is_loopback(local):
                return ()  # a client's SOCKS port on localhost is not a relay
            text = f"listening on {local}:{data.get('localPort')}"
            return (self._detection(p, event, text, key=data.get("localPort"), data=data),)
        cmd = p.command_line or ""
        m = _ORPORT.search(cmd)
        if m is not None:
            if not _orport_set(m.group(1)):
                return ()
            return (self._detection(p, event, f"started with ORPort {m.group(1)}", key=m.group(1)),)
        torrc = self._torrc(p, cmd)
        if torrc is not None:
            path, value = torrc
            return (self._detection(p, event, f"{path} sets ORPort {value}", key=value),)
        return ()

    def _torrc(self, p: ProcessInfo, cmd: str) -> tuple[str, str] | None:
        paths: list[str] = []
        for m in _TORRC_FLAG.finditer(cmd):
            paths.append(m.group(1) or m.group(2))
        paths.extend(DEFAULT_TORRC)
        for given in paths:
            path = given if given.startswith("/") else os.path.join(p.cwd or "/", given)
            try:
                with open(f"/proc/{p.pid}/root{path}", "rb") as f:
                    text = f.read(MAX_TORRC_BYTES).decode("utf-8", "replace")
            except OSError:
                continue
            for m in _TORRC_ORPORT.finditer(text):
                if _orport_set(m.group(1)):
                    return path, m.group(1)
            return None  # tor reads the first torrc it finds
        return None

    def _detection(
        self, p: ProcessInfo, event: RuntimeEvent, text: str, *, key: Any, data: dict[str, Any] | None = None
    ) -> Detection:
        self.count("relay")
        return Detection(
            TOR_RELAY,
            p,
            context={"relayEvidence": text},
            key=(str(key),),
            action=network_action(data) if data else None,
            facts={"evidence": text},
            time=event.time,
        )


# -- miners by command line, malware by hash ---------------------------------------------------------------------

_STRATUM = re.compile(r"\bstratum2?\+(?:tcp|ssl|tls|udp)://([^\s'\"/]+)", re.I)


class MinerCommandDetector(_Base):
    name = "miner_command"
    types = (MINING,)
    kinds = ("process.exec",)

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        p = event.process
        if p is None or not p.command_line or "stratum" not in p.command_line.lower():
            return ()
        m = _STRATUM.search(p.command_line)
        if m is None:
            return ()
        url = m.group(0)
        host = m.group(1).rsplit("@", 1)[-1]
        pool_host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        intel = self.ctx.intel
        if intel is not None and intel.is_trusted_domain(pool_host):
            return ()
        self.count("stratum")
        text = f"stratum URL {url} on its command line"
        return (
            Detection(
                MINING,
                p,
                context={"miningPoolUrl": url},
                key=(pool_host.lower(),),
                evidence=[ThreatEvidence("StratumCommandLine", (url,))],
                facts={"evidence": text},
                time=event.time,
            ),
        )


class MaliciousFileDetector(_Base):
    name = "malicious_file"
    types = (MALWARE_TYPE,)
    kinds = ("process.exec",)

    def on_event(self, event: RuntimeEvent) -> Iterable[Detection]:
        p = event.process
        intel = self.ctx.intel
        if p is None or intel is None or not p.executable_sha256:
            return ()
        hits = intel.match_sha256(p.executable_sha256)
        if not hits:
            return ()
        self.count("malicious_file")
        sha = p.executable_sha256.lower()
        evidence = [ThreatEvidence(ev.list_name, ev.threat_names, file_sha256=sha) for ev in _evidence(hits)]
        return (
            Detection(
                MALWARE_TYPE,
                p,
                key=(sha,),
                evidence=evidence,
                facts={"sha256": sha, "threatNames": ", ".join(n for ev in evidence for n in ev.threat_names)},
                time=event.time,
            ),
        )


DETECTORS: tuple[type[Detector], ...] = (
    ThreatListDetector,
    MetadataDNSRebindDetector,
    TorRelayDetector,
    MinerCommandDetector,
    MaliciousFileDetector,
)

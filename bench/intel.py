"""`python -m bench.intel [--quick]`: the cost of a 250,000-entry threat list.

Prints (markdown): the load time and the RSS growth of loading a list of mixed
IPs, CIDR blocks and domains (with the bundled lists); lookups per second for
IPs and domains, hits and misses; and the threat-intel detector stage's cost
per DNS event (queries and responses, through a DetectorEngine) with that list
loaded, against the same stage with only the bundled lists.
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from collectors.events import ContainerRef, ProcessInfo, RuntimeEvent
from collectors.process_table import ProcessTable
from detectors import threat_intel
from detectors.base import DetectorContext, ListSpec
from detectors.build import FindingScope
from detectors.engine import DetectorEngine
from detectors.intel import ThreatIntel


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def make_list(path: Path, n: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """n entries: 40% IPv4, 5% IPv6, 15% CIDR blocks, 40% domains. Returns (some listed IPs, listed domains)."""
    ips, domains, lines = [], [], []
    for i in range(n):
        r = i % 20
        if r < 8:
            ip = f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
            ips.append(ip)
            lines.append(ip)
        elif r == 8:
            lines.append(f"2001:db8:{rng.randrange(65536):x}:{rng.randrange(65536):x}::{rng.randrange(65536):x}")
        elif r < 12:
            lines.append(f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.0/24")
        else:
            d = f"{rng.choice(['api', 'cdn', 'x', 'mail'])}{i}.bad{rng.randrange(50000)}.example"
            domains.append(d)
            lines.append(d)
    path.write_text("# generated for bench/intel.py\n" + "\n".join(lines) + "\n")
    return ips, domains


def rate(fn: Callable[[], Any], n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def proc(pid: int) -> ProcessInfo:
    return ProcessInfo(
        pid=pid, nspid=pid, ppid=1, name="curl", executable_path="/usr/bin/curl", executable_deleted=False,
        executable_sha256=None, command_line="curl https://example.com/", cwd="/", uid=0, euid=0, gid=0, egid=0,
        user="root", euser="root", start_ticks=pid, start_time=1000.0, uuid=f"u{pid}", parent_uuid=None,
        ld_preload=None, ld_library_path=None, container=ContainerRef("app", "c0ffee"), mnt_ns=None,
    )  # fmt: skip


def dns_events(n: int, rng: random.Random) -> list[RuntimeEvent]:
    """Benign-looking traffic: queries and their answers for service names, AWS endpoints, ordinary sites."""
    names = [
        "s3.us-east-1.amazonaws.com", "sqs.us-east-1.amazonaws.com", "orders.myapp.local", "redis.prod.internal",
        "api.github.com", "pypi.org", "files.pythonhosted.org", "d1234abcd.cloudfront.net", "www.example.com",
        "logs.us-east-1.amazonaws.com", "dynamodb.us-east-1.amazonaws.com", "api.stripe.com",
    ]  # fmt: skip
    p = proc(4242)
    out = []
    for i in range(n):
        name = rng.choice(names)
        data: dict[str, Any]
        if i % 2 == 0:
            data = {"queryName": name, "queryType": "A", "direction": "OUTBOUND", "transport": "UDP"}
            out.append(RuntimeEvent("dns.query", p, time=1.0, data=data))
        else:
            answers = [{"name": name, "type": "A", "value": f"10.0.{i % 256}.{i % 200}", "ttl": 60}]
            data = {"queryName": name, "queryType": "A", "direction": "OUTBOUND", "transport": "UDP",
                    "rcode": "NOERROR", "answers": answers}  # fmt: skip
            out.append(RuntimeEvent("dns.response", p, time=1.0, data=data))
    return out


def stage_cost(intel: ThreatIntel, events: list[RuntimeEvent]) -> float:
    """Microseconds per DNS event through the engine with the threat-intel detectors only."""
    found: list[dict[str, Any]] = []
    ctx = DetectorContext(ProcessTable(), intel=intel, self_pids=frozenset())
    engine = DetectorEngine(ctx, FindingScope(), found.append, detectors=list(threat_intel.DETECTORS))
    t0 = time.perf_counter()
    for e in events:
        engine.on_event(e)
    return (time.perf_counter() - t0) / len(events) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.intel")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--entries", type=int, default=250_000)
    args = ap.parse_args()
    rng = random.Random(250)
    n_lookups = 50_000 if args.quick else 500_000
    n_events = 20_000 if args.quick else 200_000
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "big.txt"
        ips, domains = make_list(path, args.entries, rng)
        gc.collect()
        base_intel, _ = ThreatIntel.load()
        rss0 = rss_kib()
        t0 = time.perf_counter()
        intel, problems = ThreatIntel.load([ListSpec(str(path), category="c2", name="big")])
        load_s = time.perf_counter() - t0
        gc.collect()
        rss1 = rss_kib()
    assert not problems, problems[:3]
    hit_ips = [rng.choice(ips) for _ in range(n_lookups)]
    miss_ips = [f"{rng.randrange(224, 240)}.{rng.randrange(256)}.1.1" for _ in range(n_lookups)]
    hit_domains = ["www." + rng.choice(domains) for _ in range(n_lookups)]
    miss_domains = [f"svc{i}.prod.us-east-1.amazonaws.com" for i in range(n_lookups)]
    ip_hit = rate(lambda: [intel.match_ip(x) for x in hit_ips], n_lookups)
    ip_miss = rate(lambda: [intel.match_ip(x) for x in miss_ips], n_lookups)
    dom_hit = rate(lambda: [intel.match_domain(x) for x in hit_domains], n_lookups)
    dom_miss = rate(lambda: [intel.match_domain(x) for x in miss_domains], n_lookups)
    events = dns_events(n_events, rng)
    cost_big = stage_cost(intel, events)
    cost_base = stage_cost(base_intel, events)
    snap = intel.snapshot()
    print(f"# threat intelligence: a {args.entries:,}-entry list ({'quick' if args.quick else 'full'})\n")
    print("| measure | value |")
    print("| --- | --- |")
    print(f"| entries loaded (user list + bundled) | {sum(snap['threatLists'].values()):,} "
          f"({snap['ips']:,} IPs, {snap['cidrs']:,} CIDRs, {snap['domains']:,} domains) |")  # fmt: skip
    print(f"| load time | {load_s:.2f} s |")
    print(f"| RSS growth | {(rss1 - rss0) / 1024:.1f} MiB |")
    print(f"| IP lookups, hits | {ip_hit:,.0f}/s |")
    print(f"| IP lookups, misses (CIDR bisect) | {ip_miss:,.0f}/s |")
    print(f"| domain lookups, hits (www. + listed) | {dom_hit:,.0f}/s |")
    print(f"| domain lookups, misses (5 labels) | {dom_miss:,.0f}/s |")
    print(f"| detector stage per DNS event, list loaded | {cost_big:.1f} µs |")
    print(f"| detector stage per DNS event, bundled lists only | {cost_base:.1f} µs |")


if __name__ == "__main__":
    main()

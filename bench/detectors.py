"""Detector stage benchmark: events per second through the DetectorEngine on one core.

    .venv/bin/python -m bench.detectors [--quick]      (or: python -m bench detectors)

Prints markdown and saves JSON under bench/results/.

The events are a realistic mix built once, before timing: ``process.exec``
and ``process.exit`` of the processes really running on this machine (read
from /proc by the process collector, so command lines, users and lineage
have real shapes; each is assigned to one of four containers), outbound
connections to private and public addresses, DNS queries (common names,
CDN-style subdomains, some with no process), and file events on logs and
configuration. Mostly benign, as in production: a few events match a rule or
an exception.

Configurations, each timed over the same events (``time.process_time``, a
single thread, so it is the cost on one core):

- ``all families``: every detector of ``registry.detector_classes()`` with
  the bundled threat intelligence, no policy;
- ``all families + policy``: the same plus a policy of 50 exceptions and 50
  user rules (rules spread over exec, connect, DNS and file events);
- ``rules only``: no built-in detector, the 50 rules and 50 exceptions, to
  show what the policy itself costs.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any

from bench import main_for
from collectors import procfs
from collectors.events import ContainerRef, ProcessInfo, RuntimeEvent
from collectors.process import ProcessCollector
from detectors import registry
from detectors.base import Detector, DetectorContext
from detectors.build import FindingScope
from detectors.engine import DetectorEngine
from detectors.policy import Policy

CONTAINERS = (
    ContainerRef("app", "a" * 64, "123456789012.dkr.ecr.eu-west-1.amazonaws.com/shop:3.2", source="bench"),
    ContainerRef("worker", "b" * 64, "123456789012.dkr.ecr.eu-west-1.amazonaws.com/shop-worker:3.2", source="bench"),
    ContainerRef("nginx", "c" * 64, "public.ecr.aws/nginx/nginx:1.27", source="bench"),
    ContainerRef("debug-1", "d" * 64, "123456789012.dkr.ecr.eu-west-1.amazonaws.com/netops:2", source="bench"),
)
DOMAINS = (
    "api.stripe.com",
    "sqs.eu-west-1.amazonaws.com",
    "s3.eu-west-1.amazonaws.com",
    "ecr.eu-west-1.amazonaws.com",
    "db.internal.corp.example",
    "cache.internal.corp.example",
    "github.com",
    "pypi.org",
    "files.pythonhosted.org",
    "registry.npmjs.org",
    "www.google.com",
    "fonts.gstatic.com",
)
FILES = (
    ("/var/log/app/access.log", "log", "write"),
    ("/var/log/app/error.log", "log", "write"),
    ("/etc/resolv.conf", "ld_so_conf", "attribute"),
    ("/root/.bash_history", "shell_history", "write"),
    ("/usr/local/bin/app-helper", "binary_dir", "create"),
    ("/etc/passwd", "passwd", "write"),
)
MIX = (("process.exec", 30), ("process.exit", 5), ("net.connect", 30), ("dns.query", 25), ("file.modify", 10))


def capture_processes() -> list[ProcessInfo]:
    """Every process on this machine, read by the process collector, each put in one of the bench's containers."""
    rng = random.Random(1)
    collector = ProcessCollector(
        lambda e: None, hash_executables=False, resolve_container=lambda raw: rng.choice(CONTAINERS)
    )
    out = []
    for pid in procfs.list_pids():
        info = collector.capture(pid)
        if info is not None and info.complete and info.executable_path:
            out.append(info)
    return out


def make_events(procs: list[ProcessInfo], n: int, seed: int = 7) -> list[RuntimeEvent]:
    rng = random.Random(seed)
    kinds = [k for k, w in MIX for _ in range(w)]
    now = time.time()
    events = []
    for i in range(n):
        kind = rng.choice(kinds)
        p: ProcessInfo | None = rng.choice(procs)
        t = now + i * 0.001
        data: dict[str, Any] | None = None
        if kind == "process.exit":
            data = {"exitCode": 0}
        elif kind == "net.connect":
            public = rng.random() < 0.4
            ip = (
                f"203.0.113.{rng.randrange(1, 255)}"
                if public
                else f"10.0.{rng.randrange(0, 8)}.{rng.randrange(1, 255)}"
            )
            data = {
                "protocol": "TCP",
                "addressFamily": "AF_INET",
                "ianaProtocolNumber": 6,
                "direction": "OUTBOUND",
                "localIp": "10.0.1.17",
                "localPort": rng.randrange(32768, 60999),
                "remoteIp": ip,
                "remotePort": rng.choice((443, 443, 443, 80, 5432, 6379, 8080)),
                "state": "ESTABLISHED",
                "inode": rng.randrange(1 << 20),
                "uid": p.uid if p is not None else 0,
                "pid": p.pid if p is not None else None,
            }
        elif kind == "dns.query":
            name = rng.choice(DOMAINS)
            if rng.random() < 0.3:
                name = f"{rng.getrandbits(40):x}.cdn.{name}"
            if rng.random() < 0.2:
                p = None  # not attributed
            data = {
                "queryName": name + ".",
                "queryType": rng.choice(("A", "AAAA")),
                "id": rng.randrange(65536),
                "transport": "udp",
                "direction": "OUTBOUND",
                "resolverIp": "169.254.169.253",
                "resolverPort": 53,
                "containerName": rng.choice(CONTAINERS).name,
            }
        elif kind == "file.modify":
            path, category, op = rng.choice(FILES)
            data = {
                "fileOperation": op,
                "filePath": path,
                "category": category,
                "count": 1,
                "modifyingPid": p.pid if p is not None else None,
            }
        events.append(RuntimeEvent(kind, p, time=t, data=data))
    return events


def make_policy(procs: list[ProcessInfo], n_rules: int = 50, n_exceptions: int = 50) -> Policy:
    """A policy of the size a team accumulates: rules and exceptions of every shape, a few of which match."""
    exes = sorted({p.executable_path for p in procs if p.executable_path})
    lists = {
        "fetchers": ["curl", "wget", "fetch", "aria2c"],
        "pkg": ["apt", "apt-get", "dpkg", "pip", "pip3", "npm", "yum", "apk"],
        "build_images": ["*/builder:*", "*/ci-runner:*"],
        "office": ["192.0.2.0/24", "198.51.100.0/24"],
    }
    templates: list[tuple[list[str], dict[str, Any]]] = [
        (
            ["process.exec"],
            {
                "all": [
                    {"field": "process.name", "in": "@fetchers"},
                    {"field": "process.command_line", "regex": r"https?://[^ ]*\.(?:sh|py)\b"},
                ]
            },
        ),
        (
            ["process.exec"],
            {
                "all": [
                    {"field": "process.name", "in": "@pkg"},
                    {"not": {"field": "container.image", "glob": "@build_images"}},
                ]
            },
        ),
        (
            ["process.exec"],
            {"all": [{"field": "parent.name", "in": ["nginx", "httpd"]}, {"field": "process.name", "glob": "*sh"}]},
        ),
        (["process.exec"], {"field": "process.command_line", "contains": "base64 -d"}),
        (["process.exec"], {"all": [{"field": "process.uid", "equals": 0}, {"field": "process.name", "equals": "nc"}]}),
        (["net.connect"], {"all": [{"field": "remote.port", "in": [4444, 1337, 31337]}]}),
        (
            ["net.connect"],
            {"all": [{"field": "remote.ip", "cidr": "@office"}, {"not": {"field": "container.name", "equals": "app"}}]},
        ),
        (["dns.query"], {"field": "dns.domain", "domain": ["pastebin.com", "ngrok.io", "*.trycloudflare.com"]}),
        (["dns.query"], {"all": [{"field": "dns.domain", "endswith": ".onion"}]}),
        (
            ["file.modify"],
            {"all": [{"field": "file.path", "glob": "/etc/*"}, {"field": "process.name", "in": "@pkg"}]},
        ),
    ]
    # one rule that fires often (a team watching TLS to the internet), silenced for one container by an exception
    rules: list[dict[str, Any]] = [
        {
            "id": "tls-out",
            "description": "{exe} in {container} talks TLS to {remoteIp}",
            "type": "Custom:Runtime/BenchTls",
            "severity": 2,
            "events": ["net.connect"],
            "condition": {
                "all": [{"field": "remote.port", "equals": 443}, {"not": {"field": "remote.ip", "cidr": "10.0.0.0/8"}}]
            },
        }
    ]
    for i in range(n_rules - 1):
        events, cond = templates[i % len(templates)]
        rules.append(
            {
                "id": f"rule-{i}",
                "description": f"bench rule {i}: {{process}} in {{container}}",
                "type": f"Custom:Runtime/Bench{i % 7}",
                "severity": 2 + (i % 7) * 0.5,
                "events": events,
                "condition": cond,
            }
        )
    shapes: list[dict[str, Any]] = [
        {"type": "Execution:Runtime/SuspiciousTool", "container": "debug-*", "executable": ["/usr/bin/nmap"]},
        {"type": "Execution:Runtime/NewBinaryExecuted", "image": "*/shop-worker:*", "executable": "/usr/local/bin/*"},
        {"remote_ip": ["10.0.0.0/8", "@office"], "remote_port": [443, 5432]},
        {"domain": "*.internal.corp.example"},
        {"process_name": "@pkg", "image": "@build_images"},
        {"command_line": {"regex": r"^/usr/bin/python3 -m gunicorn\b"}, "container": "app"},
        {"parent_name": "supervisord", "process_name": ["nginx"]},
        {"type": "*:Runtime/SensitiveFileModified", "file_path": "/var/log/app/*"},
    ]
    exceptions: list[dict[str, Any]] = [
        {"type": "Custom:Runtime/BenchTls", "container": "nginx", "reason": "nginx proxies to the internet"}
    ]
    for i in range(n_exceptions - 1):
        shape = dict(shapes[i % len(shapes)])
        if i >= len(shapes) and exes:
            shape["executable"] = exes[i % len(exes)]  # narrower copies, as teams add one per workload
        exceptions.append({**shape, "reason": f"bench exception {i}"})
    return Policy.parse({"lists": lists, "rules": rules, "exceptions": exceptions}, source="bench-policy")


def _intel() -> Any:
    try:
        from detectors.intel import ThreatIntel

        intel, _ = ThreatIntel.load([], [], bundled=True)
        return intel
    except Exception:  # the bench still measures the rest
        return None


def measure(
    label: str,
    events: list[RuntimeEvent],
    *,
    classes: list[type[Detector]],
    policy: Policy | None,
    intel: Any,
    table_procs: list[ProcessInfo],
    passes: int,
) -> dict[str, Any]:
    collector = ProcessCollector(lambda e: None, hash_executables=False)
    for p in table_procs:
        collector.table.add(p)
    ctx = DetectorContext(table=collector.table, intel=intel, self_pids=frozenset())
    findings: list[dict[str, Any]] = []
    engine = DetectorEngine(
        ctx,
        FindingScope(),
        findings.append,
        detectors=classes,
        extra=policy.rule_detectors(ctx) if policy is not None else (),
        suppressor=policy,
        custom_types=policy.custom_types() if policy is not None else None,
    )
    for ev in events[:2000]:  # warm up caches (the policy's per-type exception lists, regex caches)
        engine.on_event(ev)
    best = float("inf")
    for _ in range(passes):
        t0 = time.process_time()
        for ev in events:
            engine.on_event(ev)
        best = min(best, time.process_time() - t0)
    engine.flush(force=True)
    snap = engine.snapshot()
    return {
        "config": label,
        "detectors": len(engine.detectors),
        "events": len(events),
        "seconds": round(best, 4),
        "eventsPerSecond": round(len(events) / best) if best > 0 else None,
        "usPerEvent": round(best / len(events) * 1e6, 2),
        "findings": len(findings),
        "suppressed": sum(snap.get("suppressed", {}).values()),
        "errors": snap.get("errors", {}),
    }


def run(quick: bool = False) -> dict[str, Any]:
    procs = capture_processes()
    n = 20_000 if quick else 100_000
    events = make_events(procs, n)
    policy = make_policy(procs)
    intel = _intel()
    classes = registry.detector_classes()
    passes = 2 if quick else 3
    mix = Counter(e.kind for e in events)
    results = [
        measure("all families", events, classes=classes, policy=None, intel=intel, table_procs=procs, passes=passes),
        measure(
            "all families + policy (50 exceptions, 50 rules)",
            events,
            classes=classes,
            policy=policy,
            intel=intel,
            table_procs=procs,
            passes=passes,
        ),
        measure(
            "rules only (50 exceptions, 50 rules)",
            events,
            classes=[],
            policy=policy,
            intel=intel,
            table_procs=procs,
            passes=passes,
        ),
    ]
    return {
        "processes": len(procs),
        "mix": dict(mix),
        "intel": intel is not None,
        "families": list(registry.FAMILIES),
        "results": results,
    }


def report(res: dict[str, Any]) -> str:
    mix = ", ".join(f"{k} {v}" for k, v in sorted(res["mix"].items()))
    lines = [
        f"Events: {mix}; processes from /proc: {res['processes']}; "
        f"bundled threat intelligence: {'loaded' if res['intel'] else 'not loaded'}.",
        "",
        "| configuration | detectors | events | CPU s | events/s (one core) | µs/event | findings | suppressed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["results"]:
        lines.append(
            f"| {r['config']} | {r['detectors']} | {r['events']} | {r['seconds']} | {r['eventsPerSecond']:,} "
            f"| {r['usPerEvent']} | {r['findings']} | {r['suppressed']} |"
        )
    errors = {r["config"]: r["errors"] for r in res["results"] if r["errors"]}
    if errors:
        lines += ["", f"Detector errors (bugs to fix): {errors}"]
    return "\n".join(lines)


def main() -> None:
    main_for("detectors", "detector stage", run, report)


if __name__ == "__main__":
    main()

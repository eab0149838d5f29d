"""The policy document: parsing in three formats, its canonical form and digest, every validation error with its
exact location, and exceptions applied to detections of real processes (captured from /proc by the process
collector, in a process table, so that parent lookups are real)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from collectors.events import ContainerRef, ProcessInfo, RuntimeEvent
from collectors.process import ProcessCollector
from detectors import catalog
from detectors.base import Detection, DetectorContext, ListSpec, dns_action, network_action
from detectors.build import FindingScope
from detectors.engine import DetectorEngine
from detectors.policy import Policy, PolicyError
from detectors.reverse_shell import ReverseShellDetector

TOOL = "Execution:Runtime/SuspiciousTool"
REVSHELL = "Execution:Runtime/ReverseShell"

EXAMPLE = """\
threat_lists:   [{path: /etc/lists/c2.txt, format: plain, category: c2, name: my-c2}]
trusted_lists:  [{path: /etc/lists/trusted.txt}]
lists:          {package_managers: [apt, apt-get, dpkg, pip], build_images: ["*/builder:*"], tools: [/usr/bin/sleep]}
exceptions:
  - type: Execution:Runtime/SuspiciousTool
    image: "123456789012.dkr.ecr.*.amazonaws.com/netops:*"
    container: "debug-*"
    executable: [/usr/bin/nmap, "@tools"]
    reason: "netops image runs nmap on purpose"
rules:
  - id: curl-pastebin
    description: "{process} fetched a paste: {commandLine}"
    type: Custom:Runtime/PastebinFetch
    severity: 5
    mitre: [T1105]
    events: [process.exec]
    condition:
      all:
        - {field: process.name, in: [curl, wget]}
        - {field: process.command_line, contains: pastebin.com}
        - not: {field: container.image, glob: "@build_images"}
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def problems(doc: dict[str, Any] | str, tmp_path: Path) -> list[str]:
    """Every problem the loader reports for a YAML document (given as a dict or as text)."""
    text = doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False)
    path = write(tmp_path, "policy.yaml", text)
    with pytest.raises(PolicyError) as exc:
        Policy.load(path)
    assert str(exc.value) == "\n".join(exc.value.problems)
    prefix = f"{path}: "
    assert all(p.startswith(prefix) for p in exc.value.problems), exc.value.problems
    return [p[len(prefix) :] for p in exc.value.problems]


def rule(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "r",
        "description": "d",
        "type": "Custom:Runtime/Thing",
        "severity": 5,
        "events": ["process.exec"],
        "condition": {"field": "process.name", "equals": "x"},
    }
    base.update(over)
    return base


# -- parsing and the canonical form ---------------------------------------------------------------------------


def test_example_parses_in_every_format_with_one_digest(tmp_path: Path) -> None:
    pol = Policy.load(write(tmp_path, "p.yaml", EXAMPLE))
    assert pol.threat_lists == [ListSpec(path="/etc/lists/c2.txt", format="plain", category="c2", name="my-c2")]
    assert pol.trusted_lists == [ListSpec(path="/etc/lists/trusted.txt")]
    ft = pol.custom_types()["Custom:Runtime/PastebinFetch"]
    assert (ft.severity, ft.mitre, catalog.severity_label(ft.severity)) == (5.0, ("T1105",), "Medium")
    assert len(pol.digest) == 64 and pol.digest == __import__("hashlib").sha256(pol.canonical_json()).hexdigest()
    data = yaml.safe_load(EXAMPLE)
    as_json = Policy.load(write(tmp_path, "p.json", json.dumps(data, indent=3)))
    assert as_json.digest == pol.digest
    toml = (
        'threat_lists = [{path = "/etc/lists/c2.txt", format = "plain", category = "c2", name = "my-c2"}]\n'
        'trusted_lists = [{path = "/etc/lists/trusted.txt", format = "auto"}]\n'
        "[lists]\n"
        'build_images = ["*/builder:*"]\npackage_managers = ["apt", "apt-get", "dpkg", "pip"]\n'
        'tools = ["/usr/bin/sleep"]\n'
        "[[exceptions]]\n"
        'type = "Execution:Runtime/SuspiciousTool"\n'
        'image = "123456789012.dkr.ecr.*.amazonaws.com/netops:*"\ncontainer = "debug-*"\n'
        'executable = ["/usr/bin/nmap", "@tools"]\nreason = "netops image runs nmap on purpose"\n'
        "[[rules]]\n"
        'id = "curl-pastebin"\ndescription = "{process} fetched a paste: {commandLine}"\n'
        'type = "Custom:Runtime/PastebinFetch"\nseverity = 5.0\nmitre = ["T1105"]\nevents = ["process.exec"]\n'
        "[rules.condition]\n"
        'all = [{field = "process.name", in = ["curl", "wget"]}, '
        '{field = "process.command_line", contains = "pastebin.com"}, '
        '{not = {field = "container.image", glob = "@build_images"}}]\n'
    )
    assert Policy.load(write(tmp_path, "p.toml", toml)).digest == pol.digest
    # the served form loads back to the same policy; any change is a new digest
    assert Policy.parse(pol.to_json()).digest == pol.digest
    data["rules"][0]["severity"] = 6
    assert Policy.parse(data).digest != pol.digest


def test_empty_policies(tmp_path: Path) -> None:
    for pol in (Policy.empty(), Policy.load(write(tmp_path, "e.yaml", "# nothing yet\n"))):
        assert pol.threat_lists == [] and pol.trusted_lists == [] and pol.custom_types() == {}
        assert pol.rule_detectors(DetectorContext(table=ProcessCollector(lambda e: None).table)) == []
        assert pol.suppressed(Detection(TOOL, None), catalog.get(TOOL)) is None
    assert Policy.empty().digest == Policy.parse({}).digest


# -- validation: one test per kind of mistake, exact messages -------------------------------------------------

KNOWN_FIELDS = (
    "event.kind, process.name, process.executable, process.command_line, process.uid, process.euid, process.user, "
    "parent.name, parent.executable, parent.command_line, ancestor.name, container.name, container.image, "
    "remote.ip, remote.port, local.port, dns.domain, file.path, file.operation, file.category"
)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            {
                "rules": [
                    rule(),
                    rule(id="b"),
                    rule(
                        id="c",
                        condition={
                            "all": [{"field": "process.name", "equals": "x"}, {"field": "proc.nam", "equals": "x"}]
                        },
                    ),
                ]
            },
            [
                "rules[2].condition.all[1]: unknown field 'proc.nam' "
                f"(did you mean 'process.name'? known: {KNOWN_FIELDS})"
            ],
        ),
        (
            {"rulez": []},
            ["(document): unknown key 'rulez' (known: version, threat_lists, trusted_lists, lists, exceptions, rules)"],
        ),
        (
            {"rules": [rule(descripton="typo")]},
            [
                "rules[0]: unknown key 'descripton' (known: id, description, type, severity, level, mitre, tactic, "
                "events, condition, enabled)"
            ],
        ),
        (
            {"rules": [rule(condition={"field": "process.command_line", "regex": "(abc"})]},
            ["rules[0].condition: bad regex '(abc': missing ), unterminated subpattern at position 0"],
        ),
        (
            {"rules": [rule(condition={"field": "process.command_line", "regex": "x(\\w+\\s?)*$"})]},
            [
                "rules[0].condition: regex 'x(\\\\w+\\\\s?)*$' nests a quantifier inside a repeated group, which can "
                "backtrack catastrophically on long command lines; rewrite it without the outer repetition"
            ],
        ),
        (
            {"rules": [rule(severity=None)]},
            ["rules[0].severity: missing severity for the custom type 'Custom:Runtime/Thing'"],
        ),
        (
            {"rules": [rule(type="Execution:Runtime/SuspicousTool", severity=None)]},
            [
                "rules[0].severity: missing severity for the custom type 'Execution:Runtime/SuspicousTool' "
                "(did you mean 'Execution:Runtime/SuspiciousTool'?)"
            ],
        ),
        (
            {"rules": [rule(severity=9.5)]},
            [
                "rules[0].severity: severity 9.5 is outside GuardDuty's bands "
                "(Low 1.0-3.9, Medium 4.0-6.9, High 7.0-8.9)"
            ],
        ),
        (
            {"rules": [rule(severity=0.5)]},
            [
                "rules[0].severity: severity 0.5 is outside GuardDuty's bands "
                "(Low 1.0-3.9, Medium 4.0-6.9, High 7.0-8.9)"
            ],
        ),
        (
            {"rules": [rule(type="Execution:Runtime/SuspiciousCommand", severity=6)]},
            [
                "rules[0].severity: a rule cannot change the severity of the catalog type Execution:Runtime/"
                "SuspiciousCommand (5.0): pick a level (high=8.0, medium=5.0, low=2.0) or emit a custom type"
            ],
        ),
        (
            {"rules": [rule(type=REVSHELL, severity=5)]},
            [
                "rules[0].severity: a rule cannot change the severity of the catalog type Execution:Runtime/"
                "ReverseShell (8.0): or emit a custom type"
            ],
        ),
        (
            {"rules": [rule(type=TOOL, severity=None, level="evil")]},
            [
                "rules[0].level: Execution:Runtime/SuspiciousTool has no severity level 'evil' "
                "(levels: offensive=8.0, dual_use=2.0)"
            ],
        ),
        (
            {"rules": [rule(type=TOOL, severity=8, level="dual_use")]},
            ["rules[0].severity: severity 8.0 contradicts level 'dual_use' (2.0)"],
        ),
        (
            {"rules": [rule(level="high")]},
            ["rules[0].level: levels exist only for catalog types; Custom:Runtime/Thing is a custom type"],
        ),
        (
            {"lists": {"pm": ["apt"]}, "rules": [rule(condition={"field": "process.name", "in": "@pms"})]},
            ["rules[0].condition: unknown named list '@pms' (lists: pm)"],
        ),
        (
            {"exceptions": [{"executable": "@nope", "reason": "x"}]},
            ["exceptions[0].executable: unknown named list '@nope' (lists: none defined)"],
        ),
        ({"rules": [rule(), rule(id="b"), rule()]}, ["rules[2].id: duplicate rule id 'r' (also rules[0])"]),
        (
            {"rules": [rule(events=["process.exec", "proc.execc"])]},
            [
                "rules[0].events[1]: unknown event kind 'proc.execc' (did you mean 'process.exec'? known: "
                "dns.query, dns.response, file.modify, kernel.module, mount.add, mount.remove, net.accept, "
                "net.close, net.connect, net.listen, net.syn, net.udp, net.unix_connect, proc.fileless, "
                "proc.library, proc.mem_write, proc.ptrace, proc.uid_change, proc.userfaultfd, process.exec, "
                "process.exit, process.stdio_socket)"
            ],
        ),
        (
            {
                "rules": [
                    rule(
                        condition={
                            "any": [
                                {"field": "process.name", "equals": "x"},
                                {"field": "dns.domain", "domain": "x.com"},
                            ]
                        }
                    )
                ]
            },
            [
                "rules[0].condition.any[1]: field 'dns.domain' is never set on events process.exec "
                "(it is on: dns.query, dns.response)"
            ],
        ),
        (
            {"rules": [rule(condition={"field": "process.name", "equals": "x", "contains": "y"})]},
            [
                "rules[0].condition: a leaf needs exactly one operator (equals, in, contains, startswith, "
                "endswith, glob, regex, cidr, domain, gt, lt); got: equals, contains"
            ],
        ),
        (
            {"rules": [rule(condition={"field": "process.name", "like": "x"})]},
            [
                "rules[0].condition: unknown operator 'like' (known: equals, in, contains, startswith, endswith, glob, "
                "regex, cidr, domain, gt, lt)"
            ],
        ),
        (
            {"rules": [rule(condition={"all": [{"not": {"field": "process.name", "gt": 3}}]})]},
            ["rules[0].condition.all[0].not: gt needs a numeric field, 'process.name' is not one"],
        ),
        (
            {"rules": [rule(condition={"field": "process.uid", "contains": "0"})]},
            ["rules[0].condition: contains needs a text field, 'process.uid' is numeric (use equals/in/gt/lt)"],
        ),
        (
            {"rules": [rule(condition={"field": "process.name", "in": "curl"})]},
            ["rules[0].condition: in: expected a list or a named list ('@name')"],
        ),
        ({"rules": [rule(condition={"all": []})]}, ["rules[0].condition.all: expected a non-empty list of conditions"]),
        (
            {"rules": [rule(condition={"every": []})]},
            ["rules[0].condition: expected exactly one of all/any/not, or a leaf with 'field' (got keys: every)"],
        ),
        (
            {"rules": [rule(events=["net.connect"], condition={"field": "remote.ip", "cidr": "10.0.0.300/8"})]},
            [
                "rules[0].condition: bad CIDR '10.0.0.300/8': '10.0.0.300/8' does not appear to be an IPv4 or IPv6 "
                "network"
            ],
        ),
        (
            {"rules": [rule(description="{proces} ran")]},
            [
                "rules[0].description: unknown template field {proces} (known: {process}, {exe}, {container}, "
                "{commandLine}, {user}, {remoteIp}, {remotePort}, {domain}, {filePath})"
            ],
        ),
        (
            {"rules": [rule(type="NotAType")]},
            [
                "rules[0].type: 'NotAType' is neither a catalog type nor a custom type of the form "
                "'Family:Runtime/Name' (see `runtime-sidecar finding-types`)"
            ],
        ),
        (
            {"rules": [rule(), rule(id="b", severity=7)]},
            ["rules[1].severity: Custom:Runtime/Thing has severity 5.0 in rules[0]: one type, one severity"],
        ),
        (
            {"rules": [rule(mitre=["T1105", "1059"])]},
            ["rules[0].mitre[1]: not a MITRE ATT&CK technique id (T1234 or T1234.001): '1059'"],
        ),
        (
            {"rules": [rule(id="has space")]},
            ["rules[0].id: String should match pattern '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$' (got 'has space')"],
        ),
        ({"rules": [{k: v for k, v in rule().items() if k != "events"}]}, ["rules[0]: missing required key 'events'"]),
        ({"exceptions": [{"type": TOOL}]}, ["exceptions[0]: missing required key 'reason'"]),
        (
            {"exceptions": [{"type": "Execution:Runtime/ReverseShel", "reason": "r"}]},
            [
                "exceptions[0].type: unknown finding type 'Execution:Runtime/ReverseShel' (did you mean "
                "'Execution:Runtime/ReverseShell'? see `runtime-sidecar finding-types`)"
            ],
        ),
        (
            {"exceptions": [{"type": [TOOL, "*:Runtime/Nothing*"], "reason": "r"}]},
            ["exceptions[0].type[1]: the pattern '*:Runtime/Nothing*' matches no finding type"],
        ),
        (
            {"exceptions": [{"reason": "everything"}]},
            ["exceptions[0]: matches every detection of every type: give a type or a field to match"],
        ),
        (
            {"exceptions": [{"remote_ip": ["10.0.0.0/8", "bad"], "reason": "r"}]},
            ["exceptions[0].remote_ip: bad CIDR 'bad': 'bad' does not appear to be an IPv4 or IPv6 network"],
        ),
        (
            {"exceptions": [{"command_line": {"regex": "(a|b", "glob": "x"}, "reason": "r"}]},
            ["exceptions[0].command_line: expected one {operator: value}, got {'regex': '(a|b', 'glob': 'x'}"],
        ),
        (
            {"exceptions": [{"command_line": {"regex": "(a|b"}, "reason": "r"}]},
            ["exceptions[0].command_line: bad regex '(a|b': missing ), unterminated subpattern at position 0"],
        ),
        (
            {"exceptions": [{"container": "x", "colour": "red", "reason": "r"}]},
            [
                "exceptions[0]: unknown key 'colour' (known: type, image, container, executable, process_name, "
                "command_line, user, parent_name, parent_executable, ancestor_name, remote_ip, remote_port, domain, "
                "file_path, reason)"
            ],
        ),
        (
            {"threat_lists": [{"path": "/x", "format": "csv"}]},
            ["threat_lists[0].format: Input should be 'auto', 'plain', 'stix' or 'otx' (got 'csv')"],
        ),
        ({"lists": {"pm": ["apt", {"x": 1}]}}, ["lists.pm[1]: expected a string or a number, got {'x': 1}"]),
    ],
)
def test_validation_errors(doc: dict[str, Any], expected: list[str], tmp_path: Path) -> None:
    assert problems(doc, tmp_path) == expected


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    doc = {
        "lists": {"pm": ["apt"]},
        "exceptions": [{"type": TOOL, "container": "a", "reason": "ok"}, {"reason": "x"}],
        "rules": [
            rule(severity=None),
            rule(id="b", condition={"all": [{"field": "nope", "equals": 1}, {"field": "process.name", "in": "@x"}]}),
            rule(id="c", descripton="d"),
        ],
    }
    got = problems(doc, tmp_path)
    assert [p.split(":", 1)[0] for p in got] == [
        "rules[0].severity",
        "rules[1].condition.all[0]",
        "rules[1].condition.all[1]",
        "rules[2]",
        "exceptions[1]",
    ]


def test_file_level_errors(tmp_path: Path) -> None:
    assert problems("rules:\n  - id: a\n    id: b\n", tmp_path) == [
        "line 3, column 5: invalid YAML: duplicate key 'id' (line 3)"
    ]
    assert problems("rules: [\n  {id: a\n", tmp_path)[0].startswith("line 3, column 1: invalid YAML: ")
    assert problems("- a list\n", tmp_path) == ["expected a mapping at the top, got list"]
    bad_json = write(tmp_path, "p.json", '{"rules": [}')
    with pytest.raises(PolicyError, match=r"p\.json: line 1, column 12: invalid JSON: Expecting value"):
        Policy.load(bad_json)
    with pytest.raises(PolicyError, match=r"p\.toml: invalid TOML: .*line 2"):
        Policy.load(write(tmp_path, "p.toml", "version = 1\nrules = = 2\n"))
    with pytest.raises(PolicyError, match=r"p\.ini: unknown policy format '\.ini' \(use \.yaml, \.json or \.toml\)"):
        Policy.load(write(tmp_path, "p.ini", ""))
    with pytest.raises(PolicyError, match=r"missing\.yaml: cannot read: No such file or directory"):
        Policy.load(str(tmp_path / "missing.yaml"))


# -- exceptions on detections of real processes ---------------------------------------------------------------


class Captured:
    """Real processes read from /proc by the process collector, with the container a resolver assigns."""

    def __init__(self) -> None:
        self.container: ContainerRef | None = None
        self.collector = ProcessCollector(
            lambda e: None, hash_executables=False, resolve_container=lambda r: self.container
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ctx = DetectorContext(table=self.collector.table, self_pids=frozenset())

    def start(self, argv: list[str], container: ContainerRef | None, want: str | None = None) -> ProcessInfo:
        """Start argv and capture its newest descendant once it runs the image named `want` (default argv[0])."""
        self.container = container
        want = want or Path(argv[0]).name
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

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


@pytest.fixture
def captured() -> Iterator[Captured]:
    c = Captured()
    yield c
    c.close()


NETOPS = ContainerRef("debug-7", "c0ffee", "123456789012.dkr.ecr.eu-west-1.amazonaws.com/netops:2.1", source="test")
APP = ContainerRef("app", "beef", "123456789012.dkr.ecr.eu-west-1.amazonaws.com/netops:2.1", source="test")


def test_exception_by_type_image_container_and_executable(captured: Captured, tmp_path: Path) -> None:
    pol = Policy.load(write(tmp_path, "p.yaml", EXAMPLE))
    pol.bind(captured.ctx)
    in_debug = captured.start(["sleep", "30"], NETOPS)
    in_app = captured.start(["sleep", "31"], APP)
    assert in_debug.executable_path == "/usr/bin/sleep" and in_debug.container == NETOPS
    ft = catalog.get(TOOL)
    assert pol.suppressed(Detection(TOOL, in_debug), ft) == "netops image runs nmap on purpose"
    # another container name, another type, another image: the exception does not apply
    assert pol.suppressed(Detection(TOOL, in_app), ft) is None
    assert pol.suppressed(Detection(REVSHELL, in_debug), catalog.get(REVSHELL)) is None
    other = ContainerRef("debug-7", "c0ffee", "docker.io/library/netops:2.1", source="test")
    assert pol.suppressed(Detection(TOOL, None, container=other), ft) is None
    assert pol.snapshot()["exceptionHits"] == {"netops image runs nmap on purpose": 1}


def test_exception_on_parent_command_line_and_ancestors(captured: Captured, tmp_path: Path) -> None:
    pol = Policy.parse(
        {
            "exceptions": [
                {
                    "type": "*:Runtime/SuspiciousCommand",
                    "parent_name": "sh",
                    "command_line": {"regex": r"^sleep 4\d$"},
                    "reason": "the healthcheck sleeps",
                },
                {"ancestor_name": "health*", "process_name": ["sleep"], "user": "root", "reason": "under healthwrap"},
            ]
        }
    )
    child = captured.start(["sh", "-c", "sleep 42; true"], None, want="sleep")
    assert child.user == "root" and captured.ctx.parent(child) is not None
    ft = catalog.get("Discovery:Runtime/SuspiciousCommand")
    # not bound to a process table yet: parent fields cannot match, the detection stays
    assert pol.suppressed(Detection(ft.name, child), ft) is None
    pol.bind(captured.ctx)
    assert pol.suppressed(Detection(ft.name, child), ft) == "the healthcheck sleeps"
    assert pol.suppressed(Detection(REVSHELL, child), catalog.get(REVSHELL)) is None  # type does not match
    # two levels down from a wrapper named healthwrap (a copy of sh): the ancestor exception applies to any type
    wrapper = tmp_path / "healthwrap"
    wrapper.write_bytes(Path("/bin/sh").read_bytes())
    wrapper.chmod(0o755)
    grandchild = captured.start([str(wrapper), "-c", "sh -c 'sleep 52; true'; true"], None, want="sleep")
    assert [a.name for a in captured.ctx.lineage(grandchild)][:2] == ["sh", "healthwrap"]
    assert pol.suppressed(Detection(ft.name, grandchild), ft) == "under healthwrap"
    assert pol.suppressed(Detection(REVSHELL, grandchild), catalog.get(REVSHELL)) == "under healthwrap"
    assert pol.suppressed(Detection(REVSHELL, child), catalog.get(REVSHELL)) is None


def test_exception_on_network_and_dns_detections(captured: Captured) -> None:
    pol = Policy.parse(
        {
            "lists": {"office": ["192.0.2.0/24", "2001:db8::/32"]},
            "exceptions": [
                {"remote_ip": ["10.0.0.0/8", "@office"], "remote_port": [443, 8443], "reason": "internal tls"},
                {"domain": "*.corp.example", "reason": "corp names"},
                {"remote_ip": "203.0.113.0/24", "remote_port": 8080, "reason": "the partner's proxy"},
                {"domain": "updates.example.org", "process_name": "sleep", "reason": "updater"},
            ],
        }
    )
    proc = captured.start(["sleep", "33"], APP)
    c2 = catalog.get("Backdoor:Runtime/C&CActivity.B")
    conn = {"direction": "OUTBOUND", "protocol": "TCP", "localIp": "10.1.1.1", "localPort": 40000, "remotePort": 443}

    def net(ip: str, port: int = 443) -> Detection:
        return Detection(c2.name, proc, action=network_action({**conn, "remoteIp": ip, "remotePort": port}))

    assert pol.suppressed(net("10.2.3.4"), c2) == "internal tls"
    assert pol.suppressed(net("192.0.2.77"), c2) == "internal tls"
    assert pol.suppressed(net("::ffff:10.9.9.9"), c2) == "internal tls"  # v4-mapped
    assert pol.suppressed(net("2001:db8::5"), c2) == "internal tls"
    assert pol.suppressed(net("10.2.3.4", 22), c2) is None
    assert pol.suppressed(net("203.0.113.9"), c2) is None
    assert pol.suppressed(net("203.0.113.9", 8080), c2) == "the partner's proxy"
    assert pol.suppressed(net("203.0.114.9", 8080), c2) is None
    dns = catalog.get("Backdoor:Runtime/C&CActivity.B!DNS")

    def query(name: str, p: ProcessInfo | None = proc) -> Detection:
        return Detection(dns.name, p, action=dns_action(name, {}), container=APP)

    assert pol.suppressed(query("git.corp.example."), dns) == "corp names"
    assert pol.suppressed(query("corp.example"), dns) is None  # "*." covers the subdomains only
    assert pol.suppressed(query("evilcorp.example"), dns) is None
    assert pol.suppressed(query("UPDATES.example.org"), dns) == "updater"
    assert pol.suppressed(query("cdn.updates.example.org"), dns) == "updater"  # a plain name covers its subdomains
    assert pol.suppressed(query("cdn.updates.example.org", None), dns) is None  # no process: no process_name


def test_engine_counts_a_suppressed_reverse_shell(captured: Captured) -> None:
    """The real reverse shell detector on a real shell's ProcessInfo: the exception drops it, per container."""
    pol = Policy.parse({"exceptions": [{"type": REVSHELL, "container": "debug-*", "reason": "debug shells"}]})
    found: list[dict[str, Any]] = []
    engine = DetectorEngine(
        captured.ctx,
        FindingScope(),
        found.append,
        detectors=[ReverseShellDetector],
        extra=pol.rule_detectors(captured.ctx),
        suppressor=pol,
        custom_types=pol.custom_types(),
        update_interval=0,
    )
    fds = [{"fd": 0, "network": True, "remoteIp": "127.0.0.9", "remotePort": 4444, "addressFamily": "AF_INET"}]
    for container in (NETOPS, APP):
        shell = captured.start(["sh", "-c", "sleep 34; true"], container, want="sleep")
        shell_image = captured.collector.table.get(shell.ppid)
        assert shell_image is not None and shell_image.name == "sh"
        engine.on_event(RuntimeEvent("process.stdio_socket", shell_image, data={"fds": fds, "socketFds": [0]}))
    engine.flush(force=True)
    assert [(f["type"], f["resource"]["ecsClusterDetails"]["taskDetails"]["containers"][0]["name"]) for f in found] == [
        (REVSHELL, "app")
    ]
    assert engine.snapshot()["suppressed"] == {"debug shells": 1}


@pytest.mark.parametrize(
    ("pattern", "rejected"),
    [
        ("(a+)+", True),
        ("(.*)*", True),
        (r"x(\w+\s?)*$", True),
        ("(?:a*b?)+", True),
        ("(a|b+)*", True),
        (r"(\d+){2,}", True),
        ("((ab)*)+", True),
        (r"(\w+\.)+com", False),  # each iteration ends with a dot
        (r"(\d{1,3}\.){3}\d{1,3}", False),
        ("(https?://)?x", False),
        ("(a|b)*", False),
        (r"[(]a+[)]+", False),
        (r"\(a+\)+", False),
        (r"(-[a-z]+ )*", False),
    ],
)
def test_catastrophic_regex_heuristic(pattern: str, rejected: bool) -> None:
    doc = {"rules": [rule(condition={"field": "process.command_line", "regex": pattern})]}
    if rejected:
        with pytest.raises(PolicyError, match="backtrack catastrophically"):
            Policy.parse(doc)
    else:
        assert Policy.parse(doc).ruleset.rules[0].id == "r"

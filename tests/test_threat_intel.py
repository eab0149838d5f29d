"""Threat-intelligence findings: the real sidecar in the emulated task with user lists from the policy file,
a local DNS responder on 127.0.0.78:53 that the containers' processes query directly, real TCP connections to
listeners on 127.x addresses, and real executables; benign look-alikes staged the same way must stay quiet.

The fast tests at the end feed hand-built events (the pattern logic: CNAME and address answers, deduplication
of one connection seen by two sources, mining-pool connections after a resolution) through a DetectorEngine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dns_responder import DnsResponder
from findings import dns_domain, remote_ip
from taskenv import TaskEnv

from collectors.events import ContainerRef, ProcessInfo, RuntimeEvent
from collectors.process_table import ProcessTable
from detectors import threat_intel
from detectors.base import DetectorContext, ListSpec
from detectors.build import FindingScope
from detectors.engine import DetectorEngine
from detectors.finding import Finding
from detectors.intel import ThreatIntel

PY = "/usr/bin/python3"
RESOLVER = "127.0.0.78"
C2_IP, STIX_IP, OTHER_IP = "127.0.0.61", "127.0.0.62", "127.0.0.63"
# user lists of the other address categories, and a mining pool's name answered with a local address
TOR_IP, BLACKHOLE_IP, DROP_IP, POOL_IP = "127.0.0.64", "127.0.0.66", "127.0.0.67", "127.0.0.65"
POOL_RESOLVED = "pool.supportxmr.com"
NET_TYPES = {
    TOR_IP: ("UnauthorizedAccess:Runtime/TorClient", 8.0, "OurTor"),
    BLACKHOLE_IP: ("Trojan:Runtime/BlackholeTraffic", 5.0, "OurSinkholes"),
    DROP_IP: ("Trojan:Runtime/DropPoint", 5.0, "OurDropPoints"),
}

TESTER = {
    "guarddutyc2activityb.com": ("Backdoor:Runtime/C&CActivity.B!DNS", 8.0),
    "c2.guarddutyc2activityb.com": ("Backdoor:Runtime/C&CActivity.B!DNS", 8.0),
    "crypto.guarddutyc2activityb.com": ("CryptoCurrency:Runtime/BitcoinTool.B!DNS", 8.0),
    "abused-rep.guarddutyc2activityb.com": ("Impact:Runtime/AbusedDomainRequest.Reputation", 5.0),
    "crypto-rep.guarddutyc2activityb.com": ("Impact:Runtime/BitcoinDomainRequest.Reputation", 8.0),
    "malicious-rep.guarddutyc2activityb.com": ("Impact:Runtime/MaliciousDomainRequest.Reputation", 8.0),
    "suspicious-rep.guarddutyc2activityb.com": ("Impact:Runtime/SuspiciousDomainRequest.Reputation", 2.0),
    "guarddutyblackholeactivity.com": ("Trojan:Runtime/BlackholeTraffic!DNS", 5.0),
    "guarddutydgaactivity.com": ("Trojan:Runtime/DGADomainRequest.C!DNS", 8.0),
    "guarddutydrivebyactivity.com": ("Trojan:Runtime/DriveBySourceTraffic!DNS", 8.0),
    "guarddutydroppointactivity.com": ("Trojan:Runtime/DropPoint!DNS", 5.0),
    "guarddutyphishingactivity.com": ("Trojan:Runtime/PhishingDomainRequest!DNS", 8.0),
}
POOL_NAME = "xmr-eu1.nanopool.org"
REBIND_NAME = "rebind.attacker-site.test"
# necurs output (johannesbader's published example domains) that is not on the bundled list: the score finds it
DGA_NX_NAME = "gpvbghcpsoxfknifij.ru"
BENIGN_NAMES = ["example.com", "s3.amazonaws.com", "backend", "orders.myapp.local"]
BENIGN_NX_NAME = "printer-configuration.com"
METADATA_OWN_NAME = "instance-data.ec2.internal"
ANSWERS = {REBIND_NAME: "169.254.169.254", METADATA_OWN_NAME: "169.254.169.254", POOL_RESOLVED: POOL_IP}
NX = {DGA_NX_NAME, BENIGN_NX_NAME}


# -- staging helpers -------------------------------------------------------------------------------------------


def query_script(names: list[str]) -> str:
    """A python one-liner that looks each name up at the responder, one after the other."""
    return (
        "import socket, struct, time\n"
        f"for i, n in enumerate({names!r}):\n"
        "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
        "    q = b''.join(bytes([len(p)]) + p.encode() for p in n.split('.')) + b'\\0'\n"
        f"    s.sendto(struct.pack('>HHHHHH', 4660 + i, 256, 1, 0, 0, 0) + q + struct.pack('>HH', 1, 1), "
        f"('{RESOLVER}', 53))\n"
        "    s.recv(512); s.close(); time.sleep(0.05)\n"
        "time.sleep(1)\n"
    )


@contextlib.contextmanager
def listeners(*hosts: str) -> Iterator[dict[str, int]]:
    socks = []
    ports: dict[str, int] = {}
    try:
        for h in hosts:
            srv = socket.socket()
            srv.bind((h, 0))
            srv.listen(8)
            socks.append(srv)
            ports[h] = srv.getsockname()[1]
        yield ports
    finally:
        for srv in socks:
            srv.close()


def connect_script(targets: list[tuple[str, int]]) -> str:
    return (
        "import socket, time\n"
        f"for h, p in {targets!r}:\n"
        "    s = socket.create_connection((h, p)); time.sleep(1.2); s.close()\n"
    )


STIX_FEED = {
    "type": "bundle",
    "id": "bundle--0a6f5e1c-34a1-4c5e-9f0e-7b5a8e1d2c3b",
    "objects": [
        {
            "type": "indicator",
            "spec_version": "2.1",
            "id": "indicator--6b2f4e1a-1c3d-4e5f-8a9b-0c1d2e3f4a5b",
            "created": "2026-11-01T00:00:00.000Z",
            "modified": "2026-11-01T00:00:00.000Z",
            "name": "test team server",
            "indicator_types": ["malicious-activity"],
            "pattern": f"[ipv4-addr:value = '{STIX_IP}']",
            "pattern_type": "stix",
            "valid_from": "2026-11-01T00:00:00Z",
        }
    ],
}


def write_policy(tmp_path: Path, threat: list[dict[str, Any]], trusted: list[dict[str, Any]]) -> str:
    policy = tmp_path / "policy.yaml"
    policy.write_text(json.dumps({"threat_lists": threat, "trusted_lists": trusted}))  # JSON is YAML
    return str(policy)


def write_list(tmp_path: Path, ip: str) -> Path:
    p = tmp_path / f"list-{ip}.txt"
    p.write_text(f"{ip}\n")
    return p


# -- end to end -------------------------------------------------------------------------------------------------


def test_lists_dns_connections_miners_tor_and_malware_in_the_task(task_env: TaskEnv, tmp_path: Path) -> None:
    # a "malicious" executable: sleep with bytes appended (still runs, new hash)
    evil = task_env.path_in("app", "/tmp/evil")
    shutil.copy("/bin/sleep", evil)
    with open(evil, "ab") as out:
        out.write(b"\0threat-intel-test\0")
    evil.chmod(0o755)
    evil_sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    tor = task_env.path_in("app", "/tmp/tor")  # a program named tor (python, which takes any arguments)
    shutil.copy(PY, tor)
    tor.chmod(0o755)

    c2_list = tmp_path / "c2.txt"
    c2_list.write_text(f"# our own C&C list\n{C2_IP}  # test C&C\nnot-an-indicator here\n")
    feed = tmp_path / "feed.json"
    feed.write_text(json.dumps(STIX_FEED, indent=1))
    malware = tmp_path / "malware.txt"
    malware.write_text(f"{evil_sha}  # test implant\n")
    policy = write_policy(
        tmp_path,
        [
            {"path": str(c2_list), "format": "plain", "category": "c2", "name": "OurC2"},
            {"path": str(feed), "format": "stix", "category": "c2", "name": "StixFeed"},
            {"path": str(malware), "category": "malware", "name": "OurHashes"},
            *[
                {"path": str(write_list(tmp_path, ip)), "category": cat, "name": name}
                for ip, cat, name in [
                    (TOR_IP, "tor", "OurTor"),
                    (BLACKHOLE_IP, "blackhole", "OurSinkholes"),
                    (DROP_IP, "drop_point", "OurDropPoints"),
                ]
            ],
        ],
        [],
    )
    pool_srv = socket.socket()
    pool_srv.bind((POOL_IP, 3333))  # a stratum port
    pool_srv.listen(4)
    with (
        DnsResponder(RESOLVER, answers=ANSWERS, nxdomain=NX),
        listeners(C2_IP, STIX_IP, OTHER_IP, *NET_TYPES) as ports,
        pool_srv,
    ):
        sidecar = task_env.start_detecting(tmp_path, env={"RUNTIME_SIDECAR_POLICY_FILE": policy})
        # benign look-alikes first
        names = [*BENIGN_NAMES, BENIGN_NX_NAME, METADATA_OWN_NAME]
        task_env.run("app", [PY, "-c", query_script(names)], timeout=30)
        task_env.run("worker", [PY, "-c", connect_script([(OTHER_IP, ports[OTHER_IP])])], timeout=30)
        task_env.run("app", ["sh", "-c", ": see the stratum docs; sleep 1"])
        task_env.run("app", ["/bin/sleep", "1"])
        task_env.run("app", ["/tmp/tor", "-c", "import time; time.sleep(1)", "--SocksPort", "9050"])
        # the real thing
        names = [*TESTER, POOL_NAME, REBIND_NAME, DGA_NX_NAME]
        task_env.run("app", [PY, "-c", query_script(names)], timeout=60)
        targets = [(ip, ports[ip]) for ip in (C2_IP, STIX_IP, *NET_TYPES)]
        assert task_env.run("worker", [PY, "-c", connect_script(targets)], timeout=30)[0] == 0
        # a miner resolves its pool, then connects to the answer on a stratum port
        pool_script = query_script([POOL_RESOLVED]) + connect_script([(POOL_IP, 3333)])
        assert task_env.run("worker", [PY, "-c", pool_script], timeout=30)[0] == 0
        # (a process living long enough for /proc polling to see it, as a miner does)
        task_env.run("app", ["sh", "-c", ": xmrig -o stratum+tcp://pool.example-mine.test:3333 -u w; sleep 1"])
        task_env.run("app", ["/tmp/evil", "1"])
        task_env.run("app", ["/tmp/tor", "-c", "import time; time.sleep(1)", "ORPort", "9001"])

        last = sidecar.wait_for_finding(lambda f: dns_domain(f) == DGA_NX_NAME, timeout=30)
        for name, (ftype, severity) in TESTER.items():
            f = sidecar.wait_for_finding(for_domain(name), timeout=20)
            assert (f["type"], f["severity"]) == (ftype, severity), name
            Finding.model_validate(f)
            ev = f["service"]["evidence"]["threatIntelligenceDetails"]
            assert ev[0]["threatListName"] == "GuardDutyTesterDomains"
        pool = sidecar.wait_for_finding(lambda f: dns_domain(f) == POOL_NAME, timeout=20)
        assert pool["type"] == "CryptoCurrency:Runtime/BitcoinTool.B!DNS" and pool["severity"] == 8.0
        assert pool["service"]["evidence"]["threatIntelligenceDetails"][0]["threatListName"] == "MiningPools"
        rebind = sidecar.wait_for_finding(lambda f: f["type"] == threat_intel.REBIND, timeout=20)
        assert dns_domain(rebind) == REBIND_NAME and rebind["severity"] == 8.0
        assert rebind["service"]["runtimeDetails"]["context"]["metadataAddress"] == "169.254.169.254"
        assert last["type"] == threat_intel.DGA_TYPE and last["severity"] == 8.0
        assert last["service"]["evidence"]["threatIntelligenceDetails"][0]["threatListName"] == "DGAScore"

        c2 = [sidecar.wait_for_finding(c2_to(ip), timeout=20) for ip in (C2_IP, STIX_IP)]
        for f, (ip, list_name, threat) in zip(
            c2, [(C2_IP, "OurC2", "test C&C"), (STIX_IP, "StixFeed", "test team server")], strict=True
        ):
            Finding.model_validate(f)
            assert f["severity"] == 8.0
            act = f["service"]["action"]["networkConnectionAction"]
            assert act["connectionDirection"] == "OUTBOUND" and act["remotePortDetails"]["port"] == ports[ip]
            assert f["service"]["evidence"]["threatIntelligenceDetails"] == [
                {"threatListName": list_name, "threatNames": [threat]}
            ]
            proc = f["service"]["runtimeDetails"].get("process")
            if proc is not None:  # the SYN may be seen before its socket is tied to a process
                assert proc["executablePath"].startswith("/usr/bin/python3")
                assert f["resource"]["ecsClusterDetails"]["taskDetails"]["containers"][0]["name"] == "worker"

        for ip, (ftype, severity, list_name) in NET_TYPES.items():
            f = sidecar.wait_for_finding(to_ip(ip), timeout=20)
            assert (f["type"], f["severity"]) == (ftype, severity), ip
            assert f["service"]["evidence"]["threatIntelligenceDetails"][0]["threatListName"] == list_name
        pool_conn = sidecar.wait_for_finding(lambda f: remote_ip(f) == POOL_IP, timeout=20)
        assert pool_conn["type"] == threat_intel.MINING and pool_conn["severity"] == 8.0
        assert pool_conn["service"]["action"]["networkConnectionAction"]["remotePortDetails"]["port"] == 3333
        assert "supportxmr.com" in pool_conn["description"]
        miner = sidecar.wait_for_finding(
            lambda f: f["type"] == threat_intel.MINING and "miningPoolUrl" in f["service"]["runtimeDetails"]["context"],
            timeout=20,
        )
        assert miner["severity"] == 8.0
        assert (
            miner["service"]["runtimeDetails"]["context"]["miningPoolUrl"]
            == "stratum+tcp://pool.example-mine.test:3333"
        )
        mal = sidecar.wait_for_finding(lambda f: f["type"] == "Execution:Runtime/MaliciousFileExecuted", timeout=20)
        Finding.model_validate(mal)
        assert mal["severity"] == 8.0
        assert mal["service"]["runtimeDetails"]["process"]["executablePath"] == "/tmp/evil"
        assert mal["service"]["evidence"]["threatIntelligenceDetails"] == [
            {"threatListName": "OurHashes", "threatNames": ["test implant"], "threatFileSha256": evil_sha}
        ]
        relay = sidecar.wait_for_finding(lambda f: f["type"] == threat_intel.TOR_RELAY, timeout=20)
        assert relay["severity"] == 8.0 and relay["service"]["runtimeDetails"]["process"]["name"] == "tor"
        assert "ORPort 9001" in relay["service"]["runtimeDetails"]["context"]["relayEvidence"]
        time.sleep(2.0)
        findings = sidecar.findings()
        assert sidecar.stop() == 0

    domains = {dns_domain(f) for f in findings}
    for benign in [*BENIGN_NAMES, BENIGN_NX_NAME, METADATA_OWN_NAME]:
        assert benign not in domains, benign
    assert not [f for f in findings if f["type"] == threat_intel.C2 and remote_ip(f) == OTHER_IP]
    assert len([f for f in findings if f["type"] == threat_intel.TOR_RELAY]) == 1
    assert len([f for f in findings if f["type"] == threat_intel.MINING]) == 2, "the stratum command, the pool"
    assert len([f for f in findings if f["type"] == "Execution:Runtime/MaliciousFileExecuted"]) == 1
    assert len([f for f in findings if f["type"] == threat_intel.C2]) == 2, "one finding per connection"


def for_domain(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: dns_domain(f) == name


def to_ip(ip: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: remote_ip(f) == ip


def c2_to(ip: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f["type"] == threat_intel.C2 and remote_ip(f) == ip


def test_trusted_lists_silence_listed_addresses_and_domains(task_env: TaskEnv, tmp_path: Path) -> None:
    c2_list = tmp_path / "c2.txt"
    c2_list.write_text(f"{C2_IP}\n{STIX_IP}\n")
    trusted = tmp_path / "trusted.txt"
    trusted.write_text(f"{C2_IP}\nguarddutyc2activityb.com\n")
    policy = write_policy(
        tmp_path, [{"path": str(c2_list), "category": "c2", "name": "OurC2"}], [{"path": str(trusted)}]
    )
    with DnsResponder(RESOLVER, answers=ANSWERS, nxdomain=NX), listeners(C2_IP, STIX_IP) as ports:
        sidecar = task_env.start_detecting(tmp_path, env={"RUNTIME_SIDECAR_POLICY_FILE": policy})
        task_env.run("app", [PY, "-c", query_script(["c2.guarddutyc2activityb.com", "guarddutyphishingactivity.com"])])
        targets = [(C2_IP, ports[C2_IP]), (STIX_IP, ports[STIX_IP])]
        task_env.run("app", [PY, "-c", connect_script(targets)], timeout=30)
        # the untrusted ones fire: the sidecar saw the traffic
        sidecar.wait_for_finding(lambda f: dns_domain(f) == "guarddutyphishingactivity.com", timeout=30)
        sidecar.wait_for_finding(lambda f: f["type"] == threat_intel.C2 and remote_ip(f) == STIX_IP, 30)
        time.sleep(2.0)
        findings = sidecar.findings()
        assert sidecar.stop() == 0
    assert not [f for f in findings if remote_ip(f) == C2_IP]
    assert not [f for f in findings if (dns_domain(f) or "").endswith("guarddutyc2activityb.com")]


# -- pattern logic on hand-built events ---------------------------------------------------------------------------

APP = ContainerRef(name="app", id="c0ffee", image="app:1", source="cgroup")


def proc(pid: int, name: str, exe: str, cmd: str, sha: str | None = None) -> ProcessInfo:
    return ProcessInfo(
        pid=pid, nspid=pid, ppid=1, name=name, executable_path=exe, executable_deleted=False,
        executable_sha256=sha, command_line=cmd, cwd="/", uid=0, euid=0, gid=0, egid=0, user="root",
        euser="root", start_ticks=pid, start_time=1000.0 + pid, uuid=f"u{pid}", parent_uuid=None,
        ld_preload=None, ld_library_path=None, container=APP, mnt_ns=None,
    )  # fmt: skip


class Rig:
    def __init__(self, intel: ThreatIntel) -> None:
        self.findings: list[dict[str, Any]] = []
        self.now = 5000.0
        ctx = DetectorContext(ProcessTable(), intel=intel, self_pids=frozenset(), clock=lambda: self.now)
        self.engine = DetectorEngine(
            ctx, FindingScope(), self.findings.append, detectors=list(threat_intel.DETECTORS), clock=lambda: self.now
        )

    def feed(self, kind: str, p: ProcessInfo | None, **data: Any) -> list[dict[str, Any]]:
        before = len(self.findings)
        self.engine.on_event(RuntimeEvent(kind, p, time=self.now, data=data))
        self.engine.flush(force=True)
        out = self.findings[before:]
        for f in out:
            Finding.model_validate(f)
        return out


def intel_with(tmp_path: Path, text: str, category: str = "c2") -> ThreatIntel:
    path = tmp_path / "l.txt"
    path.write_text(text)
    intel, problems = ThreatIntel.load([ListSpec(str(path), category=category, name="L")])
    assert problems == []
    return intel


def dns_resp(name: str, answers: list[tuple[str, str]], rcode: str = "NOERROR") -> dict[str, Any]:
    return {
        "queryName": name, "queryType": "A", "transport": "UDP", "direction": "OUTBOUND", "rcode": rcode,
        "answers": [{"name": name, "type": t, "value": v, "ttl": 60} for t, v in answers],
    }  # fmt: skip


def test_answers_cname_targets_and_addresses_on_lists(tmp_path: Path) -> None:
    intel = intel_with(tmp_path, "cdn-evil.example\n198.51.100.77\n")
    rig = Rig(intel)
    curl = proc(10, "curl", "/usr/bin/curl", "curl https://innocent.example/")
    out = rig.feed("dns.response", curl, **dns_resp("innocent.example", [("CNAME", "edge.cdn-evil.example.")]))
    assert [f["type"] for f in out] == ["Backdoor:Runtime/C&CActivity.B!DNS"]
    assert out[0]["service"]["runtimeDetails"]["context"]["resolvedTo"] == "edge.cdn-evil.example"
    assert dns_domain(out[0]) == "innocent.example"
    out = rig.feed("dns.response", curl, **dns_resp("other.example", [("A", "198.51.100.77")]))
    assert [f["type"] for f in out] == ["Backdoor:Runtime/C&CActivity.B!DNS"]
    assert rig.feed("dns.response", curl, **dns_resp("fine.example", [("A", "198.51.100.78")])) == []
    # a response to a query the task answered (a local DNS server) is not ours
    inbound = {**dns_resp("x.example", [("A", "198.51.100.77")]), "direction": "INBOUND"}
    assert rig.feed("dns.response", curl, **inbound) == []


def test_one_connection_seen_by_packets_and_sockets_is_one_finding(tmp_path: Path) -> None:
    rig = Rig(intel_with(tmp_path, "198.51.100.5\n198.51.100.6\n"))
    conn = {"localIp": "10.0.0.2", "localPort": 40000, "remoteIp": "198.51.100.5", "remotePort": 443,
            "direction": "OUTBOUND", "protocol": "tcp", "addressFamily": "AF_INET"}  # fmt: skip
    assert len(rig.feed("net.syn", None, **conn)) == 1
    p = proc(11, "python3", "/usr/bin/python3.11", "python3 beacon.py")
    assert len(rig.feed("net.connect", p, **conn)) == 1, "the socket names the process the SYN lacked"
    assert rig.feed("net.connect", p, **conn) == []
    # inbound from a listed address: not C&C
    assert rig.feed("net.accept", p, **{**conn, "direction": "INBOUND"}) == []
    # a short-lived socket with no process is still seen
    short = {**conn, "localPort": 40001, "remoteIp": "198.51.100.6", "shortLived": True}
    out = rig.feed("net.connect", None, **short)
    assert len(out) == 1 and out[0]["service"]["runtimeDetails"]["context"]["shortLived"] is True


def test_mining_pool_connection_after_its_name_resolved(tmp_path: Path) -> None:
    intel, _ = ThreatIntel.load()
    rig = Rig(intel)
    miner = proc(12, "kworkerds", "/tmp/kworkerds", "/tmp/kworkerds")
    rig.feed("dns.response", miner, **dns_resp("pool.supportxmr.com", [("A", "203.0.113.50")]))
    base = {"localIp": "10.0.0.2", "localPort": 40010, "remoteIp": "203.0.113.50", "direction": "OUTBOUND",
            "protocol": "tcp"}  # fmt: skip
    assert rig.feed("net.connect", miner, **{**base, "remotePort": 22}) == [], "not a stratum port"
    out = rig.feed("net.connect", miner, **{**base, "localPort": 40011, "remotePort": 5555})
    assert [f["type"] for f in out] == ["CryptoCurrency:Runtime/BitcoinTool.B"]
    assert "supportxmr.com" in out[0]["description"]
    rig.now += 3700  # past the longest remembered TTL
    assert rig.feed("net.connect", miner, **{**base, "localPort": 40012, "remotePort": 7777}) == []


def test_own_endpoints_and_metadata_names_never_fire(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("RUNTIME_SIDECAR_COLLECTOR_URL", "https://collector.guarddutyc2activityb.com:8443/v1")
    intel, _ = ThreatIntel.load()
    rig = Rig(intel)
    p = proc(13, "python3", "/usr/bin/python3.11", "python3 -m sidecar")
    q = {"queryName": "collector.guarddutyc2activityb.com.", "queryType": "A", "direction": "OUTBOUND"}
    assert rig.feed("dns.query", p, **q) == []
    assert len(rig.feed("dns.query", p, **{**q, "queryName": "c2.guarddutyc2activityb.com."})) == 1
    ecs = dns_resp("instance-data", [("A", "169.254.169.254")])
    assert rig.feed("dns.response", p, **ecs) == []
    out = rig.feed("dns.response", p, **dns_resp("creds.evil.test", [("A", "169.254.170.2")]))
    assert [f["type"] for f in out] == [threat_intel.REBIND]
    out = rig.feed("dns.response", p, **dns_resp("v6.evil.test", [("AAAA", "fd00:ec2:0::254")]))
    assert out[0]["service"]["runtimeDetails"]["context"]["metadataAddress"] == "fd00:ec2::254"


def test_dga_score_needs_a_name_that_does_not_exist(tmp_path: Path) -> None:
    intel, _ = ThreatIntel.load()
    rig = Rig(intel)
    p = proc(14, "bot", "/tmp/bot", "/tmp/bot")
    assert rig.feed("dns.response", p, **dns_resp("toelgqrxloftwepxyufr.ug", [("A", "192.0.2.1")])) == []
    out = rig.feed("dns.response", p, **dns_resp("toelgqrxloftwepxyufr.ug", [], rcode="NXDOMAIN"))
    assert [f["type"] for f in out] == [threat_intel.DGA_TYPE]
    assert rig.feed("dns.response", p, **dns_resp("stackoverflow-mirror.com", [], rcode="NXDOMAIN")) == []
    assert rig.feed("dns.response", p, **dns_resp("d8f7a6b5c4d3e2.cloudfront.net", [], rcode="NXDOMAIN")) == []


def test_tor_relay_by_listening_socket_and_torrc(tmp_path: Path) -> None:
    rig = Rig(ThreatIntel.load(bundled=False)[0])
    tor = proc(15, "tor", "/usr/bin/tor", "tor -f /etc/tor/torrc")
    listen = {"localIp": "0.0.0.0", "localPort": 9001, "protocol": "tcp", "direction": "LISTEN"}
    assert [f["type"] for f in rig.feed("net.listen", tor, **listen)] == [threat_intel.TOR_RELAY]
    assert rig.feed("net.listen", tor, **{**listen, "localIp": "127.0.0.1", "localPort": 9050}) == []
    not_tor = proc(16, "nginx", "/usr/sbin/nginx", "nginx")
    assert rig.feed("net.listen", not_tor, **listen) == []
    # a torrc read through /proc/<pid>/root of the process: ours, with a relative -f path
    me = dataclasses.replace(proc(os.getpid(), "tor", "/usr/bin/tor", "tor -f torrc"), cwd=str(tmp_path))
    (tmp_path / "torrc").write_text("SocksPort 9050\n# ORPort 9001\nORPort 443\n")
    out = rig.feed("process.exec", me)
    assert [f["type"] for f in out] == [threat_intel.TOR_RELAY]
    assert "ORPort 443" in out[0]["service"]["runtimeDetails"]["context"]["relayEvidence"]


def test_odd_event_data_never_raises(tmp_path: Path) -> None:
    intel, _ = ThreatIntel.load()
    rig = Rig(intel)
    p = proc(17, "x", "/x", "x")
    odd: list[Any] = [None, 7, "", "..", "a" * 300, ["1.2.3.4"], {"x": 1}, "\0", "1.2.3.4\0", "::ffff:", "ű.com"]
    for v in odd:
        for kind in ("net.connect", "net.syn", "net.udp", "net.listen"):
            rig.feed(kind, p, remoteIp=v, remotePort=v, localIp=v, direction=v, protocol=v)
        rig.feed("dns.query", None, queryName=v, direction=v)
        rig.feed("dns.response", p, queryName=v, rcode=v, answers=v)
        rig.feed("dns.response", p, queryName="x.example", answers=[v, {"type": "A", "value": v, "ttl": v}])
        rig.feed("dns.response", p, queryName="x.example", answers=[{"type": "CNAME", "value": v}])
    rig.feed("process.exec", None)
    rig.feed("process.exec", dataclasses.replace(p, command_line=None, executable_sha256="zz"))
    assert rig.engine.errors == {}, rig.engine.errors

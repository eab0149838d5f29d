"""detectors/memory.py: fileless execution, /proc/<pid>/mem and ptrace injection, anti-debugging, userfaultfd and
new libraries, staged for real in the emulated task with the real sidecar (its kernel-traces source feeding the
detector engine), each next to a benign look-alike that must stay silent. The exclusions that cannot be staged
here (runc's own memfd, a package upgrade on a host, a program started by a debugger) are checked by feeding the
engine events around real ProcessInfo captured from processes of this test.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from findings import container_of, context_of, process_of
from taskenv import TaskEnv

from collectors.events import ContainerRef, ProcessInfo, RuntimeEvent
from collectors.process import ProcessCollector
from collectors.process_table import ProcessTable
from detectors import memory
from detectors.base import DetectorContext
from detectors.build import FindingScope
from detectors.engine import DetectorEngine
from detectors.finding import Finding

pytestmark = pytest.mark.timeout(150)

PY = "/usr/bin/python3"
LIBC = textwrap.dedent(
    """
    import ctypes, os, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    def check(rc, what):
        if rc < 0:
            raise OSError(ctypes.get_errno(), what)
        return rc
    """
)
# the tracer forks its target: attaching to a child needs no capability
ATTACH = LIBC + textwrap.dedent(
    """
    import subprocess
    child = subprocess.Popen(["sleep", "40"])
    time.sleep(0.5)
    check(libc.ptrace(0x4206, child.pid, None, None), "PTRACE_SEIZE")
    time.sleep(40)
    """
)
TRACEME = LIBC + textwrap.dedent(
    """
    pid = os.fork()
    if pid == 0:
        check(libc.ptrace(0, 0, None, None), "PTRACE_TRACEME")
        os.execv("/bin/sleep", ["sleep", "41"])
    os.waitpid(pid, 0)
    check(libc.ptrace(7, pid, None, None), "PTRACE_CONT")
    time.sleep(40)
    """
)
# opens its child's memory; argv[1]: rw or r
MEM = textwrap.dedent(
    """
    import os, subprocess, sys, time
    child = subprocess.Popen(["sleep", "42"])
    time.sleep(0.3)
    fd = os.open(f"/proc/{child.pid}/mem", os.O_RDWR if sys.argv[1] == "rw" else os.O_RDONLY)
    time.sleep(40)
    """
)
# userfaultfd(UFFD_USER_MODE_ONLY): allowed without CAP_SYS_PTRACE (the containers have Docker's default caps)
UFFD = textwrap.dedent(
    """
    import ctypes, os, platform, sys, time
    if sys.argv[1] == "uffd":
        libc = ctypes.CDLL(None, use_errno=True)
        nr = {"x86_64": 323, "aarch64": 282}[platform.machine()]
        fd = libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK | 1)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "userfaultfd")
    else:
        fd = os.eventfd(0)
    print(fd, flush=True)
    time.sleep(40)
    """
)
MEMFD = (
    "import os; fd = os.memfd_create('payload'); os.write(fd, open('/bin/sleep', 'rb').read()); "
    "os.execv('/proc/self/fd/%d' % fd, ['kworker', '40'])"
)
DLOPEN = textwrap.dedent(
    """
    import ctypes, os, sys, time
    time.sleep(1.5)  # after the source's first look: found because its mappings grew
    ctypes.CDLL(sys.argv[1])
    time.sleep(40)
    """
)


MEMORY_TYPES = {t for d in memory.DETECTORS for t in d.types}


def valid(f: dict[str, Any]) -> dict[str, Any]:
    Finding.model_validate(f)
    return f


def test_fileless_injection_ptrace_userfaultfd_vs_look_alikes(task_env: TaskEnv, tmp_path: Path) -> None:
    sidecar = task_env.start_detecting(tmp_path)
    # benign first: a plain process, a read-only look at a child's memory, an eventfd, a program run under strace
    task_env.spawn("worker", ["sleep", "40"])
    task_env.spawn("worker", [PY, "-c", MEM, "r"])
    task_env.spawn("worker", [PY, "-c", UFFD, "eventfd"])
    task_env.spawn("worker", ["strace", "-o", "/dev/null", "sleep", "40"])
    # the attacks, in "app"
    memfd_pid = task_env.spawn("app", [PY, "-c", MEMFD])
    shutil.copy("/bin/sleep", task_env.path_in("app", "/tmp/dropper"))
    dropper = task_env.spawn("app", ["/tmp/dropper", "40"])
    attacher = task_env.spawn("app", [PY, "-c", ATTACH])
    traceme = task_env.spawn("app", [PY, "-c", TRACEME])
    writer = task_env.spawn("app", [PY, "-c", MEM, "rw"])
    uffd = task_env.spawn("app", [PY, "-c", UFFD, "uffd"])

    f = valid(sidecar.wait_for_finding(lambda f: f["type"] == memory.FILELESS, timeout=20))
    assert f["severity"] == 5.0 and container_of(f) == "app"
    assert process_of(f)["namespacePid"] == memfd_pid and process_of(f)["executablePath"] == "/memfd:payload"
    assert context_of(f) == {"memfd": True, "deleted": True}
    # the dropper deletes itself while it runs
    task_env.run("app", ["rm", "/tmp/dropper"])
    f = valid(sidecar.wait_for_finding(lambda f: f["type"] == memory.FILELESS and "dropper" in str(f), timeout=15))
    assert process_of(f)["namespacePid"] == dropper and process_of(f)["executablePath"] == "/tmp/dropper"
    assert context_of(f) == {"memfd": False, "deleted": True}

    f = valid(sidecar.wait_for_finding(lambda f: f["type"] == memory.INJECTION_PTRACE, timeout=15))
    assert f["severity"] == 5.0 and container_of(f) == "app"
    assert process_of(f)["namespacePid"] == attacher  # the tracer is the finding's process
    target = context_of(f)["targetProcess"]
    assert target["name"] == "sleep" and target["commandLine"] == "sleep 40"
    f = valid(sidecar.wait_for_finding(lambda f: f["type"] == memory.ANTI_DEBUGGING, timeout=15))
    assert f["severity"] == 2.0 and container_of(f) == "app"
    assert process_of(f)["commandLine"] == "sleep 41"  # the process that asked to be traced
    assert context_of(f)["tracerProcess"]["namespacePid"] == traceme

    f = valid(sidecar.wait_for_finding(lambda f: f["type"] == memory.INJECTION_PROC, timeout=15))
    assert f["severity"] == 8.0 and container_of(f) == "app"
    assert process_of(f)["namespacePid"] == writer
    c = context_of(f)
    assert c["targetProcess"]["commandLine"] == "sleep 42" and c["accessMode"] == "O_RDWR"
    assert c["path"] == f"/proc/{c['targetProcess']['namespacePid']}/mem"

    f = valid(sidecar.wait_for_finding(lambda f: f["type"] == memory.USERFAULTFD, timeout=15))
    assert f["severity"] == 5.0 and container_of(f) == "app" and process_of(f)["namespacePid"] == uffd
    assert isinstance(context_of(f)["fd"], int)

    time.sleep(2.5)  # a few more passes
    findings = sidecar.findings()
    assert not [f for f in findings if container_of(f) == "worker" and f["type"] in MEMORY_TYPES], [
        (f["type"], process_of(f).get("commandLine")) for f in findings if container_of(f) == "worker"
    ]
    # one finding per activity, however many passes saw it
    assert len({f["id"] for f in findings if f["type"] == memory.INJECTION_PTRACE}) == 1
    # strace ran its child traced: a debugger, not anti-debugging
    events = sidecar.events()
    assert [e for e in events if e["kind"] == "proc.ptrace" and e["process"]["containerName"] == "worker"], (
        "the strace look-alike was not even seen: the test would prove nothing"
    )
    assert sidecar.stop() == 0


def compile_library(directory: Path, name: str) -> Path:
    src = directory / f"{name}.c"
    src.write_text(f"int {name.replace('-', '_')}_marker(void) {{ return 42; }}\n")
    out = directory / f"{name}.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(src)], check=True, capture_output=True)
    return out


IMAGE_LIB = "/usr/lib/x86_64-linux-gnu/liblzma.so.5" if Path("/usr/lib/x86_64-linux-gnu").is_dir() else None


def test_new_libraries_vs_an_image_library_preloaded(task_env: TaskEnv, tmp_path: Path) -> None:
    image_lib = IMAGE_LIB or "/usr/lib/aarch64-linux-gnu/liblzma.so.5"
    if not Path(image_lib).exists():
        pytest.fail(f"{image_lib} missing: the benign preload needs a library that is part of the image")
    sidecar = task_env.start_detecting(tmp_path)
    for name in ("hook", "fresh"):
        shutil.copy(compile_library(tmp_path, name), task_env.path_in("app", f"/tmp/{name}.so"))
    # benign: the image's own library preloaded (as images preload jemalloc), and dlopen'd by its bare name
    task_env.spawn("worker", ["sleep", "40"], env={"LD_PRELOAD": image_lib})
    task_env.spawn("worker", [PY, "-c", DLOPEN, "liblzma.so.5"])
    preloaded = task_env.spawn("app", ["sleep", "40"], env={"LD_PRELOAD": "/tmp/hook.so"})
    dlopened = task_env.spawn("app", [PY, "-c", DLOPEN, "/tmp/fresh.so"])

    f = valid(sidecar.wait_for_finding(lambda f: f["type"] == memory.NEW_LIBRARY and "hook.so" in str(f), timeout=20))
    assert f["severity"] == 5.0 and container_of(f) == "app" and process_of(f)["namespacePid"] == preloaded
    c = context_of(f)
    assert c["libraryPath"] == "/tmp/hook.so" and c["ldPreloadValue"] == "/tmp/hook.so" and c["reason"] == "ld_preload"
    f = valid(sidecar.wait_for_finding(lambda f: f["type"] == memory.NEW_LIBRARY and "fresh.so" in str(f), timeout=20))
    assert process_of(f)["namespacePid"] == dlopened
    c = context_of(f)
    assert c["libraryPath"] == "/tmp/fresh.so" and c["reason"] == "new_file" and c["ldPreloadValue"] is None
    time.sleep(2.5)
    assert not [f for f in sidecar.findings() if container_of(f) == "worker"]
    # the benign preload was seen and judged, not missed
    assert [
        e
        for e in sidecar.events()
        if e["kind"] == "proc.library" and e.get("reason") == "ld_preload" and e.get("libraryPath") == image_lib
    ]
    assert sidecar.stop() == 0


# -- exclusions that cannot be staged here, on real process records ---------------------------------------------------


class Engine:
    def __init__(self) -> None:
        self.table = ProcessTable()
        self.findings: list[dict[str, Any]] = []
        self.engine = DetectorEngine(
            DetectorContext(self.table, self_pids=frozenset()),
            FindingScope(),
            self.findings.append,
            detectors=list(memory.DETECTORS),
        )


@pytest.fixture
def sleeper() -> Iterator[ProcessInfo]:
    child = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while True:
            info = ProcessCollector(lambda e: None, hash_executables=False).capture(child.pid)
            if info is not None and info.name == "sleep":
                break
            assert time.monotonic() < deadline, "sleep never captured"
            time.sleep(0.01)
        yield info
    finally:
        child.kill()
        child.wait()


def _as(info: ProcessInfo, **changes: Any) -> ProcessInfo:
    return dataclasses.replace(info, _json=None, **changes)


def test_runc_clone_and_host_upgrade_are_not_fileless(sleeper: ProcessInfo, tmp_path: Path) -> None:
    e = Engine()
    app = ContainerRef("app", "c1")
    runc = _as(sleeper, name="runc:[2:INIT]", executable_path="/memfd:runc_cloned:/proc/self/exe", container=app)
    e.engine.on_event(RuntimeEvent("proc.fileless", runc, data={"exePath": runc.executable_path, "memfd": True,
                                                                "deleted": True}))  # fmt: skip
    assert e.findings == []
    # the same memfd name in a process that is not runc: a payload hiding behind the name
    fake = _as(runc, name="kworker")
    e.engine.on_event(RuntimeEvent("proc.fileless", fake, data={"exePath": fake.executable_path, "memfd": True,
                                                                "deleted": True}))  # fmt: skip
    assert [f["type"] for f in e.findings] == [memory.FILELESS]
    # a host binary replaced on disk by an upgrade while it runs: its path holds a file again
    replaced = tmp_path / "daemon"
    shutil.copy(sys.executable, replaced)
    host = _as(sleeper, executable_path=str(replaced), container=None, exe_ino=1)
    data = {"exePath": str(replaced), "memfd": False, "deleted": True}
    e.engine.on_event(RuntimeEvent("proc.fileless", host, data=data))
    assert len(e.findings) == 1
    # in a container the same shape is a finding, marked as such
    boxed = _as(host, container=app)
    e.engine.on_event(RuntimeEvent("proc.fileless", boxed, data=data))
    assert len(e.findings) == 2 and e.findings[1]["service"]["runtimeDetails"]["context"]["replacedOnDisk"] is True
    # on the host, a deleted binary with nothing at its path is a finding
    gone = _as(host, executable_path=str(tmp_path / "gone"))
    e.engine.on_event(RuntimeEvent("proc.fileless", gone, data={**data, "exePath": str(tmp_path / "gone")}))
    assert len(e.findings) == 3
    for f in e.findings:
        Finding.model_validate(f)


def test_program_started_by_a_debugger_is_not_anti_debugging(sleeper: ProcessInfo) -> None:
    e = Engine()
    strace = _as(sleeper, pid=sleeper.pid + 100000, name="strace", executable_path="/usr/bin/strace",
                 uuid="strace-uuid", command_line="strace ./prog")  # fmt: skip
    e.table.add(strace)
    data = {"tracerPid": strace.pid, "tracee": sleeper.pid, "traceMe": True, "tracer": strace.to_json()}
    e.engine.on_event(RuntimeEvent("proc.ptrace", sleeper, data=data))
    assert e.findings == []
    shell = _as(strace, name="python3", executable_path="/usr/bin/python3.11", uuid="py-uuid")
    e.engine.on_event(RuntimeEvent("proc.ptrace", sleeper, data={**data, "tracer": shell.to_json()}))
    assert [f["type"] for f in e.findings] == [memory.ANTI_DEBUGGING]
    # an attach by a debugger (strace -p) is an attach: the tracer is the finding's process, rebuilt from the
    # event when the table no longer has it
    e.engine.on_event(RuntimeEvent("proc.ptrace", sleeper, data={**data, "traceMe": False, "tracer": shell.to_json()}))
    f = e.findings[-1]
    assert f["type"] == memory.INJECTION_PTRACE
    assert f["service"]["runtimeDetails"]["process"]["uuid"] == "py-uuid"
    assert f["service"]["runtimeDetails"]["context"]["targetProcess"]["pid"] == sleeper.pid
    for f in e.findings:
        Finding.model_validate(f)


def test_preload_rules_on_a_real_process(sleeper: ProcessInfo, tmp_path: Path) -> None:
    """Which proc.library facts are findings: the source's fields as it reports them, around a real process."""
    e = Engine()
    boxed = _as(sleeper, container=ContainerRef("app", "c1"))

    def lib(p: ProcessInfo, **data: Any) -> None:
        e.engine.on_event(RuntimeEvent("proc.library", p, data={"ldPreloadValue": None, "fileTime": None, **data}))

    # an image's own library preloaded (dated before the container started), or named bare: configuration
    lib(boxed, libraryPath="/usr/lib/libjemalloc.so.2", reason="ld_preload", newFile=False)
    lib(boxed, libraryPath="libtcmalloc.so.4", reason="ld_preload", newFile=None)
    assert e.findings == []
    # a preload that is not in the container's files (the path is seen through /proc/<pid>/root): deleted since
    missing = str(tmp_path / "gone.so")
    lib(boxed, libraryPath=missing, reason="ld_preload", newFile=None, ldPreloadValue=missing)
    assert [context_of(f)["reason"] for f in e.findings] == ["ld_preload_missing"]
    assert context_of(e.findings[0])["ldPreloadValue"] == missing
    # on a host, a system library newer than boot is an upgrade; in a container it is news
    host = _as(sleeper, container=None)
    lib(host, libraryPath="/usr/lib/x86_64-linux-gnu/libssl.so.3", reason="new_file", newFile=True)
    assert len(e.findings) == 1
    lib(boxed, libraryPath="/usr/lib/x86_64-linux-gnu/libssl.so.3", reason="new_file", newFile=True)
    lib(host, libraryPath="/tmp/x.so", reason="memfd", newFile=None)
    assert [context_of(f)["reason"] for f in e.findings[1:]] == ["new_file", "memfd"]
    for f in e.findings:
        valid(f)

"""Contract and race tests of the raw /proc reader, on real processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collectors import procfs


def test_contract_every_field_typed() -> None:
    raw = procfs.read_process(os.getpid())
    assert raw.pid == os.getpid() == raw.tgid
    assert raw.ppid == os.getppid()
    assert (raw.argv is not None and raw.argv[0].endswith(("python", "python3", "pytest"))) or "pytest" in " ".join(
        raw.argv or []
    )
    assert raw.exe is not None and os.path.samefile(raw.exe, sys.executable)
    assert raw.cwd == os.getcwd()
    assert (raw.uid, raw.euid, raw.gid, raw.egid) == (os.getuid(), os.geteuid(), os.getgid(), os.getegid())
    assert isinstance(raw.start_ticks, int) and raw.start_ticks > 0
    assert isinstance(raw.mnt_ns, int)
    assert raw.exe_file is not None and raw.exe_file.ino == os.stat(sys.executable).st_ino
    assert raw.cgroup is not None and ":" in raw.cgroup
    assert raw.state in "RS"


def test_environment_keeps_only_loader_variables(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "LD_PRELOAD": "/tmp/evil.so",
        "LD_LIBRARY_PATH": "/opt/lib",
        "DB_PASSWORD": "s3cret",
    }
    proc = subprocess.Popen(["sleep", "30"], env=env)
    try:
        time.sleep(0.05)
        raw = procfs.read_process(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert raw.ld_preload == "/tmp/evil.so"
    assert raw.ld_library_path == "/opt/lib"
    assert "s3cret" not in repr(raw)


def test_spaces_and_parentheses_in_comm(tmp_path: Path) -> None:
    # comm is attacker-controlled: ") R 1 2" must not shift the stat fields.
    odd = tmp_path / "a) R 1 (b"
    shutil.copy("/bin/sleep", odd)
    proc = subprocess.Popen([str(odd), "30"])
    try:
        time.sleep(0.05)
        raw = procfs.read_process(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert raw.ppid == os.getpid()
    assert raw.name.startswith("a) R 1 (b"[:15])
    assert raw.exe == str(odd)


def test_gone_process_raises_typed_error() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(procfs.ProcessGone):
        procfs.read_process(proc.pid)


def test_zombie_is_reported_as_such_with_exit_code() -> None:
    proc = subprocess.Popen(["sh", "-c", "exit 7"])
    # do not reap: it stays a zombie
    deadline = time.time() + 5
    while time.time() < deadline:
        raw = procfs.read_process(proc.pid)
        if raw.state == "Z":
            break
        time.sleep(0.01)
    assert raw.state == "Z"
    assert raw.exe is None and raw.argv == []
    assert procfs.read_exit_code(proc.pid) == 7
    proc.wait()


def test_deleted_executable(tmp_path: Path) -> None:
    exe = tmp_path / "dropped"
    shutil.copy("/bin/sleep", exe)
    proc = subprocess.Popen([str(exe), "30"])
    try:
        time.sleep(0.05)
        exe.unlink()
        raw = procfs.read_process(proc.pid, want_exe_fd=True)
        assert raw.exe == str(exe)
        assert raw.exe_deleted
        # the content is still readable through the fd (hashable after deletion)
        assert raw.exe_fd is not None
        assert os.pread(raw.exe_fd, 4, 0) == b"\x7fELF"
        os.close(raw.exe_fd)
    finally:
        proc.kill()
        proc.wait()


def test_other_uid_process_is_read() -> None:
    proc = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "30"])
    try:
        deadline = time.time() + 5
        while time.time() < deadline:
            raw = procfs.read_process(proc.pid)
            if raw.uid == 65534:
                break
            time.sleep(0.01)
        assert (raw.uid, raw.euid, raw.gid) == (65534, 65534, 65534)
        assert raw.argv == ["sleep", "30"]
    finally:
        proc.kill()
        proc.wait()


def test_thread_ids_are_not_processes() -> None:
    import threading

    tids: list[int] = []
    ready = threading.Event()
    done = threading.Event()

    def worker() -> None:
        tids.append(threading.get_native_id())
        ready.set()
        done.wait(5)

    t = threading.Thread(target=worker)
    t.start()
    ready.wait(5)
    try:
        with pytest.raises(procfs.NotAProcess):
            procfs.read_process(tids[0])
    finally:
        done.set()
        t.join()


def test_pid_reuse_never_mixes_two_processes() -> None:
    """A directory fd pins the process: reads after its exit fail, never describe a newcomer."""
    proc = subprocess.Popen(["sleep", "30"])
    dfd = procfs.open_pid_dir(proc.pid)
    try:
        proc.kill()
        proc.wait()
        with pytest.raises(OSError):
            procfs.read_small("cmdline", dfd)
    finally:
        os.close(dfd)


def test_last_pid_moves_with_forks() -> None:
    reader = procfs.LastPidReader()
    before = reader.read()
    proc = subprocess.Popen(["true"])
    proc.wait()
    after = reader.read()
    reader.close()
    assert after != before
    assert proc.pid == after or after > proc.pid or after < before  # wrapped or other forks since


def test_processes_exiting_mid_read_never_crash_the_reader() -> None:
    """Hammer: read thousands of short-lived processes; only typed errors may surface."""
    stop = time.time() + 2
    procs = []
    errors: dict[str, int] = {}
    while time.time() < stop:
        p = subprocess.Popen(["true"])
        procs.append(p)
        try:
            procfs.read_process(p.pid)
        except procfs.ProcfsError as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        if len(procs) > 50:
            for q in procs:
                q.wait()
            procs.clear()
    for q in procs:
        q.wait()
    assert set(errors) <= {"ProcessGone", "NotAProcess"}


def test_reader_does_not_leak_memory_or_fds() -> None:
    import resource

    pid = os.getpid()
    for _ in range(500):
        procfs.read_process(pid, want_exe_fd=False)
    fds_before = len(os.listdir("/proc/self/fd"))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(20000):
        procfs.read_process(pid, want_exe_fd=False)
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 4096  # KiB


def test_exit_code_of_killed_zombie() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    os.kill(proc.pid, signal.SIGKILL)
    deadline = time.time() + 5
    code = None
    while time.time() < deadline and code is None:
        code = procfs.read_exit_code(proc.pid)
        time.sleep(0.01)
    assert code == -signal.SIGKILL
    proc.wait()


def test_forked_from_tells_a_fork_from_an_exec() -> None:
    import os
    import subprocess
    import time

    me = (os.getpid(), procfs.read_start_ticks(os.getpid()))
    pid = os.fork()
    if pid == 0:
        time.sleep(1)
        os._exit(0)
    child = subprocess.Popen(["sleep", "1"])
    try:
        time.sleep(0.2)
        assert procfs.forked_from((pid, procfs.read_start_ticks(pid)), me) is True
        assert procfs.forked_from((child.pid, procfs.read_start_ticks(child.pid)), me) is False
        assert procfs.forked_from((child.pid, 1), me) is None  # not that process (start ticks differ)
    finally:
        os.waitpid(pid, 0)
        child.wait()


def test_the_collector_marks_subshells_forked_and_exec_d_shells_not() -> None:
    """A shell reading commands: `( sleep 5; true )` forks a subshell that keeps the parent's image; typing `sh` execs a
    new shell with the same command line. Only the address-space layout tells them apart, and only while alive."""
    import subprocess
    import time

    from collectors.exe_hash import ExeHasher
    from collectors.process import ProcessCollector
    from collectors.process_table import ProcessTable

    session = subprocess.Popen(["/bin/sh"], stdin=subprocess.PIPE, text=True)
    assert session.stdin is not None
    children: list[int] = []
    table = ProcessTable()
    collector = ProcessCollector(lambda e: None, table=table, hasher=ExeHasher(), hash_executables=False)
    try:
        collector.capture(session.pid)
        session.stdin.write("( sleep 5; true ) & sh -c 'sleep 5; true' & sh\n")
        session.stdin.flush()
        time.sleep(0.5)
        with open(f"/proc/{session.pid}/task/{session.pid}/children") as f:
            children = [int(p) for p in f.read().split()]
        captured = [i for i in (collector.capture(pid) for pid in children) if i is not None]
        time.sleep(0.2)
        collector.recheck_young()  # forks held back are judged once their grace is over, as the sources do
        infos = [i for i in (table.get(c.pid) for c in captured) if i is not None]
        by_cmd: dict[str, list[bool]] = {}
        for i in infos:
            if i.name != "sleep":
                by_cmd.setdefault(i.command_line or "", []).append(i.forked)
        # the subshell (same command line as the session, forked) and the typed `sh` (same line, exec'd)
        assert sorted(by_cmd.get("/bin/sh", []) + by_cmd.get("sh", [])) == [False, True], by_cmd
        assert by_cmd["sh -c sleep 5; true"] == [False]  # another command line: not a fork of the session's image
    finally:
        session.kill()
        session.wait()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        collector.hasher.shutdown()

"""What runs inside an emulated ECS task (see tests/taskenv.py, which is the only caller).

Started by the test process as ``python -I -S taskenv_init.py task`` with a JSON spec on stdin. Stdlib only and
no site-packages on purpose: it starts fast and the forked container-inits keep working after pivot_root, when
the interpreter's own files are no longer reachable (everything they need is imported here, up front).

Process layout (pids as seen inside the task)::

    launcher (host pid ns)            unshare(NEWNS|NEWPID), forks PID 1, then waits for it, or kills it when
      │                               its stdin (kept open by the test process) closes
      └─ 1  task-init                 mounts /proc, the containers' roots (tmpfs) and the cgroup hierarchy, reaps
         │                            orphans like ECS's pause/init, serves the control socket (exec the sidecar,
         │                            kill, wait, ...)
         ├─ container-init (app)      own mount ns + root fs, own cgroup, serves its socket: every command a
         │    └─ sh -> curl ...       test runs in the container is forked by it, so lineage is realistic
         └─ sidecar main process      own mount ns (host file view, task /proc), own cgroup, Fargate capabilities

Every request on a socket is one JSON line; every answer is one or more JSON lines.

``python -I -S taskenv_init.py cleanup-cgroup NAME [SUBTREE]`` removes one task's cgroups when its init could not
(SUBTREE=/ecs/<task>), or a whole named hierarchy: at the end of a test process, or left behind by a killed one.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

# ---------------------------------------------------------------------------------------------------------------
# Thin syscall layer (ctypes on the already loaded libc: CDLL(None) costs nothing, find_library would fork gcc).

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# glibc has no pivot_root() wrapper.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(platform.machine(), 155)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    ret = _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data))
    _check(ret, f"mount {source} on {target} ({fstype})")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), f"umount {target}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(ctypes.c_long(_SYS_PIVOT_ROOT), _b(new_root), _b(put_old)), "pivot_root")


def prctl(option: int, arg2: int = 0) -> None:
    zero = ctypes.c_ulong(0)
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), zero, zero, zero), f"prctl({option})")


def set_comm(name: str) -> None:
    """The name ps/`/proc/<pid>/comm` show; the forked inits would otherwise all be called python3."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _libc.prctl(ctypes.c_int(PR_SET_NAME), buf, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def restrict_capabilities(keep: int, last_cap: int) -> None:
    """Leave exactly `keep` (a bit mask) in the bounding, effective and permitted sets, nothing inheritable or
    ambient: what runc does for a container. The bounding set must shrink first (dropping from it needs
    CAP_SETPCAP, still effective at that point); the bounding set is what survives execve for root."""
    for cap in range(last_cap + 1):
        if not keep >> cap & 1:
            prctl(PR_CAPBSET_DROP, cap)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        word = keep >> (32 * i) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = word
        data[i].inheritable = 0
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


# ---------------------------------------------------------------------------------------------------------------
# JSON lines over sockets


def read_request(conn: socket.socket) -> dict[str, Any]:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
    request: dict[str, Any] = json.loads(buf)
    return request


def send(conn: socket.socket, message: dict[str, Any]) -> None:
    try:
        conn.sendall(json.dumps(message).encode() + b"\n")
    except OSError:
        pass  # the test side gave up on this request (timeout): nothing to tell


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def reset_inherited_signals() -> None:
    """A child forked from task-init must not run task-init's SIGCHLD handler nor write to its wakeup pipe."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)


def join_cgroup(cgroup_dir: str | None) -> None:
    if cgroup_dir:
        # In cgroup v1 the pid written is resolved in the writer's pid namespace: our own pid is right.
        with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))


def redirect_stdio(stdout: str, stderr: str | None = None) -> None:
    null = os.open("/dev/null", os.O_RDONLY)
    out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    err = out if stderr is None else os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in {null, out, err}:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# The container root file system


ROOT_BINDS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ROOT_DIRS = (
    ("proc", 0o555),
    ("dev", 0o755),
    ("tmp", 0o1777),
    ("root", 0o700),
    ("var", 0o755),
    ("var/tmp", 0o1777),
    ("var/log", 0o755),
    ("var/lib", 0o755),
    ("var/cache", 0o755),
    ("run", 0o755),
    ("home", 0o755),
    ("opt", 0o755),
    ("srv", 0o755),
    ("mnt", 0o755),
)


def make_rootfs(root: str) -> None:
    """A container root's skeleton. On merged-usr hosts /bin, /lib, ... are symlinks into /usr: the same
    symlinks are made here, and only real directories get a bind mount (enter_rootfs)."""
    os.makedirs(root)
    for path in ROOT_BINDS:
        if os.path.islink(path):
            os.symlink(os.readlink(path), root + path)
        elif os.path.isdir(path):
            os.mkdir(root + path)
    for name, mode in ROOT_DIRS:
        os.mkdir(f"{root}/{name}")
        os.chmod(f"{root}/{name}", mode)  # mkdir obeys the umask; /tmp needs its sticky bit


def enter_rootfs(root: str) -> None:
    """Build the container's mounts inside its (already private) mount namespace, then pivot_root into it.

    The skeleton and the copy of /etc are made by task-init (make_roots); the mounts made here exist in this
    container's namespace and nowhere else."""
    mount(root, root, None, MS_BIND | MS_REC)  # pivot_root needs the new root to be a mount point
    for path in ROOT_BINDS:  # read-only: the container can run the host's binaries, not change them
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        target = root + path
        mount(path, target, None, MS_BIND | MS_REC)
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    # A /proc of the task's pid namespace (we are in it): the container sees every process of the task, as
    # containers of a `pidMode: task` task do.
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # A minimal /dev like Docker's, instead of the host's (which has the disks).
    dev = root + "/dev"
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=755,size=1024k")
    for name, major, minor in (
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ):
        os.mknod(f"{dev}/{name}", 0o20666, os.makedev(major, minor))
        os.chmod(f"{dev}/{name}", 0o666)  # mknod obeys the umask
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ):
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(f"{dev}/shm")
    mount("shm", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=65536k")
    os.mkdir(f"{dev}/pts")
    try:
        mount("devpts", f"{dev}/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
    except OSError:
        pass  # only needed by tests that allocate a pty
    # The runc sequence: pivot onto the new root and lazily detach the old one, so that nothing of the host's
    # mount tree stays reachable from the container.
    os.chdir(root)
    pivot_root(".", ".")
    umount(".", MNT_DETACH)
    os.chdir("/")


# ---------------------------------------------------------------------------------------------------------------
# container-init: the long-lived first process of an application container


class ContainerInit:
    """Forks/execs what the tests ask for, as its own children. One thread per request (subprocess's fork/exec
    is thread-safe); each thread also reaps its child, so no zombies are left. Orphans of the container's
    processes are re-parented to task-init, as in a real task, not to this process."""

    def __init__(self, listener: socket.socket, env: dict[str, str]) -> None:
        self.listener = listener
        self.env = env

    def serve(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                request = read_request(conn)
            except (OSError, ValueError) as exc:
                send(conn, {"error": describe(exc)})
                return
            self.execute(conn, request)

    def execute(self, conn: socket.socket, request: dict[str, Any]) -> None:
        wait = bool(request.get("wait", True))
        stdin = request.get("stdin")
        uid = request.get("uid")
        gid = request.get("gid", uid)
        env = dict(self.env)
        env.update(request.get("env") or {})
        try:
            proc = subprocess.Popen(
                request["argv"],
                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                # Not waited for: output goes to the container's log (our stdout), like `docker logs`.
                stdout=subprocess.PIPE if wait else None,
                stderr=subprocess.PIPE if wait else None,
                cwd=request.get("cwd") or "/",
                env=env,
                user=uid,
                group=gid,
                extra_groups=[] if uid is not None else None,
                close_fds=True,
            )
        except (OSError, subprocess.SubprocessError, ValueError, TypeError) as exc:
            send(conn, {"error": describe(exc)})
            return
        send(conn, {"pid": proc.pid})
        data = None if stdin is None else str(stdin).encode()
        if not wait:
            if proc.stdin is not None:
                try:
                    proc.stdin.write(data or b"")
                    proc.stdin.close()
                except OSError:
                    pass
            proc.wait()
            return
        timed_out = False
        try:
            out, err = proc.communicate(data, timeout=float(request.get("timeout", 10)))
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            out, err = proc.communicate()
        send(
            conn,
            {
                "rc": proc.returncode,
                "stdout": out.decode(errors="replace"),
                "stderr": err.decode(errors="replace"),
                "timeout": timed_out,
            },
        )


def container_main(spec: dict[str, Any], cgroup_dir: str | None, last_cap: int, ready_fd: int) -> None:
    """Body of a freshly forked container-init. Never returns."""
    try:
        reset_inherited_signals()
        os.setsid()
        set_comm("container-init")
        join_cgroup(cgroup_dir)
        redirect_stdio(spec["log"])
        # Bound on the host path before pivot_root: the socket is reachable by the test process, not from inside.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(spec["socket"])
        listener.listen(128)
        unshare(CLONE_NEWNS)
        enter_rootfs(spec["root"])
        if spec["cap_keep"] is not None:
            restrict_capabilities(spec["cap_keep"], last_cap)
        if spec["uid"] != 0:
            os.setgroups([])
            os.setgid(spec["gid"])
            os.setuid(spec["uid"])
        os.environ.clear()
        os.environ.update(spec["env"])
        os.write(ready_fd, b"ok")
        os.close(ready_fd)
    except BaseException as exc:  # whatever it is, task-init must hear about it
        os.write(ready_fd, describe(exc).encode())
        os._exit(1)
    try:
        ContainerInit(listener, dict(spec["env"])).serve()
    finally:
        os._exit(0)


# ---------------------------------------------------------------------------------------------------------------
# task-init: PID 1 of the task's pid namespace


class TaskInit:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        with open("/proc/sys/kernel/cap_last_cap") as f:
            self.last_cap = int(f.read())
        self.cgroup_mount: str | None = None
        self.cgroup_error: str | None = None
        self.statuses: dict[int, int] = {}  # exit codes of everything we reaped, by pid
        self.waiters: dict[int, list[tuple[socket.socket, float]]] = {}
        self.container_pids: dict[str, int] = {}
        self.selector = selectors.DefaultSelector()

    # -- setup ----------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        # A /proc for our pid namespace, in our private mount namespace: the host's /proc is untouched.
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        self.make_roots()
        self.mount_cgroups()
        for container in self.spec["containers"]:
            self.container_pids[container["name"]] = self.start_container(container)

    def make_roots(self) -> None:
        """The containers' root file systems live on a tmpfs mounted only in the task's mount namespace: copying
        /etc there takes milliseconds (the disk can take half a second), and it all vanishes with the task,
        even if the test run is killed."""
        roots = self.spec["roots_dir"]
        mount("tmpfs", roots, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1g")
        copies = []
        for container in self.spec["containers"]:
            make_rootfs(container["root"])
            # A private copy of the host's /etc (cp -a keeps owners, modes, symlinks), one per container.
            copies.append(subprocess.Popen(["cp", "-a", "/etc", container["root"] + "/etc"], stderr=subprocess.PIPE))
        for container, cp in zip(self.spec["containers"], copies, strict=True):
            _, err = cp.communicate()
            if cp.returncode != 0:
                raise RuntimeError(f"copying /etc for {container['name']}: {err.decode(errors='replace')}")
            with open(container["root"] + "/etc/hostname", "w") as f:
                f.write(container["hostname"] + "\n")

    def cgroup_dir(self, docker_id: str) -> str | None:
        if self.cgroup_mount is None:
            return None
        return os.path.join(self.cgroup_mount, self.spec["cgroup"]["parent"].lstrip("/"), docker_id)

    def mount_cgroups(self) -> None:
        """Mount the test process's named cgroup v1 hierarchy (no controllers, so it limits nothing) and make
        /ecs/<task>/<DockerId> for each container: the paths the sidecar reads in /proc/<pid>/cgroup, as on
        Fargate. Mounted only in this mount namespace; the host's hierarchies are never written to. Tasks of
        the same test process share the hierarchy (each its own /ecs/<task>): see remove_cgroups for why."""
        cg = self.spec["cgroup"]
        try:
            os.makedirs(cg["mountpoint"], exist_ok=True)
            mount("cgroup", cg["mountpoint"], "cgroup", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"none,name={cg['name']}")
            self.cgroup_mount = cg["mountpoint"]
            for container in [*self.spec["containers"], self.spec["sidecar"]]:
                os.makedirs(self.cgroup_dir(container["docker_id"]) or "", exist_ok=True)
        except OSError as exc:
            self.cgroup_error = describe(exc)
            if self.cgroup_mount is not None:
                self.remove_cgroups()

    def start_container(self, container: dict[str, Any]) -> int:
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            container_main(container, self.cgroup_dir(container["docker_id"]), self.last_cap, ready_w)
        os.close(ready_w)
        answer = self.read_all(ready_r)
        if answer != b"ok":
            raise RuntimeError(f"container {container['name']} failed to start: {answer.decode(errors='replace')}")
        return pid

    @staticmethod
    def read_all(fd: int) -> bytes:
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        os.close(fd)
        return data

    # -- main loop ------------------------------------------------------------------------------------------------
    def serve(self) -> None:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a Python handler is needed for the wakeup fd to fire
        signal.set_wakeup_fd(wake_w)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.spec["control_socket"])
        listener.listen(128)
        self.selector.register(wake_r, selectors.EVENT_READ, "wake")
        self.selector.register(listener, selectors.EVENT_READ, "accept")
        ready = {"containers": self.container_pids, "cgroup_error": self.cgroup_error}
        os.write(1, json.dumps(ready).encode() + b"\n")
        null = os.open("/dev/null", os.O_WRONLY)
        os.dup2(null, 1)  # the launcher's pipe was only for the ready line
        os.close(null)
        self.reap()  # a container may already have died
        while True:
            for key, _ in self.selector.select(self.next_timeout()):
                if key.data == "wake":
                    try:
                        while os.read(wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    self.reap()
                else:
                    conn, _ = listener.accept()
                    self.handle(conn)
            self.expire_waiters()

    def reap(self) -> None:
        """Like ECS's init: collect every exited child, including orphans re-parented to PID 1."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            self.statuses[pid] = code
            for conn, _ in self.waiters.pop(pid, []):
                send(conn, {"status": code})
                conn.close()

    def next_timeout(self) -> float | None:
        deadlines = [deadline for waiting in self.waiters.values() for _, deadline in waiting]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def expire_waiters(self) -> None:
        now = time.monotonic()
        for pid in list(self.waiters):
            keep = []
            for conn, deadline in self.waiters[pid]:
                if deadline <= now:
                    send(conn, {"status": None})
                    conn.close()
                else:
                    keep.append((conn, deadline))
            if keep:
                self.waiters[pid] = keep
            else:
                del self.waiters[pid]

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            request = read_request(conn)
            op = request["op"]
            if op == "wait":
                pid = int(request["pid"])
                if pid in self.statuses or float(request.get("timeout", 0)) <= 0:
                    send(conn, {"status": self.statuses.get(pid)})
                else:
                    deadline = time.monotonic() + float(request["timeout"])
                    self.waiters.setdefault(pid, []).append((conn, deadline))
                    return  # answered by reap() or expire_waiters()
            elif op == "shutdown":
                self.shutdown(conn)
            else:
                send(conn, getattr(self, f"op_{op}")(request))
        except Exception as exc:  # report it to the test, keep serving
            send(conn, {"error": describe(exc)})
        conn.close()

    # -- operations -----------------------------------------------------------------------------------------------
    def op_ping(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    def op_kill(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            os.kill(int(request["pid"]), int(request["signal"]))
        except ProcessLookupError:
            return {"ok": False}
        return {"ok": True}

    def op_alive(self, request: dict[str, Any]) -> dict[str, Any]:
        """exists: in the process table; alive: running (a zombie waiting for its parent's wait() is not)."""
        try:
            with open(f"/proc/{int(request['pid'])}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return {"alive": False, "exists": False}
        return {"alive": state not in (b"Z", b"X"), "exists": True}

    def op_pids(self, request: dict[str, Any]) -> dict[str, Any]:
        processes = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            comm = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode(errors="replace")
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
            processes.append({"pid": int(entry), "ppid": ppid, "comm": comm})
        return {"processes": processes}

    def op_exec(self, request: dict[str, Any]) -> dict[str, Any]:
        """Start a container whose main process is `argv` itself (the sidecar): forked by PID 1 like runc's
        container processes end up, in its own mount namespace with the host's files (so the venv works) but
        the task's /proc and with `hide` covered by empty read-only tmpfs, Fargate's capabilities, then exec."""
        err_r, err_w = os.pipe2(os.O_CLOEXEC)  # stays empty if execve succeeds (closed by O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                os.close(err_r)
                reset_inherited_signals()
                os.setsid()
                join_cgroup(self.cgroup_dir(request["docker_id"]))
                redirect_stdio(request["stdout"], request["stderr"])
                unshare(CLONE_NEWNS)
                for path in request["hide"]:
                    mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=755")
                if request["cap_keep"] is not None:
                    restrict_capabilities(request["cap_keep"], self.last_cap)
                os.chdir(request["cwd"])
                os.execvpe(request["argv"][0], request["argv"], request["env"])
            except BaseException as exc:  # reported by the parent, never returns into task-init's loop
                os.write(err_w, describe(exc).encode())
            os._exit(127)
        os.close(err_w)
        self.statuses.pop(pid, None)
        error = self.read_all(err_r)
        if error:
            raise RuntimeError(error.decode(errors="replace"))
        return {"pid": pid}

    def shutdown(self, conn: socket.socket) -> None:
        """Kill everything in the namespace, reap it, remove the cgroups, unmount, exit. The mount namespaces
        (and every mount in them) disappear with their last process."""
        removed = self.abort()
        send(conn, {"ok": True, "cgroups_removed": removed})
        conn.close()
        os._exit(0)

    def abort(self) -> bool:
        """Kill and reap every other process of the namespace, then remove the cgroups; True if they are gone."""
        try:
            os.kill(-1, signal.SIGKILL)  # from PID 1: every process of the namespace but itself
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.002)
        return self.remove_cgroups() if self.cgroup_mount is not None else True

    def remove_cgroups(self) -> bool:
        """Remove this task's /ecs/<task> cgroups and unmount. The hierarchy itself stays for the next task: the
        kernel can destroy it only after the removed cgroups are released (tens of milliseconds later, see
        unmount_hierarchy), a wait paid once per test process instead of once per task."""
        assert self.cgroup_mount is not None
        ok = remove_cgroup_tree(self.cgroup_mount + self.spec["cgroup"]["parent"])
        try:
            umount(self.cgroup_mount)
            os.rmdir(self.cgroup_mount)
        except OSError:
            ok = False
        self.cgroup_mount = None
        return ok


def remove_cgroup_tree(top: str) -> bool:
    """rmdir `top` and every cgroup under it, deepest first (only empty cgroups can be removed; the last
    processes may take a moment to leave them after being killed)."""
    deadline = time.monotonic() + 3
    for path, _, _ in list(os.walk(top, topdown=False)):
        while True:
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.005)
    return True


def hierarchy_exists(name: str) -> bool:
    with open("/proc/self/cgroup") as f:  # one line per v1 hierarchy the kernel has
        return f":name={name}:" in f.read()


def unmount_hierarchy(name: str, mountpoint: str) -> bool:
    """Unmount the hierarchy so that the kernel destroys it; True once it is gone.

    The kernel destroys a v1 hierarchy when its last mount goes *if it has no child cgroups then*; but a cgroup
    removed a moment ago still counts until it is released (asynchronously, 40-80 ms later here), and the empty
    hierarchy would then stay forever. So: unmount, wait for the (asynchronous, ~35 ms) destruction, and if it
    does not come, mount and unmount again (the removed cgroups are released by then). Mounting a hierarchy
    being destroyed waits for that and makes a new empty one, which an unmount destroys at once: harmless."""
    umount(mountpoint)
    deadline = time.monotonic() + 5
    while True:
        settle = time.monotonic() + 0.2
        while time.monotonic() < settle:
            time.sleep(0.005)
            if not hierarchy_exists(name):
                return True
        if time.monotonic() > deadline:
            return False
        mount("cgroup", mountpoint, "cgroup", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"none,name={name}")
        umount(mountpoint)


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def read_line(fd: int) -> bytes:
    """One line from fd, unbuffered: what follows must stay in the pipe (its EOF is the lifeline)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data


def launch_task() -> int:
    spec = json.loads(read_line(0))
    unshare(CLONE_NEWNS | CLONE_NEWPID)
    # Nothing mounted from now on may propagate back to the host's mount namespace.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    pid = os.fork()  # the first child in the new pid namespace is its PID 1
    if pid == 0:
        try:
            # The launcher is single-threaded, so its death (see below) is what this parent-death signal means.
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            set_comm("task-init")
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            # PID 1 gets only the signals it has handlers for (from inside the namespace): SIGINT must not
            # be turned into a KeyboardInterrupt by Python's default handler.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            init = TaskInit(spec)
            try:
                init.setup()
                init.serve()
            finally:
                init.abort()
        except BaseException as exc:  # the test process reads this line instead of the ready line
            sys.stderr.write(f"task-init: {describe(exc)}\n")
            sys.stderr.flush()
            os.write(1, json.dumps({"error": describe(exc)}).encode() + b"\n")
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for pytest, which then tears the task down
    os.write(1, json.dumps({"init_host_pid": pid}).encode() + b"\n")  # PID 1 cannot know its host pid
    # The test process keeps our stdin open: EOF means it closed it, or died (even by SIGKILL). Then PID 1 is
    # killed, and with it the whole namespace. (Not a parent-death signal here: that one fires when the
    # *thread* that started us exits, and tests may start tasks from short-lived threads.)
    pidfd = os.pidfd_open(pid)
    while True:
        ready, _, _ = select.select([0, pidfd], [], [])
        if pidfd in ready:
            break
        if not os.read(0, 4096):
            os.kill(pid, signal.SIGKILL)
            break
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) & 0xFF


def cleanup_cgroup(name: str, subtree: str | None) -> int:
    """Mount hierarchy `name` in a throwaway mount namespace and remove the cgroups of `subtree` (one task's
    /ecs/<task>) and unmount, or without subtree remove all its cgroups and the hierarchy itself."""
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mountpoint = tempfile.mkdtemp(prefix="taskenv-cg-")
    try:
        mount("cgroup", mountpoint, "cgroup", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"none,name={name}")
        ok = False
        try:
            if subtree:
                ok = remove_cgroup_tree(mountpoint + "/" + subtree.strip("/"))
            else:
                ok = all([remove_cgroup_tree(entry.path) for entry in os.scandir(mountpoint) if entry.is_dir()])
        finally:
            if subtree:
                umount(mountpoint)
            else:
                ok = unmount_hierarchy(name, mountpoint) and ok
    finally:
        os.rmdir(mountpoint)
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    if argv[1:2] == ["task"]:
        return launch_task()
    if argv[1:2] == ["cleanup-cgroup"] and len(argv) in (3, 4):
        return cleanup_cgroup(argv[2], argv[3] if len(argv) == 4 else None)
    sys.stderr.write(f"usage: {argv[0]} task | cleanup-cgroup NAME [SUBTREE]\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Runs inside the namespace under test: starts the sidecar, spawns the workload, measures.

Invoked by bench/process_capture.py, either directly (host, initial PID
namespace) or under `unshare --pid --fork --mount --mount-proc` (a task).
Prints one JSON object on stdout.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

# Docker's default capabilities plus SYS_PTRACE: what a Fargate task may give.
FARGATE_CAPS = (
    "chown,dac_override,fsetid,fowner,mknod,net_raw,setgid,setuid,setfcap,setpcap,"
    "net_bind_service,sys_chroot,kill,audit_write,sys_ptrace"
)


# Extra RUNTIME_SIDECAR_* settings of the run (e.g. NICE), from the parameters.
SIDECAR_ENV: dict[str, object] = {}


def cpu_seconds(pid: int) -> float:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class Reaper(threading.Thread):
    """Reaps spawned children so the spawner never blocks on them."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                time.sleep(0.005)


def spawn_class(prefix: str, n: int, rate: float, lifetime: float) -> float:
    """Spawn n processes at `rate`/s, each living ~lifetime s; argv[0] carries the marker."""
    env = {"PATH": "/usr/bin:/bin"}
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if lifetime <= 0:
            os.posix_spawn("/bin/true", [f"{prefix}-{i}"], env)
        else:
            os.posix_spawn("/bin/sleep", [f"{prefix}-{i}", str(lifetime)], env)
    return n / (time.perf_counter() - t0)


def start_sidecar(events: str, source: str, caps: bool, cpu: int | None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "sidecar", "run", "--events-out", events, "--process-source", source]
    if caps:
        cmd = ["setpriv", f"--bounding-set=-all,+{FARGATE_CAPS.replace(',', ',+')}", "--inh-caps=-all", *cmd]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    env = {**os.environ, "RUNTIME_SIDECAR_LOG_LEVEL": "WARNING", "RUNTIME_SIDECAR_STATS_INTERVAL_S": "3600",
           **{k: str(v) for k, v in SIDECAR_ENV.items()}}  # fmt: skip
    env.pop("ECS_CONTAINER_METADATA_URI_V4", None)
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 20
    while time.time() < deadline:  # ready once it has written its first events (initial sweep)
        if os.path.exists(events) and os.path.getsize(events) > 0:
            break
        time.sleep(0.05)
    time.sleep(1.0)
    return proc


def sidecar_pid(proc: subprocess.Popen[bytes]) -> int:
    """The python process (setpriv/taskset exec into it, so it is the same pid)."""
    return proc.pid


def stop_sidecar(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def capture(args: dict[str, Any]) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="bench-")
    events = f"{tmp}/events.jsonl"
    source = str(args["source"])
    proc = start_sidecar(events, source, bool(args["caps"]), None)
    pid = sidecar_pid(proc)
    reaper = Reaper()
    reaper.start()
    out: dict[str, Any] = {"source": source}
    idle_s = float(args["idle_seconds"])
    c0 = cpu_seconds(pid)
    time.sleep(idle_s)
    out["idle_cpu_pct"] = round((cpu_seconds(pid) - c0) / idle_s * 100, 2)
    classes = []
    for rate in args["rates"]:
        for life in args["lifetimes"]:
            prefix = f"bm{rate}x{int(life * 1000)}ms"
            c0, t0 = cpu_seconds(pid), time.perf_counter()
            achieved = spawn_class(prefix, int(args["per_class"]), float(rate), float(life))
            time.sleep(max(life, 0.05) + 0.3)
            wall = time.perf_counter() - t0
            load_cpu = round((cpu_seconds(pid) - c0) / wall * 100, 1)
            classes.append(
                {"rate": rate, "lifetime_ms": life * 1000, "prefix": prefix, "achieved_rate": round(achieved),
                 "load_cpu_pct": load_cpu}
            )  # fmt: skip
    time.sleep(1.0)
    out["peak_rss_mb"] = round(status_kb(pid, "VmHWM") / 1024, 1)
    out["exit_code"] = stop_sidecar(proc)
    reaper.stop = True
    seen: dict[str, int] = {}
    with open(events, "rb") as f:
        for line in f:
            ev = orjson.loads(line)
            if ev.get("kind") != "process.exec":
                continue
            cmd = (ev.get("process") or {}).get("commandLine") or ""
            if cmd.startswith("bm"):
                seen[cmd.split()[0]] = 1
    for c in classes:
        n = int(args["per_class"])
        got = sum(1 for i in range(n) if f"{c['prefix']}-{i}" in seen)
        c["caught_pct"] = round(got / n * 100, 1)
    out["classes"] = classes
    return out


def workload_cost(args: dict[str, Any]) -> dict[str, Any]:
    """Time a process-creation loop with and without the sidecar, alternating, both on one CPU."""
    cpu = 0
    os.sched_setaffinity(0, {cpu})
    n = int(args["loop_spawns"])
    rounds = int(args["rounds"])

    def loop() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            pid = os.posix_spawn("/bin/true", ["true"], {})
            os.waitpid(pid, 0)
        return time.perf_counter() - t0

    loop()  # warm caches
    base, withs = [], []
    tmp = tempfile.mkdtemp(prefix="bench-cost-")
    for r in range(rounds):
        base.append(loop())
        proc = start_sidecar(f"{tmp}/ev{r}.jsonl", str(args["source"]), bool(args["caps"]), cpu)
        withs.append(loop())
        stop_sidecar(proc)
    b, w = statistics.median(base), statistics.median(withs)
    return {"source": args["source"], "spawns": n, "rounds": rounds, "pinned_cpu": cpu,
            "without_s": round(b, 3), "with_s": round(w, 3), "slowdown_pct": round((w / b - 1) * 100, 1)}  # fmt: skip


if __name__ == "__main__":
    params = json.loads(sys.argv[2])
    SIDECAR_ENV.update(params.get("env", {}))
    result = capture(params) if sys.argv[1] == "capture" else workload_cost(params)
    sys.stdout.write(json.dumps(result) + "\n")

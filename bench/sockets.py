"""Socket source benchmark: cost of a poll by socket count, and connection events per second it follows.

    .venv/bin/python -m bench.sockets [--quick]

Prints markdown and saves JSON under bench/results/. Runs as root in the
host's network namespace; the sockets measured are staged by child
processes over loopback (so each connection is two sockets here, both ends).

- poll cost: a child holds N sockets (a listener and N/2 connections to
  itself); we time the first poll (everything new: every socket's owner is
  read), polls with nothing new, and polls that each find 10 new connections
  of that child (its N fd links are read again to find their owner).
- following connections: a child opens connections at a given rate, each
  held for a given time, while the collector runs at its default 200 ms.
  Connections held longer than a poll are seen by the dumps and attributed;
  shorter ones come from the kernel's destroy messages, without a process.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from typing import Any

from bench import main_for
from collectors.events import RuntimeEvent
from collectors.process import ProcessCollector
from collectors.sockets import SockDiagCollector

HOLDER = r"""
import os, resource, socket, sys
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
n = int(sys.argv[1])
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(4096)
port = ls.getsockname()[1]
held = []
def more(k):
    for _ in range(k):
        c = socket.create_connection(("127.0.0.1", port)); a, _ = ls.accept(); held.extend((c, a))
more((n - 1) // 2)
print(port, flush=True)
for line in sys.stdin:
    more(int(line))
    print("ok", flush=True)
"""

SINK = r"""
import selectors, socket, sys
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(4096); ls.setblocking(False)
print(ls.getsockname()[1], flush=True)
sel = selectors.DefaultSelector(); sel.register(ls, selectors.EVENT_READ); sel.register(sys.stdin, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj is sys.stdin:
            raise SystemExit
        if key.fileobj is ls:
            try:
                while True:
                    c, _ = ls.accept(); c.setblocking(False); sel.register(c, selectors.EVENT_READ)
            except BlockingIOError:
                pass
        else:
            try:
                data = key.fileobj.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(key.fileobj); key.fileobj.close()
"""

GENERATOR = r"""
import collections, json, resource, socket, sys, time
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, rate, hold, duration = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
sys.stdin.readline()  # go
open_ = collections.deque(); ports = []
start = time.monotonic(); made = 0
while True:
    now = time.monotonic()
    if now - start >= duration:
        break
    while made < (now - start) * rate:
        s = socket.create_connection(("127.0.0.1", port)); made += 1
        ports.append(s.getsockname()[1])
        if hold <= 0:
            s.close()
        else:
            open_.append((now + hold, s))
    while open_ and open_[0][0] <= now:
        open_.popleft()[1].close()
    time.sleep(0.0005)
generated = time.monotonic() - start
for due, s in open_:  # each lives its full time, the last ones too
    time.sleep(max(0.0, due - time.monotonic()))
    s.close()
print(json.dumps({"made": made, "seconds": generated, "ports": ports}), flush=True)
"""


def _spawn(code: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def _readline(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    return p.stdout.readline().strip()


def _end(p: subprocess.Popen[str]) -> None:
    if p.stdin is not None:
        try:
            p.stdin.close()
        except BrokenPipeError:
            pass
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def poll_cost(n_sockets: int, idle_polls: int, rounds: int) -> dict[str, Any]:
    holder = _spawn(HOLDER, n_sockets)
    try:
        _readline(holder)
        processes = ProcessCollector(lambda _e: None, hash_executables=False)
        processes.sweep()
        # memory: a collector whose events go nowhere, its own allocations only
        tracemalloc.start()
        probe_collector = SockDiagCollector(lambda _e: None, processes.table, destroy_events=False, stdio_checks=False)
        probe_collector.poll_once()
        tracked_bytes = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        probe_collector.close()
        del probe_collector
        events: list[RuntimeEvent] = []
        collector = SockDiagCollector(events.append, processes.table, destroy_events=False)
        t0 = time.perf_counter()
        collector.poll_once()
        first = (time.perf_counter() - t0) * 1000
        tracked = collector.snapshot()["sockets_tracked"]
        owned = sum(1 for e in events if e.process is not None and e.process.pid == holder.pid)
        for _ in range(20):  # let the stdio scan and the rest settle
            collector.poll_once()
        idle = []
        for _ in range(idle_polls):
            t = time.perf_counter()
            collector.poll_once()
            idle.append((time.perf_counter() - t) * 1000)
        busy = []
        assert holder.stdin is not None
        for _ in range(rounds):
            holder.stdin.write("5\n")  # 5 connections: 10 new sockets, all the holder's
            holder.stdin.flush()
            _readline(holder)
            before = len(events)
            t = time.perf_counter()
            collector.poll_once()
            busy.append((time.perf_counter() - t) * 1000)
            assert all(e.process is not None for e in events[before:]), "new sockets left unattributed"
        snap = collector.snapshot()
        collector.close()
        return {
            "sockets": tracked,
            "holder_sockets_attributed": owned,
            "first_poll_ms": round(first, 2),
            "idle_poll_ms_median": round(statistics.median(idle), 3),
            "idle_poll_ms_p95": round(sorted(idle)[int(len(idle) * 0.95) - 1], 3),
            "poll_with_10_new_ms_median": round(statistics.median(busy), 3),
            "collector_bytes_per_socket": round(tracked_bytes / max(tracked, 1)),
            "fd_reads": snap.get("fd_reads", 0),
        }
    finally:
        _end(holder)


async def _follow(rate: float, hold: float, duration: float) -> dict[str, Any]:
    sink = _spawn(SINK)
    port = int(_readline(sink))
    gen = _spawn(GENERATOR, port, rate, hold, duration)
    processes = ProcessCollector(lambda _e: None, hash_executables=False)
    processes.sweep()
    processes.capture(gen.pid)
    processes.capture(sink.pid)
    events: list[RuntimeEvent] = []
    collector = SockDiagCollector(events.append, processes.table)
    task = asyncio.get_running_loop().create_task(collector.run())
    try:
        await asyncio.sleep(0.5)
        cpu0, wall0 = time.process_time(), time.monotonic()
        assert gen.stdin is not None
        gen.stdin.write("go\n")
        gen.stdin.flush()
        line = await asyncio.to_thread(_readline, gen)
        await asyncio.sleep(max(0.5, hold) + 0.5)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    finally:
        collector.stop()
        await task
        _end(gen)
        _end(sink)
    result = json.loads(line)
    # Counted by event, not by port: loopback reuses ports straight from TIME_WAIT (tcp_tw_reuse=2).
    ports = set(result["ports"])
    mine = [
        e
        for e in events
        if e.kind == "net.connect" and e.data and e.data["remotePort"] == port and e.data["localPort"] in ports
    ]
    polled = sum(1 for e in mine if e.data and not e.data["shortLived"])
    attributed = sum(1 for e in mine if e.data and e.process is not None and e.process.pid == gen.pid)
    short = sum(1 for e in mine if e.data and e.data["shortLived"])
    made = result["made"]
    snap = collector.snapshot()
    return {
        "target_rate": rate,
        "hold_ms": hold * 1000,
        "achieved_rate": round(made / result["seconds"]),
        "connections": made,
        "seen_pct": round(100 * (polled + short) / made, 1),
        "seen_by_poll_attributed_pct": round(100 * attributed / made, 1),
        "seen_by_destroy_pct": round(100 * short / made, 1),
        "events_per_s": round(len(events) / wall),
        "collector_cpu_pct": round(100 * cpu / wall, 1),
        "avg_poll_ms": snap["avg_poll_ms"],
        "max_poll_ms": snap["max_poll_ms"],
        "destroy_overruns": snap.get("destroy_overruns", 0),
        "short_lived_dropped": snap.get("short_lived_dropped", 0),
    }


def run(quick: bool = False) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    out: dict[str, Any] = {"cpus": os.cpu_count(), "kernel": os.uname().release}
    out["poll_cost"] = [
        poll_cost(n, idle_polls=100 if quick else 500, rounds=10 if quick else 40) for n in (100, 1000, 5000)
    ]
    duration = 3.0 if quick else 8.0
    cases = [(100, 0.3), (500, 0.3), (2000, 0.3), (500, 0.0), (2000, 0.0)]
    out["follow"] = [asyncio.run(_follow(rate, hold, duration)) for rate, hold in cases]
    return out


def report(results: dict[str, Any]) -> str:
    lines = [
        f"{results['cpus']} CPUs, kernel {results['kernel']}",
        "",
        "| sockets | first poll (all new, owners read) | poll, nothing new (median / p95) | poll with 10 new sockets "
        "of a process holding all N | collector memory per socket |",
        "|---|---|---|---|---|",
    ]
    for r in results["poll_cost"]:
        lines.append(
            f"| {r['sockets']} | {r['first_poll_ms']} ms | {r['idle_poll_ms_median']} / {r['idle_poll_ms_p95']} ms "
            f"| {r['poll_with_10_new_ms_median']} ms | {r['collector_bytes_per_socket']} B |"
        )
    lines += [
        "",
        "| connections/s (achieved) | held | seen | by a poll, attributed | by destroy message only | events/s "
        "| collector CPU | avg / max poll |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["follow"]:
        lines.append(
            f"| {r['target_rate']} ({r['achieved_rate']}) | {r['hold_ms']:.0f} ms | {r['seen_pct']}% "
            f"| {r['seen_by_poll_attributed_pct']}% | {r['seen_by_destroy_pct']}% | {r['events_per_s']} "
            f"| {r['collector_cpu_pct']}% of a core | {r['avg_poll_ms']} / {r['max_poll_ms']} ms |"
        )
    return "\n".join(lines)


def main() -> None:
    main_for("sockets", "socket source", run, report)


if __name__ == "__main__":
    main()

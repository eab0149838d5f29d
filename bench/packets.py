"""Packet capture benchmark: DNS throughput without kernel drops, CPU per 1000 packets, SYN capture of short
connections.

    python -m bench.packets [--quick]

Two network namespaces joined by a veth pair: "task", where the collector runs (``python -m collectors.packets``,
as the sidecar would inside a Fargate task), and "net". Senders are separate processes, so the collector's CPU is
its own (read from /proc/<pid>/stat). On a 2-core machine the sender, the kernel and the collector share the
cores: the figures are a floor, not a ceiling. Prints markdown, asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").is_dir() else sys.executable
TASK_IP, NET_IP, SINK_IP = "10.78.0.1", "10.78.0.2", "10.78.0.3"


# -- helpers run inside the namespaces ------------------------------------------------------------------------
def _flood(spec: dict[str, Any]) -> None:
    """UDP payloads round-robin to (addr, port) from sport, at `rate` per second (None: as fast as possible)."""
    wires = [bytearray.fromhex(h) for h in spec["hex"]]
    # unique: every message differs (a counter written over the first label), so no cache helps the collector
    unique = spec.get("unique", False)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if spec.get("bind"):
        s.bind((spec["bind"], 53))
    s.setblocking(False)
    dest, rate, n = (spec["addr"], spec["port"]), spec.get("rate"), len(wires)
    sent = 0
    t0 = time.monotonic()
    end = t0 + spec["seconds"]
    while (now := time.monotonic()) < end:
        burst = 256
        if rate is not None:
            burst = min(int((now - t0) * rate) - sent, 256)
            if burst <= 0:
                time.sleep(0.0002)
                continue
        for _ in range(burst):
            wire = wires[sent % n]
            if unique:
                wire[13:21] = b"%08x" % sent
            try:
                s.sendto(wire, dest)
            except BlockingIOError:
                break
            sent += 1
    print(json.dumps({"sent": sent, "seconds": time.monotonic() - t0}), flush=True)


def _server(spec: dict[str, Any]) -> None:
    """Accept and close at once: the shortest connection a client can make."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((spec["addr"], spec["port"]))
    srv.listen(4096)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        conn.close()


def _connector(spec: dict[str, Any]) -> None:
    """`count` connections at `rate`/s, each closed right after connect; reports their lifetimes."""
    lifetimes: list[float] = []
    ports: list[int] = []
    t0 = time.monotonic()
    for i in range(spec["count"]):
        delay = t0 + i / spec["rate"] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        start = time.perf_counter()
        with contextlib.suppress(ConnectionRefusedError):
            s.connect((spec["addr"], spec["port"]))
        ports.append(s.getsockname()[1])
        s.close()
        lifetimes.append((time.perf_counter() - start) * 1000)
    lifetimes.sort()
    print(json.dumps({"ports": ports, "p50_ms": lifetimes[len(lifetimes) // 2], "max_ms": lifetimes[-1]}))


# -- the lab --------------------------------------------------------------------------------------------------
def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Lab:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.task, self.net = f"pktb{tag}t", f"pktb{tag}n"
        self.procs: list[subprocess.Popen[str]] = []

    def __enter__(self) -> Lab:
        for ns in (self.task, self.net):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", "veth0", "netns", self.task, "type", "veth", "peer", "name", "veth1", "netns", self.net)
        _ip("-n", self.task, "addr", "add", f"{TASK_IP}/24", "dev", "veth0")
        for a in (NET_IP, SINK_IP):
            _ip("-n", self.net, "addr", "add", f"{a}/24", "dev", "veth1")
        for ns, dev in ((self.task, "veth0"), (self.net, "veth1")):
            _ip("-n", ns, "link", "set", dev, "up")
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(Exception):
                p.communicate(timeout=5)
        for ns in (self.task, self.net):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def popen(self, ns: str, argv: list[str], **kw: Any) -> subprocess.Popen[str]:
        p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], cwd=REPO, text=True, **kw)
        self.procs.append(p)
        return p

    def helper(self, ns: str, mode: str, spec: dict[str, Any]) -> dict[str, Any]:
        p = self.popen(ns, [PYTHON, "-m", "bench.packets", mode, json.dumps(spec)], stdout=subprocess.PIPE)
        out, _ = p.communicate(timeout=600)
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result


class Collector:
    def __init__(self, lab: Lab, events: Path, cpu_budget: float, *, fargate_caps: bool = False) -> None:
        self.events = events
        argv = [PYTHON, "-m", "collectors.packets", "--commands", "--cpu-budget", str(cpu_budget),
                "--events-out", str(events)]  # fmt: skip
        if fargate_caps:
            # No NET_ADMIN, as in a Fargate task: SO_RCVBUFFORCE fails and net.core.rmem_max caps the buffer. The
            # sysctl is not per namespace (and this host's may be raised): ask for the kernel default, 212992.
            argv = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", *argv, "--rcvbuf", "212992"]
        self.proc = lab.popen(lab.task, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        first = self._line()
        self.pid, self.rcvbuf = first["pid"], first["rcvbuf"]

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        if not ready:
            raise RuntimeError("collector does not answer")
        out: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return out

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return self._line()

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        self.proc.wait(20)


def _wait_idle(col: Collector, limit: float = 60.0) -> dict[str, Any]:
    """Stats once every packet the filter passed has been read or dropped by the kernel (tp_packets counts both)."""
    end = time.monotonic() + limit
    while True:
        st = col.stats()
        if st["packets"] + st["kernel_drops"] >= st["kernel_packets"] or time.monotonic() > end:
            return st
        time.sleep(0.1)


def _wires(kind: str) -> list[str]:
    import dns.message
    import dns.rrset

    # the sender writes a counter over the first label when names are to be distinct
    name = "00000000.bench.test"
    q = dns.message.make_query(name, "A")
    if kind == "query":
        return [q.to_wire().hex()]
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(name + ".", 60, "IN", "CNAME", "edge.cdn.test."))
    r.answer.append(dns.rrset.from_text("edge.cdn.test.", 60, "IN", "A", "192.0.2.1", "192.0.2.2"))
    return [r.to_wire().hex()]


def dns_rates(
    lab: Lab,
    tmp: Path,
    *,
    kind: str,
    distinct: bool,
    rates: list[int | None],
    seconds: float,
    budget: float,
    fargate_caps: bool = False,
) -> list[dict[str, Any]]:
    wires = _wires(kind)
    col = Collector(lab, tmp / f"ev-{kind}-{distinct}-{budget}.jsonl", budget, fargate_caps=fargate_caps)
    key = "dns_queries" if kind == "query" else "dns_responses"
    rows = []
    try:
        for rate in rates:
            before = col.stats()
            cpu0, t0 = col.cpu(), time.monotonic()
            if kind == "query":  # a process of the task floods a resolver (nobody listens: no answers)
                spec = {"addr": SINK_IP, "port": 53, "rate": rate, "seconds": seconds, "hex": wires, "unique": distinct}
                res = lab.helper(lab.task, "flood", spec)
            else:  # answers flood into the task from port 53
                spec = {"addr": TASK_IP, "port": 40000, "bind": SINK_IP, "rate": rate, "seconds": seconds,
                        "hex": wires, "unique": distinct}  # fmt: skip
                res = lab.helper(lab.net, "flood", spec)
            after = _wait_idle(col)
            # the window: the flood and the time to work through what it left queued
            cpu, wall = col.cpu() - cpu0, time.monotonic() - t0
            handled = after[key] - before[key]
            drops = after["kernel_drops"] - before["kernel_drops"]
            rows.append({
                "kind": kind, "distinct": distinct, "budget": budget, "asked_rate": rate, "rcvbuf": col.rcvbuf,
                "sent_rate": round(res["sent"] / res["seconds"]), "sent": res["sent"], "handled": handled,
                "kernel_drops": drops, "cpu_pct": round(100 * cpu / wall, 1),
                "cpu_ms_per_1000": round(1000 * cpu / max(handled, 1) * 1000, 2),
                "budget_pauses": after["budget_pauses"] - before["budget_pauses"],
            })  # fmt: skip
            time.sleep(0.3)
    finally:
        col.stop()
    return rows


def syn_capture(lab: Lab, tmp: Path, *, rate: int, count: int, port: int, budget: float) -> dict[str, Any]:
    events = tmp / f"ev-syn-{rate}-{port}-{budget}.jsonl"
    col = Collector(lab, events, budget)
    try:
        res = lab.helper(lab.task, "connector", {"addr": NET_IP, "port": port, "rate": rate, "count": count})
        _wait_idle(col)
        time.sleep(0.2)
    finally:
        col.stop()
    ports = set(res["ports"])
    seen = set()
    for line in events.read_text().splitlines():
        ev = json.loads(line)
        if ev["kind"] == "net.syn" and ev["remotePort"] == port:
            seen.add(ev["localPort"])
    return {"rate": rate, "count": count, "port": port, "budget": budget, "seen": len(seen & ports),
            "p50_ms": round(res["p50_ms"], 3), "max_ms": round(res["max_ms"], 2)}  # fmt: skip


def run(quick: bool) -> dict[str, Any]:
    seconds = 1.5 if quick else 3.0
    rates: list[int | None] = [2000, 10000, 20000, 40000, None]
    if not quick:
        rates = [1000, 2000, 5000, 10000, 20000, 30000, 40000, 60000, None]
    tmp = Path(f"/tmp/bench-packets-{os.getpid()}")
    tmp.mkdir(exist_ok=True)
    out: dict[str, Any] = {"dns": [], "syn": []}
    try:
        with Lab() as lab:
            argv = [PYTHON, "-m", "bench.packets", "server", json.dumps({"addr": NET_IP, "port": 8080})]
            server = lab.popen(lab.net, argv, stdout=subprocess.PIPE)
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            for kind, distinct in (("query", True), ("query", False), ("response", True)):
                out["dns"] += dns_rates(
                    lab, tmp, kind=kind, distinct=distinct, rates=rates, seconds=seconds, budget=1.0
                )
            # the default budget: a flood costs a quarter of a core, the rest is dropped by the kernel and counted
            out["dns"] += dns_rates(lab, tmp, kind="query", distinct=True, rates=[20000, None], seconds=seconds,
                                    budget=0.25)  # fmt: skip
            out["dns"] += dns_rates(lab, tmp, kind="query", distinct=True, rates=[2000, 5000, 10000, 20000],
                                    seconds=seconds, budget=1.0, fargate_caps=True)  # fmt: skip
            count = 500 if quick else 2000
            for rate, port in ((200, 8080), (1000, 8080), (1000, 9)):
                out["syn"].append(syn_capture(lab, tmp, rate=rate, count=count, port=port, budget=0.25))
    finally:
        for f in tmp.glob("*"):
            f.unlink()
        tmp.rmdir()
    return out


def report(results: dict[str, Any]) -> str:
    lines = [
        "| DNS packets | names | budget | rcvbuf | asked/s | sent/s | decoded | kernel drops | collector CPU"
        " | CPU ms per 1000 decoded |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["dns"]:
        lines.append(
            f"| {r['kind']} | {'distinct' if r['distinct'] else 'repeated'} | {r['budget']:g} | "
            f"{r['rcvbuf'] // 1024} KiB | "
            f"{r['asked_rate'] or 'max'} | {r['sent_rate']} | {r['handled']} | {r['kernel_drops']} | "
            f"{r['cpu_pct']}% | {r['cpu_ms_per_1000']} |"
        )
    lines += ["", "| short TCP connections | rate/s | lifetime p50 (max) | SYNs seen / made |", "|---|---|---|---|"]
    for r in results["syn"]:
        what = "to an open port" if r["port"] == 8080 else "to a closed port (RST)"
        lines.append(f"| {what} | {r['rate']} | {r['p50_ms']} ms ({r['max_ms']} ms) | {r['seen']}/{r['count']} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] in ("flood", "server", "connector"):
        {"flood": _flood, "server": _server, "connector": _connector}[sys.argv[1]](json.loads(sys.argv[2]))
        return
    p = argparse.ArgumentParser(prog="python -m bench.packets")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results = run(args.quick)
    print(f"# packet capture ({started}, {'quick' if args.quick else 'full'}, {os.cpu_count()} CPUs)\n")
    print(report(results))


if __name__ == "__main__":
    main()

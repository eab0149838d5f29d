"""Delivery benchmark: malicious action -> finding returned by get_findings, the sidecar under 100 findings/s,
the spool's throughput, and an exec storm.

    .venv/bin/python -m bench.delivery [--quick]      (or: python -m bench delivery)

A real backend (SQLite, in a thread of this process) and the real sidecar (a child process watching this host,
default settings: batches closed at 100 findings or 2 s) talk over HTTP on loopback.

- latency: one at a time, a freshly copied tool (`nmap`, a copy of /bin/sleep at a new path, so each is a new
  finding) is run; the clock starts at its exec and stops when boto3's get_findings returns its finding (polled
  every 50 ms through list_findings with an executablePath criterion);
- load: 100 new findings a second for 30 s (50 ms runs of hard links to /bin/sleep named like tools, each path a
  new finding); the sidecar's CPU (utime+stime from /proc) and peak RSS (VmHWM), and what reached the backend;
- spool: put, then peek+ack, of 20,000 findings of 2 KB on this disk;
- storm: as many short processes as the machine spawns for 60 s (30 s quick) from 4 workers, then one tool run
  after it: the sidecar's peak RSS, what it reports missed, and whether the after-storm finding still arrives.
"""

from __future__ import annotations

import os
import shutil
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

from bench import main_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from backend_env import BackendThread

from backend import tenancy
from sidecar.spool import Spool

ACCOUNT, REGION = "000000000000", "local"  # the sidecar's identity when it watches a host
DETECTOR = tenancy.detector_id_for(ACCOUNT, REGION)
SIDECAR = [sys.executable, "-m", "sidecar", "run"]


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.backend = BackendThread(f"sqlite:///{tmp / 'b.db'}").start()
        token = self.backend.token(account=ACCOUNT, cluster="local", region=REGION)
        self.gd = self.backend.guardduty(account=ACCOUNT, region=REGION)
        env = {**os.environ, "RUNTIME_SIDECAR_TOKEN": token, "RUNTIME_SIDECAR_STATS_INTERVAL_S": "5"}
        self.log = open(tmp / "sidecar.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*SIDECAR, "--collector-url", self.backend.url, "--state-dir", str(tmp / "state")],
            env=env, stdout=subprocess.DEVNULL, stderr=self.log,
        )  # fmt: skip
        self._wait_started()

    def _wait_started(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if b"remote configuration applied" in (self.tmp / "sidecar.log").read_bytes():
                time.sleep(2)  # its first /proc pass
                return
            time.sleep(0.2)
        raise RuntimeError("the sidecar did not start: " + (self.tmp / "sidecar.log").read_text()[-2000:])

    def find(self, exe: str) -> list[str]:
        crit = {"Criterion": {"service.runtimeDetails.process.executablePath": {"Eq": [exe]}}}
        return list(self.gd.list_findings(DetectorId=DETECTOR, FindingCriteria=crit)["FindingIds"])

    def stats_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in (self.tmp / "sidecar.log").read_bytes().splitlines():
            if b'"msg":"stats"' in line:
                out.append(orjson.loads(line))
        return out

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        self.backend.stop()


def _latency(rig: Rig, n: int) -> dict[str, Any]:
    lat = []
    for i in range(n):
        d = rig.tmp / "lat" / str(i)
        d.mkdir(parents=True)
        exe = d / "nmap"
        shutil.copy("/bin/sleep", exe)
        t0 = time.time()
        subprocess.run([str(exe), "0.05"], check=True)
        while not rig.find(str(exe)):
            if time.time() - t0 > 30:
                raise RuntimeError(f"no finding for {exe} after 30 s")
            time.sleep(0.05)
        (fid,) = rig.find(str(exe))
        rig.gd.get_findings(DetectorId=DETECTOR, FindingIds=[fid])
        lat.append(time.time() - t0)
    lat.sort()
    return {
        "n": n,
        "p50_s": round(statistics.median(lat), 2),
        "p99_s": round(lat[max(0, int(len(lat) * 0.99) - 1)], 2),
        "max_s": round(lat[-1], 2),
    }


def _load(rig: Rig, rate: int, seconds: int) -> dict[str, Any]:
    total = rate * seconds
    base = rig.tmp / "load"
    names = ["nmap", "masscan", "hydra", "sqlmap", "nikto"]
    paths = []
    for i in range(total):
        d = base / str(i)
        d.mkdir(parents=True)
        p = d / names[i % len(names)]
        if Path("/bin/sleep").stat().st_dev == d.stat().st_dev:
            os.link("/bin/sleep", p)
        else:
            shutil.copy("/bin/sleep", p)
        paths.append(str(p))
    pid = rig.proc.pid
    cpu0, t0 = _proc_cpu_s(pid), time.monotonic()
    running = []
    for i, path in enumerate(paths):
        # 50 ms lives: this measures shipping, not the capture of 1 ms processes (bench process does that)
        running.append(subprocess.Popen([path, "0.05"]))
        ahead = t0 + (i + 1) / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        running = [r for r in running if r.poll() is None]
    for r in running:
        r.wait()
    elapsed = time.monotonic() - t0
    cpu = _proc_cpu_s(pid) - cpu0
    deadline = time.monotonic() + 60
    stored: set[str] = set()
    while time.monotonic() < deadline:
        stored = {
            i for pg in rig.gd.get_paginator("list_findings").paginate(DetectorId=DETECTOR) for i in pg["FindingIds"]
        }
        if len(stored) >= total:
            break
        time.sleep(1)
    return {
        "rate_per_s": round(total / elapsed),
        "seconds": round(elapsed, 1),
        "sidecar_cpu_pct": round(100 * cpu / elapsed, 1),
        "sidecar_rss_mb": round(_status_kb(pid, "VmRSS") / 1024, 1),
        "sidecar_peak_rss_mb": round(_status_kb(pid, "VmHWM") / 1024, 1),
        "findings_made": total,
        "findings_in_backend": len(stored),
    }


def _spool(tmp: Path, n: int) -> dict[str, Any]:
    data = orjson.dumps({"pad": "x" * 1900})
    spool = Spool(tmp / "spool-bench", max_findings=n + 1, max_bytes=n * 4096)
    t0 = time.perf_counter()
    for i in range(n):
        spool.put(f"f{i}", 5.0, data)
    spool.sync()
    put_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    while len(spool):
        items = spool.peek(100, 1 << 20)
        spool.ack([it.seq for it in items])
    read_s = time.perf_counter() - t0
    spool.close()
    mb = n * len(data) / 1e6
    return {
        "findings": n,
        "put_per_s": round(n / put_s),
        "put_mb_per_s": round(mb / put_s, 1),
        "read_ack_per_s": round(n / read_s),
    }


def _storm(rig: Rig, seconds: int) -> dict[str, Any]:
    pid = rig.proc.pid
    stop = time.monotonic() + seconds
    spawned = [0] * 4

    def worker(k: int) -> None:
        while time.monotonic() < stop:
            subprocess.Popen(["/bin/true"]).wait()
            spawned[k] += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    peak = 0
    cpu0, t0 = _proc_cpu_s(pid), time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, _status_kb(pid, "VmRSS"))
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    cpu = _proc_cpu_s(pid) - cpu0
    # after the storm: is it still detecting and delivering?
    d = rig.tmp / "after-storm"
    d.mkdir()
    shutil.copy("/bin/sleep", d / "nmap")
    after = time.time()
    subprocess.run([str(d / "nmap"), "0.05"], check=True)
    arrived = None
    while time.time() - after < 60:
        if rig.find(str(d / "nmap")):
            arrived = round(time.time() - after, 2)
            break
        time.sleep(0.1)
    time.sleep(6)  # a stats line after the storm
    last = rig.stats_lines()[-1]["stats"]
    procs = last.get("processes", {})
    return {
        "seconds": round(elapsed, 1),
        "processes_per_s": round(sum(spawned) / elapsed),
        "sidecar_cpu_pct": round(100 * cpu / elapsed, 1),
        "sidecar_peak_rss_mb": round(max(peak, _status_kb(pid, "VmHWM")) / 1024, 1),
        "reported": {k: v for k, v in procs.items() if any(w in k for w in ("miss", "lost", "drop", "overflow"))},
        "after_storm_finding_s": arrived,
    }


def run(quick: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-delivery-", dir="/tmp") as tmp:
        out["spool"] = _spool(Path(tmp), 5_000 if quick else 20_000)
        rig = Rig(Path(tmp))
        try:
            out["latency"] = _latency(rig, 10 if quick else 40)
            out["load"] = _load(rig, 100, 10 if quick else 30)
            out["storm"] = _storm(rig, 20 if quick else 60)
        finally:
            rig.close()
    return out


def report(r: dict[str, Any]) -> str:
    lat, load, sp, st = r["latency"], r["load"], r["spool"], r["storm"]
    return "\n".join(
        [
            "| measure | figure |",
            "|---|---|",
            f"| action → `get_findings` ({lat['n']} tool runs, default 2 s batching) | p50 {lat['p50_s']} s, "
            f"p99 {lat['p99_s']} s, max {lat['max_s']} s |",
            f"| sidecar at {load['rate_per_s']} new findings/s for {load['seconds']} s | CPU {load['sidecar_cpu_pct']}%"
            f" of a core, RSS {load['sidecar_rss_mb']} MB (peak {load['sidecar_peak_rss_mb']} MB); "
            f"{load['findings_in_backend']:,} of {load['findings_made']:,} findings in the backend |",
            f"| spool, {sp['findings']:,} findings of 2 KB | put {sp['put_per_s']:,}/s ({sp['put_mb_per_s']} MB/s), "
            f"read+ack {sp['read_ack_per_s']:,}/s |",
            f"| exec storm, {st['processes_per_s']:,} processes/s for {st['seconds']} s | CPU "
            f"{st['sidecar_cpu_pct']}%, peak RSS {st['sidecar_peak_rss_mb']} MB, reported {st['reported']}; "
            f"a tool run after it: finding in {st['after_storm_finding_s']} s |",
        ]
    )


if __name__ == "__main__":
    main_for("delivery", "delivery: latency, load, spool, storm", run, report)

"""PID wrap-around and reuse, with the real sidecar in its own PID namespace.

At a few thousand spawns per second the pid counter wraps pid_max every few
seconds. Here a fresh PID namespace's counter (ns_last_pid, per namespace, so
the host is untouched) is set just below pid_max, and processes are started
across the wrap: every one must be seen, with its real command line, and
reused pids must not be confused.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson

SCRIPT = textwrap.dedent(
    """
    set -e
    {python} -m sidecar run --events-out {events} --process-source proc_poll 2>{log} &
    SIDECAR=$!
    i=0; while [ ! -s {events} ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
    sleep 0.5
    PID_MAX=$(cat /proc/sys/kernel/pid_max); echo "pid_max=$PID_MAX"
    echo $((PID_MAX - 40)) > /proc/sys/kernel/ns_last_pid
    for i in $(seq 1 80); do
        sh -c "sleep 0.05; : wrap-$i"
    done
    # pid reuse: the same pid twice, different processes
    echo 999 > /proc/sys/kernel/ns_last_pid; sh -c 'sleep 0.1; : reuse-a'
    echo 999 > /proc/sys/kernel/ns_last_pid; sh -c 'sleep 0.1; : reuse-b'
    sleep 0.5
    kill -TERM $SIDECAR
    wait $SIDECAR
    echo "sidecar-exit=$?"
    """
)


def test_every_process_across_a_pid_wrap_is_seen(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    log = tmp_path / "sidecar.log"
    script = SCRIPT.format(python=sys.executable, events=events, log=log)
    r = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount", "--propagation", "private", "--mount-proc", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr + log.read_text()
    assert "sidecar-exit=0" in r.stdout
    evs = [e for e in map(orjson.loads, events.read_bytes().splitlines()) if e["kind"].startswith("process.")]
    execs = [e for e in evs if e["kind"] == "process.exec"]
    by_marker: dict[str, dict[str, Any]] = {}
    for e in execs:
        cmd = e["process"]["commandLine"] or ""
        if cmd.startswith("sh -c sleep") and ": " in cmd:
            by_marker[cmd.rsplit(": ", 1)[1]] = e["process"]
    missing = [i for i in range(1, 81) if f"wrap-{i}" not in by_marker]
    assert not missing, f"not seen across the wrap: {missing}"
    # pid_max is per PID namespace on recent kernels: read the one the test used
    pid_max = int(r.stdout.split("pid_max=")[1].split()[0])
    pids = [by_marker[f"wrap-{i}"]["pid"] for i in range(1, 81)]
    assert max(pids) > pid_max - 41 and min(pids) < 1000, "the test did not wrap"
    # each wrapped shell's child sleep has that shell as parent (lineage across the wrap)
    sleeps = {e["process"]["parentUuid"] for e in execs if e["process"]["commandLine"] == "sleep 0.05"}
    assert {p["uuid"] for p in by_marker.values() if p["commandLine"].endswith("wrap-1")} <= sleeps | {None}
    near = [
        (e["kind"], e["process"]["pid"], e["process"]["commandLine"]) for e in evs if 995 < e["process"]["pid"] < 1005
    ]
    assert "reuse-a" in by_marker and "reuse-b" in by_marker, (near, log.read_text()[-1500:])
    a, b = by_marker["reuse-a"], by_marker["reuse-b"]
    assert a["pid"] == b["pid"] == 1000
    assert a["uuid"] != b["uuid"]
    exits = {e["process"]["uuid"] for e in evs if e["kind"] == "process.exit"}
    around = [
        (e["kind"], e["process"]["uuid"][:8], e["process"]["commandLine"]) for e in evs if e["process"]["pid"] == 1000
    ]
    assert {a["uuid"], b["uuid"]} <= exits, around
